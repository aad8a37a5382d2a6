/* libFuzzer target: ovl_grpc's HTTP/2 + gRPC server, fed a client's bytes.
 *
 * Each input is one connection to a fresh server: two flags bytes, then
 * the bytes a client sends.  The harness is the client and the worker at once,
 * in one thread, so a run is deterministic: it writes the client's bytes a
 * frame at a time (or all at once) to a real unix socket, runs the server's
 * event loop (poll_round) until nothing moves, reads what the server sent
 * (checking that it is a sequence of well-formed frames), and answers every
 * call the server hands out as a worker would -- some with a body (large
 * enough to run into flow control), some with an error status, some later
 * (after more client bytes, or after the connection is gone) -- then ends
 * the connection one of four ways (client EOF, client close, graceful
 * shutdown, shutdown with no grace).
 *
 * It #includes ovl_grpc.c for poll_round (the event loop without the
 * leader/followers role: ovl_grpc_next would block in epoll_wait when
 * nothing is queued) and stays off its other internals: calls come from
 * ovl_grpc_next once ovl_grpc_stats says one is queued, answers go through
 * ovl_grpc_reply, the end through ovl_grpc_shutdown and ovl_grpc_free.
 * Time is virtual (clock_gettime below): it passes only when the server
 * would sleep in epoll_wait with nothing to do, so PING acknowledgements,
 * lingering closes and idle timeouts fire on the input's schedule, not the
 * machine's.  The flags (the first byte, then the second):
 *
 *   bit 0     prepend the client connection preface
 *   bit 1     a small send buffer on the server's socket (partial writes, EPOLLOUT)
 *   bit 2     60 ms pass between two client writes
 *   bit 3     the client writes everything at once instead of a frame at a time
 *   bit 4     small limits (a 4 KiB message, 1 KiB of headers, 4 streams,
 *             100 ms per request...) instead of the daemon's defaults
 *   bits 5-6  the end: client EOF, client close, graceful shutdown, cut
 *   bit 7     calls are answered newest first, after each write
 *   bit 8     during a graceful shutdown the client never hangs up (the
 *             server's linger runs out)
 *   bit 9     a graceful shutdown starts halfway through the input; the
 *             client goes on sending the rest during it
 *
 * The worker's answer depends on the first byte of the request message
 * (see answer()).  Build: tests/fuzz/native.py (python -m tests.fuzz).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------ virtual time */

static int64_t fuzz_now_ns = 1000000000LL;

static int fuzz_clock_gettime(clockid_t clk, struct timespec *ts)
{
    (void)clk;
    ts->tv_sec = fuzz_now_ns / 1000000000LL;
    ts->tv_nsec = fuzz_now_ns % 1000000000LL;
    return 0;
}

static int fuzz_epoll_events; /* what the last epoll_wait returned */

/* While ovl_grpc_shutdown runs the loop itself: the client and a worker,
 * acting while the server waits (idle 0), and once nothing is ready (idle
 * 1, returns 1 when that changed anything). */
static int (*fuzz_hook)(int idle);

/* Never sleeps: with nothing ready, the time the server asked to wait
 * passes at once.  Waiting forever with nothing ready is a harness bug. */
static int fuzz_epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout_ms)
{
    if (fuzz_hook)
        fuzz_hook(0);
    int n = epoll_wait(epfd, evs, max, 0);
    if (n == 0 && fuzz_hook && fuzz_hook(1))
        n = epoll_wait(epfd, evs, max, 0);
    if (n == 0) {
        if (timeout_ms < 0) {
            fprintf(stderr, "grpc_fuzz: the server would wait forever with nothing to do\n");
            abort();
        }
        fuzz_now_ns += (int64_t)timeout_ms * 1000000LL;
    }
    fuzz_epoll_events = n > 0 ? n : 0;
    return n;
}

static int fuzz_small_sndbuf;

static int fuzz_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    int c = accept4(fd, addr, len, flags);
    if (c >= 0 && fuzz_small_sndbuf) {
        int size = 4096; /* the kernel doubles it, and has a floor */
        setsockopt(c, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    }
    return c;
}

#define clock_gettime fuzz_clock_gettime
#define epoll_wait fuzz_epoll_wait
#define accept4 fuzz_accept4
#include "../ovl_grpc.c"
#undef clock_gettime
#undef epoll_wait
#undef accept4

/* ------------------------------------------------------------------ checks */

