/* fuzz_env: .env files (pn_env_load_file) with the input as the file's
 * text, written to a private temporary file. The environment is restored
 * after every input (clearenv, then the variables as they were at start),
 * so one input never changes how the next one loads. A refused file must
 * get PN_ERR_INVAL with an error that starts with the file's name. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/env.h"
#include "base/err.h"

extern char **environ;

static char path[64];
static char **saved; /* "NAME=VALUE" copies of the starting environment */

static void setup(void)
{
    snprintf(path, sizeof path, "/tmp/fuzz_env.XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0) {
        perror("fuzz_env: mkstemp");
        abort();
    }
    close(fd);
    size_t n = 0;
    while (environ && environ[n])
        n++;
    saved = calloc(n + 1, sizeof *saved);
    for (size_t i = 0; i < n; i++)
        saved[i] = strdup(environ[i]);
}

static void cleanup(void)
{
    unlink(path);
}

static void restore(void)
{
    clearenv();
    for (size_t i = 0; saved[i]; i++) {
        char *eq = strchr(saved[i], '=');
        if (!eq)
            continue;
        *eq = '\0';
        setenv(saved[i], eq + 1, 1);
        *eq = '=';
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!saved) {
        setup();
        atexit(cleanup);
    }
    int fd = open(path, O_WRONLY | O_TRUNC);
    if (fd < 0 || (size && write(fd, data, size) != (ssize_t)size)) {
        perror("fuzz_env: writing the file");
        abort();
    }
    close(fd);
    char err[512] = "";
    int rv = pn_env_load_file(path, err, sizeof err);
    if (rv != PN_OK && rv != PN_ERR_INVAL) {
        fprintf(stderr, "fuzz_env: unexpected result %d: %s\n", rv, err);
        abort();
    }
    if (rv == PN_ERR_INVAL && strncmp(err, path, strlen(path)) != 0) {
        fprintf(stderr, "fuzz_env: the error does not name the file: %s\n", err);
        abort();
    }
    restore();
    return 0;
}
