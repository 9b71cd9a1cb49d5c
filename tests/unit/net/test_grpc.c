/* gRPC framing helpers: the incremental decoder, the 5-byte prefix, the
 * grpc-timeout parser, grpc-message percent-encoding and the code→HTTP
 * table. The call machinery is exercised over real HTTP/2 in test_h2.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "base/err.h"
#include "net/grpc.h"

struct got {
    size_t n;
    size_t lens[16];
    char msgs[16][64];
};

static void collect(void *arg, const uint8_t *msg, size_t len)
{
    struct got *g = arg;
    assert_true(g->n < 16);
    assert_non_null(msg);
    g->lens[g->n] = len;
    memcpy(g->msgs[g->n], msg, len < 63 ? len : 63);
    g->msgs[g->n][len < 63 ? len : 63] = '\0';
    g->n++;
}

/* Builds prefix+payload for each string into out; returns the length. */
static size_t frame_all(uint8_t *out, const char *const *msgs, size_t n)
{
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(msgs[i]);
        pn_grpc_frame_header(out + off, len);
        memcpy(out + off + 5, msgs[i], len);
        off += 5 + len;
    }
    return off;
}

static void test_frame_header(void **state)
{
    (void)state;
    uint8_t h[5];
    pn_grpc_frame_header(h, 0);
    assert_memory_equal(h, "\0\0\0\0\0", 5);
    pn_grpc_frame_header(h, 0x01020304);
    const uint8_t want[5] = {0, 1, 2, 3, 4};
    assert_memory_equal(h, want, 5);
    pn_grpc_frame_header(h, 67108864);
    const uint8_t want64[5] = {0, 0x04, 0, 0, 0};
    assert_memory_equal(h, want64, 5);
}

static void test_decoder_byte_at_a_time(void **state)
{
    (void)state;
    static const char *const msgs[] = {"hello", "", "world!", "x"};
    uint8_t wire[128];
    size_t n = frame_all(wire, msgs, 4);
    struct pn_grpc_decoder d;
    pn_grpc_decoder_init(&d, 1024);
    struct got g = {0};
    uint64_t big = 0;
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(pn_grpc_decoder_feed(&d, wire + i, 1, collect, &g, &big), PN_OK);
        if (i + 1 < n && g.n < 4)
            assert_true(pn_grpc_decoder_idle(&d) == (i + 1 == 10 || i + 1 == 15 || i + 1 == 26));
    }
    assert_true(pn_grpc_decoder_idle(&d));
    assert_int_equal(g.n, 4);
    assert_string_equal(g.msgs[0], "hello");
    assert_int_equal(g.lens[1], 0);
    assert_string_equal(g.msgs[2], "world!");
    assert_string_equal(g.msgs[3], "x");
    pn_grpc_decoder_free(&d);
}

/* Every split of the same stream into two feeds gives the same messages. */
static void test_decoder_every_split(void **state)
{
    (void)state;
    static const char *const msgs[] = {"alpha", "beta", "", "gamma-delta"};
    uint8_t wire[128];
    size_t n = frame_all(wire, msgs, 4);
    for (size_t cut = 0; cut <= n; cut++) {
        struct pn_grpc_decoder d;
        pn_grpc_decoder_init(&d, 64);
        struct got g = {0};
        assert_int_equal(pn_grpc_decoder_feed(&d, wire, cut, collect, &g, NULL), PN_OK);
        assert_int_equal(pn_grpc_decoder_feed(&d, wire + cut, n - cut, collect, &g, NULL), PN_OK);
        assert_int_equal(g.n, 4);
        assert_string_equal(g.msgs[0], "alpha");
        assert_string_equal(g.msgs[1], "beta");
        assert_int_equal(g.lens[2], 0);
        assert_string_equal(g.msgs[3], "gamma-delta");
        assert_true(pn_grpc_decoder_idle(&d));
        pn_grpc_decoder_free(&d);
    }
}

static void test_decoder_several_in_one_feed(void **state)
{
    (void)state;
    static const char *const msgs[] = {"a", "bb", "ccc"};
    uint8_t wire[64];
    size_t n = frame_all(wire, msgs, 3);
    struct pn_grpc_decoder d;
    pn_grpc_decoder_init(&d, 16);
    struct got g = {0};
    assert_int_equal(pn_grpc_decoder_feed(&d, wire, n, collect, &g, NULL), PN_OK);
    assert_int_equal(g.n, 3);
    assert_string_equal(g.msgs[2], "ccc");
    pn_grpc_decoder_free(&d);
}

