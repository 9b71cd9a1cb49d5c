/* The log ring (see logring.h): the last `capacity` core log lines with a
 * global sequence number, and subscribers that each keep their own
 * cursor (the sequence number of the next line they will read). The ring
 * owns a copy of every line it holds, one allocation per line; pushing
 * over a full ring frees the oldest line. Subscribers are owned by
 * whoever created them; the ring only links them.
 *
 * A subscriber whose cursor has reached the newest line is "waiting" and
 * sits on the ring's waiting list; a push moves that whole list onto the
 * pending list and notifies its members one by one. That keeps a push at
 * O(1) plus O(waiting subscribers): readers that are behind are never
 * visited. Each subscriber is taken off the pending list before its
 * notify runs, and pn_log_sub_free unlinks from whichever list holds it,
 * so a notify may read, free itself, free another subscriber, or push
 * again (the new line's waiters join the same pending list and the outer
 * loop delivers them). */
#include "node/logring.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "base/alloc.h"

/* A line longer than this is cut (the supervisor already splits core
 * output at this length, spec marzban.md §4), and the ring holds at most
 * MAX_BYTES of text whatever its line capacity, so a core printing long
 * lines cannot make 10,000 slots cost 640 MB: the oldest lines go first. */
#define MAX_LINE 65536
#define MAX_BYTES (32u << 20)

struct line {
    size_t len;
    char data[]; /* NUL-terminated */
};

enum sub_queue { Q_NONE, Q_WAITING, Q_PENDING };

struct sublist {
    struct pn_log_sub *head, *tail;
};

struct pn_logring {
    struct line **lines; /* the line with sequence s is at s % cap */
    size_t cap, count;
    size_t bytes;        /* text held, for MAX_BYTES */
    uint64_t next_seq;       /* sequence number of the next line pushed */
    struct pn_log_sub *subs; /* every subscriber, for pn_logring_free */
    struct sublist waiting;  /* caught up, to be notified on the next push */
    struct sublist pending;  /* to be notified for a push in progress */
    bool notifying;
};

struct pn_log_sub {
    struct pn_logring *r; /* NULL once the ring is gone */
    uint64_t cursor;
    void (*notify)(struct pn_log_sub *s, void *arg);
    void *arg;
    struct pn_log_sub *prev, *next;   /* r->subs */
    struct pn_log_sub *qprev, *qnext; /* r->waiting or r->pending, per q */
    enum sub_queue q;
};

static void list_append(struct sublist *l, struct pn_log_sub *s)
{
    s->qnext = NULL;
    s->qprev = l->tail;
    if (l->tail)
        l->tail->qnext = s;
    else
        l->head = s;
    l->tail = s;
}

static void list_unlink(struct sublist *l, struct pn_log_sub *s)
{
    if (s->qprev)
        s->qprev->qnext = s->qnext;
    else
        l->head = s->qnext;
    if (s->qnext)
        s->qnext->qprev = s->qprev;
    else
        l->tail = s->qprev;
    s->qprev = s->qnext = NULL;
}

/* Puts a caught-up subscriber on the waiting list, once. Subscribers
 * without a notify callback poll and never need waking. */
static void mark_waiting(struct pn_log_sub *s)
{
    if (s->q != Q_NONE || !s->notify)
        return;
    list_append(&s->r->waiting, s);
    s->q = Q_WAITING;
}

/* Takes s off whichever notification list holds it. */
static void unqueue(struct pn_log_sub *s)
{
    if (s->q == Q_WAITING)
        list_unlink(&s->r->waiting, s);
    else if (s->q == Q_PENDING)
        list_unlink(&s->r->pending, s);
    s->q = Q_NONE;
}

struct pn_logring *pn_logring_new(size_t capacity)
{
    struct pn_logring *r = pn_new(struct pn_logring);
    r->cap = capacity ? capacity : 1;
    r->lines = pn_calloc(r->cap, sizeof *r->lines);
    return r;
}

/* Frees the ring and its lines. Subscribers should be gone already; any
 * left are detached (they read nothing more) rather than left dangling. */
void pn_logring_free(struct pn_logring *r)
{
    if (!r)
        return;
    for (struct pn_log_sub *s = r->subs; s; s = s->next) {
        s->r = NULL;
        s->q = Q_NONE;
        s->qprev = s->qnext = NULL;
    }
    for (size_t i = 0; i < r->cap; i++)
        free(r->lines[i]);
    free(r->lines);
    free(r);
}

