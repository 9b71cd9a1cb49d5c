/* UTF-8 validation for text that leaves the node in protobuf `string`
 * fields (core log lines): proto3 decoders on the panels reject invalid
 * UTF-8, so a stray byte from a core must not break a whole log stream. */
#ifndef PN_BASE_UTF8_H
#define PN_BASE_UTF8_H

#include <stdbool.h>
#include <stddef.h>

bool pn_utf8_valid(const char *s, size_t len);
/* Copies s into out, replacing every invalid sequence by U+FFFD. out must
 * hold 3 * len bytes. Returns the output length. */
size_t pn_utf8_sanitize(const char *s, size_t len, char *out);

#endif