static void test_decoder_empty_message(void **state)
{
    (void)state;
    const uint8_t wire[5] = {0, 0, 0, 0, 0};
    struct pn_grpc_decoder d;
    pn_grpc_decoder_init(&d, 16);
    struct got g = {0};
    assert_int_equal(pn_grpc_decoder_feed(&d, wire, 5, collect, &g, NULL), PN_OK);
    assert_int_equal(g.n, 1);
    assert_int_equal(g.lens[0], 0);
    assert_true(pn_grpc_decoder_idle(&d));
    pn_grpc_decoder_free(&d);
}

struct big_ctx {
    size_t *seen;
    size_t len;
};

static void check(void *arg, const uint8_t *msg, size_t mlen)
{
    struct big_ctx *cx = arg;
    assert_int_equal(mlen, cx->len);
    for (size_t i = 0; i < mlen; i++)
        if (msg[i] != (uint8_t)(i * 7))
            fail_msg("byte %zu differs", i);
    (*cx->seen)++;
}

/* A message bigger than the buffer's growth steps is reassembled whole. */
static void test_decoder_large_message(void **state)
{
    (void)state;
    size_t len = 300000;
    uint8_t *wire = malloc(len + 5);
    pn_grpc_frame_header(wire, len);
    for (size_t i = 0; i < len; i++)
        wire[5 + i] = (uint8_t)(i * 7);
    struct pn_grpc_decoder d;
    pn_grpc_decoder_init(&d, 1 << 20);
    size_t seen = 0;
    struct big_ctx cx = {&seen, len};
    for (size_t off = 0; off < len + 5; off += 1000) {
        size_t n = len + 5 - off < 1000 ? len + 5 - off : 1000;
        assert_int_equal(pn_grpc_decoder_feed(&d, wire + off, n, check, &cx, NULL), PN_OK);
    }
    assert_int_equal(seen, 1);
    pn_grpc_decoder_free(&d);
    free(wire);
}

static void test_decoder_too_big(void **state)
{
    (void)state;
    struct pn_grpc_decoder d;
    pn_grpc_decoder_init(&d, 67108864);
    uint8_t h[5];
    pn_grpc_frame_header(h, 67108865);
    struct got g = {0};
    uint64_t big = 0;
    /* the size is known as soon as the prefix is complete, split or not */
    assert_int_equal(pn_grpc_decoder_feed(&d, h, 3, collect, &g, &big), PN_OK);
    assert_int_equal(pn_grpc_decoder_feed(&d, h + 3, 2, collect, &g, &big), PN_ERR_TOOBIG);
    assert_int_equal(big, 67108865);
    assert_int_equal(g.n, 0);
    pn_grpc_decoder_free(&d);

    /* exactly the maximum is fine */
    pn_grpc_decoder_init(&d, 10);
    uint8_t wire[15];
    pn_grpc_frame_header(wire, 10);
    memset(wire + 5, 'z', 10);
    assert_int_equal(pn_grpc_decoder_feed(&d, wire, 15, collect, &g, &big), PN_OK);
    assert_int_equal(g.n, 1);
    pn_grpc_frame_header(wire, 11);
    big = 0;
    assert_int_equal(pn_grpc_decoder_feed(&d, wire, 5, collect, &g, &big), PN_ERR_TOOBIG);
    assert_int_equal(big, 11);
    pn_grpc_decoder_free(&d);

    /* the largest declarable length */
    pn_grpc_decoder_init(&d, 67108864);
    const uint8_t huge[5] = {0, 0xff, 0xff, 0xff, 0xff};
    assert_int_equal(pn_grpc_decoder_feed(&d, huge, 5, collect, &g, &big), PN_ERR_TOOBIG);
    assert_int_equal(big, 4294967295u);
    pn_grpc_decoder_free(&d);
}

static void test_decoder_compressed_rejected(void **state)
{
    (void)state;
    const uint8_t wire[8] = {1, 0, 0, 0, 3, 'a', 'b', 'c'};
    struct pn_grpc_decoder d;
    pn_grpc_decoder_init(&d, 64);
    struct got g = {0};
    assert_int_equal(pn_grpc_decoder_feed(&d, wire, 8, collect, &g, NULL), PN_ERR_PROTO);
    assert_int_equal(g.n, 0);
    pn_grpc_decoder_free(&d);

    /* a good message, then a compressed one in the same feed */
    uint8_t two[16] = {0, 0, 0, 0, 2, 'o', 'k', 1, 0, 0, 0, 1, 'x'};
    pn_grpc_decoder_init(&d, 64);
    assert_int_equal(pn_grpc_decoder_feed(&d, two, 13, collect, &g, NULL), PN_ERR_PROTO);
    assert_int_equal(g.n, 1);
    assert_string_equal(g.msgs[0], "ok");
    pn_grpc_decoder_free(&d);
}

