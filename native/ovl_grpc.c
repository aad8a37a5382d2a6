/* overlay's gRPC transport over libnghttp2: see ovl_grpc.h.
 *
 * Threads: any number of workers in ovl_grpc_next / ovl_grpc_reply; one of
 * the waiting ones at a time holds the poller role and runs the event loop
 * (accept, read, nghttp2_session_mem_recv, closing connections): see
 * ovl_grpc_next.  A connection's nghttp2 session is only touched under its
 * mutex; the server mutex guards the queue, the role and the counters.  Lock
 * order: connection, then server.  Only the poller closes a connection.
 *
 * A call belongs to its stream while it is being received and while its
 * response is being sent (the stream's close frees it), and to Python in
 * between (ovl_grpc_reply frees it when its stream or connection is gone).
 */
#define _GNU_SOURCE
#include "ovl_grpc.h"

#include <errno.h>
#include <fcntl.h>
#include <nghttp2/nghttp2.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <malloc.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_CHUNK (64 * 1024)
#define READ_BUDGET (1024 * 1024) /* per connection per wakeup: stay fair */
#define STREAM_WINDOW (1 << 20)
#define CONN_WINDOW (16 << 20)
#define STANDBY_MS 2 /* longest a slow handler leaves the loop unwatched */
#define FLUSH_BATCH (1 << 20) /* bytes gathered from nghttp2 per send */
#define LINGER_MS 500 /* longest a drained conn waits for its peer's EOF */
#define PING_ACK_MS 50 /* PING acknowledgements wait this long: see on_ping */
#define MAX_PINGS 8
#define PREFIX 5 /* gRPC message prefix: compressed flag + 32-bit length */
#define MAPPED_MIN (64 * 1024) /* messages this large get pages of their own: see body_alloc */
#define OUT_KEEP (64 * 1024)   /* an idle conn keeps an output buffer this large at most */
#define SWEEP_MAX_MS 1000      /* timeouts are checked this often at least */
#define TRIM_BYTES (16 << 20)  /* request bytes freed before the heap is trimmed */
/* Header blocks up to this many times max_header_bytes are decoded (and the
 * call refused); a longer one ends the connection (nghttp2's CONTINUATION
 * limit, against CVE-2024-28182's flood). */
#define BLOCK_FACTOR 16
#define FRAME_SIZE 16384 /* the default SETTINGS_MAX_FRAME_SIZE clients send with */

enum call_state { RECEIVING, QUEUED, RESPONDING };

struct buf {
    unsigned char *p;
    size_t len, cap;
    int mapped; /* p is an anonymous mapping of cap bytes */
};

struct conn;

struct call {
    struct ovl_grpc_call pub; /* first: Python's pointer is this call's */
    struct conn *conn;
    int32_t stream_id;
    enum call_state state;
    int linked;  /* on conn->calls */
    int closed;  /* stream gone while Python held the call */
    int counted; /* in server->pending */
    int post, grpc_content, identity;
    unsigned pseudo; /* PSEUDO_* seen */
    int regular;     /* a regular field seen: no pseudo-header may follow */
    int64_t started; /* CLOCK_MONOTONIC ms: its HEADERS began (early: its answer went) */
    int early;       /* answered before the client ended the stream (answer_early) */
    size_t charged;  /* bytes held against the limits (headers and message) */
    size_t hdr;      /* of which header bytes */
    int bad_status;
    char bad_message[160];
    char *path;
    struct buf meta, body;
    unsigned char *resp;
    size_t resp_len, resp_off;
    struct call *prev, *next; /* conn->calls */
    struct call *qnext;       /* server queue */
};

struct conn {
    struct ovl_grpc_server *srv;
    int fd;
    pthread_mutex_t mu;
    nghttp2_session *session;
    int dead, broken, want_out, goaway;
    int lingering; /* FIN sent after a graceful end: waiting for the peer's EOF */
    int64_t linger_until; /* CLOCK_MONOTONIC ms */
    uint8_t pings[MAX_PINGS][8]; /* PING payloads not yet acknowledged */
    int npings;
    int64_t ping_due;             /* when they are acknowledged */
    struct buf out;
    size_t out_off;
    struct call *calls;
    int refs;
    size_t buffered, hdr; /* its calls' charged and hdr (atomic) */
    int served;           /* a stream was opened */
    int64_t born, idle_since; /* CLOCK_MONOTONIC ms: accepted; calls last became none */
    struct conn *prev, *next; /* server->conns: the poller's */
};

struct ovl_grpc_server {
    int listen_fd, epfd, evfd;
    struct ovl_grpc_limits lim;
    size_t buffered;    /* every call's charged (atomic) */
    size_t freed;       /* bytes uncharged since the last trim (atomic) */
    int sweep_ms;       /* how often sweep() runs */
    int64_t next_sweep; /* the poller's */
    unsigned char *rbuf; /* the poller's */
    int polling;         /* a thread holds the poller role */
    int closed;          /* stopped, every conn closed: nobody polls again */
    pthread_mutex_t mu;
    pthread_cond_t work, idle, standby_cv;
    int standby, standby_idle; /* a worker watches the poller (standby_wait) */
    uint64_t leave_seq;        /* requests the poller left the loop to answer */
    struct call *qhead, *qtail;
    int draining, stopped, accept_paused;
    int nlinger; /* lingering conns (the poller's) */
    int nping;   /* conns holding PING acknowledgements (the poller's) */
    int doomed;  /* conns replaced by newcomers, to close after the events (the poller's) */
    nghttp2_option *options;
    struct conn *conns;
    uint64_t accepted, nconns, calls, pending, rejected, shed;
    nghttp2_session_callbacks *cbs;
};

/* ----------------------------------------------------------------- buffers */

static int buf_add(struct buf *b, const void *data, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        unsigned char *p = realloc(b->p, cap);
        if (!p)
            return -1;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static void buf_free(struct buf *b)
{
    if (b->mapped)
        munmap(b->p, b->cap);
    else
        free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
    b->mapped = 0;
}

/* Room for a whole message of cap bytes, keeping what b holds.  A large one
 * gets an anonymous mapping, so its pages go back to the kernel when it is
 * freed: from the heap, freed messages would leave it fragmented and the
 * memory an attack made us hold would stay with the process. */
static int body_alloc(struct buf *b, size_t cap)
{
    if (cap < MAPPED_MIN) {
        unsigned char *p = realloc(b->p, cap);
        if (!p)
            return -1;
        b->p = p;
        b->cap = cap;
        return 0;
    }
    unsigned char *p = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return -1;
    memcpy(p, b->p, b->len);
    size_t len = b->len;
    buf_free(b);
    b->p = p;
    b->len = len;
    b->cap = cap;
    b->mapped = 1;
    return 0;
}

/* ------------------------------------------------------------ small helpers */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}


static size_t ld(const size_t *v)
{
    return __atomic_load_n(v, __ATOMIC_RELAXED);
}

