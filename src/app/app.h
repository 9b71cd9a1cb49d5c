/* The running node: wires the configuration into TLS, the listener, the
 * API fronts and the backend, owns the event loop and the signals
 * (SIGTERM/SIGINT: graceful stop; SIGHUP: reload the certificate). */
#ifndef PN_APP_APP_H
#define PN_APP_APP_H

#include "app/config.h"

/* Runs the node until a stop signal. Returns the process exit status. */
int pn_app_run(struct pn_config *cfg);

#endif
