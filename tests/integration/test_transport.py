"""The C gRPC transport (``native/ovl_grpc.c``) on the wire.

Three kinds of client drive it: grpcio (what the project's own client and
containerd's Go client look like on the wire), the pure-Python ``h2`` library
for requests grpcio never sends (wrong method, wrong content type, compressed,
missing/truncated/extra messages), and plain sockets for bytes that are not
HTTP/2 at all.  Every rejected request is checked to have never reached a
worker (the dispatch records what it saw, and ``stats()["calls"]``), and every
misbehaving client to leave the server serving.

Servers are ``RpcServer`` (a worker pool) or a bare ``GrpcTransport`` with the
test's own worker threads where the reply's return value matters.  Each test
gets its own short socket directory under /tmp; every server, transport,
channel and socket is stopped and closed at teardown, even on failure.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import random
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame

from overlay._native import GrpcCall, GrpcLimits, GrpcTransport
from overlay.server.rpc import Reply, RpcServer

C = grpc.StatusCode
OK = C.OK
LONG = 10.0  # seconds: liveness only, never a speed requirement

ECHO = "/pkg.Svc/Echo"
BLOCK = "/pkg.Svc/Block"
FAIL = "/pkg.Svc/Fail"
EMPTY = "/pkg.Svc/Empty"
RAISE = "/pkg.Svc/Raise"
BIG = "/pkg.Svc/Big"

#: an error message with non-ASCII, '%', control characters and both edges
#: of the printable range
FAIL_MESSAGE = "bad: 100% «é» ~\n\t\x7f!"
FAIL_MESSAGE_WIRE = b"bad: 100%25 %C2%AB%C3%A9%C2%BB ~%0A%09%7F!"


def prefixed(message: bytes, compressed: int = 0) -> bytes:
    """One gRPC message: compressed flag, 32-bit big-endian length, bytes."""
    return struct.pack(">BI", compressed, len(message)) + message


def big(n: int) -> bytes:
    return random.Random(n).randbytes(n)


def wait_for(pred: Callable[[], bool], timeout: float = LONG) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_error(path: str) -> int | None:
    """errno of connecting to ``path`` (None: the connection was accepted)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(LONG)
        sock.connect(path)
    except OSError as exc:
        return exc.errno
    finally:
        sock.close()
    return None


# ----------------------------------------------------------------------------- handlers