static void wake(struct ovl_grpc_server *s)
{
    uint64_t one = 1;
    ssize_t n;
    do
        n = write(s->evfd, &one, sizeof one);
    while (n < 0 && errno == EINTR);
}

static void conn_unref(struct conn *c)
{
    if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_destroy(&c->mu);
        buf_free(&c->out);
        free(c);
    }
}

static void call_unlink(struct call *call)
{
    struct conn *c = call->conn;
    if (!call->linked)
        return;
    if (call->prev)
        call->prev->next = call->next;
    else
        c->calls = call->next;
    if (call->next)
        call->next->prev = call->prev;
    call->prev = call->next = NULL;
    call->linked = 0;
    if (!c->calls)
        c->idle_since = now_ms();
}

/* Give back what a call holds against the limits (any thread). */
static void uncharge(struct call *call)
{
    struct conn *c = call->conn;
    struct ovl_grpc_server *s = c->srv;
    if (call->charged) {
        __atomic_sub_fetch(&c->buffered, call->charged, __ATOMIC_RELAXED);
        __atomic_sub_fetch(&s->buffered, call->charged, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->freed, call->charged, __ATOMIC_RELAXED);
    }
    if (call->hdr)
        __atomic_sub_fetch(&c->hdr, call->hdr, __ATOMIC_RELAXED);
    call->charged = call->hdr = 0;
}

/* The call must be unlinked.  May drop the last reference to its conn, so
 * never call it with a dead conn's mutex held. */
static void call_free(struct call *call)
{
    struct ovl_grpc_server *s = call->conn->srv;
    if (call->counted) {
        pthread_mutex_lock(&s->mu);
        if (--s->pending == 0)
            pthread_cond_broadcast(&s->idle);
        pthread_mutex_unlock(&s->mu);
    }
    uncharge(call);
    conn_unref(call->conn);
    free(call->path);
    buf_free(&call->meta);
    buf_free(&call->body);
    free(call->resp);
    free(call);
}

static void arm_out(struct conn *c, int on)
{
    if (c->want_out == on)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(c->srv->epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->want_out = on;
}

/* Write what nghttp2 has to send (c->mu held).  Whatever the socket does not
 * take now waits in c->out for EPOLLOUT.  A failure marks the conn broken
 * and gets the poller's attention. */
static void conn_flush(struct conn *c)
{
    if (c->dead || c->broken)
        return;
    for (;;) {
        if (c->out_off == c->out.len) {
            /* the socket took everything: gather what nghttp2 has next */
            c->out.len = c->out_off = 0;
            while (c->out.len < FLUSH_BATCH) {
                const uint8_t *data;
                ssize_t n = nghttp2_session_mem_send(c->session, &data);
                if (n == 0)
                    break;
                if (n < 0 || buf_add(&c->out, data, (size_t)n) < 0) {
                    c->broken = 1;
                    break;
                }
            }
            if (c->broken || c->out.len == 0) {
                if (c->out.cap > OUT_KEEP)
                    buf_free(&c->out); /* a big response's buffer: not for an idle conn */
                break; /* done, or flow control holds the rest until a WINDOW_UPDATE */
            }
        }
        ssize_t n = send(c->fd, c->out.p + c->out_off, c->out.len - c->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            arm_out(c, 1); /* the rest, and whatever nghttp2 queues meanwhile, on EPOLLOUT */
            return;
        } else {
            c->broken = 1;
            break;
        }
    }
    if (c->broken) {
        arm_out(c, 1); /* the poller sees the error and closes */
        wake(c->srv);
        return;
    }
    arm_out(c, 0);
}

/* Nothing left to read or write: both sides said GOAWAY, or we did and no
 * stream is open. */
static int conn_idle(struct conn *c)
{
    return !nghttp2_session_want_read(c->session) && !nghttp2_session_want_write(c->session) &&
           c->out_off == c->out.len;
}

/* --------------------------------------------------------------- responses */

#define NV(n, v) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE}

static char *percent_encode(const char *msg)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = strlen(msg);
    char *out = malloc(3 * n + 1), *o = out;
    if (!out)
        return NULL;
    for (const unsigned char *p = (const unsigned char *)msg; *p; p++) {
        if (*p < 0x20 || *p > 0x7e || *p == '%') {
            *o++ = '%';
            *o++ = hex[*p >> 4];
            *o++ = hex[*p & 15];
        } else {
            *o++ = (char)*p;
        }
    }
    *o = 0;
    return out;
}

/* A trailers-only response (c->mu held). */
static int submit_status(struct conn *c, struct call *call, int status, const char *message)
{
    char code[16];
    snprintf(code, sizeof code, "%d", status);
    char *encoded = percent_encode(message ? message : "");
    if (!encoded)
        return NGHTTP2_ERR_NOMEM;
    nghttp2_nv nv[5] = {NV(":status", "200"), NV("content-type", "application/grpc"),
                        NV("grpc-status", code)};
    size_t n = 3;
    if (encoded[0])
        nv[n++] = (nghttp2_nv)NV("grpc-message", encoded);
    if (!call->identity)
        nv[n++] = (nghttp2_nv)NV("grpc-accept-encoding", "identity");
    int rv = nghttp2_submit_response(c->session, call->stream_id, nv, n, NULL);
    free(encoded);
    return rv;
}

/* Not a gRPC request at all: a bare HTTP status (c->mu held). */
static int submit_http(struct conn *c, struct call *call, const char *http_status)
{
    nghttp2_nv nv[] = {NV(":status", http_status)};
    return nghttp2_submit_response(c->session, call->stream_id, nv, 1, NULL);
}

static ssize_t read_body(nghttp2_session *session, int32_t stream_id, uint8_t *buf,
                         size_t length, uint32_t *flags, nghttp2_data_source *source,
                         void *user_data)
{
    struct call *call = source->ptr;
    size_t n = call->resp_len - call->resp_off;
    if (n > length)
        n = length;
    if (n) /* an empty body has no buffer: no offset into NULL */
        memcpy(buf, call->resp + call->resp_off, n);
    call->resp_off += n;
    if (call->resp_off == call->resp_len) {
        nghttp2_nv ok[] = {NV("grpc-status", "0")};
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        if (nghttp2_submit_trailer(session, stream_id, ok, 1) == 0)
            *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
    }
    return (ssize_t)n;
}

static int submit_body(struct conn *c, struct call *call, const unsigned char *body, size_t len)
{
    if (len) {
        call->resp = malloc(len);
        if (!call->resp)
            return NGHTTP2_ERR_NOMEM;
        memcpy(call->resp, body, len);
    }
    call->resp_len = len;
    nghttp2_data_provider provider = {.source.ptr = call, .read_callback = read_body};
    nghttp2_nv nv[] = {NV(":status", "200"), NV("content-type", "application/grpc")};
    return nghttp2_submit_response(c->session, call->stream_id, nv, 2, &provider);
}

/* ----------------------------------------------------------------- requests */

static struct call *stream_call(nghttp2_session *session, int32_t stream_id)
{
    return nghttp2_session_get_stream_user_data(session, stream_id);
}

