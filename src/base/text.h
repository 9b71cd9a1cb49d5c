/* Small text helpers the parsers share: hex digits and percent-decoding
 * (grpc-message values, URL query parameters, UUIDs, JSON escapes). */
#ifndef PN_BASE_TEXT_H
#define PN_BASE_TEXT_H

#include <stdbool.h>
#include <stddef.h>

/* The value of a hex digit (either case), or -1. */
int pn_hex_digit(int c);

/* Decodes %XX escapes of in[0..len) into out (len + 1 bytes), and '+' as
 * a space when plus_space (URL query form); a malformed escape is kept
 * literally. Returns the output length; out is NUL-terminated. */
size_t pn_percent_decode(const char *in, size_t len, char *out, bool plus_space);

#endif
