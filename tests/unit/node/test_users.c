/* The user set: put/get/remove/replace, many users with removals checked
 * against a plain array, equality rules (every account field, presence,
 * the inbound set without regard to order), cloning and foreach. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/alloc.h"
#include "node/users.h"

static struct pn_user *mk(const char *email, const char *vless_id)
{
    struct pn_user *u = pn_user_new(email);
    if (vless_id) {
        u->has_vless = true;
        u->vless_id = pn_strdup(vless_id);
        u->vless_flow = pn_strdup("");
    }
    return u;
}

static void test_put_get_remove_replace(void **state)
{
    (void)state;
    struct pn_userset *s = pn_userset_new();
    assert_int_equal(pn_userset_count(s), 0);
    assert_null(pn_userset_get(s, "a"));
    assert_false(pn_userset_remove(s, "a"));

    pn_userset_put(s, mk("a", "id-a"));
    pn_userset_put(s, mk("b", "id-b"));
    assert_int_equal(pn_userset_count(s), 2);
    assert_string_equal(pn_userset_get(s, "a")->vless_id, "id-a");
    assert_string_equal(pn_userset_get(s, "b")->vless_id, "id-b");
    /* keys are exact bytes */
    assert_null(pn_userset_get(s, "A"));
    assert_null(pn_userset_get(s, "a "));

    /* replace frees the old user (ASan would see a leak otherwise) */
    pn_userset_put(s, mk("a", "id-a2"));
    assert_int_equal(pn_userset_count(s), 2);
    assert_string_equal(pn_userset_get(s, "a")->vless_id, "id-a2");

    assert_true(pn_userset_remove(s, "a"));
    assert_false(pn_userset_remove(s, "a"));
    assert_null(pn_userset_get(s, "a"));
    assert_non_null(pn_userset_get(s, "b"));
    assert_int_equal(pn_userset_count(s), 1);

    /* the empty email is a key like any other */
    pn_userset_put(s, mk("", NULL));
    assert_non_null(pn_userset_get(s, ""));
    assert_int_equal(pn_userset_count(s), 2);
    pn_userset_free(s);
}

static void count_cb(const struct pn_user *u, void *arg)
{
    (void)u;
    (*(size_t *)arg)++;
}

/* 100k users in, every third removed, the rest still found; timings are
 * printed, not asserted. */