static void call_fail(struct call *call, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void call_fail(struct call *call, int status, const char *fmt, ...)
{
    if (call->bad_status)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(call->bad_message, sizeof call->bad_message, fmt, ap);
    va_end(ap);
    call->bad_status = status;
    buf_free(&call->body);
    buf_free(&call->meta);
    uncharge(call);
}

static int refused(struct ovl_grpc_server *s, int rv);

/* Answer a request still being received with its failure now (c->mu held);
 * what the client still sends of it is discarded.  No RST_STREAM NO_ERROR
 * after the answer (RFC 9113 §8.1 allows one): grpcio then reports INTERNAL
 * "Stream removed" instead of the status it was sent.  A client that has not
 * ended the stream request_timeout_ms later gets RST_STREAM CANCEL (sweep). */
static void answer_early(struct conn *c, struct call *call)
{
    call->state = RESPONDING;
    call->early = 1;
    call->started = now_ms(); /* from now on: when it was answered */
    if (submit_status(c, call, call->bad_status, call->bad_message) != 0)
        nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, call->stream_id,
                                  NGHTTP2_INTERNAL_ERROR);
    refused(c->srv, 0);
}

/* Make room for n more bytes of call (the poller, call's conn mutex held):
 * refuse the largest unfinished request of the connection holding the most,
 * if it holds more than call would.  0 if something was freed. */
static int evict(struct call *call, size_t n)
{
    struct ovl_grpc_server *s = call->conn->srv;
    struct conn *fat = NULL;
    size_t most = 0;
    for (struct conn *c = s->conns; c; c = c->next) {
        size_t b = ld(&c->buffered);
        if (b > most) {
            most = b;
            fat = c;
        }
    }
    if (!fat)
        return -1;
    /* the poller is the only thread that holds two conn mutexes: no deadlock */
    if (fat != call->conn)
        pthread_mutex_lock(&fat->mu);
    struct call *victim = NULL;
    for (struct call *v = fat->calls; v; v = v->next)
        if (v != call && v->state == RECEIVING && v->charged > call->charged + n &&
            (!victim || v->charged > victim->charged))
            victim = v;
    if (victim) {
        call_fail(victim, OVL_GRPC_RESOURCE_EXHAUSTED,
                  "refused to make room for other requests: the server holds %zu bytes "
                  "of unfinished requests at most", s->lim.max_buffer);
        answer_early(fat, victim);
        if (fat != call->conn)
            conn_flush(fat);
    }
    if (fat != call->conn)
        pthread_mutex_unlock(&fat->mu);
    return victim ? 0 : -1;
}

/* Hold n more bytes of call's request (the poller, c->mu held) within the
 * limits; over one, the call fails with RESOURCE_EXHAUSTED and -1. */
static int charge(struct call *call, size_t n, int header)
{
    struct conn *c = call->conn;
    struct ovl_grpc_server *s = c->srv;
    const struct ovl_grpc_limits *l = &s->lim;
    if (header && call->hdr + n > l->max_header_bytes) {
        call_fail(call, OVL_GRPC_RESOURCE_EXHAUSTED, "request metadata larger than %zu bytes",
                  l->max_header_bytes);
        return -1;
    }
    if (header && ld(&c->hdr) + n > l->max_conn_header_bytes) {
        call_fail(call, OVL_GRPC_RESOURCE_EXHAUSTED,
                  "the connection's requests hold more than %zu bytes of metadata",
                  l->max_conn_header_bytes);
        return -1;
    }
    if (ld(&c->buffered) + n > l->max_conn_buffer) {
        call_fail(call, OVL_GRPC_RESOURCE_EXHAUSTED,
                  "the connection's unfinished requests hold more than %zu bytes",
                  l->max_conn_buffer);
        return -1;
    }
    /* only the poller adds: what other threads do meanwhile only frees */
    while (ld(&s->buffered) + n > l->max_buffer) {
        if (evict(call, n) != 0) {
            call_fail(call, OVL_GRPC_RESOURCE_EXHAUSTED,
                      "the server holds %zu bytes of unfinished requests at most: retry later",
                      l->max_buffer);
            return -1;
        }
    }
    call->charged += n;
    __atomic_add_fetch(&c->buffered, n, __ATOMIC_RELAXED);
    __atomic_add_fetch(&s->buffered, n, __ATOMIC_RELAXED);
    if (header) {
        call->hdr += n;
        __atomic_add_fetch(&c->hdr, n, __ATOMIC_RELAXED);
    }
    return 0;
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user)
{
    struct conn *c = user;
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    struct call *call = calloc(1, sizeof *call);
    if (!call)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    call->conn = c;
    __atomic_add_fetch(&c->refs, 1, __ATOMIC_ACQ_REL);
    call->stream_id = frame->hd.stream_id;
    call->state = RECEIVING;
    call->identity = 1;
    call->started = now_ms();
    c->served = 1;
    call->next = c->calls;
    if (c->calls)
        c->calls->prev = call;
    c->calls = call;
    call->linked = 1;
    nghttp2_session_set_stream_user_data(session, call->stream_id, call);
    return 0;
}

static int eq(const uint8_t *a, size_t alen, const char *b)
{
    return alen == strlen(b) && memcmp(a, b, alen) == 0;
}

/* Request checks.  nghttp2's HTTP messaging checks are off (ovl_grpc_start):
 * they refuse requests real gRPC clients send -- grpc-go 1.33 dialing a unix
 * socket sends its path as :authority ("/run/x.sock" fails nghttp2's
 * authority syntax), others send an empty one or none, which nghttp2 also
 * refuses -- and most of the rest protects nothing here.  What we keep makes
 * a request malformed (RFC 9113 §8.1.1: RST_STREAM PROTOCOL_ERROR, as grpc-go's
 * own server answers), each so that what a worker sees is unambiguous:
 *  - a NUL, CR or LF in a field name or value, or an uppercase name (§8.2.1):
 *    a NUL would split the "name\0value\0" metadata, a "Containerd-Namespace"
 *    would silently not be the header the client meant;
 *  - pseudo-headers other than :method, :scheme, :authority, :path, one
 *    twice, or one after a regular field (§8.3); no :method or no :path.
 * Dropped, as nghttp2 applies them: :authority/host syntax and presence,
 * :scheme and :path syntax (we route on the exact :path), te other than
 * "trailers", connection-specific fields, content-length against the DATA
 * received (the gRPC prefix frames the message), leading/trailing whitespace
 * in values, the priority field.  Request trailers are ignored (gRPC puts
 * nothing there).  Frame-level rules (stream states, flow control, HPACK,
 * CONTINUATION counts) stay nghttp2's. */
enum { PSEUDO_METHOD = 1, PSEUDO_SCHEME = 2, PSEUDO_AUTHORITY = 4, PSEUDO_PATH = 8 };

static int bad_bytes(const uint8_t *p, size_t n, int name)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] == 0 || p[i] == '\r' || p[i] == '\n' || (name && p[i] >= 'A' && p[i] <= 'Z'))
            return 1;
    return 0;
}