#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "grpc_fuzz: check failed: %s: ", #cond);                       \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fprintf(stderr, "\n");                                                         \
            abort();                                                                       \
        }                                                                                  \
    } while (0)

static const char PREFACE[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
#define PREFACE_LEN (sizeof PREFACE - 1)

enum { END_EOF, END_CLOSE, END_DRAIN, END_CUT };
#define STAY (1u << 8)        /* the client never hangs up during a drain */
#define DRAIN_EARLY (1u << 9) /* the drain starts halfway through the input */

/* What the server sent, checked frame by frame as it arrives. */
struct peer {
    unsigned char hdr[9];
    size_t have;       /* bytes of hdr read */
    size_t payload;    /* payload bytes still to skip */
    uint64_t frames;
    uint64_t bytes;
};

static void check_frame(struct peer *p)
{
    const unsigned char *h = p->hdr;
    uint32_t len = (uint32_t)h[0] << 16 | (uint32_t)h[1] << 8 | h[2];
    uint8_t type = h[3];
    uint32_t stream = ((uint32_t)h[5] << 24 | (uint32_t)h[6] << 16 | (uint32_t)h[7] << 8 | h[8]) &
                      0x7fffffffu;
    if (p->frames == 0)
        CHECK(type == NGHTTP2_SETTINGS && stream == 0 && !(h[4] & NGHTTP2_FLAG_ACK),
              "the server's first frame is type %u on stream %u", type, stream);
    switch (type) {
    case NGHTTP2_DATA:
    case NGHTTP2_HEADERS:
    case NGHTTP2_RST_STREAM:
    case NGHTTP2_CONTINUATION:
        CHECK(stream % 2 == 1, "frame type %u on stream %u (not a client stream)", type, stream);
        break;
    case NGHTTP2_SETTINGS:
    case NGHTTP2_PING:
    case NGHTTP2_GOAWAY:
        CHECK(stream == 0, "frame type %u on stream %u", type, stream);
        break;
    case NGHTTP2_WINDOW_UPDATE:
        CHECK(stream == 0 || stream % 2 == 1, "WINDOW_UPDATE on stream %u", stream);
        break;
    default:
        CHECK(0, "the server sent a frame of type %u", type);
    }
    p->frames++;
    p->payload = len;
}

static void peer_feed(struct peer *p, const unsigned char *data, size_t n)
{
    p->bytes += n;
    while (n) {
        if (p->payload) {
            size_t k = n < p->payload ? n : p->payload;
            p->payload -= k;
            data += k;
            n -= k;
            continue;
        }
        size_t k = 9 - p->have < n ? 9 - p->have : n;
        memcpy(p->hdr + p->have, data, k);
        p->have += k;
        data += k;
        n -= k;
        if (p->have == 9) {
            p->have = 0;
            check_frame(p);
        }
    }
}

/* ------------------------------------------------------------- the session */

#define MAX_HELD 4096

struct session {
    struct ovl_grpc_server *srv;
    int client;        /* the client's end */
    int client_eof;    /* the server closed its side */
    int client_gone;   /* the client cannot write any more */
    struct peer peer;
    struct ovl_grpc_call *held[MAX_HELD]; /* taken from ovl_grpc_next, not answered yet */
    int nheld;
    size_t max_message;
    int lifo, stay;
    const unsigned char *rest; /* what the client sends during a drain */
    size_t rest_len;
    uint64_t handed, answered;
};

static unsigned char rbuf[1 << 16];

/* Read what the server sent; 1 if anything came. */
static int client_drain(struct session *s)
{
    int got = 0;
    while (!s->client_eof) {
        ssize_t n = recv(s->client, rbuf, sizeof rbuf, MSG_DONTWAIT);
        if (n > 0) {
            peer_feed(&s->peer, rbuf, (size_t)n);
            got = 1;
        } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
            s->client_eof = 1; /* EOF, or ECONNRESET after a cut */
        } else if (errno == EAGAIN) {
            break;
        }
    }
    return got;
}

static const unsigned char *body_bytes(size_t n)
{
    static unsigned char *pattern;
    static size_t cap;
    if (n > cap) {
        free(pattern);
        pattern = malloc(n);
        CHECK(pattern, "out of memory");
        for (size_t i = 0; i < n; i++)
            pattern[i] = (unsigned char)(i * 131 + 7);
        cap = n;
    }
    return pattern;
}

