/* UUIDs as the panels send them: API keys and session ids are parsed to 128
 * bits and compared in constant time, never as strings. */
#ifndef PN_BASE_UUID_H
#define PN_BASE_UUID_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PN_UUID_STRLEN 36

struct pn_uuid {
    uint8_t b[16];
};

/* Parses the forms Go's google/uuid accepts, case-insensitively: canonical
 * 8-4-4-4-12, 32 bare hex digits, `{canonical}` and `urn:uuid:canonical`.
 * Returns PN_OK or PN_ERR_INVAL. */
int pn_uuid_parse(const char *s, size_t len, struct pn_uuid *out);
/* Constant-time equality. */
bool pn_uuid_equal(const struct pn_uuid *a, const struct pn_uuid *b);
bool pn_uuid_is_nil(const struct pn_uuid *u);
/* Lower-case canonical form into out[PN_UUID_STRLEN + 1]. */
void pn_uuid_format(const struct pn_uuid *u, char *out);
/* A random (version 4) UUID from the OS CSPRNG. Returns PN_OK or PN_ERR_IO. */
int pn_uuid_random(struct pn_uuid *out);

#endif
