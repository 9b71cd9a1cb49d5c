/* jansson under the node's OOM policy (alloc.h): jansson reports an
 * allocation failure (or invalid UTF-8, which callers rule out first) as
 * NULL or -1; these wrappers abort instead, so builders carry no untested
 * NULL paths. */
#ifndef PN_BASE_JSON_H
#define PN_BASE_JSON_H

#include <jansson.h>
#include <stddef.h>

struct pn_buf;

json_t *pn_json_nn(json_t *v);
/* Steal val. */
void pn_json_set(json_t *obj, const char *key, json_t *val);
void pn_json_append(json_t *arr, json_t *val);
void pn_json_insert(json_t *arr, size_t i, json_t *val);

/* Appends s (valid UTF-8) as a JSON string literal, byte for byte what
 * jansson's json_dumps prints for it: `"` and `\\` escaped, \b \f \n \r \t,
 * other control characters as \u00XX, everything else raw. For builders
 * that write large uniform parts as text instead of building a tree. */
void pn_json_quote(struct pn_buf *out, const char *s);

#endif