/* Stores a copy of the line (cut at MAX_LINE, backing off to a UTF-8
 * character boundary so a cut line is still valid text for a protobuf
 * string), dropping the oldest line when full, then notifies the
 * subscribers that were waiting for it. */
void pn_logring_push(struct pn_logring *r, const char *line, size_t len)
{
    if (len > MAX_LINE) {
        size_t cut = MAX_LINE;
        while (cut > MAX_LINE - 3 && ((unsigned char)line[cut] & 0xC0) == 0x80)
            cut--;
        len = cut;
    }
    struct line *ln = pn_malloc(sizeof *ln + len + 1);
    ln->len = len;
    if (len)
        memcpy(ln->data, line, len);
    ln->data[len] = '\0';

    /* Make room: by line count (the slot we overwrite) and by bytes. */
    while (r->count > 0 && (r->count == r->cap || r->bytes + len > MAX_BYTES)) {
        size_t oldest = (size_t)((r->next_seq - r->count) % r->cap);
        r->bytes -= r->lines[oldest]->len;
        free(r->lines[oldest]);
        r->lines[oldest] = NULL;
        r->count--;
    }
    size_t idx = (size_t)(r->next_seq % r->cap);
    r->lines[idx] = ln;
    r->count++;
    r->bytes += len;
    r->next_seq++;

    /* Everyone waiting was caught up before this line; none of them is
     * caught up after it, so all move to pending in one splice. */
    for (struct pn_log_sub *s = r->waiting.head; s; s = s->qnext)
        s->q = Q_PENDING;
    if (r->waiting.head) {
        if (r->pending.tail) {
            r->pending.tail->qnext = r->waiting.head;
            r->waiting.head->qprev = r->pending.tail;
        } else {
            r->pending.head = r->waiting.head;
        }
        r->pending.tail = r->waiting.tail;
        r->waiting.head = r->waiting.tail = NULL;
    }
    if (r->notifying)
        return; /* a push from inside a notify: the outer loop delivers */

    r->notifying = true;
    struct pn_log_sub *s;
    while ((s = r->pending.head)) {
        list_unlink(&r->pending, s);
        s->q = Q_NONE;
        if (s->cursor == r->next_seq) {
            /* Another notify already read it up to date: nothing new. */
            mark_waiting(s);
            continue;
        }
        s->notify(s, s->arg); /* may free s: s is not touched after this */
    }
    r->notifying = false;
}

size_t pn_logring_count(const struct pn_logring *r)
{
    return r->count;
}

struct pn_log_sub *pn_log_sub_new(struct pn_logring *r, size_t backlog,
                                  void (*notify)(struct pn_log_sub *s, void *arg), void *arg)
{
    struct pn_log_sub *s = pn_new(struct pn_log_sub);
    s->r = r;
    s->notify = notify;
    s->arg = arg;
    s->cursor = r->next_seq - (backlog < r->count ? backlog : r->count);
    s->next = r->subs;
    if (r->subs)
        r->subs->prev = s;
    r->subs = s;
    if (s->cursor == r->next_seq)
        mark_waiting(s);
    return s;
}

void pn_log_sub_free(struct pn_log_sub *s)
{
    if (!s)
        return;
    struct pn_logring *r = s->r;
    if (r) {
        unqueue(s);
        if (s->prev)
            s->prev->next = s->next;
        else
            r->subs = s->next;
        if (s->next)
            s->next->prev = s->prev;
    }
    free(s);
}

/* Returns the line at the cursor and advances it. A cursor that fell
 * behind the oldest line held jumps to it, adding the lines it missed to
 * *dropped. Reaching the newest line puts the reader on the waiting list,
 * so the next push notifies it. */
const char *pn_log_sub_next(struct pn_log_sub *s, size_t *len, uint64_t *dropped)
{
    struct pn_logring *r = s->r;
    if (!r)
        return NULL;
    uint64_t oldest = r->next_seq - r->count;
    if (s->cursor < oldest) {
        if (dropped)
            *dropped += oldest - s->cursor;
        s->cursor = oldest;
    }
    if (s->cursor == r->next_seq) {
        mark_waiting(s);
        return NULL;
    }
    const struct line *ln = r->lines[s->cursor % r->cap];
    s->cursor++;
    if (s->cursor == r->next_seq)
        mark_waiting(s);
    if (len)
        *len = ln->len;
    return ln->data;
}
