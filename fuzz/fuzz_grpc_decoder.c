/* fuzz_grpc_decoder: the length-prefixed gRPC message stream
 * (pn_grpc_decoder_feed) fed in pieces the input chooses, checked against
 * the same stream fed in one piece: both must yield the same messages, in
 * order, and the same result. Also the two small parsers of peer header
 * values in net/grpc.c: grpc-timeout and the grpc-message encoder.
 *
 * Input: opt[0] (bits 0-1: the size limit: 0, 16, 1000 or 64 MiB; bits 2-4:
 * how many split points follow, 0-7), the split points (2 bytes each, as
 * offsets modulo the stream length), then the stream. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/buf.h"
#include "base/err.h"
#include "net/grpc.h"

struct seen {
    struct pn_buf log; /* each message as its 8-byte length, then its bytes */
    size_t count;
    size_t max;
};

static void on_msg(void *arg, const uint8_t *msg, size_t len)
{
    struct seen *s = arg;
    if (len > s->max) {
        fprintf(stderr, "fuzz_grpc_decoder: message of %zu bytes passed the %zu limit\n", len,
                s->max);
        abort();
    }
    uint64_t l = len;
    pn_buf_append(&s->log, &l, sizeof l);
    pn_buf_append(&s->log, msg, len);
    s->count++;
}

static int cmp_size(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

/* Feeds [0, len) cut at the given offsets; stops at the first error, as the
 * gRPC layer does. */
static int feed(const uint8_t *p, size_t len, const size_t *cuts, size_t ncuts, size_t max,
                struct seen *s, uint64_t *too_big)
{
    struct pn_grpc_decoder d;
    pn_grpc_decoder_init(&d, max);
    pn_buf_init(&s->log, 0);
    s->count = 0;
    s->max = max;
    int rv = PN_OK;
    size_t at = 0;
    for (size_t i = 0; i <= ncuts && rv == PN_OK; i++) {
        size_t end = i < ncuts ? cuts[i] : len;
        rv = pn_grpc_decoder_feed(&d, p + at, end - at, on_msg, s, too_big);
        at = end;
    }
    pn_grpc_decoder_free(&d);
    return rv;
}

static void header_values(const uint8_t *p, size_t len)
{
    char v[16];
    size_t n = len < sizeof v - 1 ? len : sizeof v - 1;
    memcpy(v, p, n);
    v[n] = '\0';
    uint64_t ms;
    pn_grpc_parse_timeout(v, &ms);
    char text[64];
    n = len < sizeof text - 1 ? len : sizeof text - 1;
    memcpy(text, p, n);
    text[n] = '\0';
    char *enc = pn_grpc_encode_message(text);
    for (const char *c = enc; *c; c++) {
        if (*c < 0x20 || *c > 0x7e) {
            fprintf(stderr, "fuzz_grpc_decoder: grpc-message not encoded: %s\n", enc);
            abort();
        }
    }
    free(enc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t maxes[4] = {0, 16, 1000, (size_t)64 << 20};
    if (size < 1)
        return 0;
    uint8_t opt = data[0];
    size_t max = maxes[opt & 3];
    size_t ncuts = (opt >> 2) & 7;
    size_t off = 1;
    if (size < off + 2 * ncuts)
        return 0;
    const uint8_t *stream = data + off + 2 * ncuts;
    size_t len = size - off - 2 * ncuts;
    size_t cuts[7];
    for (size_t i = 0; i < ncuts; i++) {
        size_t c = (size_t)data[off + 2 * i] << 8 | data[off + 2 * i + 1];
        cuts[i] = len ? c % (len + 1) : 0;
    }
    qsort(cuts, ncuts, sizeof cuts[0], cmp_size);

    struct seen whole, split;
    uint64_t big1 = 0, big2 = 0;
    int rv1 = feed(stream, len, NULL, 0, max, &whole, &big1);
    int rv2 = feed(stream, len, cuts, ncuts, max, &split, &big2);
    if (rv1 != rv2 || big1 != big2 || whole.count != split.count ||
        whole.log.len != split.log.len ||
        (whole.log.len && memcmp(whole.log.data, split.log.data, whole.log.len) != 0)) {
        fprintf(stderr, "fuzz_grpc_decoder: split feed differs: rv %d/%d, %zu/%zu messages\n", rv1,
                rv2, whole.count, split.count);
        abort();
    }
    pn_buf_free(&whole.log);
    pn_buf_free(&split.log);
    header_values(stream, len);
    return 0;
}