static unsigned pseudo_bit(const uint8_t *name, size_t namelen)
{
    if (eq(name, namelen, ":method"))
        return PSEUDO_METHOD;
    if (eq(name, namelen, ":path"))
        return PSEUDO_PATH;
    if (eq(name, namelen, ":authority"))
        return PSEUDO_AUTHORITY;
    if (eq(name, namelen, ":scheme"))
        return PSEUDO_SCHEME;
    return 0;
}

/* Reset a malformed request's stream (from a header or frame callback). */
static int malformed(nghttp2_session *session, struct call *call)
{
    call->state = RESPONDING; /* nothing more of it is looked at */
    nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, call->stream_id,
                              NGHTTP2_PROTOCOL_ERROR);
    return refused(call->conn->srv, NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE);
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *user)
{
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0; /* request trailers carry nothing gRPC uses */
    struct call *call = stream_call(session, frame->hd.stream_id);
    if (!call || call->state != RECEIVING)
        return 0;
    if (namelen == 0 || bad_bytes(name, namelen, 1) || bad_bytes(value, valuelen, 0))
        return malformed(session, call);
    if (name[0] == ':') {
        unsigned bit = pseudo_bit(name, namelen);
        if (!bit || (call->pseudo & bit) || call->regular)
            return malformed(session, call);
        call->pseudo |= bit;
        if (bit == PSEUDO_PATH) {
            if (charge(call, namelen + valuelen + 2, 1) != 0)
                return 0;
            call->path = strndup((const char *)value, valuelen);
            if (!call->path)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        } else if (bit == PSEUDO_METHOD) {
            call->post = eq(value, valuelen, "POST");
        }
        return 0;
    }
    call->regular = 1;
    if (eq(name, namelen, "content-type")) {
        static const char grpc[] = "application/grpc";
        size_t n = sizeof grpc - 1;
        call->grpc_content = valuelen >= n && memcmp(value, grpc, n) == 0 &&
                             (valuelen == n || value[n] == '+' || value[n] == ';');
    } else if (eq(name, namelen, "grpc-encoding")) {
        call->identity = eq(value, valuelen, "identity");
    }
    if (call->bad_status || charge(call, namelen + valuelen + 2, 1) != 0)
        return 0; /* refused: nothing more of it is kept */
    static const char nul = 0;
    if (buf_add(&call->meta, name, namelen) < 0 || buf_add(&call->meta, &nul, 1) < 0 ||
        buf_add(&call->meta, value, valuelen) < 0 || buf_add(&call->meta, &nul, 1) < 0)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    return 0;
}

static int on_data(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                   const uint8_t *data, size_t len, void *user)
{
    struct call *call = stream_call(session, stream_id);
    struct ovl_grpc_server *s = ((struct conn *)user)->srv;
    if (!call || call->state != RECEIVING || call->bad_status)
        return 0;
    struct buf *b = &call->body;
    while (len) {
        if (b->len < PREFIX) {
            size_t take = PREFIX - b->len < len ? PREFIX - b->len : len;
            if (buf_add(b, data, take) < 0)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
            data += take;
            len -= take;
            if (b->len < PREFIX)
                continue;
            size_t declared = be32(b->p + 1);
            if (declared > s->lim.max_message) {
                call_fail(call, OVL_GRPC_RESOURCE_EXHAUSTED,
                          "grpc: received message larger than max (%zu vs. %zu)", declared,
                          s->lim.max_message);
                return 0;
            }
            if (charge(call, PREFIX + declared, 0) != 0)
                return 0;
            if (body_alloc(b, PREFIX + declared) < 0)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
            continue;
        }
        if (len > PREFIX + (size_t)be32(b->p + 1) - b->len) {
            call_fail(call, OVL_GRPC_INTERNAL, "more than one request message for a unary call");
            return 0;
        }
        if (buf_add(b, data, len) < 0)
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        len = 0;
    }
    return 0;
}

/* A request the transport answers itself, counted (c->mu held). */
static int refused(struct ovl_grpc_server *s, int rv)
{
    pthread_mutex_lock(&s->mu);
    s->rejected++;
    pthread_mutex_unlock(&s->mu);
    return rv;
}

/* The whole request is in (c->mu held): hand it to a worker, or answer a
 * request that is not one here. */
static int finish_request(struct conn *c, struct call *call)
{
    struct ovl_grpc_server *s = c->srv;
    call->state = RESPONDING;
    if (!call->post)
        return refused(s, submit_http(c, call, "405"));
    if (!call->grpc_content)
        return refused(s, submit_http(c, call, "415"));
    if (!call->identity)
        return refused(s, submit_status(c, call, OVL_GRPC_UNIMPLEMENTED,
                                        "compressed requests are not supported: "
                                        "use grpc-encoding identity"));
    if (call->bad_status)
        return refused(s, submit_status(c, call, call->bad_status, call->bad_message));
    const struct buf *b = &call->body;
    if (b->len < PREFIX || b->len != PREFIX + (size_t)be32(b->p + 1))
        return refused(s, submit_status(c, call, OVL_GRPC_INTERNAL,
                                        b->len ? "the request message is truncated"
                                               : "the request has no message"));
    if (b->p[0] != 0)
        return refused(s, submit_status(c, call, OVL_GRPC_INTERNAL,
                                        "compressed message flag set, but grpc-encoding "
                                        "is identity"));
    static const char nul = 0;
    if (buf_add(&call->meta, &nul, 1) < 0) /* never empty: a valid pointer */
        return NGHTTP2_ERR_NOMEM;
    call->pub.path = call->path;
    call->pub.metadata = (const char *)call->meta.p;
    call->pub.metadata_len = call->meta.len - 1;
    call->pub.message = b->p + PREFIX;
    call->pub.message_len = b->len - PREFIX;
    call->state = QUEUED;
    call->counted = 1;
    pthread_mutex_lock(&s->mu);
    if (s->qtail)
        s->qtail->qnext = call;
    else
        s->qhead = call;
    s->qtail = call;
    s->calls++;
    s->pending++;
    /* no signal: the poller takes a request itself (ovl_grpc_next) */
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* Acknowledge the PINGs a conn holds (c->mu held, the poller). */
static void ack_pings(struct conn *c)
{
    for (int i = 0; i < c->npings; i++)
        nghttp2_submit_ping(c->session, NGHTTP2_FLAG_ACK, c->pings[i]);
    if (c->npings)
        c->srv->nping--;
    c->npings = 0;
}

/* A PING (the poller, in mem_recv).  Its acknowledgement waits PING_ACK_MS:
 * grpc-go (containerd's client) measures bandwidth by sending a PING with
 * nearly every response it receives, whenever none is outstanding, so an
 * acknowledgement at once costs both sides another wake-up per call.  Held,
 * the PING stays outstanding and the next ones are not sent: at most one
 * per PING_ACK_MS.  RFC 9113 asks only that PINGs be answered (and answers
 * go out first, once due); keepalive timeouts are seconds. */
static void on_ping(struct conn *c, const nghttp2_ping *ping)
{
    if (c->npings == MAX_PINGS)
        ack_pings(c);
    memcpy(c->pings[c->npings++], ping->opaque_data, 8);
    if (c->npings == 1) {
        c->ping_due = now_ms() + PING_ACK_MS;
        c->srv->nping++;
    }
}

static int on_frame(nghttp2_session *session, const nghttp2_frame *frame, void *user)
{
    if (frame->hd.type == NGHTTP2_PING) {
        if (!(frame->hd.flags & NGHTTP2_FLAG_ACK))
            on_ping(user, &frame->ping);
        return 0;
    }
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA)
        return 0;
    struct call *call = stream_call(session, frame->hd.stream_id);
    if (!call || call->state != RECEIVING)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST &&
        (call->pseudo & (PSEUDO_METHOD | PSEUDO_PATH)) != (PSEUDO_METHOD | PSEUDO_PATH)) {
        malformed(session, call);
        return 0;
    }
    if (!(frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
        if (call->bad_status == OVL_GRPC_RESOURCE_EXHAUSTED)
            answer_early(user, call); /* over a limit: no need to take the rest */
        return 0;
    }
    if (finish_request(user, call) != 0)
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, call->stream_id,
                                  NGHTTP2_INTERNAL_ERROR);
    return 0;
}