static void reply_checked(struct session *s, struct ovl_grpc_call *call, int status,
                          const char *message, const unsigned char *body, size_t len)
{
    int rv = ovl_grpc_reply(s->srv, call, status, message, body, len);
    CHECK(rv == 0 || errno == EPIPE, "ovl_grpc_reply: %s", strerror(errno));
    s->answered++;
}

/* The worker.  The first byte of the message picks the answer:
 *   0 mod 6  OK, no message                 3  an error status, the request as its text
 *   1        OK, the request echoed back    4  later: after the next client write
 *   2        OK, 16 KiB x byte 2 of body    5  OK, many small messages
 * An empty message is OK with no body. */
static void answer(struct session *s, struct ovl_grpc_call *call)
{
    const unsigned char *m = call->message;
    size_t n = call->message_len;
    if (n == 0) {
        reply_checked(s, call, 0, NULL, NULL, 0);
        return;
    }
    switch (m[0] % 6) {
    case 0:
        reply_checked(s, call, 0, NULL, NULL, 0);
        break;
    case 1: {
        unsigned char *b = malloc(5 + n);
        CHECK(b, "out of memory");
        b[0] = 0;
        b[1] = (unsigned char)(n >> 24);
        b[2] = (unsigned char)(n >> 16);
        b[3] = (unsigned char)(n >> 8);
        b[4] = (unsigned char)n;
        memcpy(b + 5, m, n);
        reply_checked(s, call, 0, NULL, b, 5 + n);
        free(b);
        break;
    }
    case 2: {
        size_t len = (size_t)(n > 1 ? m[1] : 1) * 16384;
        reply_checked(s, call, 0, NULL, body_bytes(len), len);
        break;
    }
    case 3: {
        /* any bytes, NUL-terminated: the status message is percent-encoded */
        char text[256];
        size_t k = n - 1 < sizeof text - 1 ? n - 1 : sizeof text - 1;
        memcpy(text, m + 1, k);
        text[k] = 0;
        reply_checked(s, call, 1 + m[0] / 6 % 16, text, NULL, 0);
        break;
    }
    case 4:
        if (s->nheld < MAX_HELD) {
            s->held[s->nheld++] = call;
            return;
        }
        reply_checked(s, call, 0, NULL, NULL, 0);
        break;
    case 5: {
        size_t count = n > 1 ? m[1] : 0;
        unsigned char *b = calloc(count ? count : 1, 5);
        CHECK(b, "out of memory");
        reply_checked(s, call, 0, NULL, b, count * 5); /* empty messages */
        free(b);
        break;
    }
    }
}

static void check_call(struct session *s, const struct ovl_grpc_call *call)
{
    CHECK(call->path != NULL, "a call without a path");
    CHECK(call->message_len <= s->max_message, "a message of %zu bytes (max %zu)",
          call->message_len, s->max_message);
    CHECK(call->metadata != NULL && call->metadata[call->metadata_len] == 0,
          "metadata not NUL-terminated");
    size_t nuls = 0;
    for (size_t i = 0; i < call->metadata_len; i++)
        nuls += call->metadata[i] == 0;
    CHECK(nuls % 2 == 0 && (call->metadata_len == 0 || call->metadata[call->metadata_len - 1] == 0),
          "metadata is not name\\0value\\0 pairs (%zu NULs in %zu bytes)", nuls,
          call->metadata_len);
}

/* Take and answer every call queued now; 1 if there was one. */
static int work(struct session *s)
{
    struct ovl_grpc_call *taken[256];
    int ntaken = 0, any = 0;
    for (;;) {
        struct ovl_grpc_stats st;
        ovl_grpc_stats(s->srv, &st);
        if (st.calls == s->handed)
            break; /* nothing queued (calls counts them as they queue): next would poll */
        struct ovl_grpc_call *call;
        CHECK(ovl_grpc_next(s->srv, &call) == 0, "ovl_grpc_next: %s", strerror(errno));
        check_call(s, call);
        s->handed++;
        any = 1;
        if (!s->lifo) {
            answer(s, call);
            continue;
        }
        taken[ntaken++] = call;
        if (ntaken == (int)(sizeof taken / sizeof *taken))
            break;
    }
    while (ntaken)
        answer(s, taken[--ntaken]);
    return any;
}

static void answer_held(struct session *s)
{
    int n = s->nheld;
    s->nheld = 0;
    for (int i = 0; i < n; i++)
        reply_checked(s, s->held[i], 0, NULL, NULL, 0);
}

