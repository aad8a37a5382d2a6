/* overlay's gRPC transport: HTTP/2 (libnghttp2) served from C, handlers in Python.
 *
 * Python worker threads call ovl_grpc_next() (the GIL is released while they
 * wait); one of them at a time runs the event loop: it accepts connections
 * on the listening socket, runs one nghttp2 server session per connection
 * and assembles each request (its :path, its metadata and its single
 * length-prefixed message), then answers the request it read itself while
 * another waiting worker takes over the loop (leader/followers: no thread
 * hand-off per request).  ovl_grpc_reply() submits and writes the response
 * from the worker.  Everything below HTTP/2 framing is nghttp2's.
 *
 * Like ovl.h, this header is also cffi's cdef: plain declarations only.
 *
 * Ownership (the one exception to "C never allocates what Python frees"):
 * ovl_grpc_start() returns a handle that only ovl_grpc_free() releases, and
 * every call ovl_grpc_next() hands out is released by exactly one
 * ovl_grpc_reply().  Python never frees C memory itself.
 */
#ifndef OVL_GRPC_H
#define OVL_GRPC_H

#include <stddef.h>
#include <stdint.h>

/* gRPC status codes used by the transport itself */
#define OVL_GRPC_INTERNAL 13
#define OVL_GRPC_RESOURCE_EXHAUSTED 8
#define OVL_GRPC_UNIMPLEMENTED 12

struct ovl_grpc_server;

/* One request, as a worker sees it (read-only; valid until the reply). */
struct ovl_grpc_call {
    const char *path;              /* ":path", e.g. "/pkg.Service/Method" */
    const char *metadata;          /* "name\0value\0" for each non-pseudo header */
    size_t metadata_len;
    const unsigned char *message;  /* the request message, without its prefix */
    size_t message_len;
};

/* What one server lets its clients hold (ovl_grpc_start).  Over a request
 * limit, that call is answered RESOURCE_EXHAUSTED (at once, with RST_STREAM
 * NO_ERROR if the client is still sending) and its bytes are freed; other
 * calls and clients go on.  When the bytes of all unfinished requests would
 * pass max_buffer, the largest unfinished request of the connection holding
 * the most is refused first, if it is larger than the newcomer.  At
 * max_connections a new connection replaces the oldest one that never opened
 * a stream, else the one idle longest, else one that holds only refused or
 * unfinished requests; when every one has a request queued, being handled or
 * answered, it is closed itself. */
struct ovl_grpc_limits {
    size_t max_message;           /* one request message, in bytes */
    uint32_t max_connections;     /* open at once */
    uint32_t max_streams;         /* concurrent streams per connection (SETTINGS) */
    size_t max_header_bytes;      /* decoded header bytes of one request */
    size_t max_conn_header_bytes; /* ... of one connection's requests held */
    size_t max_conn_buffer;       /* request bytes (headers and messages) one connection holds */
    size_t max_buffer;            /* request bytes all connections hold */
    int request_timeout_ms;       /* a request must arrive in full within this */
    int idle_timeout_ms;          /* a connection without streams is closed (GOAWAY) after this */
};

struct ovl_grpc_stats {
    uint64_t accepted;     /* connections accepted since start */
    uint64_t connections;  /* connections open now */
    uint64_t calls;        /* requests handed to workers since start */
    uint64_t pending;      /* requests queued or being answered now */
    uint64_t rejected;     /* requests the transport answered itself (not gRPC,
                              compressed, malformed, over a limit) */
    uint64_t shed;         /* connections closed for a limit: idle, evicted or
                              refused at max_connections */
    uint64_t buffered;     /* request bytes held now */
};

/* Serve on listen_fd (a listening stream socket; the server owns it from now
 * on, also on failure) within limits (copied; EINVAL if a limit is 0). */
int ovl_grpc_start(int listen_fd, const struct ovl_grpc_limits *limits,
                   struct ovl_grpc_server **out);

/* The next request, waiting for one as long as it takes; -1 with errno
 * ESHUTDOWN once the server stopped and nothing is left to answer. */
int ovl_grpc_next(struct ovl_grpc_server *s, struct ovl_grpc_call **out);

/* Answer call and release it.  status 0: body (length-prefixed messages,
 * body_len bytes, possibly none) then trailers with grpc-status 0; otherwise
 * a trailers-only response with grpc-status and grpc-message (percent-encoded
 * here).  -1 with errno EPIPE when the client went away (nothing is sent;
 * the call is released all the same), ENOMEM. */
int ovl_grpc_reply(struct ovl_grpc_server *s, struct ovl_grpc_call *call, int status,
                   const char *message, const unsigned char *body, size_t body_len);

/* Stop accepting, send GOAWAY, let requests already received finish for up
 * to grace_ms (the calling thread runs the event loop when no worker does),
 * then cut what is left.  Workers then get ESHUTDOWN from ovl_grpc_next.
 * Returns the connections that had to be cut.  Idempotent. */
int ovl_grpc_shutdown(struct ovl_grpc_server *s, int grace_ms);

void ovl_grpc_stats(struct ovl_grpc_server *s, struct ovl_grpc_stats *stats);

/* Release the server; only after ovl_grpc_shutdown and once no worker is
 * inside ovl_grpc_next or holds a call. */
void ovl_grpc_free(struct ovl_grpc_server *s);

#endif
