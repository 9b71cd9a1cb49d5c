/* jansson wrappers that abort on allocation failure (see json.h). */
#include "base/json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/buf.h"

json_t *pn_json_nn(json_t *v)
{
    if (!v) {
        fprintf(stderr, "proxynode: out of memory building JSON\n");
        abort();
    }
    return v;
}

void pn_json_set(json_t *obj, const char *key, json_t *val)
{
    if (json_object_set_new(obj, key, pn_json_nn(val)) != 0)
        pn_json_nn(NULL);
}

void pn_json_append(json_t *arr, json_t *val)
{
    if (json_array_append_new(arr, pn_json_nn(val)) != 0)
        pn_json_nn(NULL);
}

void pn_json_insert(json_t *arr, size_t i, json_t *val)
{
    if (json_array_insert_new(arr, i, pn_json_nn(val)) != 0)
        pn_json_nn(NULL);
}

void pn_json_quote(struct pn_buf *out, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    pn_buf_append(out, "\"", 1);
    const char *run = s; /* start of the bytes that need no escape */
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        pn_buf_append(out, run, (size_t)(s - run));
        run = s + 1;
        char esc[7] = {'\\', 0};
        size_t n = 2;
        switch (c) {
        case '"':
        case '\\':
            esc[1] = (char)c;
            break;
        case '\b':
            esc[1] = 'b';
            break;
        case '\f':
            esc[1] = 'f';
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        default:
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            n = 6;
        }
        pn_buf_append(out, esc, n);
    }
    pn_buf_append(out, run, (size_t)(s - run));
    pn_buf_append(out, "\"", 1);
}