static int on_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                    void *user)
{
    struct call *call = stream_call(session, stream_id);
    if (!call)
        return 0;
    nghttp2_session_set_stream_user_data(session, stream_id, NULL);
    call_unlink(call);
    if (call->state == QUEUED)
        call->closed = 1; /* Python has it: its reply frees it */
    else
        call_free(call); /* the conn list holds a reference: the conn stays */
    return 0;
}

/* -------------------------------------------------------------- connections */

static void conn_new(struct ovl_grpc_server *s, int fd)
{
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        return;
    }
    c->srv = s;
    c->fd = fd;
    c->refs = 1;
    c->born = c->idle_since = now_ms();
    pthread_mutex_init(&c->mu, NULL);
    /* Beyond max_streams nghttp2 refuses streams (REFUSED_STREAM, which
     * clients retry) even before the client acknowledges the SETTINGS.
     * MAX_HEADER_LIST_SIZE is advisory: clients that honour it (grpc-go)
     * fail an oversized call themselves; charge() enforces it. */
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, s->lim.max_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE,
         s->lim.max_header_bytes > UINT32_MAX ? UINT32_MAX : (uint32_t)s->lim.max_header_bytes},
    };
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (nghttp2_session_server_new2(&c->session, s->cbs, c, s->options) != 0) {
        c->session = NULL;
        goto fail;
    }
    if (nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, settings,
                                sizeof settings / sizeof settings[0]) != 0 ||
        nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0, CONN_WINDOW) != 0 ||
        epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) != 0)
        goto fail;
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    pthread_mutex_lock(&s->mu);
    s->accepted++;
    s->nconns++;
    pthread_mutex_unlock(&s->mu);
    pthread_mutex_lock(&c->mu);
    conn_flush(c);
    pthread_mutex_unlock(&c->mu);
    return;
fail:
    if (c->session)
        nghttp2_session_del(c->session);
    close(fd);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* The poller only. */
