/* .env loading (see env.h). This module owns the parse of a `.env` file into
 * a list of (name, value) pairs and the one step that copies them into the
 * process environment. The whole file is parsed before anything is set, so a
 * file with one bad line changes nothing. Variables that already have a
 * non-empty value in the environment win over the file; an empty one counts
 * as unset, the same rule pn_env_get applies when the configuration is read. */
#include "base/env.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/alloc.h"
#include "base/err.h"

#define ENV_MAX_FILE (1024 * 1024)

struct env_pair {
    char *name;
    char *value;
};

struct env_list {
    struct env_pair *v;
    size_t n, cap;
};

const char *pn_env_get(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

static void env_list_free(struct env_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].name);
        free(l->v[i].value);
    }
    free(l->v);
    l->v = NULL;
    l->n = l->cap = 0;
}

/* Takes ownership of name and value. */
static void env_list_add(struct env_list *l, char *name, char *value)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 16;
        l->v = pn_realloc(l->v, l->cap * sizeof *l->v);
    }
    l->v[l->n].name = name;
    l->v[l->n].value = value;
    l->n++;
}

static bool is_blank(char c)
{
    return c == ' ' || c == '\t';
}

static bool is_name_start(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
}

static bool is_name_char(char c)
{
    return is_name_start(c) || (c >= '0' && c <= '9');
}

static bool valid_name(const char *s, size_t n)
{
    if (n == 0 || !is_name_start(s[0]))
        return false;
    for (size_t i = 1; i < n; i++)
        if (!is_name_char(s[i]))
            return false;
    return true;
}

/* After a closing quote only blanks and a `# comment` may follow. */
static bool only_comment_left(const char *p, const char *end)
{
    while (p < end && is_blank(*p))
        p++;
    return p == end || *p == '#';
}

/* Parses the value part of one line, [p, end), into a new string. Returns
 * NULL with a problem in *why when the value is malformed. */
static char *parse_value(const char *p, const char *end, const char **why)
{
    while (p < end && is_blank(*p))
        p++;
    if (p < end && *p == '\'') {
        const char *q = memchr(p + 1, '\'', (size_t)(end - p - 1));
        if (!q) {
            *why = "unterminated single quote";
            return NULL;
        }
        if (!only_comment_left(q + 1, end)) {
            *why = "unexpected text after the closing quote";
            return NULL;
        }
        return pn_strndup(p + 1, (size_t)(q - p - 1));
    }
    if (p < end && *p == '"') {
        char *out = pn_malloc((size_t)(end - p));
        size_t n = 0;
        for (p++; p < end; p++) {
            if (*p == '"')
                break;
            if (*p == '\\' && p + 1 < end) {
                p++;
                switch (*p) {
                case 'n':
                    out[n++] = '\n';
                    break;
                case 't':
                    out[n++] = '\t';
                    break;
                case '\\':
                    out[n++] = '\\';
                    break;
                case '"':
                    out[n++] = '"';
                    break;
                default:
                    /* Unknown escapes stay as written. */
                    out[n++] = '\\';
                    out[n++] = *p;
                    break;
                }
                continue;
            }
            out[n++] = *p;
        }
        if (p >= end) {
            free(out);
            *why = "unterminated double quote";
            return NULL;
        }
        if (!only_comment_left(p + 1, end)) {
            free(out);
            *why = "unexpected text after the closing quote";
            return NULL;
        }
        out[n] = '\0';
        return out;
    }
    /* Bare value: a '#' after a blank starts a comment; blanks around are cut. */
    const char *stop = end;
    for (const char *q = p; q < end; q++) {
        if (*q == '#' && q > p && is_blank(q[-1])) {
            stop = q;
            break;
        }
    }
    while (stop > p && is_blank(stop[-1]))
        stop--;
    return pn_strndup(p, (size_t)(stop - p));
}

/* Parses the whole text into out. Returns PN_OK or PN_ERR_INVAL with
 * `<path>:<line>: <problem>` in err. */
