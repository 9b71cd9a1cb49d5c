/* .env files: KEY=VALUE lines loaded into the process environment before the
 * configuration is read. The real environment wins over the file. */
#ifndef PN_BASE_ENV_H
#define PN_BASE_ENV_H

#include <stddef.h>

/* Loads path. Accepts blank lines, `# comments`, an optional `export `
 * prefix, values in single quotes (literal), double quotes (with \n, \t, \\,
 * \" escapes) or bare (trailing ` # comment` and surrounding blanks cut).
 * Variables already set in the environment are left alone. Returns PN_OK,
 * PN_ERR_NOTFOUND when the file does not exist, PN_ERR_IO, or PN_ERR_INVAL
 * with `<path>:<line>: <problem>` in err (nothing is set then). */
int pn_env_load_file(const char *path, char *err, size_t errlen);
/* getenv that treats an empty value as unset. */
const char *pn_env_get(const char *name);

#endif