static void conn_close(struct conn *c)
{
    struct ovl_grpc_server *s = c->srv;
    if (c->lingering)
        s->nlinger--;
    if (c->npings)
        s->nping--;
    pthread_mutex_lock(&c->mu);
    c->dead = 1;
    struct call *free_list = NULL;
    while (c->calls) {
        struct call *call = c->calls;
        call_unlink(call);
        nghttp2_session_set_stream_user_data(c->session, call->stream_id, NULL);
        if (call->state == QUEUED) {
            call->closed = 1;
        } else {
            call->qnext = free_list;
            free_list = call;
        }
    }
    nghttp2_session_del(c->session);
    c->session = NULL;
    epoll_ctl(s->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    pthread_mutex_unlock(&c->mu);
    while (free_list) {
        struct call *call = free_list;
        free_list = call->qnext;
        call_free(call);
    }
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    pthread_mutex_lock(&s->mu);
    s->nconns--;
    pthread_cond_broadcast(&s->idle);
    pthread_mutex_unlock(&s->mu);
    conn_unref(c);
}

/* The end of a drained connection (the poller only): send FIN and wait for
 * the peer's EOF, LINGER_MS at most, before closing.  Closing at once could
 * make the peer's pending write (a PING, a WINDOW_UPDATE) fail with EPIPE,
 * and grpcio then fails streams whose answers already sit in its receive
 * buffer. */
static void conn_linger(struct conn *c)
{
    c->srv->nlinger++;
    pthread_mutex_lock(&c->mu);
    c->lingering = 1;
    c->linger_until = now_ms() + LINGER_MS;
    shutdown(c->fd, SHUT_WR);
    arm_out(c, 0);
    pthread_mutex_unlock(&c->mu);
}

static void conn_event(struct conn *c, uint32_t events, unsigned char *rbuf)
{
    int fail = 0;
    pthread_mutex_lock(&c->mu);
    if (c->lingering) { /* discard until the peer's EOF */
        for (size_t total = 0; total < READ_BUDGET;) {
            ssize_t n = read(c->fd, rbuf, READ_CHUNK);
            if (n > 0) {
                total += (size_t)n;
            } else if (n < 0 && errno == EINTR) {
                continue;
            } else {
                fail = n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
                break;
            }
        }
        pthread_mutex_unlock(&c->mu);
        if (fail)
            conn_close(c);
        return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        for (size_t total = 0; total < READ_BUDGET && !fail && !c->broken;) {
            ssize_t n = read(c->fd, rbuf, READ_CHUNK);
            if (n > 0) {
                total += (size_t)n;
                if (nghttp2_session_mem_recv(c->session, rbuf, (size_t)n) < 0)
                    fail = 1; /* not HTTP/2, or a protocol error: GOAWAY is queued */
            } else if (n == 0) {
                fail = 1; /* the peer is gone */
            } else if (errno == EINTR) {
                continue;
            } else {
                if (errno != EAGAIN && errno != EWOULDBLOCK)
                    fail = 1;
                break;
            }
        }
    }
    conn_flush(c);
    int cut = fail || c->broken, idle = !cut && conn_idle(c);
    int graceful = idle && c->goaway; /* we drained it: let the peer read it all */
    pthread_mutex_unlock(&c->mu);
    if (cut || (idle && !graceful))
        conn_close(c);
    else if (graceful)
        conn_linger(c);
}

/* Draining: GOAWAY each connection once, end those with nothing left. */
static void drain_conns(struct ovl_grpc_server *s)
{
    struct conn *c = s->conns;
    while (c) {
        struct conn *next = c->next;
        pthread_mutex_lock(&c->mu);
        if (c->lingering) {
            pthread_mutex_unlock(&c->mu);
            c = next;
            continue;
        }
        if (!c->goaway) {
            c->goaway = 1;
            nghttp2_submit_goaway(c->session, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(c->session),
                                  NGHTTP2_NO_ERROR, NULL, 0);
            conn_flush(c);
        }
        int cut = c->broken, graceful = !cut && conn_idle(c);
        pthread_mutex_unlock(&c->mu);
        if (cut)
            conn_close(c);
        else if (graceful)
            conn_linger(c);
        c = next;
    }
}

static void shed(struct ovl_grpc_server *s)
{
    pthread_mutex_lock(&s->mu);
    s->shed++;
    pthread_mutex_unlock(&s->mu);
}

/* At max_connections (the poller): the connection a newcomer replaces,
 * NULL when every one is doing real work.  In this order, oldest first in
 * each class: one that has not opened a stream in NEW_GRACE_MS (a client
 * that connects and sends nothing, or part of a preface); one whose every
 * stream was refused and is still held open; one whose every request is
 * still being received; one idle (a real client between calls: containerd's
 * connection is idle most of the time, so it goes after those that only
 * hold what they should not); one that has just connected (a real client
 * opens its first stream within milliseconds: replacing it mid-handshake is
 * the last resort).  Connections with a request queued, being handled or
 * answered are never replaced, so holding unfinished or refused requests
 * cannot lock new clients out. */
#define NEW_GRACE_MS 250
enum { NEVER_SERVED, ONLY_REFUSED, ONLY_RECEIVING, IDLE, JUST_CONNECTED, BUSY };

static int conn_class(struct conn *c, int64_t now, int64_t *since)
{
    if (c->lingering || c->broken)
        return BUSY;
    if (!c->calls) {
        *since = c->served ? c->idle_since : c->born;
        if (c->served)
            return IDLE;
        return now - c->born >= NEW_GRACE_MS ? NEVER_SERVED : JUST_CONNECTED;
    }
    int receiving = 0;
    *since = INT64_MAX;
    for (struct call *call = c->calls; call; call = call->next) {
        if (call->state == RECEIVING)
            receiving = 1;
        else if (!call->early)
            return BUSY;
        if (call->started < *since)
            *since = call->started;
    }
    return receiving ? ONLY_RECEIVING : ONLY_REFUSED;
}

static struct conn *victim_for_newcomer(struct ovl_grpc_server *s)
{
    struct conn *best = NULL;
    int best_class = BUSY;
    int64_t best_since = 0, now = now_ms();
    for (struct conn *c = s->conns; c; c = c->next) {
        int64_t since = 0;
        pthread_mutex_lock(&c->mu);
        int cls = conn_class(c, now, &since);
        pthread_mutex_unlock(&c->mu);
        /* conns is newest first: on a tie (ms clock) the older connection goes */
        if (cls < best_class || (cls == best_class && cls != BUSY && since <= best_since)) {
            best = c;
            best_class = cls;
            best_since = since;
        }
    }
    return best;
}

static void conn_close(struct conn *c);

static void accept_all(struct ovl_grpc_server *s)
{
    for (;;) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            if (s->nconns - s->doomed >= s->lim.max_connections) {
                struct conn *victim = victim_for_newcomer(s);
                shed(s);
                if (!victim) {
                    close(fd); /* all at work: the newcomer retries later */
                    continue;
                }
                /* closed after this round's events (poll_round): one of them
                 * may still be the victim's */
                pthread_mutex_lock(&victim->mu);
                nghttp2_submit_goaway(victim->session, NGHTTP2_FLAG_NONE,
                                      nghttp2_session_get_last_proc_stream_id(victim->session),
                                      NGHTTP2_NO_ERROR, NULL, 0);
                conn_flush(victim);
                victim->broken = 1;
                pthread_mutex_unlock(&victim->mu);
                s->doomed++;
            }
            conn_new(s, fd);
            continue;
        }
        if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
            continue;
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            /* out of descriptors or memory: stop listening for a moment */
            epoll_ctl(s->epfd, EPOLL_CTL_DEL, s->listen_fd, NULL);
            s->accept_paused = 1;
        }
        return;
    }
}

/* The timeouts (the poller, every sweep_ms): answer requests not received in
 * full within request_timeout_ms, end connections idle for idle_timeout_ms
 * (GOAWAY, then the peer's EOF), and give freed memory back. */
static void sweep(struct ovl_grpc_server *s, int64_t now)
{
    const struct ovl_grpc_limits *l = &s->lim;
    struct conn *c = s->conns;
    while (c) {
        struct conn *next = c->next;
        int idled = 0;
        pthread_mutex_lock(&c->mu);
        if (!c->lingering && !c->broken) {
            for (struct call *call = c->calls; call; call = call->next) {
                if (now - call->started < l->request_timeout_ms)
                    continue;
                if (call->state == RECEIVING) {
                    call_fail(call, OVL_GRPC_RESOURCE_EXHAUSTED,
                              "request not received in full within %d ms", l->request_timeout_ms);
                    answer_early(c, call);
                } else if (call->early == 1) { /* answered, and the client still sends */
                    call->early = 2;
                    nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, call->stream_id,
                                              NGHTTP2_CANCEL);
                }
            }
            if (!c->calls && !c->goaway && now - c->idle_since >= l->idle_timeout_ms) {
                c->goaway = idled = 1;
                nghttp2_submit_goaway(c->session, NGHTTP2_FLAG_NONE,
                                      nghttp2_session_get_last_proc_stream_id(c->session),
                                      NGHTTP2_NO_ERROR, NULL, 0);
            }
            conn_flush(c);
        }
        int cut = c->broken, graceful = !cut && !c->lingering && c->goaway && conn_idle(c);
        pthread_mutex_unlock(&c->mu);
        if (idled)
            shed(s);
        if (cut)
            conn_close(c);
        else if (graceful)
            conn_linger(c);
        c = next;
    }
    /* Freed request bytes came from the heap (headers, small messages) and
     * from nghttp2: give back what fragmentation would keep. */
    if (ld(&s->freed) >= TRIM_BYTES) {
        __atomic_store_n(&s->freed, 0, __ATOMIC_RELAXED);
        malloc_trim(0);
    }
}

/* One round of the event loop (the caller holds the poller role): wait up
 * to timeout_ms for events, accept, read, close what is finished.  Requests
 * that complete are queued; the caller takes one itself. */