static int parse_text(const char *path, const char *text, size_t len, struct env_list *out,
                      char *err, size_t errlen)
{
    const char *p = text, *end = text + len;
    const char *nul = memchr(text, '\0', len);
    if (nul) {
        unsigned line = 1;
        for (const char *q = text; q < nul; q++)
            line += *q == '\n';
        return pn_seterr(err, errlen, PN_ERR_INVAL, "%s:%u: NUL byte in line", path, line);
    }
    for (unsigned line = 1; p < end; line++) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *next = eol ? eol + 1 : end;
        if (!eol)
            eol = end;
        if (eol > p && eol[-1] == '\r')
            eol--;

        const char *s = p;
        p = next;
        while (s < eol && is_blank(*s))
            s++;
        if (s == eol || *s == '#')
            continue;
        if (eol - s > 7 && memcmp(s, "export", 6) == 0 && is_blank(s[6])) {
            s += 7;
            while (s < eol && is_blank(*s))
                s++;
        }
        const char *eq = memchr(s, '=', (size_t)(eol - s));
        if (!eq)
            return pn_seterr(err, errlen, PN_ERR_INVAL, "%s:%u: missing '=' (expected NAME=value)",
                             path, line);
        const char *ne = eq;
        while (ne > s && is_blank(ne[-1]))
            ne--;
        if (!valid_name(s, (size_t)(ne - s))) {
            int shown = (int)(ne - s) > 64 ? 64 : (int)(ne - s);
            return pn_seterr(err, errlen, PN_ERR_INVAL,
                             "%s:%u: bad variable name \"%.*s\" (letters, digits and '_', "
                             "not starting with a digit)",
                             path, line, shown, s);
        }
        const char *why = NULL;
        char *value = parse_value(eq + 1, eol, &why);
        if (!value)
            return pn_seterr(err, errlen, PN_ERR_INVAL, "%s:%u: %s", path, line, why);
        env_list_add(out, pn_strndup(s, (size_t)(ne - s)), value);
    }
    return PN_OK;
}

/* Reads the whole file, refusing more than ENV_MAX_FILE bytes. */
static int read_file(const char *path, char **out, size_t *outlen, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return pn_seterr(err, errlen, e == ENOENT ? PN_ERR_NOTFOUND : PN_ERR_IO, "%s: %s", path,
                         strerror(e));
    }
    int rv = PN_OK;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", path, strerror(errno));
        goto out_fd;
    }
    if (!S_ISREG(st.st_mode)) {
        rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: not a regular file", path);
        goto out_fd;
    }
    char *buf = pn_malloc(ENV_MAX_FILE + 1);
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, buf + n, ENV_MAX_FILE + 1 - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: %s", path, strerror(errno));
            goto out_buf;
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n > ENV_MAX_FILE) {
            rv = pn_seterr(err, errlen, PN_ERR_INVAL, "%s: larger than 1 MiB", path);
            goto out_buf;
        }
    }
    buf[n] = '\0';
    *out = buf;
    *outlen = n;
    close(fd);
    return PN_OK;

out_buf:
    free(buf);
out_fd:
    close(fd);
    return rv;
}

int pn_env_load_file(const char *path, char *err, size_t errlen)
{
    char *text = NULL;
    size_t len = 0;
    int rv = read_file(path, &text, &len, err, errlen);
    if (rv < 0)
        return rv;

    struct env_list list = {0};
    bool *keep = NULL;
    rv = parse_text(path, text, len, &list, err, errlen);
    if (rv < 0)
        goto out;

    /* Decide against the environment as it was before this file, so a name
     * repeated in the file takes its last value and never beats the real
     * environment. */
    keep = pn_calloc(list.n, sizeof *keep);
    for (size_t i = 0; i < list.n; i++)
        keep[i] = pn_env_get(list.v[i].name) == NULL;
    for (size_t i = 0; i < list.n; i++) {
        if (keep[i] && setenv(list.v[i].name, list.v[i].value, 1) < 0) {
            rv = pn_seterr(err, errlen, PN_ERR_IO, "%s: setenv %s: %s", path, list.v[i].name,
                           strerror(errno));
            goto out;
        }
    }

out:
    free(keep);
    env_list_free(&list);
    free(text);
    return rv;
}
