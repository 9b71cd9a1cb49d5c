/* WebSocket server connections (RFC 6455, framing by wslay) for log
 * streams: the node sends text frames, sends a ping every 20 s, ignores
 * what clients send (frames over 64 KiB close the connection with 1009),
 * and closes with a code. A WebSocket starts from an HTTP/1.1 request that
 * asked to upgrade: pn_ws_accept answers 101 and takes the connection over
 * from the HTTP/1.1 server (pn_req_take_over); the listener still tracks it
 * for shutdown. */
#ifndef PN_NET_WS_H
#define PN_NET_WS_H

#include <stddef.h>
#include <stdint.h>

#include "net/http.h"

struct pn_ws;

struct pn_ws_cbs {
    /* The connection ended (peer close, error, node shutdown, or after our
     * own close completed); ws is freed when this returns. */
    void (*on_close)(struct pn_ws *ws, void *arg);
    /* Queued output dropped under 64 KiB. Optional. */
    void (*on_writable)(struct pn_ws *ws, void *arg);
};

/* Whether req asks for a WebSocket upgrade (GET, Upgrade: websocket,
 * Connection: upgrade, Sec-WebSocket-Key, version 13). */
bool pn_ws_is_upgrade(const struct pn_req *req);

/* Answers 101 and takes over req's connection (req is gone afterwards).
 * Returns NULL when the transport cannot be taken over (HTTP/2) or the
 * request is not a valid upgrade: req has then been answered 400. */
struct pn_ws *pn_ws_accept(struct pn_req *req, const struct pn_ws_cbs *cbs, void *arg);

/* Queues one text frame (data must be UTF-8). Returns PN_OK or
 * PN_ERR_CLOSED once closing. */
int pn_ws_send_text(struct pn_ws *ws, const char *data, size_t len);
size_t pn_ws_pending(const struct pn_ws *ws);
/* Sends a close frame after what is queued, waits ≤ 1 s for the peer's,
 * then closes the TCP connection; on_close follows. */
void pn_ws_close(struct pn_ws *ws, uint16_t code, const char *reason);
const struct pn_peer *pn_ws_peer(const struct pn_ws *ws);

/* Sec-WebSocket-Accept for a key (base64 of SHA-1 of key + GUID); out
 * holds 29 bytes. For tests. */
void pn_ws_accept_key(const char *key, char *out);

#endif