static void poll_round(struct ovl_grpc_server *s, int timeout_ms)
{
    struct epoll_event evs[64];
    if (s->conns) { /* timeouts to watch */
        int64_t left = s->next_sweep - now_ms();
        int wait = left < 0 ? 0 : (int)left;
        if (timeout_ms < 0 || timeout_ms > wait)
            timeout_ms = wait;
    }
    if (s->accept_paused && (timeout_ms < 0 || timeout_ms > 100))
        timeout_ms = 100;
    if (s->nlinger && (timeout_ms < 0 || timeout_ms > 50))
        timeout_ms = 50; /* to close lingering conns on time */
    if (s->nping && (timeout_ms < 0 || timeout_ms > PING_ACK_MS / 2))
        timeout_ms = PING_ACK_MS / 2; /* to acknowledge PINGs on time */
    int n = epoll_wait(s->epfd, evs, 64, timeout_ms);
    if (n < 0)
        n = 0; /* EINTR: the caller comes back */
    if (n == 0 && s->accept_paused && s->listen_fd >= 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &s->listen_fd};
        if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->listen_fd, &ev) == 0)
            s->accept_paused = 0;
    }
    int woken = 0;
    for (int i = 0; i < n; i++) {
        void *p = evs[i].data.ptr;
        if (p == &s->listen_fd) {
            if (s->listen_fd >= 0)
                accept_all(s);
        } else if (p == &s->evfd) {
            uint64_t v;
            ssize_t r = read(s->evfd, &v, sizeof v);
            (void)r;
            woken = 1;
        } else {
            /* only a conn's own event closes it in this batch, and each fd
             * appears once per epoll_wait: later events never see a freed conn */
            conn_event(p, evs[i].events, s->rbuf);
        }
    }
    if (s->nping) {
        int64_t now = now_ms();
        for (struct conn *c = s->conns; c; c = c->next) {
            if (c->npings && now >= c->ping_due) {
                pthread_mutex_lock(&c->mu);
                ack_pings(c);
                conn_flush(c);
                pthread_mutex_unlock(&c->mu);
            }
        }
    }
    if (s->nlinger) {
        int64_t now = now_ms();
        struct conn *c = s->conns;
        while (c) {
            struct conn *next = c->next;
            if (c->lingering && now >= c->linger_until)
                conn_close(c);
            c = next;
        }
    }
    int64_t now = now_ms();
    if (now >= s->next_sweep) {
        sweep(s, now);
        s->next_sweep = now + s->sweep_ms;
    }
    int draining = __atomic_load_n(&s->draining, __ATOMIC_ACQUIRE);
    if (draining) {
        if (s->listen_fd >= 0) {
            epoll_ctl(s->epfd, EPOLL_CTL_DEL, s->listen_fd, NULL);
            close(s->listen_fd);
            s->listen_fd = -1;
        }
        drain_conns(s); /* closes the broken ones too */
        s->doomed = 0;
    } else if (woken || s->doomed) {
        /* a worker found a broken conn, or a newcomer replaced one */
        s->doomed = 0;
        struct conn *c = s->conns;
        while (c) {
            struct conn *next = c->next;
            pthread_mutex_lock(&c->mu);
            int done = c->broken;
            pthread_mutex_unlock(&c->mu);
            if (done)
                conn_close(c);
            c = next;
        }
    }
}

/* ---------------------------------------------------------------- the API */

int ovl_grpc_start(int listen_fd, const struct ovl_grpc_limits *limits,
                   struct ovl_grpc_server **out)
{
    int err = EINVAL;
    const struct ovl_grpc_limits *l = limits;
    if (!l->max_message || !l->max_connections || !l->max_streams || !l->max_header_bytes ||
        !l->max_conn_header_bytes || !l->max_conn_buffer || !l->max_buffer ||
        l->request_timeout_ms <= 0 || l->idle_timeout_ms <= 0)
        goto fail_fd;
    struct ovl_grpc_server *s = calloc(1, sizeof *s);
    err = ENOMEM;
    if (!s)
        goto fail_fd;
    s->listen_fd = listen_fd;
    s->epfd = s->evfd = -1;
    s->lim = *l;
    int shortest = l->request_timeout_ms < l->idle_timeout_ms ? l->request_timeout_ms
                                                              : l->idle_timeout_ms;
    s->sweep_ms = shortest / 4 < 10 ? 10 : shortest / 4 > SWEEP_MAX_MS ? SWEEP_MAX_MS : shortest / 4;
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->epfd < 0 || s->evfd < 0) {
        err = errno;
        goto fail;
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&s->work, &attr);
    pthread_cond_init(&s->idle, &attr);
    pthread_cond_init(&s->standby_cv, &attr);
    pthread_condattr_destroy(&attr);
    if (nghttp2_session_callbacks_new(&s->cbs) != 0)
        goto fail_sync;
    if (nghttp2_option_new(&s->options) != 0) {
        nghttp2_session_callbacks_del(s->cbs);
        goto fail_sync;
    }
    nghttp2_option_set_no_auto_ping_ack(s->options, 1); /* on_ping */
    nghttp2_option_set_no_http_messaging(s->options, 1); /* our own checks: see bad_bytes */
    size_t block = BLOCK_FACTOR * l->max_header_bytes / FRAME_SIZE + 1;
    nghttp2_option_set_max_continuations(s->options, block < 8 ? 8 : block > 4096 ? 4096 : block);
    nghttp2_session_callbacks_set_on_begin_headers_callback(s->cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(s->cbs, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(s->cbs, on_data);
    nghttp2_session_callbacks_set_on_frame_recv_callback(s->cbs, on_frame);
    nghttp2_session_callbacks_set_on_stream_close_callback(s->cbs, on_close);
    int fl = fcntl(listen_fd, F_GETFL);
    if (fl < 0 || fcntl(listen_fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        err = errno;
        goto fail_cbs;
    }
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &s->listen_fd};
    struct epoll_event wev = {.events = EPOLLIN, .data.ptr = &s->evfd};
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, listen_fd, &lev) != 0 ||
        epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->evfd, &wev) != 0) {
        err = errno;
        goto fail_cbs;
    }
    s->rbuf = malloc(READ_CHUNK);
    if (!s->rbuf) {
        err = ENOMEM;
        goto fail_cbs;
    }
    *out = s;
    return 0;
fail_cbs:
    nghttp2_option_del(s->options);
    nghttp2_session_callbacks_del(s->cbs);
fail_sync:
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->idle);
    pthread_cond_destroy(&s->standby_cv);
    pthread_mutex_destroy(&s->mu);
fail:
    if (s->epfd >= 0)
        close(s->epfd);
    if (s->evfd >= 0)
        close(s->evfd);
    free(s);
fail_fd:
    close(listen_fd);
    errno = err;
    return -1;
}

