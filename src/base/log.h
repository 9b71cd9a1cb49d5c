/* The node's own log: one line per event on stderr, with an ISO-8601 UTC
 * timestamp and a level, which journald and `docker logs` keep as is.
 * Secrets (API keys, session ids) are never passed to the logger. */
#ifndef PN_BASE_LOG_H
#define PN_BASE_LOG_H

enum pn_log_level { PN_LOG_ERROR = 0, PN_LOG_WARN, PN_LOG_INFO, PN_LOG_DEBUG };

void pn_log_set_level(enum pn_log_level level);
enum pn_log_level pn_log_get_level(void);
void pn_log(enum pn_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define pn_log_error(...) pn_log(PN_LOG_ERROR, __VA_ARGS__)
#define pn_log_warn(...) pn_log(PN_LOG_WARN, __VA_ARGS__)
#define pn_log_info(...) pn_log(PN_LOG_INFO, __VA_ARGS__)
#define pn_log_debug(...)                                                                          \
    do {                                                                                           \
        if (pn_log_get_level() >= PN_LOG_DEBUG)                                                    \
            pn_log(PN_LOG_DEBUG, __VA_ARGS__);                                                     \
    } while (0)

#endif
