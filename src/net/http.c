/* The transport-neutral side of the HTTP server: request helpers that
 * dispatch to the carrying transport (http1.c or h2.c), Go-style plain-text
 * error answers, reason phrases, and the listener's connection list. */
#include "net/http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/alloc.h"
#include "base/err.h"

const char *pn_req_header(const struct pn_req *req, const char *name)
{
    for (size_t i = 0; i < req->nheaders; i++)
        if (strcasecmp(req->headers[i].name, name) == 0)
            return req->headers[i].value;
    return NULL;
}

bool pn_req_query_param(const struct pn_req *req, const char *name, char *out, size_t outlen)
{
    size_t nlen = strlen(name);
    const char *p = req->query ? req->query : "";
    while (*p) {
        const char *end = strchr(p, '&');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len >= nlen && strncmp(p, name, nlen) == 0 && (len == nlen || p[nlen] == '=')) {
            const char *v = len == nlen ? p + nlen : p + nlen + 1;
            size_t vlen = len == nlen ? 0 : len - nlen - 1;
            if (outlen == 0)
                return true;
            if (vlen >= outlen)
                vlen = outlen - 1;
            memcpy(out, v, vlen);
            out[vlen] = '\0';
            return true;
        }
        if (!end)
            break;
        p = end + 1;
    }
    return false;
}

int pn_req_respond(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                   size_t nhdrs, const void *body, size_t len)
{
    return req->ops->respond(req, status, hdrs, nhdrs, body, len);
}

int pn_req_respond_text(struct pn_req *req, int status, const char *text)
{
    static const struct pn_http_header hdrs[] = {
        {"Content-Type", "text/plain; charset=utf-8"},
        {"X-Content-Type-Options", "nosniff"},
    };
    size_t n = strlen(text);
    char *body = pn_malloc(n + 1);
    memcpy(body, text, n);
    body[n] = '\n';
    int rv = pn_req_respond(req, status, hdrs, 2, body, n + 1);
    free(body);
    return rv;
}

int pn_req_stream_start(struct pn_req *req, int status, const struct pn_http_header *hdrs,
                        size_t nhdrs)
{
    return req->ops->stream_start(req, status, hdrs, nhdrs);
}

int pn_req_stream_write(struct pn_req *req, const void *data, size_t len)
{
    return req->ops->stream_write(req, data, len);
}

int pn_req_stream_end(struct pn_req *req)
{
    return req->ops->stream_end(req);
}

size_t pn_req_stream_pending(const struct pn_req *req)
{
    return req->ops->stream_pending(req);
}

void pn_req_set_callbacks(struct pn_req *req, void (*on_close)(struct pn_req *, void *),
                          void (*on_writable)(struct pn_req *, void *), void *arg)
{
    req->on_close = on_close;
    req->on_writable = on_writable;
    req->cb_arg = arg;
}

const char *pn_http_reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Request Entity Too Large";
    case 422: return "Unprocessable Entity";
    case 425: return "Too Early";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 499: return "Client Closed Request";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    }
    return "Unknown";
}

void pn_conn_link(struct pn_conn *c, struct pn_conn_set *set)
{
    c->set = set;
    c->prev = NULL;
    if (!set)
        return;
    c->next = set->head;
    if (set->head)
        set->head->prev = c;
    set->head = c;
    set->count++;
}

void pn_conn_unlink(struct pn_conn *c)
{
    struct pn_conn_set *set = c->set;
    if (!set)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        set->head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    set->count--;
    c->set = NULL;
    c->prev = c->next = NULL;
}