/* Run the server until nothing moves. */
static void pump(struct session *s)
{
    int idle_rounds = 0;
    for (int round = 0;; round++) {
        poll_round(s->srv, 0);
        int events = fuzz_epoll_events;
        int got = client_drain(s);
        int worked = work(s);
        if (!events && !got && !worked)
            return;
        /* events that move nothing, round after round: the loop spins */
        idle_rounds = got || worked ? 0 : idle_rounds + 1;
        CHECK(idle_rounds < 1000, "the event loop spins: %d rounds without progress",
              idle_rounds);
        CHECK(round < 10000000, "the event loop never settles");
    }
}

/* Send what the socket takes of data, without running the server; the
 * number of bytes sent.  The server gone (EPIPE), the client stops. */
static size_t client_send(struct session *s, const unsigned char *data, size_t n)
{
    size_t sent = 0;
    while (sent < n && !s->client_gone) {
        ssize_t k = send(s->client, data + sent, n - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k > 0)
            sent += (size_t)k;
        else if (k < 0 && errno == EINTR)
            continue;
        else if (k < 0 && errno == EAGAIN)
            break;
        else
            s->client_gone = 1; /* EPIPE, ECONNRESET: the server closed the connection */
    }
    return sent;
}

/* Write all of data as the client, running the server while the socket is full. */
static void client_write(struct session *s, const unsigned char *data, size_t n)
{
    while (n && !s->client_gone) {
        size_t k = client_send(s, data, n);
        data += k;
        n -= k;
        if (n) {
            pump(s); /* the server reads, the socket takes more */
            if (s->client_eof)
                s->client_gone = 1;
        }
    }
}

/* Where the next chunk ends: one frame (by its declared length), or the
 * preface on its own. */
static size_t next_chunk(const unsigned char *data, size_t n, int whole)
{
    if (whole)
        return n;
    if (n >= PREFACE_LEN && memcmp(data, PREFACE, PREFACE_LEN) == 0)
        return PREFACE_LEN;
    if (n < 9)
        return n;
    size_t len = 9 + ((size_t)data[0] << 16 | (size_t)data[1] << 8 | data[2]);
    return len < n ? len : n;
}

static int listener(void)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0, "socket: %s", strerror(errno));
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    /* autobind: the kernel picks a free abstract name */
    CHECK(bind(fd, (struct sockaddr *)&addr, sizeof(sa_family_t)) == 0, "bind: %s",
          strerror(errno));
    CHECK(listen(fd, 4) == 0, "listen: %s", strerror(errno));
    return fd;
}

static int connect_to(int lfd)
{
    struct sockaddr_un addr;
    socklen_t len = sizeof addr;
    CHECK(getsockname(lfd, (struct sockaddr *)&addr, &len) == 0, "getsockname: %s",
          strerror(errno));
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0, "socket: %s", strerror(errno));
    CHECK(connect(fd, (struct sockaddr *)&addr, len) == 0, "connect: %s", strerror(errno));
    return fd;
}

/* The drain's client, run whenever shutdown's event loop would wait: it
 * reads what the server sends, answers what is queued and held (a worker
 * running concurrently), sends the rest of its input a chunk at a time
 * (a client that has not seen the GOAWAY yet), and once nothing moves
 * hangs up, as a client does after GOAWAY (unless told to stay). */
static struct session *draining;

static int drain_hook(int idle)
{
    struct session *s = draining;
    if (!idle) {
        client_drain(s);
        work(s);
        answer_held(s);
        if (s->rest_len && !s->client_gone) {
            size_t k = client_send(s, s->rest, next_chunk(s->rest, s->rest_len, 0));
            s->rest += k;
            s->rest_len -= k;
        }
        return 0;
    }
    if (s->client_gone || s->rest_len || s->stay)
        return 0;
    shutdown(s->client, SHUT_WR);
    s->client_gone = 1;
    return 1;
}