static void deadline_after(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* The standby (s->mu held): one waiting worker watches the poller role
 * while the poller handles the request it read.  Every STANDBY_MS it looks:
 * when the same request has kept the role empty for a whole period, it
 * takes the role over (returns with s->polling == 0), so a slow handler
 * delays other clients by a few milliseconds at most.  Polling throughout a
 * period with nothing handled means idle: it sleeps until the next request. */
static void standby_wait(struct ovl_grpc_server *s)
{
    s->standby = 1;
    uint64_t seen = s->leave_seq;
    int was_unwatched = !s->polling, idle = 0;
    while (!s->stopped && !s->qhead) {
        if (idle) {
            s->standby_idle = 1;
            pthread_cond_wait(&s->standby_cv, &s->mu); /* until the poller leaves */
            s->standby_idle = 0;
        } else {
            struct timespec step;
            deadline_after(&step, STANDBY_MS);
            pthread_cond_timedwait(&s->standby_cv, &s->mu, &step);
        }
        if (s->stopped || s->qhead)
            break;
        int unwatched = !s->polling, same = s->leave_seq == seen;
        if (!idle && same && unwatched && was_unwatched)
            break; /* one request held the loop a whole period: take over */
        idle = !idle && same && !unwatched && !was_unwatched;
        seen = s->leave_seq;
        was_unwatched = unwatched;
    }
    s->standby = 0;
    pthread_cond_signal(&s->work); /* another worker becomes the standby */
}

/* Leader/followers: the thread that reads a request answers it, so a
 * request costs no thread hand-off and no extra wake-up.  One waiting
 * thread holds the poller role (in epoll_wait, without the GIL) and comes
 * back with the requests it read; it takes one, and leaves the loop to the
 * standby's watch (standby_wait) until it returns and polls again. */
int ovl_grpc_next(struct ovl_grpc_server *s, struct ovl_grpc_call **out)
{
    int polled = 0;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        struct call *call = s->qhead;
        if (call) {
            s->qhead = call->qnext;
            if (!s->qhead)
                s->qtail = NULL;
            call->qnext = NULL;
            if (s->qhead) { /* more for other workers */
                pthread_cond_signal(&s->work);
                if (s->standby)
                    pthread_cond_signal(&s->standby_cv);
            } else if (!s->standby) {
                /* leaving with nobody to watch the loop: a waiting worker
                 * becomes the standby (or the poller) */
                pthread_cond_signal(&s->work);
            }
            if (polled) {
                s->leave_seq++;
                if (s->standby_idle)
                    pthread_cond_signal(&s->standby_cv);
            }
            pthread_mutex_unlock(&s->mu);
            *out = &call->pub;
            return 0;
        }
        if (s->stopped) {
            pthread_mutex_unlock(&s->mu);
            errno = ESHUTDOWN;
            return -1;
        }
        if (!s->polling) {
            s->polling = 1;
            pthread_mutex_unlock(&s->mu);
            poll_round(s, -1);
            pthread_mutex_lock(&s->mu);
            s->polling = 0;
            polled = 1;
            if (s->draining)
                pthread_cond_broadcast(&s->idle); /* shutdown may want the role */
            continue;
        }
        polled = 0;
        if (!s->standby)
            standby_wait(s);
        else
            pthread_cond_wait(&s->work, &s->mu);
    }
}

int ovl_grpc_reply(struct ovl_grpc_server *s, struct ovl_grpc_call *pub, int status,
                   const char *message, const unsigned char *body, size_t body_len)
{
    struct call *call = (struct call *)pub;
    struct conn *c = call->conn;
    pthread_mutex_lock(&c->mu);
    int rv = -1, err = EPIPE;
    if (!c->dead && !call->closed && !c->broken && !c->lingering) {
        call->state = RESPONDING;
        int sub = status == 0 ? submit_body(c, call, body, body_len)
                              : submit_status(c, call, status, message);
        if (sub == 0) {
            /* the stream owns the call now: its close frees it */
            conn_flush(c);
            int draining = __atomic_load_n(&s->draining, __ATOMIC_ACQUIRE);
            pthread_mutex_unlock(&c->mu);
            if (draining)
                wake(s); /* this may have been the conn's last stream */
            return 0;
        }
        err = sub == NGHTTP2_ERR_NOMEM ? ENOMEM : EPIPE;
        nghttp2_session_set_stream_user_data(c->session, call->stream_id, NULL);
        nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, call->stream_id,
                                  NGHTTP2_INTERNAL_ERROR);
        conn_flush(c);
    }
    call_unlink(call);
    pthread_mutex_unlock(&c->mu);
    call_free(call);
    errno = err;
    return rv;
}

static int remaining_ms(const struct timespec *deadline)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ms = (long long)(deadline->tv_sec - now.tv_sec) * 1000 +
                   (deadline->tv_nsec - now.tv_nsec) / 1000000;
    return ms < 0 ? 0 : ms > 100 ? 100 : (int)ms;
}

int ovl_grpc_shutdown(struct ovl_grpc_server *s, int grace_ms)
{
    struct timespec deadline;
    deadline_after(&deadline, grace_ms > 0 ? grace_ms : 0);
    pthread_mutex_lock(&s->mu);
    if (s->closed) {
        pthread_mutex_unlock(&s->mu);
        return 0;
    }
    __atomic_store_n(&s->draining, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&s->mu);
    wake(s); /* the poller: GOAWAY everyone, stop accepting */
    pthread_mutex_lock(&s->mu);
    /* Drain: workers keep answering; when nobody polls, poll here. */
    for (;;) {
        int left = remaining_ms(&deadline);
        if (!(s->nconns || s->pending) || left == 0)
            break;
        if (!s->polling) {
            s->polling = 1;
            pthread_mutex_unlock(&s->mu);
            poll_round(s, left);
            pthread_mutex_lock(&s->mu);
            s->polling = 0;
            pthread_cond_signal(&s->work);
            continue;
        }
        struct timespec step;
        deadline_after(&step, left);
        pthread_cond_timedwait(&s->idle, &s->mu, &step);
    }
    int cut = (int)s->nconns;
    s->stopped = 1;
    pthread_cond_broadcast(&s->work);
    pthread_cond_broadcast(&s->standby_cv);
    /* take the poller role for good, then cut what is left */
    while (s->polling) {
        pthread_mutex_unlock(&s->mu);
        wake(s);
        pthread_mutex_lock(&s->mu);
        struct timespec step;
        deadline_after(&step, 10);
        pthread_cond_timedwait(&s->idle, &s->mu, &step);
    }
    s->polling = 1;
    s->closed = 1;
    pthread_mutex_unlock(&s->mu);
    while (s->conns)
        conn_close(s->conns);
    if (s->listen_fd >= 0) {
        epoll_ctl(s->epfd, EPOLL_CTL_DEL, s->listen_fd, NULL);
        close(s->listen_fd);
        s->listen_fd = -1;
    }
    return cut;
}

void ovl_grpc_stats(struct ovl_grpc_server *s, struct ovl_grpc_stats *st)
{
    pthread_mutex_lock(&s->mu);
    st->accepted = s->accepted;
    st->connections = s->nconns;
    st->calls = s->calls;
    st->pending = s->pending;
    st->rejected = s->rejected;
    st->shed = s->shed;
    pthread_mutex_unlock(&s->mu);
    st->buffered = ld(&s->buffered);
}

void ovl_grpc_free(struct ovl_grpc_server *s)
{
    if (!s)
        return;
    ovl_grpc_shutdown(s, 0);
    while (s->qhead) { /* never taken by a worker: their conns are closed */
        struct call *call = s->qhead;
        s->qhead = call->qnext;
        call_free(call);
    }
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    close(s->epfd);
    close(s->evfd);
    nghttp2_option_del(s->options);
    nghttp2_session_callbacks_del(s->cbs);
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->idle);
    pthread_cond_destroy(&s->standby_cv);
    pthread_mutex_destroy(&s->mu);
    free(s->rbuf);
    free(s);
}
