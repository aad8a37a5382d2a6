"""A gRPC server: the C core's HTTP/2 transport and a pool of Python workers.

Why not grpcio's server: through containerd, every snapshot operation costs
one or more round trips to the proxy, and containerd's List does one Stat per
snapshot.  grpcio's Python server costs far more per call than our metadata
operations (5-50 us): an echo method called by the same grpcio client took
270 us per call with grpcio's server and about 120 us with this one, on 2
cores (most of it the client's own).  The transport (``native/ovl_grpc.c``
on libnghttp2, which does all of HTTP/2) runs on the workers themselves: one
idle worker waits in epoll without the GIL, reads, and answers the request it
read while another takes the loop over (leader/followers: no thread hand-off
per call).  grpcio stays our client.

What the transport itself answers, never reaching a handler: a request that
is not gRPC (HTTP 405/415), a compressed one (UNIMPLEMENTED), one over a
limit of :class:`~overlay._native.GrpcLimits` (RESOURCE_EXHAUSTED), a
missing, truncated or second request message (INTERNAL), a malformed one
(RST_STREAM).  Handlers serve unary-request methods; a streaming
response is sent as its messages one after another.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterable

import grpc
from google.protobuf.message import Message

from overlay._native import GrpcCall, GrpcLimits, GrpcTransport

__all__ = ["Dispatch", "Reply", "RpcServer", "frame"]

log = logging.getLogger(__name__)

#: (grpc status, message, length-prefixed response messages)
Reply = tuple[grpc.StatusCode, str, bytes]
Dispatch = Callable[[GrpcCall], Reply]

_PREFIX = struct.Struct(">BI")


def frame(messages: Iterable[Message | bytes]) -> bytes:
    """Messages (or their serialized bytes) as a gRPC body: each with its
    uncompressed-flag and length prefix."""
    parts = []
    for message in messages:
        data = message if isinstance(message, bytes) else message.SerializeToString()
        parts.append(_PREFIX.pack(0, len(data)))
        parts.append(data)
    return b"".join(parts)


class RpcServer:
    """Serves ``dispatch`` on ``listener`` once started; :meth:`stop` drains."""

    def __init__(self, listener: socket.socket, dispatch: Dispatch, *,
                 workers: int, limits: GrpcLimits) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._transport = GrpcTransport(listener, limits)
        self._dispatch = dispatch
        self._threads = [
            threading.Thread(target=self._work, name=f"ovl-rpc-{i}", daemon=True)
            for i in range(workers)
        ]
        self._started = False
        self._stopped = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._started or self._stopped:
                raise RuntimeError("an RpcServer starts once")
            self._started = True
        for t in self._threads:
            t.start()

    def stats(self) -> dict[str, int]:
        """The transport's counters (:meth:`GrpcTransport.stats`)."""
        return self._transport.stats()

    def _work(self) -> None:
        transport = self._transport
        while (call := transport.next()) is not None:
            try:
                code, message, body = self._dispatch(call)
            except BaseException as exc:  # dispatch maps errors; this is the last net
                log.error("%s: dispatch failed", call.path, exc_info=exc)
                code, message, body = (grpc.StatusCode.INTERNAL,
                                       f"{type(exc).__name__}: {exc}: internal", b"")
            transport.reply(call, int(code.value[0]), message, body)

    def stop(self, grace: float | None = None) -> int:
        """Stop accepting, let calls already received finish for ``grace``
        seconds (None: none), cut the rest.  Returns the connections cut.
        Idempotent; the socket's file (if any) is the caller's to remove."""
        with self._lock:
            if self._stopped:
                return 0
            self._stopped = True
        cut = self._transport.shutdown(grace or 0.0)
        if not self._started:
            self._transport.close()
            return cut
        for t in self._threads:
            t.join(timeout=(grace or 0.0) + 10.0)
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            # a handler still runs: its reply needs the transport, so keep it
            log.warning("workers still busy after shutdown: %s", ", ".join(stuck))
        else:
            self._transport.close()
        return cut