static void run(const uint8_t *data, size_t size)
{
    if (size < 2)
        return;
    unsigned flags = data[0] | (unsigned)data[1] << 8;
    data += 2;
    size -= 2;
    struct session s = {0};
    s.lifo = !!(flags & 128);
    s.stay = !!(flags & STAY);
    fuzz_small_sndbuf = !!(flags & 2);
    int lfd = listener();
    s.client = connect_to(lfd);
    /* the daemon's defaults (overlay._native.GrpcLimits), or limits small
     * enough for an input of a few KiB to reach each of them */
    struct ovl_grpc_limits limits = {
        .max_message = 16 << 20, .max_connections = 512, .max_streams = 128,
        .max_header_bytes = 64 << 10, .max_conn_header_bytes = 1 << 20,
        .max_conn_buffer = 32 << 20, .max_buffer = 128 << 20,
        .request_timeout_ms = 30000, .idle_timeout_ms = 600000,
    };
    if (flags & 16)
        limits = (struct ovl_grpc_limits){
            .max_message = 4096, .max_connections = 2, .max_streams = 4,
            .max_header_bytes = 1024, .max_conn_header_bytes = 3072,
            .max_conn_buffer = 12288, .max_buffer = 16384,
            .request_timeout_ms = 100, .idle_timeout_ms = 200,
        };
    s.max_message = limits.max_message;
    CHECK(ovl_grpc_start(lfd, &limits, &s.srv) == 0, "ovl_grpc_start: %s", strerror(errno));
    pump(&s); /* accept; the server's SETTINGS */

    int end = (flags >> 5) & 3;
    size_t before_end = end == END_DRAIN && (flags & DRAIN_EARLY) ? size / 2 : size;
    if (flags & 1)
        client_write(&s, (const unsigned char *)PREFACE, PREFACE_LEN);
    while (before_end && !s.client_gone) {
        size_t k = next_chunk(data, before_end, flags & 8);
        client_write(&s, data, k);
        data += k;
        size -= k;
        before_end -= k;
        pump(&s);
        answer_held(&s); /* the calls put off until after this write */
        pump(&s);
        if (flags & 4) {
            poll_round(s.srv, 60); /* time passes: due PING acks, timeouts */
            pump(&s);
        }
    }

    switch (end) {
    case END_EOF:
        shutdown(s.client, SHUT_WR);
        pump(&s);
        break;
    case END_CLOSE: {
        /* some answers sit unread in the client's socket when it closes (the
         * server's next read fails: ECONNRESET); the others come after it
         * closed, before the server noticed (their send fails) */
        int half = s.nheld / 2;
        for (int i = 0; i < half; i++)
            reply_checked(&s, s.held[i], 0, NULL, NULL, 0);
        close(s.client);
        s.client = -1;
        s.client_gone = 1;
        for (int i = half; i < s.nheld; i++)
            reply_checked(&s, s.held[i], 0, NULL, NULL, 0);
        s.nheld = 0;
        pump(&s);
        break;
    }
    case END_DRAIN:
        s.rest = data;
        s.rest_len = size;
        draining = &s;
        fuzz_hook = drain_hook;
        ovl_grpc_shutdown(s.srv, 1000);
        fuzz_hook = NULL;
        draining = NULL;
        break;
    case END_CUT:
        break;
    }
    ovl_grpc_shutdown(s.srv, 0);
    /* what a worker still holds is answered after all: the conn is gone */
    for (int i = 0; i < s.nheld; i++) {
        errno = 0;
        CHECK(ovl_grpc_reply(s.srv, s.held[i], 0, NULL, NULL, 0) == -1 && errno == EPIPE,
              "a reply after shutdown did not fail with EPIPE");
    }
    s.nheld = 0;
    /* calls queued but never taken: ovl_grpc_next hands them out still */
    struct ovl_grpc_call *call;
    while (ovl_grpc_next(s.srv, &call) == 0) {
        check_call(&s, call);
        s.handed++;
        CHECK(ovl_grpc_reply(s.srv, call, 0, NULL, NULL, 0) == -1 && errno == EPIPE,
              "a reply after shutdown did not fail with EPIPE");
    }
    CHECK(errno == ESHUTDOWN, "ovl_grpc_next after shutdown: %s", strerror(errno));
    struct ovl_grpc_stats st;
    ovl_grpc_stats(s.srv, &st);
    CHECK(st.connections == 0 && st.pending == 0,
          "after shutdown: %llu connections, %llu pending", (unsigned long long)st.connections,
          (unsigned long long)st.pending);
    CHECK(st.calls == s.handed, "calls counted %llu, handed %llu",
          (unsigned long long)st.calls, (unsigned long long)s.handed);
    ovl_grpc_free(s.srv);
    if (s.client >= 0)
        close(s.client);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    run(data, size);
    return 0;
}