class Recorder:
    """A dispatch (for RpcServer) and handler (for bare transports) that notes
    every call it gets.  Methods: Echo (the message back), Block (waits for
    ``release``), Fail (FAIL_MESSAGE as NOT_FOUND), Empty (OK, no message),
    Raise (an exception), Big (as many pseudo-random bytes as the message says)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[GrpcCall] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def paths(self) -> list[str]:
        with self.lock:
            return [c.path for c in self.calls]

    def __call__(self, call: GrpcCall) -> Reply:
        with self.lock:
            self.calls.append(call)
        if call.path == ECHO:
            return OK, "", prefixed(call.message)
        if call.path == BLOCK:
            self.entered.set()
            if not self.release.wait(60):
                return C.DEADLINE_EXCEEDED, "never released", b""
            return OK, "", prefixed(b"unblocked:" + call.message)
        if call.path == FAIL:
            return C.NOT_FOUND, FAIL_MESSAGE, b""
        if call.path == EMPTY:
            return OK, "", b""
        if call.path == RAISE:
            raise ValueError("boom")
        if call.path == BIG:
            return OK, "", prefixed(big(int(call.message)))
        return C.UNIMPLEMENTED, f"unknown method {call.path}", b""


def blocked(rec: Recorder, n: int) -> Callable[[], bool]:
    """Whether ``n`` Block calls reached the handler."""
    return lambda: rec.paths().count(BLOCK) == n


class Workers:
    """Worker threads over a bare GrpcTransport, noting what each reply returned."""

    def __init__(self, transport: GrpcTransport, n: int, handler: Recorder) -> None:
        self.transport = transport
        self.handler = handler
        self.lock = threading.Lock()
        self.replies: list[tuple[str, bool]] = []
        self.finished = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        try:
            while (call := self.transport.next()) is not None:
                try:
                    code, message, body = self.handler(call)
                except Exception as exc:
                    code, message, body = C.INTERNAL, str(exc), b""
                status = int(code.value[0])
                ok = self.transport.reply(call, status, message, body if status == 0 else b"")
                with self.lock:
                    self.replies.append((call.path, ok))
        except BaseException as exc:
            with self.lock:
                self.errors.append(exc)
        with self.lock:
            self.finished += 1

    def reply_for(self, path: str) -> list[bool]:
        with self.lock:
            return [ok for p, ok in self.replies if p == path]

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)


# ----------------------------------------------------------------------------- h2 client


def _b(x: bytes | str) -> bytes:
    return x.encode("latin-1") if isinstance(x, str) else bytes(x)


def _headers(hs: Sequence[Any] | None) -> list[tuple[bytes, bytes]]:
    return [(_b(n), _b(v)) for n, v in (hs or [])]


@dataclass
class Response:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytes = b""
    trailers: list[tuple[bytes, bytes]] | None = None
    reset: int | None = None  # RST_STREAM error code
    ended: bool = False


def grpc_headers(path: str = ECHO, *, method: str = "POST",
                 content_type: str | None = "application/grpc",
                 extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    hs = [(":method", method), (":scheme", "http"), (":path", path),
          (":authority", "localhost")]
    if content_type is not None:
        hs.append(("content-type", content_type))
    hs.append(("te", "trailers"))
    hs.extend(extra)
    return hs


class H2Client:
    """A minimal HTTP/2 client over a unix socket, driven by hand."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(LONG)
        self.sock.connect(path)
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.flush()
        self.responses: dict[int, Response] = {}
        self.ping_acks: list[bytes] = []
        self.terminated = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def send(self, headers: Sequence[tuple[str, str]], chunks: Sequence[bytes] = (),
             *, end: bool = True, trailers: Sequence[tuple[str, str]] | None = None) -> int:
        """A request: headers, one DATA frame per chunk, END_STREAM on the last
        frame when ``end`` (or request trailers carrying it)."""
        sid: int = self.conn.get_next_available_stream_id()
        self.responses[sid] = Response()
        ends_with_data = end and trailers is None
        # latin-1: a str stands for exactly its bytes on the wire
        self.conn.send_headers(sid, [(_b(n), _b(v)) for n, v in headers],
                               end_stream=ends_with_data and not chunks)
        for i, chunk in enumerate(chunks):
            self.conn.send_data(sid, chunk, end_stream=ends_with_data and i == len(chunks) - 1)
        if end and trailers is not None:
            self.conn.send_headers(sid, [(_b(n), _b(v)) for n, v in trailers], end_stream=True)
        self.flush()
        return sid

    def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid)
        self.flush()

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                self.responses[ev.stream_id].headers = _headers(ev.headers)
            elif isinstance(ev, h2.events.DataReceived):
                r = self.responses[ev.stream_id]
                r.data += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                self.responses[ev.stream_id].trailers = _headers(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                self.responses[ev.stream_id].ended = True
            elif isinstance(ev, h2.events.StreamReset):
                r = self.responses[ev.stream_id]
                r.reset = int(ev.error_code or 0)
                r.ended = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.terminated = True
            elif isinstance(ev, h2.events.PingAckReceived):
                self.ping_acks.append(ev.ping_data)
        self.flush()

    def wait_ping_ack(self, data: bytes, timeout: float = LONG) -> bool:
        deadline = time.monotonic() + timeout
        while data not in self.ping_acks:
            if time.monotonic() > deadline:
                return False
            try:
                self._receive()
            except TimeoutError:
                return False
        return True

    def response(self, sid: int, timeout: float = LONG) -> Response:
        deadline = time.monotonic() + timeout
        while not self.responses[sid].ended:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete response on stream {sid}")
            self._receive()
        return self.responses[sid]

    def echo_ok(self, message: bytes = b"still serving") -> None:
        """A valid request on this connection is answered."""
        r = self.response(self.send(grpc_headers(ECHO), [prefixed(message)]))
        assert r.headers == [(b":status", b"200"), (b"content-type", b"application/grpc")]
        assert r.data == prefixed(message)
        assert r.trailers == [(b"grpc-status", b"0")]


def read_raw(sock: socket.socket, sid: int, timeout: float = LONG,
             ) -> tuple[Response, list[Frame]]:
    """Read frames off ``sock`` by hand until the server closes it, noting
    stream ``sid``'s response: for a connection whose server frames were never
    fed to h2 (h2 refuses every frame after a GOAWAY, even those of the
    streams the GOAWAY let through)."""
    decoder = hpack.Decoder()
    resp, frames, buf = Response(), [], b""
    deadline = time.monotonic() + timeout
    while True:
        while len(buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length:
                break
            frame.parse_body(memoryview(buf[9:9 + length]))
            buf = buf[9 + length:]
            frames.append(frame)
            if isinstance(frame, HeadersFrame):
                hs = _headers(list(decoder.decode(frame.data)))  # every one: HPACK state
                if frame.stream_id == sid:
                    if resp.headers:
                        resp.trailers = hs
                    else:
                        resp.headers = hs
            elif isinstance(frame, DataFrame) and frame.stream_id == sid:
                resp.data += frame.data
            if frame.stream_id == sid and "END_STREAM" in frame.flags:
                resp.ended = True
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server kept the connection open (stream {sid} "
                               f"ended: {resp.ended})")
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return resp, frames
        buf += data


def status_only(code: int, message: bytes | None, *, accept_identity: bool = False,
                ) -> list[tuple[bytes, bytes]]:
    """A trailers-only response's headers, exactly as the transport sends them."""
    hs = [(b":status", b"200"), (b"content-type", b"application/grpc"),
          (b"grpc-status", str(code).encode())]
    if message:
        hs.append((b"grpc-message", message))
    if accept_identity:
        hs.append((b"grpc-accept-encoding", b"identity"))
    return hs


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Served:
    server: RpcServer
    path: str
    recorder: Recorder

    @property
    def target(self) -> str:
        return "unix://" + self.path

    def stats(self) -> dict[str, int]:
        return self.server.stats()


@dataclass
class Bare:
    transport: GrpcTransport
    path: str
    recorder: Recorder
    workers: Workers | None


class Env:
    """Everything a test starts, stopped and closed by ``cleanup``."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ovlt-", dir="/tmp")
        self.n = 0
        self.servers: list[Served] = []
        self.bares: list[Bare] = []
        self.channels: list[Any] = []
        self.h2s: list[H2Client] = []
        self.socks: list[socket.socket] = []

    def sock_path(self) -> str:
        self.n += 1
        path = os.path.join(self.dir, f"s{self.n}.sock")
        assert len(path.encode()) < 108
        return path

    def server(self, *, workers: int = 2, max_message: int = 4 << 20,
               **limits: Any) -> Served:
        path = self.sock_path()
        rec = Recorder()
        server = RpcServer(listen(path), rec, workers=workers,
                           limits=GrpcLimits(max_message=max_message, **limits))
        served = Served(server, path, rec)
        self.servers.append(served)
        server.start()
        return served

    def bare(self, *, workers: int = 2, max_message: int = 4 << 20, **limits: Any) -> Bare:
        path = self.sock_path()
        rec = Recorder()
        bare = Bare(GrpcTransport(listen(path), GrpcLimits(max_message=max_message, **limits)),
                    path, rec, None)
        self.bares.append(bare)
        if workers:
            bare.workers = Workers(bare.transport, workers, rec)
        return bare

    def channel(self, target: str) -> Any:
        ch = grpc.insecure_channel(target)
        self.channels.append(ch)
        return ch

    def h2(self, path: str) -> H2Client:
        client = H2Client(path)
        self.h2s.append(client)
        return client

    def raw(self, path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socks.append(sock)
        sock.settimeout(LONG)
        sock.connect(path)
        return sock

    def cleanup(self) -> None:
        for ch in self.channels:
            ch.close()
        for c in self.h2s:
            c.close()
        for s in self.socks:
            s.close()
        for served in self.servers:
            served.recorder.release.set()
        for bare in self.bares:
            bare.recorder.release.set()
        try:
            for served in self.servers:
                served.server.stop(0)
            for bare in self.bares:
                bare.transport.shutdown(0)
                if bare.workers is None or bare.workers.join(LONG):
                    bare.transport.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    try:
        yield e
    finally:
        e.cleanup()


def echo(channel: Any, message: bytes, **kw: Any) -> bytes:
    result: bytes = channel.unary_unary(ECHO)(message, timeout=LONG, **kw)
    return result


# ----------------------------------------------------------------------------- 1. grpcio


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("size", [0, 1, 100, 16 * 1024 + 3, (1 << 20) + 17, (3 << 20) + 5])
def test_grpcio_echo(env: Env, size: int, workers: int) -> None:
    s = env.server(workers=workers)
    ch = env.channel(s.target)
    message = random.Random(size).randbytes(size)
    assert echo(ch, message) == message
    assert s.recorder.paths() == [ECHO]
    assert s.recorder.calls[0].message == message
    st = s.stats()
    assert st["calls"] == 1
    assert wait_for(lambda: s.stats()["pending"] == 0)


def test_grpcio_message_at_the_limit_is_served(env: Env) -> None:
    s = env.server(max_message=1024)
    ch = env.channel(s.target)
    assert echo(ch, b"x" * 1024) == b"x" * 1024


def test_grpcio_metadata_in_order(env: Env) -> None:
    s = env.server()
    ch = env.channel(s.target)
    sent = (("containerd-namespace", "k8s.io"), ("x-b", "2"), ("x-a", "1"), ("x-b", "3"),
            ("containerd-lease", "lease-1"))
    assert echo(ch, b"m", metadata=sent) == b"m"
    [call] = s.recorder.calls
    assert call.path == ECHO
    md = call.metadata
    assert all(not name.startswith(":") for name, _ in md)
    assert ("content-type", "application/grpc") in md
    custom = tuple(kv for kv in md if kv[0] in {"containerd-namespace", "containerd-lease",
                                                  "x-a", "x-b"})
    assert custom == sent


def test_grpcio_error_status_message_intact(env: Env) -> None:
    s = env.server()
    ch = env.channel(s.target)
    with pytest.raises(grpc.RpcError) as info:
        ch.unary_unary(FAIL)(b"", timeout=LONG)
    assert info.value.code() == C.NOT_FOUND
    assert info.value.details() == FAIL_MESSAGE


def test_grpcio_handler_exception_is_internal(env: Env) -> None:
    s = env.server()
    ch = env.channel(s.target)
    with pytest.raises(grpc.RpcError) as info:
        ch.unary_unary(RAISE)(b"", timeout=LONG)
    assert info.value.code() == C.INTERNAL
    assert info.value.details() == "ValueError: boom: internal"
    assert echo(ch, b"after") == b"after"


@pytest.mark.parametrize("size", [1025, 3 << 20])
def test_grpcio_message_over_max(env: Env, size: int) -> None:
    s = env.server(max_message=1024)
    ch = env.channel(s.target)
    with pytest.raises(grpc.RpcError) as info:
        echo(ch, b"y" * size)
    assert info.value.code() == C.RESOURCE_EXHAUSTED
    assert info.value.details() == f"grpc: received message larger than max ({size} vs. 1024)"
    assert s.recorder.paths() == []
    assert s.stats()["calls"] == 0
    assert s.stats()["rejected"] == 1
    assert echo(ch, b"small") == b"small"
    assert s.recorder.paths() == [ECHO]
    assert s.stats()["rejected"] == 1


def test_grpcio_many_concurrent_calls(env: Env) -> None:
    s = env.server(workers=4)
    channels = [env.channel(s.target) for _ in range(3)]
    threads, per_thread = 8, 150

    def run(t: int) -> list[tuple[bytes, bytes]]:
        ch = channels[t % len(channels)]
        rng = random.Random(t)
        out = []
        for i in range(per_thread):
            msg = f"{t}:{i}:".encode() + rng.randbytes(rng.randrange(0, 2000))
            out.append((msg, echo(ch, msg)))
        return out

    with ThreadPoolExecutor(threads) as pool:
        results = [r for rs in pool.map(run, range(threads)) for r in rs]
    assert len(results) == threads * per_thread
    bad = [(sent[:20], got[:20]) for sent, got in results if sent != got]
    assert bad == []
    assert s.stats()["calls"] == threads * per_thread
    assert len(s.recorder.calls) == threads * per_thread
    assert wait_for(lambda: s.stats()["pending"] == 0)


def test_grpcio_connection_churn(env: Env) -> None:
    s = env.server()
    for i in range(40):
        ch = grpc.insecure_channel(s.target, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            assert echo(ch, b"%d" % i) == b"%d" % i
        finally:
            ch.close()
    assert wait_for(lambda: s.stats()["connections"] == 0), s.stats()
    st = s.stats()
    assert st["accepted"] == 40
    assert st["calls"] == 40
    assert st["pending"] == 0


def test_grpcio_many_streams_on_one_channel(env: Env) -> None:
    s = env.server(workers=3)
    ch = env.channel(s.target)
    method = ch.unary_unary(ECHO)
    futures = [(b"stream %d" % i, method.future(b"stream %d" % i, timeout=LONG))
               for i in range(400)]
    assert [f.result(timeout=LONG) for _, f in futures] == [m for m, _ in futures]
    assert s.stats()["calls"] == 400
    assert s.stats()["connections"] == 1


def test_grpcio_concurrent_large_uploads_on_one_channel(env: Env) -> None:
    """Several messages over the 1 MiB stream window at once on one connection."""
    s = env.server(workers=2, max_message=2 << 20)
    ch = env.channel(s.target)
    method = ch.unary_unary(ECHO)
    messages = [big((3 << 19) + i) for i in range(8)]
    futures = [method.future(m, timeout=LONG) for m in messages]
    assert [f.result(timeout=LONG) == m for f, m in zip(futures, messages, strict=True)] == [
        True] * 8
    assert s.stats()["calls"] == 8


# ----------------------------------------------------------------------------- 2. h2: protocol


def test_h2_ok_response_on_the_wire(env: Env) -> None:
    s = env.server()
    c = env.h2(s.path)
    r = c.response(c.send(grpc_headers(ECHO), [prefixed(b"hello")]))
    assert r.headers == [(b":status", b"200"), (b"content-type", b"application/grpc")]
    assert r.data == prefixed(b"hello")
    assert r.trailers == [(b"grpc-status", b"0")]
    assert r.reset is None
    # OK with no message at all: headers then the OK trailers, no data
    r = c.response(c.send(grpc_headers(EMPTY), [prefixed(b"")]))
    assert r.headers == [(b":status", b"200"), (b"content-type", b"application/grpc")]
    assert r.data == b""
    assert r.trailers == [(b"grpc-status", b"0")]


def test_h2_error_message_percent_encoded(env: Env) -> None:
    s = env.server()
    c = env.h2(s.path)
    r = c.response(c.send(grpc_headers(FAIL), [prefixed(b"")]))
    assert r.headers == status_only(5, FAIL_MESSAGE_WIRE)
    assert r.data == b""
    assert r.trailers is None


def test_h2_metadata_exact(env: Env) -> None:
    s = env.server()
    c = env.h2(s.path)
    extra = [("containerd-namespace", "default"), ("x-b", "2"), ("x-a", "1"), ("x-b", "3"),
             ("user-agent", "h2-test"), ("x-latin", "caf\xe9 au lait"), ("x-empty", "")]
    r = c.response(c.send(grpc_headers(ECHO, extra=extra), [prefixed(b"md")],
                          trailers=[("x-trailer", "ignored")]))
    assert r.data == prefixed(b"md")
    [call] = s.recorder.calls
    assert call.path == ECHO
    assert call.message == b"md"
    assert call.metadata == (("content-type", "application/grpc"), ("te", "trailers"),
                             *extra)


@pytest.mark.parametrize(("limit", "copies"), [(64 << 10, 21), (1 << 20, 348)])
def test_h2_metadata_over_limit(env: Env, limit: int, copies: int) -> None:
    s = env.server(max_header_bytes=limit, max_connection_header_bytes=2 * limit)
    c = env.h2(s.path)
    # HPACK indexes the header once: a megabyte of metadata in a small block.
    # Counted as name + value + 2 per header: :path, content-type and te take 62.
    value = "v" * 3000
    over = [("x-big", value)] * (copies + 1)
    assert 62 + (copies + 1) * 3007 > limit >= 62 + copies * 3007
    r = c.response(c.send(grpc_headers(ECHO, extra=over), [prefixed(b"x")]))
    assert r.headers == status_only(8, b"request metadata larger than %d bytes" % limit)
    assert s.recorder.calls == []
    assert s.stats()["calls"] == 0
    assert s.stats()["rejected"] == 1
    c.echo_ok()
    under = [("x-big", value)] * copies
    r = c.response(c.send(grpc_headers(ECHO, extra=under), [prefixed(b"y")]))
    assert r.data == prefixed(b"y")
    assert s.recorder.calls[-1].metadata[2:] == tuple(under)
    assert wait_for(lambda: s.stats()["buffered"] == 0)


def test_h2_large_response_flow_control(env: Env) -> None:
    """A response far over the client's 64 KiB windows comes whole, sent as
    the client opens its windows."""
    s = env.server(workers=1)
    c = env.h2(s.path)
    n = (2 << 20) + 3
    r = c.response(c.send(grpc_headers(BIG), [prefixed(str(n).encode())]))
    assert r.data == prefixed(big(n))
    assert r.trailers == [(b"grpc-status", b"0")]
    c.echo_ok()


@pytest.mark.parametrize("chunks", [
    [b"\x00", b"\x00\x00", b"\x00\x07ab", b"cdefg"],
    [b"\x00\x00\x00\x00\x07", b"abcdefg"],
    [b"\x00\x00\x00\x00\x07abc", b"", b"defg"],
], ids=["split-prefix", "prefix-then-body", "with-empty-frame"])
def test_h2_message_split_across_frames(env: Env, chunks: list[bytes]) -> None:
    s = env.server()
    c = env.h2(s.path)
    r = c.response(c.send(grpc_headers(ECHO), chunks))
    assert r.data == prefixed(b"abcdefg")
    assert r.trailers == [(b"grpc-status", b"0")]
    assert [call.message for call in s.recorder.calls] == [b"abcdefg"]


@pytest.mark.parametrize("content_type", [
    "application/grpc+proto", "application/grpc;charset=utf-8", "application/grpc+json"])
def test_h2_grpc_content_types_accepted(env: Env, content_type: str) -> None:
    s = env.server()
    c = env.h2(s.path)
    r = c.response(c.send(grpc_headers(ECHO, content_type=content_type), [prefixed(b"ct")]))
    assert r.data == prefixed(b"ct")
    assert r.trailers == [(b"grpc-status", b"0")]


@dataclass(frozen=True)
class Bad:
    headers: list[tuple[str, str]]
    chunks: list[bytes]
    expect: list[tuple[bytes, bytes]]


BAD: dict[str, Bad] = {
    "get": Bad(grpc_headers(method="GET"), [], [(b":status", b"405")]),
    "put-with-message": Bad(grpc_headers(method="PUT"), [prefixed(b"x")],
                            [(b":status", b"405")]),
    "text-plain": Bad(grpc_headers(content_type="text/plain"), [prefixed(b"x")],
                      [(b":status", b"415")]),
    "grpcx": Bad(grpc_headers(content_type="application/grpcx"), [prefixed(b"x")],
                 [(b":status", b"415")]),
    "json": Bad(grpc_headers(content_type="application/json"), [prefixed(b"x")],
                [(b":status", b"415")]),
    "no-content-type": Bad(grpc_headers(content_type=None), [prefixed(b"x")],
                           [(b":status", b"415")]),
    "gzip": Bad(grpc_headers(extra=[("grpc-encoding", "gzip")]), [prefixed(b"x", 1)],
                status_only(12, b"compressed requests are not supported: "
                            b"use grpc-encoding identity", accept_identity=True)),
    "gzip-uncompressed-flag": Bad(grpc_headers(extra=[("grpc-encoding", "gzip")]),
                                  [prefixed(b"x")],
                                  status_only(12, b"compressed requests are not supported: "
                                              b"use grpc-encoding identity",
                                              accept_identity=True)),
    "compressed-flag": Bad(grpc_headers(), [prefixed(b"x", 1)],
                           status_only(13, b"compressed message flag set, "
                                       b"but grpc-encoding is identity")),
    "compressed-flag-identity": Bad(grpc_headers(extra=[("grpc-encoding", "identity")]),
                                    [prefixed(b"x", 1)],
                                    status_only(13, b"compressed message flag set, "
                                                b"but grpc-encoding is identity")),
    "no-message": Bad(grpc_headers(), [], status_only(13, b"the request has no message")),
    "empty-data": Bad(grpc_headers(), [b""], status_only(13, b"the request has no message")),
    "partial-prefix": Bad(grpc_headers(), [b"\x00\x00\x00"],
                          status_only(13, b"the request message is truncated")),
    "truncated": Bad(grpc_headers(), [b"\x00\x00\x00\x00\x0aabcd"],
                     status_only(13, b"the request message is truncated")),
    "truncated-prefix-only": Bad(grpc_headers(), [b"\x00\x00\x00\x00\x0a"],
                                 status_only(13, b"the request message is truncated")),
    "two-messages-one-frame": Bad(grpc_headers(), [prefixed(b"one") + prefixed(b"two")],
                                  status_only(13, b"more than one request message "
                                              b"for a unary call")),
    "two-messages-two-frames": Bad(grpc_headers(), [prefixed(b"one"), prefixed(b"two")],
                                   status_only(13, b"more than one request message "
                                               b"for a unary call")),
    "two-empty-messages": Bad(grpc_headers(), [prefixed(b"") + prefixed(b"")],
                              status_only(13, b"more than one request message "
                                          b"for a unary call")),
    "trailing-byte": Bad(grpc_headers(), [prefixed(b"one") + b"\x00"],
                         status_only(13, b"more than one request message for a unary call")),
    "over-max": Bad(grpc_headers(), [b"\x00\x80\x00\x00\x00abc"],
                    status_only(8, b"grpc: received message larger than max "
                                b"(2147483648 vs. 1024)")),
    "over-max-by-one": Bad(grpc_headers(), [prefixed(b"z" * 1025)],
                           status_only(8, b"grpc: received message larger than max "
                                       b"(1025 vs. 1024)")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_h2_rejected_request(env: Env, case: str) -> None:
    bad = BAD[case]
    s = env.server(max_message=1024)
    c = env.h2(s.path)
    c.echo_ok(b"before")
    r = c.response(c.send(bad.headers, bad.chunks))
    assert r.headers == bad.expect
    assert r.data == b""
    assert r.trailers is None
    assert r.reset is None
    assert s.recorder.paths() == [ECHO]
    assert s.stats()["calls"] == 1
    assert s.stats()["rejected"] == 1  # counted (overlay_grpc_rejected_requests_total)
    # the same connection goes on serving
    c.echo_ok(b"after")
    assert [call.message for call in s.recorder.calls] == [b"before", b"after"]
    assert s.stats()["calls"] == 2
    assert s.stats()["rejected"] == 1
    assert not c.terminated


def test_h2_rejected_requests_interleaved_on_one_connection(env: Env) -> None:
    s = env.server(max_message=1024)
    c = env.h2(s.path)
    sids = [(c.send(bad.headers, bad.chunks), bad) for bad in BAD.values()]
    ok = c.send(grpc_headers(ECHO), [prefixed(b"among them")])
    for sid, bad in sids:
        assert c.response(sid).headers == bad.expect
    assert c.response(ok).data == prefixed(b"among them")
    assert [call.message for call in s.recorder.calls] == [b"among them"]
    assert s.stats()["calls"] == 1


def replaced(name: str, value: str) -> list[tuple[str, str]]:
    """grpc_headers() with pseudo-header ``name`` set to ``value`` in its place."""
    return [(n, value if n == name else v) for n, v in grpc_headers()]


def without(name: str, headers: Sequence[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    return [h for h in (grpc_headers() if headers is None else headers) if h[0] != name]


MALFORMED: dict[str, list[tuple[str, str]]] = {
    "uppercase-name": grpc_headers(extra=[("X-Upper", "v")]),
    "newline-in-value": grpc_headers(extra=[("x-nl", "a\nb")]),
    "cr-in-value": grpc_headers(extra=[("x-cr", "a\rb")]),
    "nul-in-value": grpc_headers(extra=[("containerd-namespace", "a\0b")]),
    "nul-in-name": grpc_headers(extra=[("x-a\0b", "v")]),
    "newline-in-path": grpc_headers(ECHO + "\n"),
    "nul-in-path": grpc_headers(ECHO + "\0x"),
    "no-path": without(":path"),
    "no-method": without(":method"),
    "two-paths": [*grpc_headers()[:3], (":path", ECHO), *grpc_headers()[3:]],
    "two-methods": [(":method", "POST"), *grpc_headers()],
    "unknown-pseudo-header": [(":status", "200"), *grpc_headers()],
    "protocol-pseudo-header": [(":protocol", "websocket"), *grpc_headers()],
    "pseudo-header-after-regular": [*without(":method"), (":method", "POST")],
}


def raw_h2(env: Env, path: str) -> H2Client:
    """An h2 client that sends headers exactly as given, however invalid."""
    c = env.h2(path)
    c.conn = h2.connection.H2Connection(config=h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False, split_outbound_cookies=False))
    c.close()
    c.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.sock.settimeout(LONG)
    c.sock.connect(path)
    c.conn.initiate_connection()
    c.flush()
    return c


@pytest.mark.parametrize("case", list(MALFORMED))
def test_h2_malformed_headers_reset_stream(env: Env, case: str) -> None:
    """What RFC 9113 calls malformed and we still refuse (native/ovl_grpc.c,
    bad_bytes): the stream is reset (PROTOCOL_ERROR), the half-built request
    dropped and counted, the connection goes on."""
    s = env.server()
    c = raw_h2(env, s.path)
    r = c.response(c.send(MALFORMED[case], [prefixed(b"q")]))
    assert r.reset == 1  # PROTOCOL_ERROR
    assert r.headers == []
    c.echo_ok()
    assert s.recorder.paths() == [ECHO]
    assert wait_for(lambda: s.stats()["pending"] == 0)
    assert s.stats()["calls"] == 1
    assert s.stats()["rejected"] == 1


# What real clients send, all served (nghttp2's HTTP messaging checks
# refused the first ones: grpc-go 1.33 sends a socket path as :authority).
SERVED: dict[str, list[tuple[str, str]]] = {
    "authority-socket-path": replaced(":authority", "/run/ovl/overlay.sock"),
    "authority-empty": replaced(":authority", ""),
    "authority-absent": without(":authority"),
    "authority-percent-encoded": replaced(":authority", "%2Frun%2Fovl%2Foverlay.sock"),
    "authority-long": replaced(":authority", "/" + "d/" * 3000 + "s.sock"),
    "authority-with-spaces-and-brackets": replaced(":authority", "[a b]:x"),
    "host-instead-of-authority": [*without(":authority"), ("host", "/run/ovl/overlay.sock")],
    "scheme-absent": without(":scheme"),
    "scheme-unix": replaced(":scheme", "unix"),
    "te-absent": without("te"),
    "te-other": [*without("te"), ("te", "trailers, deflate")],
    "connection-header": grpc_headers(extra=[("connection", "keep-alive")]),
    "content-length-wrong": grpc_headers(extra=[("content-length", "1")]),
    "user-agent-grpc-go": grpc_headers(extra=[("user-agent", "grpc-go/1.33.3")]),
    "user-agent-containerd": grpc_headers(
        extra=[("user-agent", "containerd/1.6.20 grpc-go/1.33.3")]),
    "value-with-edge-spaces": grpc_headers(extra=[("x-sp", " padded ")]),
    "grpc-timeout-hours": grpc_headers(extra=[("grpc-timeout", "1H")]),
    "grpc-timeout-minutes": grpc_headers(extra=[("grpc-timeout", "2M")]),
    "grpc-timeout-seconds": grpc_headers(extra=[("grpc-timeout", "30S")]),
    "grpc-timeout-millis": grpc_headers(extra=[("grpc-timeout", "99999m")]),
    "grpc-timeout-micros": grpc_headers(extra=[("grpc-timeout", "99999999u")]),
    "grpc-timeout-nanos": grpc_headers(extra=[("grpc-timeout", "99999999n")]),
    "binary-metadata": grpc_headers(extra=[("x-trace-bin", "AAEC/w"), ("x-id-bin", "AAEC/w==")]),
    "priority-field": grpc_headers(extra=[("priority", "u=7, i")]),
}


@pytest.mark.parametrize("case", list(SERVED))
def test_h2_what_real_clients_send_is_served(env: Env, case: str) -> None:
    s = env.server()
    c = raw_h2(env, s.path)
    headers = SERVED[case]
    r = c.response(c.send(headers, [prefixed(b"served")]))
    assert r.reset is None
    assert r.headers == [(b":status", b"200"), (b"content-type", b"application/grpc")]
    assert r.data == prefixed(b"served")
    assert r.trailers == [(b"grpc-status", b"0")]
    [call] = s.recorder.calls
    assert call.path == ECHO
    # every regular field reaches the worker as sent, in order
    assert call.metadata == tuple((n, v) for n, v in headers if not n.startswith(":"))
    assert s.stats()["rejected"] == 0


@pytest.mark.parametrize("authority", [
    "/run/overlay-snapshotter/overlay.sock", "", "%2Frun%2Fs.sock", "x" * 4000, "localhost"])
def test_grpcio_any_default_authority(env: Env, authority: str) -> None:
    """grpcio told to send the authority grpc-go 1.33 sends (the socket path),
    an empty one, a percent-encoded one, a long one."""
    s = env.server()
    ch = grpc.insecure_channel(s.target, options=[("grpc.default_authority", authority)])
    env.channels.append(ch)
    for i in range(3):
        assert echo(ch, b"a%d" % i) == b"a%d" % i
    assert s.recorder.paths() == [ECHO] * 3


def test_grpcio_binary_metadata_and_timeout_reach_the_worker(env: Env) -> None:
    s = env.server()
    ch = env.channel(s.target)
    blob = bytes(range(256))
    assert echo(ch, b"b", metadata=(("x-blob-bin", blob),)) == b"b"
    [call] = s.recorder.calls
    md = dict(call.metadata)
    assert base64.b64decode(md["x-blob-bin"] + "==") == blob
    assert md["grpc-timeout"][-1] in "HMSmun" and md["grpc-timeout"][:-1].isdigit()


@pytest.mark.parametrize("then", ["second-response", "ping-ack"])
def test_frames_queued_behind_a_blocked_write_are_sent(env: Env, then: str) -> None:
    """A response larger than the socket buffer while the client does not read
    leaves the rest waiting for EPOLLOUT.  Whatever is queued meanwhile (the
    answer to a second request, a PING ACK) must follow once the client reads
    on, without the client having to send anything more.  Windows are opened
    wide so that reading needs no WINDOW_UPDATE from the client."""
    b = env.bare(workers=2)
    assert b.workers is not None
    c = env.h2(b.path)
    c.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 30})
    c.conn.increment_flow_control_window(1 << 30)
    c.flush()
    c.echo_ok(b"windows open")
    n = 4 << 20
    first = c.send(grpc_headers(BIG), [prefixed(str(n).encode())])
    # answered: far more than the socket takes now waits for EPOLLOUT
    assert wait_for(lambda: b.workers is not None and b.workers.reply_for(BIG) == [True])
    if then == "second-response":
        second = c.send(grpc_headers(ECHO), [prefixed(b"second")])
        # answered while the big response still waits for the socket
        assert wait_for(lambda: b.workers is not None
                        and b.workers.reply_for(ECHO) == [True, True])
    else:
        c.conn.ping(b"pingpong")
        c.flush()
        time.sleep(0.2)  # let the poller read it before we read on (no assertion)
    r = c.response(first)
    assert r.data == prefixed(big(n))
    assert r.trailers == [(b"grpc-status", b"0")]
    if then == "second-response":
        r = c.response(second)  # never came: TimeoutError
        assert r.data == prefixed(b"second")
        assert r.trailers == [(b"grpc-status", b"0")]
    else:
        assert c.wait_ping_ack(b"pingpong")
    assert wait_for(lambda: b.transport.stats()["pending"] == 0)


# ----------------------------------------------------------------------------- 3. garbage


def drained_until_closed(sock: socket.socket, timeout: float = LONG) -> bool:
    """Read until the server closes (EOF or reset)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            continue
    return False


GARBAGE = {
    "http1": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "random": random.Random(1234).randbytes(4096),
    "preface-then-random": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + random.Random(99).randbytes(512),
    "preface-then-non-settings": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                                  + b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_connection_closed(env: Env, case: str) -> None:
    s = env.server()
    sock = env.raw(s.path)
    assert wait_for(lambda: s.stats()["accepted"] == 1)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(GARBAGE[case])  # may find it closed already: what we want
    sock.settimeout(1.0)
    assert drained_until_closed(sock), "the server kept a garbage connection open"
    assert wait_for(lambda: s.stats()["connections"] == 0), s.stats()
    assert s.stats()["calls"] == 0
    assert s.recorder.calls == []
    ch = env.channel(s.target)
    assert echo(ch, b"alive") == b"alive"


# ----------------------------------------------------------------------------- 4. half request


@pytest.mark.parametrize("how", ["close", "reset", "headers-only-close"])
def test_half_request_then_gone(env: Env, how: str) -> None:
    s = env.server(workers=1)
    c = env.h2(s.path)
    chunks = [] if how == "headers-only-close" else [b"\x00\x00\x00\x00\x64" + b"h" * 50]
    sid = c.send(grpc_headers(ECHO), chunks, end=False)
    # a worker is free and a partial request blocks nobody
    ch = env.channel(s.target)
    assert echo(ch, b"meanwhile") == b"meanwhile"
    assert s.stats()["connections"] == 2
    if how == "reset":
        c.reset(sid)
        c.echo_ok(b"same connection")
        assert s.recorder.paths() == [ECHO, ECHO]
        c.close()
    else:
        c.close()
    assert wait_for(lambda: s.stats()["connections"] == 1), s.stats()
    assert all(call.message != b"h" * 50 for call in s.recorder.calls)
    assert s.stats()["calls"] == len(s.recorder.calls)
    assert s.stats()["pending"] == 0
    assert echo(ch, b"after") == b"after"


# ----------------------------------------------------------------------------- 5. client gone


def test_reply_false_when_connection_closed(env: Env) -> None:
    b = env.bare(workers=2)
    assert b.workers is not None
    c = env.h2(b.path)
    c.send(grpc_headers(BLOCK), [prefixed(b"x")])
    assert b.recorder.entered.wait(LONG)
    c.close()
    # the standby worker runs the loop and sees the connection go
    assert wait_for(lambda: b.transport.stats()["connections"] == 0), b.transport.stats()
    assert b.transport.stats()["pending"] == 1
    b.recorder.release.set()
    assert wait_for(lambda: b.workers is not None and b.workers.reply_for(BLOCK) != [])
    assert b.workers.reply_for(BLOCK) == [False]
    assert b.transport.stats()["pending"] == 0
    ch = env.channel("unix://" + b.path)
    assert echo(ch, b"next") == b"next"
    assert b.workers.reply_for(ECHO) == [True]
    assert b.workers.errors == []


def test_reply_false_when_stream_reset(env: Env) -> None:
    b = env.bare(workers=2)
    assert b.workers is not None
    c = env.h2(b.path)
    sid = c.send(grpc_headers(BLOCK), [prefixed(b"x")])
    assert b.recorder.entered.wait(LONG)
    c.reset(sid)
    # answered after the reset on the same connection: the reset was read
    c.echo_ok(b"after reset")
    b.recorder.release.set()
    assert wait_for(lambda: b.workers is not None and b.workers.reply_for(BLOCK) != [])
    assert b.workers.reply_for(BLOCK) == [False]
    assert wait_for(lambda: b.transport.stats()["pending"] == 0)
    c.echo_ok(b"still")
    assert b.transport.stats()["connections"] == 1
    assert b.workers.errors == []


def test_grpcio_client_gone_server_keeps_serving(env: Env) -> None:
    s = env.server(workers=2)
    ch = env.channel(s.target)
    with pytest.raises(grpc.RpcError) as info:
        ch.unary_unary(BLOCK)(b"q", timeout=0.5)
    assert info.value.code() == C.DEADLINE_EXCEEDED
    assert s.recorder.entered.wait(LONG)
    assert s.stats()["pending"] == 1
    assert echo(ch, b"other") == b"other"
    s.recorder.release.set()
    assert wait_for(lambda: s.stats()["pending"] == 0), s.stats()
    assert echo(ch, b"again") == b"again"


# ----------------------------------------------------------------------------- 6. standby


@pytest.mark.parametrize("same_channel", [False, True])
def test_blocked_handler_does_not_stop_others(env: Env, same_channel: bool) -> None:
    s = env.server(workers=2)
    ch1 = env.channel(s.target)
    ch2 = ch1 if same_channel else env.channel(s.target)
    blocked = ch1.unary_unary(BLOCK).future(b"b", timeout=60)
    try:
        assert s.recorder.entered.wait(LONG)
        for i in range(5):
            assert echo(ch2, b"free %d" % i) == b"free %d" % i
        assert not blocked.done()
        assert s.stats()["pending"] == 1
    finally:
        s.recorder.release.set()
    assert blocked.result(timeout=LONG) == b"unblocked:b"
    assert s.stats()["calls"] == 6


@pytest.mark.parametrize("workers", [3, 4])
def test_all_but_one_worker_blocked(env: Env, workers: int) -> None:
    s = env.server(workers=workers)
    blocked_channels = [env.channel(s.target) for _ in range(workers - 1)]
    futures = []
    try:
        for i, ch in enumerate(blocked_channels):
            futures.append(ch.unary_unary(BLOCK).future(b"%d" % i, timeout=60))
            assert wait_for(blocked(s.recorder, i + 1))
        free = env.channel(s.target)
        for i in range(5):
            assert echo(free, b"free %d" % i) == b"free %d" % i
        assert not any(f.done() for f in futures)
        assert s.stats()["pending"] == workers - 1
    finally:
        s.recorder.release.set()
    results = sorted(f.result(timeout=LONG) for f in futures)
    assert results == [b"unblocked:%d" % i for i in range(workers - 1)]


def test_free_worker_serves_round_after_round(env: Env) -> None:
    """Four workers; in each round three calls block their handlers, then a
    fourth call must be served by the fourth worker, then all are released.
    However the roles were handed around in earlier rounds, the idle worker
    must end up watching the loop."""
    s = env.server(workers=4)
    ch = env.channel(s.target)
    block = ch.unary_unary(BLOCK)
    for r in range(20):
        s.recorder.release = threading.Event()
        futures = []
        try:
            for i in range(3):
                futures.append(block.future(b"%d" % i, timeout=60))
                assert wait_for(blocked(s.recorder, 3 * r + i + 1))
            try:
                assert echo(ch, b"round %d" % r) == b"round %d" % r
            except grpc.RpcError as exc:
                pytest.fail(f"round {r}: with 3 of 4 workers blocked the free call got "
                            f"{exc.code()} ({s.stats()})")
        finally:
            s.recorder.release.set()
        assert sorted(f.result(timeout=LONG) for f in futures) == [
            b"unblocked:0", b"unblocked:1", b"unblocked:2"]
        assert wait_for(lambda: s.stats()["pending"] == 0)
    assert s.stats()["calls"] == 80


# ----------------------------------------------------------------------------- 7. shutdown


def test_shutdown_lets_inflight_call_finish(env: Env) -> None:
    s = env.server(workers=2)
    ch = env.channel(s.target)
    assert echo(ch, b"warm") == b"warm"
    blocked = ch.unary_unary(BLOCK).future(b"late", timeout=60)
    assert s.recorder.entered.wait(LONG)
    result: list[int] = []
    stopper = threading.Thread(target=lambda: result.append(s.server.stop(30.0)))
    stopper.start()
    try:
        # shutdown has begun once the listener is gone
        assert wait_for(lambda: connect_error(s.path) == errno.ECONNREFUSED)
        assert stopper.is_alive()
        assert not blocked.done()
    finally:
        s.recorder.release.set()
    assert blocked.result(timeout=LONG) == b"unblocked:late"
    stopper.join(LONG)
    assert not stopper.is_alive()
    assert result == [0]
    assert connect_error(s.path) == errno.ECONNREFUSED
    assert s.recorder.paths() == [ECHO, BLOCK]


def test_shutdown_grace_zero_cuts_stuck_call(env: Env) -> None:
    s = env.server(workers=2)
    ch = env.channel(s.target)
    blocked = ch.unary_unary(BLOCK).future(b"stuck", timeout=60)
    assert s.recorder.entered.wait(LONG)
    result: list[int] = []
    stopper = threading.Thread(target=lambda: result.append(s.server.stop(0)))
    stopper.start()
    try:
        exc = blocked.exception(timeout=LONG)
        assert isinstance(exc, grpc.RpcError)
        print("client saw", exc.code(), exc.details())
        assert exc.code() in {C.UNAVAILABLE, C.INTERNAL, C.CANCELLED}
    finally:
        s.recorder.release.set()
    stopper.join(3 * LONG)
    assert not stopper.is_alive()
    assert result == [1]
    assert connect_error(s.path) == errno.ECONNREFUSED


def graceful_shutdown_round(env: Env) -> None:
    """Both workers blocked: nobody runs the loop, so a request sent now waits
    in the socket.  stop(grace) reads it before its GOAWAY; once the handlers
    are released within the grace, all three calls are answered: the two
    grpcio calls get their OK answers, the raw request its response and a
    GOAWAY that let its stream through, and nothing is cut."""
    s = env.server(workers=2)
    c = env.h2(s.path)  # what the server sends is read by read_raw only
    assert wait_for(lambda: s.stats()["accepted"] == 1)  # a connection the server knows
    chans = [env.channel(s.target) for _ in range(2)]
    futures = []
    for i, ch in enumerate(chans):
        futures.append(ch.unary_unary(BLOCK).future(b"%d" % i, timeout=60))
        assert wait_for(blocked(s.recorder, i + 1))
    sid = c.send(grpc_headers(ECHO), [prefixed(b"queued")])
    assert s.stats()["calls"] == 2  # not read: no worker runs the loop
    result: list[int] = []
    stopper = threading.Thread(target=lambda: result.append(s.server.stop(30.0)))
    stopper.start()
    try:
        assert wait_for(lambda: connect_error(s.path) == errno.ECONNREFUSED)
    finally:
        s.recorder.release.set()
    outcomes = []
    for f in futures:
        try:
            outcomes.append(f.result(timeout=LONG))
        except grpc.RpcError as exc:
            outcomes.append(f"{exc.code()}: {exc.details()}".encode())
    r, frames = read_raw(c.sock, sid)
    c.sock.close()  # at EOF, as clients do: the server's lingering close ends
    stopper.join(LONG)
    assert not stopper.is_alive()
    assert sorted(outcomes) == [b"unblocked:0", b"unblocked:1"]
    assert r.headers == [(b":status", b"200"), (b"content-type", b"application/grpc")]
    assert r.data == prefixed(b"queued")
    assert r.trailers == [(b"grpc-status", b"0")]
    goaways = [(f.last_stream_id, f.error_code) for f in frames if isinstance(f, GoAwayFrame)]
    assert goaways == [(sid, 0)]
    assert result == [0]


def test_shutdown_serves_request_read_by_shutdown_itself(env: Env) -> None:
    graceful_shutdown_round(env)


def test_shutdown_graceful_answers_reach_grpcio_repeatedly() -> None:
    """graceful_shutdown_round again and again: every answer the server gave
    within the grace must reach the grpcio client (a connection closed the
    moment its last response is out can fail a client still writing to it)."""
    for _ in range(250):
        env = Env()
        try:
            graceful_shutdown_round(env)
        finally:
            env.cleanup()


def test_shutdown_cuts_half_received_request(env: Env) -> None:
    b = env.bare(workers=2)
    assert b.workers is not None
    c = env.h2(b.path)
    c.send(grpc_headers(ECHO), [b"\x00\x00\x00\x00\x64half"], end=False)
    assert wait_for(lambda: b.transport.stats()["connections"] == 1)
    assert b.transport.shutdown(0.3) == 1
    assert drained_until_closed(c.sock)
    assert b.transport.stats()["connections"] == 0
    assert b.workers.join(LONG)
    assert b.workers.replies == []
    assert b.transport.stats()["calls"] == 0


def test_shutdown_idle_channel_does_not_delay(env: Env) -> None:
    b = env.bare(workers=2)
    assert b.workers is not None
    ch = env.channel("unix://" + b.path)
    assert echo(ch, b"connect") == b"connect"
    assert b.transport.stats()["connections"] == 1
    grace = LONG
    t0 = time.monotonic()
    cut = b.transport.shutdown(grace)
    elapsed = time.monotonic() - t0
    assert cut == 0
    assert elapsed < grace, f"shutdown waited {elapsed:.1f}s for an idle connection"
    assert b.transport.stats()["connections"] == 0
    assert b.workers.join(LONG)
    assert b.workers.finished == 2
    assert b.workers.errors == []
    assert b.transport.next() is None
    assert b.transport.shutdown(0) == 0  # idempotent
    assert connect_error(b.path) == errno.ECONNREFUSED
    with pytest.raises(grpc.RpcError) as info:
        echo(ch, b"too late")
    assert info.value.code() == C.UNAVAILABLE


def test_shutdown_without_workers_then_next_is_none(env: Env) -> None:
    b = env.bare(workers=0)
    c = env.h2(b.path)  # still in the listen backlog: nobody ran the loop
    # nothing to drain: shutdown stops at once and closes the listener, which
    # drops the connection never accepted
    assert b.transport.shutdown(LONG) == 0
    st = b.transport.stats()
    assert st["accepted"] in {0, 1}
    assert {k: st[k] for k in ("connections", "calls", "pending")} == {
        "connections": 0, "calls": 0, "pending": 0}
    assert b.transport.next() is None
    assert b.transport.next() is None
    assert drained_until_closed(c.sock)
    assert connect_error(b.path) == errno.ECONNREFUSED


def test_shutdown_leftover_request_then_none(env: Env) -> None:
    """The only worker is stuck, so a request shutdown itself read is never
    taken within the grace: its connection is cut.  next() still hands it out
    (ovl_grpc.h: ESHUTDOWN once nothing is left), its reply finds the client
    gone, and then next() returns None."""
    b = env.bare(workers=1)
    assert b.workers is not None
    c = env.h2(b.path)
    c.echo_ok(b"known")
    stuck = env.h2(b.path)
    stuck.send(grpc_headers(BLOCK), [prefixed(b"b")])
    assert b.recorder.entered.wait(LONG)
    c.send(grpc_headers(ECHO), [prefixed(b"left over")])
    assert b.transport.shutdown(0.3) == 2
    st = b.transport.stats()
    assert st["connections"] == 0
    assert st["calls"] == 3
    assert st["pending"] == 2
    left = b.transport.next()
    assert left is not None
    assert (left.path, left.message) == (ECHO, b"left over")
    assert b.transport.reply(left, 0, "", prefixed(b"too late")) is False
    assert b.transport.next() is None
    b.recorder.release.set()
    assert b.workers.join(LONG)
    assert b.workers.replies == [(ECHO, True), (BLOCK, False)]
    assert b.workers.errors == []
    assert b.transport.stats()["pending"] == 0
    assert drained_until_closed(c.sock)
    assert drained_until_closed(stuck.sock)


# ----------------------------------------------------------------------------- 8. listener


def _fd_inode(fd: int) -> int | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


@pytest.mark.parametrize("shutdown_first", [True, False])
def test_listener_owned_by_transport(env: Env, shutdown_first: bool) -> None:
    path = env.sock_path()
    listener = listen(path)
    fd = listener.fileno()
    inode = _fd_inode(fd)
    assert inode is not None
    transport = GrpcTransport(listener, GrpcLimits(max_message=1024))
    try:
        assert listener.fileno() == -1  # detached: the transport has the fd
        assert _fd_inode(fd) == inode
        assert connect_error(path) is None  # still listening
        if shutdown_first:
            transport.shutdown(0)
    finally:
        transport.close()
    transport.close()  # idempotent
    assert _fd_inode(fd) != inode
    assert connect_error(path) == errno.ECONNREFUSED
    with pytest.raises(ValueError, match="closed"):
        transport.stats()  # never reads freed memory (a metrics scrape may come late)


def test_every_ping_is_acknowledged_with_its_payload(env: Env) -> None:
    """Acknowledgements are held back a little (so grpc-go does not ping after
    every response) but each PING gets one, payload intact, even when more
    arrive than the server holds at once; requests are served meanwhile."""
    s = env.server()
    c = env.h2(s.path)
    payloads = [b"ping%04d" % i for i in range(20)]
    for p in payloads:
        c.conn.ping(p)
    c.flush()
    c.echo_ok(b"served while pings wait")
    for p in payloads:
        assert c.wait_ping_ack(p), p
    assert sorted(c.ping_acks) == sorted(payloads)