static void test_many(void **state)
{
    (void)state;
    enum { N = 100000 };
    char email[32];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    struct pn_userset *s = pn_userset_new();
    for (int i = 0; i < N; i++) {
        snprintf(email, sizeof email, "%d", i);
        struct pn_user *u = mk(email, NULL);
        pn_user_add_inbound(u, "VLESS");
        pn_userset_put(s, u);
    }
    assert_int_equal(pn_userset_count(s), N);
    for (int i = 0; i < N; i += 3) {
        snprintf(email, sizeof email, "%d", i);
        assert_true(pn_userset_remove(s, email));
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    for (int i = 0; i < N; i++) {
        snprintf(email, sizeof email, "%d", i);
        const struct pn_user *u = pn_userset_get(s, email);
        if (i % 3 == 0) {
            assert_null(u);
        } else {
            assert_non_null(u);
            assert_string_equal(u->email, email);
        }
    }
    size_t seen = 0;
    pn_userset_foreach(s, count_cb, &seen);
    assert_int_equal(seen, pn_userset_count(s));
    assert_int_equal(seen, N - (N + 2) / 3);
    printf("# 100k puts + 33k removes: %.1f ms\n",
           (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6);
    pn_userset_free(s);
}

/* Random puts and removes against a reference array, exercising the
 * backward-shift deletion across wrap-around and growth. */
static void test_random_ops(void **state)
{
    (void)state;
    enum { KEYS = 2000, OPS = 50000 };
    bool present[KEYS] = {false};
    struct pn_userset *s = pn_userset_new();
    srand(12345);
    char email[32];
    for (int op = 0; op < OPS; op++) {
        int k = rand() % KEYS;
        snprintf(email, sizeof email, "user-%d@x", k);
        if (rand() % 2) {
            pn_userset_put(s, mk(email, NULL));
            present[k] = true;
        } else {
            assert_int_equal(pn_userset_remove(s, email), present[k]);
            present[k] = false;
        }
    }
    size_t want = 0;
    for (int k = 0; k < KEYS; k++) {
        snprintf(email, sizeof email, "user-%d@x", k);
        assert_int_equal(pn_userset_get(s, email) != NULL, present[k]);
        want += present[k];
    }
    assert_int_equal(pn_userset_count(s), want);
    pn_userset_free(s);
}

static struct pn_user *full_user(void)
{
    struct pn_user *u = pn_user_new("7.alice");
    u->has_vmess = u->has_vless = u->has_trojan = u->has_ss = u->has_hysteria = true;
    u->vmess_id = pn_strdup("11111111-1111-1111-1111-111111111111");
    u->vless_id = pn_strdup("22222222-2222-2222-2222-222222222222");
    u->vless_flow = pn_strdup("xtls-rprx-vision");
    u->trojan_password = pn_strdup("tp");
    u->ss_password = pn_strdup("sp");
    u->ss_method = pn_strdup("aes-256-gcm");
    u->hysteria_auth = pn_strdup("ha");
    pn_user_add_inbound(u, "A");
    pn_user_add_inbound(u, "B");
    pn_user_add_inbound(u, "C");
    return u;
}

static void replace_str(char **field, const char *v)
{
    free(*field);
    *field = v ? pn_strdup(v) : NULL;
}

static void test_equal(void **state)
{
    (void)state;
    struct pn_user *a = full_user();
    struct pn_user *b = full_user();
    assert_true(pn_user_equal(a, b));

    /* each field matters */
    char **fields_b[] = {&b->vmess_id,    &b->vless_id,  &b->vless_flow,   &b->trojan_password,
                         &b->ss_password, &b->ss_method, &b->hysteria_auth};
    for (size_t i = 0; i < sizeof fields_b / sizeof fields_b[0]; i++) {
        char *saved = pn_strdup(*fields_b[i]);
        replace_str(fields_b[i], "changed");
        assert_false(pn_user_equal(a, b));
        replace_str(fields_b[i], saved);
        free(saved);
        assert_true(pn_user_equal(a, b));
    }
    bool *flags_b[] = {&b->has_vmess, &b->has_vless, &b->has_trojan, &b->has_ss, &b->has_hysteria};
    for (size_t i = 0; i < sizeof flags_b / sizeof flags_b[0]; i++) {
        *flags_b[i] = false;
        assert_false(pn_user_equal(a, b));
        *flags_b[i] = true;
    }
    assert_true(pn_user_equal(a, b));

    /* an absent string equals an empty one: presence is in the flags */
    replace_str(&a->trojan_password, "");
    replace_str(&b->trojan_password, NULL);
    assert_true(pn_user_equal(a, b));

    /* email */
    struct pn_user *c = pn_user_clone(a);
    replace_str(&c->email, "7.alicE");
    assert_false(pn_user_equal(a, c));
    pn_user_free(c);

    /* inbound set, order-insensitive */
    struct pn_user *d = pn_user_clone(a);
    pn_user_clear_inbounds(d);
    assert_int_equal(d->ninbounds, 0);
    pn_user_add_inbound(d, "C");
    pn_user_add_inbound(d, "A");
    pn_user_add_inbound(d, "B");
    assert_true(pn_user_equal(a, d));
    pn_user_add_inbound(d, "D");
    assert_false(pn_user_equal(a, d));
    assert_false(pn_user_equal(d, a));
    pn_user_free(d);

    /* large inbound lists take the sorting path */
    struct pn_user *e = pn_user_new("e"), *f = pn_user_new("e");
    char tag[16];
    for (int i = 0; i < 40; i++) {
        snprintf(tag, sizeof tag, "t%d", i);
        pn_user_add_inbound(e, tag);
        snprintf(tag, sizeof tag, "t%d", 39 - i);
        pn_user_add_inbound(f, tag);
    }
    assert_true(pn_user_equal(e, f));
    struct pn_user *g = pn_user_new("e");
    for (int i = 0; i < 40; i++) {
        snprintf(tag, sizeof tag, "t%d", i);
        pn_user_add_inbound(g, i == 5 ? "other" : tag);
    }
    assert_false(pn_user_equal(e, g));
    /* tags are shared: equal text, one copy */
    assert_ptr_equal(e->inbounds[0], f->inbounds[39]);
    pn_user_free(e);
    pn_user_free(f);
    pn_user_free(g);

    pn_user_free(a);
    pn_user_free(b);
}

static void test_inbounds(void **state)
{
    (void)state;
    struct pn_user *u = pn_user_new("x");
    assert_false(pn_user_has_inbound(u, "A"));
    char tag[16];
    for (int i = 0; i < 100; i++) {
        snprintf(tag, sizeof tag, "in-%d", i);
        pn_user_add_inbound(u, tag);
    }
    pn_user_add_inbound(u, "in-5"); /* a set: no duplicate */
    assert_int_equal(u->ninbounds, 100);
    assert_true(pn_user_has_inbound(u, "in-99"));
    assert_false(pn_user_has_inbound(u, "in-100"));
    assert_string_equal(u->inbounds[42], "in-42");
    pn_user_free(u);
    pn_user_free(NULL);
}

static void test_clone(void **state)
{
    (void)state;
    struct pn_user *a = full_user();
    struct pn_user *c = pn_user_clone(a);
    assert_true(pn_user_equal(a, c));
    assert_ptr_not_equal(a->vmess_id, c->vmess_id);
    assert_ptr_equal(a->inbounds[0], c->inbounds[0]); /* interned, counted */
    pn_user_free(a); /* the clone stands alone */
    assert_string_equal(c->vless_flow, "xtls-rprx-vision");
    assert_string_equal(c->inbounds[2], "C");

    struct pn_userset *s = pn_userset_new();
    pn_userset_put(s, c);
    char email[16];
    for (int i = 0; i < 1000; i++) {
        snprintf(email, sizeof email, "u%d", i);
        pn_userset_put(s, mk(email, "id"));
    }
    struct pn_userset *s2 = pn_userset_clone(s);
    assert_int_equal(pn_userset_count(s2), 1001);
    assert_true(pn_user_equal(pn_userset_get(s, "7.alice"), pn_userset_get(s2, "7.alice")));
    assert_ptr_not_equal(pn_userset_get(s, "u7"), pn_userset_get(s2, "u7"));
    pn_userset_remove(s, "u7");
    assert_non_null(pn_userset_get(s2, "u7"));
    pn_userset_put(s2, mk("new", NULL));
    assert_null(pn_userset_get(s, "new"));
    pn_userset_free(s);
    assert_int_equal(pn_userset_count(s2), 1002);
    pn_userset_free(s2);
    pn_userset_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_put_get_remove_replace),
        cmocka_unit_test(test_many),
        cmocka_unit_test(test_random_ops),
        cmocka_unit_test(test_equal),
        cmocka_unit_test(test_inbounds),
        cmocka_unit_test(test_clone),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
