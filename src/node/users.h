/* The panel's users as the node holds them, protocol-free: email, the
 * accounts the panel sent (presence matters: spec pasarguard.md §5.1), and
 * the inbound tags. A set keyed by email (exact bytes) with diffing, so user
 * syncs of any size become add/remove operations on the running core. */
#ifndef PN_NODE_USERS_H
#define PN_NODE_USERS_H

#include <stdbool.h>
#include <stddef.h>

/* One user. Strings are owned (NULL when the sub-message was absent). */
struct pn_user {
    char *email;
    bool has_vmess, has_vless, has_trojan, has_ss, has_hysteria;
    char *vmess_id;
    char *vless_id, *vless_flow;
    char *trojan_password;
    char *ss_password, *ss_method;
    char *hysteria_auth;
    const char **inbounds; /* tags, interned: shared by all users, never freed by callers */
    size_t ninbounds;
};

struct pn_user *pn_user_new(const char *email);
struct pn_user *pn_user_clone(const struct pn_user *u);
void pn_user_free(struct pn_user *u);
/* Copies tag into the user's inbound list. */
void pn_user_add_inbound(struct pn_user *u, const char *tag);
bool pn_user_has_inbound(const struct pn_user *u, const char *tag);
/* Empties the user's inbound list. */
void pn_user_clear_inbounds(struct pn_user *u);
/* Same accounts and same inbound set (order-insensitive). */
bool pn_user_equal(const struct pn_user *a, const struct pn_user *b);

struct pn_userset;
struct pn_userset *pn_userset_new(void);
void pn_userset_free(struct pn_userset *s);
size_t pn_userset_count(const struct pn_userset *s);
const struct pn_user *pn_userset_get(const struct pn_userset *s, const char *email);
/* Inserts or replaces (steals u; frees a replaced user). */
void pn_userset_put(struct pn_userset *s, struct pn_user *u);
/* Removes and frees; returns false when absent. */
bool pn_userset_remove(struct pn_userset *s, const char *email);
/* Iteration in insertion order is not promised; the callback must not
 * change the set. */
void pn_userset_foreach(const struct pn_userset *s,
                        void (*fn)(const struct pn_user *u, void *arg), void *arg);
struct pn_userset *pn_userset_clone(const struct pn_userset *s);

#endif
