/* fuzz_chunks: the body of `PUT /users/sync/chunked` and of the buffered
 * SyncUsersChunked stream (pn_pasarguard_parse_chunks): uvarint-framed
 * UsersChunk messages, bucketed by index, joined in order. On success the
 * users must be there (n > 0, every email a string); on failure the outputs
 * must be untouched and the error text set. The whole input is the body. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/pasarguard.h"
#include "base/err.h"
#include "base/log.h"
#include "node/users.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static bool quiet;
    if (!quiet) {
        quiet = true;
        if (!getenv("FUZZ_VERBOSE"))
            pn_log_set_level(PN_LOG_ERROR);
    }
    struct pn_user **users = (struct pn_user **)&quiet; /* must stay untouched on errors */
    size_t n = 12345;
    char err[256] = "";
    int rv = pn_pasarguard_parse_chunks(size ? data : NULL, size, &users, &n, err, sizeof err);
    if (rv != PN_OK) {
        if (users != (struct pn_user **)&quiet || n != 12345 || !err[0]) {
            fprintf(stderr, "fuzz_chunks: a failed parse touched its outputs or said nothing\n");
            abort();
        }
        return 0;
    }
    if (n == 0 || !users) {
        fprintf(stderr, "fuzz_chunks: success without users\n");
        abort();
    }
    for (size_t i = 0; i < n; i++) {
        if (!users[i] || !users[i]->email)
            abort();
        pn_user_free(users[i]);
    }
    free(users);
    return 0;
}
