/* proxynode's command line: run (default) | check | version | --help.
 * Everything else lives in the library (app/). */
#include <stdio.h>
#include <string.h>

#include "app/app.h"
#include "app/config.h"
#include "base/env.h"
#include "base/err.h"

static int load_config(struct pn_config *cfg)
{
    char err[512];
    int rv = pn_env_load_file(".env", err, sizeof err);
    if (rv < 0 && rv != PN_ERR_NOTFOUND) {
        fprintf(stderr, "proxynode: .env: %s\n", err);
        return rv;
    }
    rv = pn_config_load(cfg, err, sizeof err);
    if (rv < 0)
        fprintf(stderr, "proxynode: invalid configuration: %s\n", err);
    return rv;
}

int main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : "run";
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        pn_config_print_help(stdout);
        return 0;
    }
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("proxynode %s\n", PN_VERSION);
        return 0;
    }
    if (argc > 2 || (strcmp(cmd, "run") && strcmp(cmd, "check"))) {
        fprintf(stderr, "proxynode: unknown command '%s'\nusage: proxynode [run|check|version|--help]\n",
                argc > 2 ? argv[2] : cmd);
        return 2;
    }
    struct pn_config cfg;
    if (load_config(&cfg) < 0)
        return 1;
    int status;
    if (!strcmp(cmd, "check")) {
        pn_config_print(&cfg, stdout);
        status = 0;
    } else {
        status = pn_app_run(&cfg);
    }
    pn_config_free(&cfg);
    return status;
}
