/* fuzz_proto_msgs: every request message of service.proto a panel can send
 * (Backend, StatRequest, User, Users, UsersChunk, LatencyRequest) unpacked
 * from peer bytes, and the users in them turned into node users the way the
 * PasarGuard API does (user_from_pb / userset_from_pb, reached by including
 * api/pasarguard.c), then put through the user set (lookups, clone,
 * equality, removal). A Backend also goes through the core config builder,
 * as Start does, with its own users and excluded inbounds.
 *
 * Input: opt[0] (bits 0-2: the message type, modulo 6; bit 3: v2ray 4.34
 * instead of Xray for the config build), then the message bytes. */
#include "../src/api/pasarguard.c"

#include "node/coreconf.h"

enum msg_type { T_BACKEND, T_STAT, T_USER, T_USERS, T_CHUNK, T_LATENCY, T_COUNT };

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_proto_msgs: %s\n", what);
    abort();
}

static void check_set(Service__User *const *pb, size_t n)
{
    struct pn_userset *set = userset_from_pb(pb, n);
    if (pn_userset_count(set) > n)
        fail("more users in the set than in the message");
    for (size_t i = 0; i < n; i++) {
        const char *email = pb[i]->email ? pb[i]->email : "";
        const struct pn_user *u = pn_userset_get(set, email);
        if (!u || strcmp(u->email, email) != 0)
            fail("a user of the message is not in the set");
        for (size_t j = 0; j < pb[i]->n_inbounds; j++)
            (void)pn_user_has_inbound(u, pb[i]->inbounds[j] ? pb[i]->inbounds[j] : "");
    }
    struct pn_userset *copy = pn_userset_clone(set);
    if (pn_userset_count(copy) != pn_userset_count(set))
        fail("clone changed the count");
    for (size_t i = 0; i < n; i += 2) {
        const char *email = pb[i]->email ? pb[i]->email : "";
        const struct pn_user *a = pn_userset_get(set, email), *b = pn_userset_get(copy, email);
        if (!a)
            fail("a user of the message left the set");
        if (!b)
            continue; /* a duplicate email, removed already */
        if (!pn_user_equal(a, b))
            fail("a cloned user differs");
        pn_userset_remove(copy, email);
        if (pn_userset_get(copy, email))
            fail("a removed user is still there");
    }
    pn_userset_free(copy);
    pn_userset_free(set);
}

static void one_user(const Service__User *m)
{
    struct pn_user *u = user_from_pb(m);
    struct pn_user *c = pn_user_clone(u);
    if (!pn_user_equal(u, c) || !pn_user_equal(c, u))
        fail("a user differs from its clone");
    for (size_t i = 0; i < m->n_inbounds; i++)
        if (!pn_user_has_inbound(u, m->inbounds[i] ? m->inbounds[i] : ""))
            fail("an inbound of the message is missing");
    pn_user_free(c);
    pn_user_free(u);
}

/* What Start does with a core: the config built from the panel's JSON, its
 * users and its excluded inbounds. */
static void build_config(const Service__Backend *m, bool v2ray)
{
    static const struct pn_core_version xray = {PN_CORE_XRAY, 25, 10, 15, "25.10.15"};
    static const struct pn_core_version v2 = {PN_CORE_V2RAY, 4, 34, 0, "4.34.0"};
    struct pn_userset *users = userset_from_pb(m->users, m->n_users);
    struct pn_coreconf_opts o = {
        .panel_json = m->config ? m->config : "",
        .panel_len = m->config ? strlen(m->config) : 0,
        .exclude = (const char *const *)m->exclude_inbounds,
        .nexclude = m->n_exclude_inbounds,
        .core = v2ray ? v2 : xray,
        .api_port = 10085,
        .metrics_port = v2ray ? 0 : 10086,
        .users = users,
    };
    struct pn_coreconf cc;
    char err[512];
    if (pn_coreconf_build(&o, &cc, err, sizeof err) == PN_OK)
        pn_coreconf_free(&cc);
    pn_userset_free(users);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool quiet;
    if (!quiet) {
        quiet = true;
        if (!getenv("FUZZ_VERBOSE"))
            pn_log_set_level(PN_LOG_ERROR);
    }
    if (size < 1)
        return 0;
    enum msg_type t = (enum msg_type)((data[0] & 7) % T_COUNT);
    bool v2ray = data[0] & 8;
    data++;
    size--;
    switch (t) {
    case T_BACKEND: {
        Service__Backend *m = service__backend__unpack(NULL, size, data);
        if (!m)
            break;
        check_set(m->users, m->n_users);
        build_config(m, v2ray);
        service__backend__free_unpacked(m, NULL);
        break;
    }
    case T_STAT: {
        Service__StatRequest *m = service__stat_request__unpack(NULL, size, data);
        if (!m)
            break;
        /* the pattern the stats handlers build from it */
        char *pattern = pn_asprintf("user>>>%s>>>", m->name ? m->name : "");
        free(pattern);
        service__stat_request__free_unpacked(m, NULL);
        break;
    }
    case T_USER: {
        Service__User *m = service__user__unpack(NULL, size, data);
        if (!m)
            break;
        one_user(m);
        service__user__free_unpacked(m, NULL);
        break;
    }
    case T_USERS: {
        Service__Users *m = service__users__unpack(NULL, size, data);
        if (!m)
            break;
        check_set(m->users, m->n_users);
        service__users__free_unpacked(m, NULL);
        break;
    }
    case T_CHUNK: {
        Service__UsersChunk *m = service__users_chunk__unpack(NULL, size, data);
        if (!m)
            break;
        struct chunkset cs = {0};
        chunkset_add(&cs, m);
        struct pn_user **users = NULL;
        size_t n = 0;
        char err[128];
        if (chunkset_join(&cs, &users, &n, err, sizeof err) == PN_OK) {
            if (n != m->n_users)
                fail("a joined chunk lost users");
            for (size_t i = 0; i < n; i++)
                pn_user_free(users[i]);
            free(users);
        }
        chunkset_free(&cs);
        service__users_chunk__free_unpacked(m, NULL);
        break;
    }
    case T_LATENCY: {
        Service__LatencyRequest *m = service__latency_request__unpack(NULL, size, data);
        if (!m)
            break;
        service__latency_request__free_unpacked(m, NULL);
        break;
    }
    case T_COUNT:
        break;
    }
    return 0;
}
