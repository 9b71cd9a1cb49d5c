/* jansson wrappers that abort on allocation failure (see json.h). */
#include "base/json.h"

#include <stdio.h>
#include <stdlib.h>

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