/* Freeing a decoder holding half a message releases it (ASan checks). */
static void test_decoder_free_partial(void **state)
{
    (void)state;
    uint8_t wire[5 + 10000];
    pn_grpc_frame_header(wire, 20000);
    memset(wire + 5, 1, 10000);
    struct pn_grpc_decoder d;
    pn_grpc_decoder_init(&d, 1 << 20);
    struct got g = {0};
    assert_int_equal(pn_grpc_decoder_feed(&d, wire, sizeof wire, collect, &g, NULL), PN_OK);
    assert_false(pn_grpc_decoder_idle(&d));
    pn_grpc_decoder_free(&d);
}

static void test_parse_timeout(void **state)
{
    (void)state;
    uint64_t ms = 0;
    assert_true(pn_grpc_parse_timeout("2H", &ms));
    assert_int_equal(ms, 7200000);
    assert_true(pn_grpc_parse_timeout("3M", &ms));
    assert_int_equal(ms, 180000);
    assert_true(pn_grpc_parse_timeout("5S", &ms));
    assert_int_equal(ms, 5000);
    assert_true(pn_grpc_parse_timeout("100m", &ms));
    assert_int_equal(ms, 100);
    assert_true(pn_grpc_parse_timeout("2500u", &ms));
    assert_int_equal(ms, 3); /* rounded up */
    assert_true(pn_grpc_parse_timeout("1000u", &ms));
    assert_int_equal(ms, 1);
    assert_true(pn_grpc_parse_timeout("1n", &ms));
    assert_int_equal(ms, 1);
    assert_true(pn_grpc_parse_timeout("7000000n", &ms));
    assert_int_equal(ms, 7);
    assert_true(pn_grpc_parse_timeout("0m", &ms));
    assert_int_equal(ms, 0);
    assert_true(pn_grpc_parse_timeout("99999999S", &ms)); /* 8 digits is the maximum */
    assert_int_equal(ms, 99999999000ULL);

    ms = 42;
    assert_false(pn_grpc_parse_timeout("", &ms));
    assert_false(pn_grpc_parse_timeout("S", &ms));
    assert_false(pn_grpc_parse_timeout("5", &ms));
    assert_false(pn_grpc_parse_timeout("5s", &ms));
    assert_false(pn_grpc_parse_timeout("5X", &ms));
    assert_false(pn_grpc_parse_timeout("-5S", &ms));
    assert_false(pn_grpc_parse_timeout(" 5S", &ms));
    assert_false(pn_grpc_parse_timeout("5 S", &ms));
    assert_false(pn_grpc_parse_timeout("1.5S", &ms));
    assert_false(pn_grpc_parse_timeout("123456789S", &ms)); /* 9 digits */
    assert_false(pn_grpc_parse_timeout(NULL, &ms));
    assert_int_equal(ms, 42);
}

static void test_encode_message(void **state)
{
    (void)state;
    char *s = pn_grpc_encode_message("plain text ~!");
    assert_string_equal(s, "plain text ~!");
    free(s);
    s = pn_grpc_encode_message("100% done\nnext\ttab");
    assert_string_equal(s, "100%25 done%0Anext%09tab");
    free(s);
    s = pn_grpc_encode_message("caf\xc3\xa9 \x7f");
    assert_string_equal(s, "caf%C3%A9 %7F");
    free(s);
    s = pn_grpc_encode_message("");
    assert_string_equal(s, "");
    free(s);
}

static void test_code_to_http(void **state)
{
    (void)state;
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_OK), 200);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_CANCELLED), 499);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_UNKNOWN), 500);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_INVALID_ARGUMENT), 400);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_DEADLINE_EXCEEDED), 504);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_NOT_FOUND), 404);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_ALREADY_EXISTS), 409);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_PERMISSION_DENIED), 403);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_RESOURCE_EXHAUSTED), 429);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_FAILED_PRECONDITION), 412);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_ABORTED), 409);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_OUT_OF_RANGE), 400);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_UNIMPLEMENTED), 501);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_INTERNAL), 500);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_UNAVAILABLE), 503);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_DATA_LOSS), 500);
    assert_int_equal(pn_grpc_code_to_http(PN_GRPC_UNAUTHENTICATED), 401);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_frame_header),
        cmocka_unit_test(test_decoder_byte_at_a_time),
        cmocka_unit_test(test_decoder_every_split),
        cmocka_unit_test(test_decoder_several_in_one_feed),
        cmocka_unit_test(test_decoder_empty_message),
        cmocka_unit_test(test_decoder_large_message),
        cmocka_unit_test(test_decoder_too_big),
        cmocka_unit_test(test_decoder_compressed_rejected),
        cmocka_unit_test(test_decoder_free_partial),
        cmocka_unit_test(test_parse_timeout),
        cmocka_unit_test(test_encode_message),
        cmocka_unit_test(test_code_to_http),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
