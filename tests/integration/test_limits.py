"""What a client may make the transport hold (``overlay._native.GrpcLimits``).

Each limit is driven over the edge on a server of its own with small limits,
with raw HTTP/2 frames (``Raw``: no flow control or stream limits of its own,
so it sends what an attacker would) or ``h2``, and checked three ways: the
call over the limit gets its answer (RESOURCE_EXHAUSTED, REFUSED_STREAM,
GOAWAY), what it held is given back (``stats()["buffered"]``), and a normal
client on another connection (and on the same one, where it makes sense) is
still served.  ``test_attacks.py`` replays the attacks on a real daemon and
bounds its memory.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import hpack
import pytest
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.integration.test_transport import (
    BLOCK,
    ECHO,
    LONG,
    Env,
    echo,
    env,
    grpc_headers,
    prefixed,
    status_only,
    wait_for,
)

__all__ = ["Raw", "env"]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REFUSED_STREAM = 7
CANCEL = 8
NO_ERROR = 0


@dataclass
class Stream:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytes = b""
    trailers: list[tuple[bytes, bytes]] | None = None
    ended: bool = False  # END_STREAM from the server
    reset: int | None = None


class Raw:
    """An HTTP/2 client that writes the frames it is told to, however many and
    however large (no flow control, no stream limit of its own), and parses
    what the server sends (acknowledging its SETTINGS, opening windows)."""

    def __init__(self, path: str, *, preface: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(LONG)
        self.sock.connect(path)
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.streams: dict[int, Stream] = {}
        self.goaway: GoAwayFrame | None = None
        self.closed = False
        self._buf = b""
        self._next = 1
        # what the server lets us send (flow control), for send_data
        self.conn_window = 65535
        self.stream_window = 65535
        self.windows: dict[int, int] = {}
        if preface:
            s = SettingsFrame(0)
            s.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: (1 << 31) - 1}
            w = WindowUpdateFrame(0)
            w.window_increment = (1 << 31) - 1 - 65535
            self.settled = False
            try:
                self.sock.sendall(PREFACE + s.serialize() + w.serialize())
            except (BrokenPipeError, ConnectionResetError):
                self.closed = True  # refused at once (max_connections)
                return
            # the server's stream windows (1 MiB) apply once we acknowledge its SETTINGS
            assert self.pump(lambda: self.settled or self.closed)

    def close(self) -> None:
        self.sock.close()

    def sid(self) -> int:
        sid = self._next
        self._next += 2
        return sid

    def headers_frame(self, sid: int, headers: Sequence[tuple[str, str]], *,
                      end_stream: bool = False) -> bytes:
        f = HeadersFrame(sid)
        f.data = self.enc.encode([(n.encode("latin-1"), v.encode("latin-1"))
                                  for n, v in headers])
        f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        self.streams.setdefault(sid, Stream())
        return bytes(f.serialize())

    def data_frame(self, sid: int, payload: bytes, *, end_stream: bool = False) -> bytes:
        """DATA frames of 16 KiB at most (the default SETTINGS_MAX_FRAME_SIZE)."""
        out = []
        pieces = [payload[i:i + 16384] for i in range(0, len(payload), 16384)] or [b""]
        for i, piece in enumerate(pieces):
            f = DataFrame(sid)
            f.data = piece
            if end_stream and i == len(pieces) - 1:
                f.flags.add("END_STREAM")
            out.append(bytes(f.serialize()))
        return b"".join(out)

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def send_data(self, sid: int, payload: bytes, *, end_stream: bool = False) -> bool:
        """DATA within the server's flow-control windows, waiting for its
        WINDOW_UPDATEs; False if the stream or connection ends first."""
        sent = 0
        while sent < len(payload) or (end_stream and sent == len(payload) == 0):
            room = min(self.conn_window, self.windows.setdefault(sid, self.stream_window),
                       len(payload) - sent)
            if room <= 0 and payload:
                if not self.pump(lambda: self.closed or self.answered(sid) or min(
                        self.conn_window, self.windows[sid]) > 0):
                    return False
                if self.closed or self.answered(sid):
                    return False
                continue
            piece = payload[sent:sent + room]
            sent += len(piece)
            self.conn_window -= len(piece)
            self.windows[sid] -= len(piece)
            self.send(self.data_frame(sid, piece, end_stream=end_stream and sent == len(payload)))
            if not payload:
                break
        return True

    def request(self, headers: Sequence[tuple[str, str]] | None = None,
                message: bytes | None = b"raw", *, end: bool = True) -> int:
        sid = self.sid()
        frames = [self.headers_frame(sid, headers or grpc_headers(ECHO),
                                     end_stream=end and message is None)]
        if message is not None:
            frames.append(self.data_frame(sid, prefixed(message), end_stream=end))
        self.send(*frames)
        return sid

    def pump(self, until: Callable[[], bool], timeout: float = LONG) -> bool:
        """Read and parse until ``until()`` or the connection ends; False on timeout."""
        deadline = time.monotonic() + timeout
        while not until():
            if self.closed:
                return until()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(min(left, 0.5))
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.closed = True
                continue
            self._buf += chunk
            self._parse()
        return True

    def _parse(self) -> None:
        while len(self._buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buf[:9]))
            if len(self._buf) < 9 + length:
                return
            frame.parse_body(memoryview(self._buf[9:9 + length]))
            self._buf = self._buf[9 + length:]
            self._on(frame)

    def _on(self, frame: Frame) -> None:
        if isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                initial = frame.settings.get(SettingsFrame.INITIAL_WINDOW_SIZE)
                if initial is not None:
                    for sid in self.windows:
                        self.windows[sid] += initial - self.stream_window
                    self.stream_window = initial
                try:
                    self.send(bytes(SettingsFrame(0, flags=["ACK"]).serialize()))
                except (BrokenPipeError, ConnectionResetError):
                    self.closed = True  # closed by the server meanwhile
                self.settled = True
            return
        if isinstance(frame, WindowUpdateFrame):
            if frame.stream_id == 0:
                self.conn_window += frame.window_increment
            else:
                sid = frame.stream_id
                self.windows[sid] = (self.windows.get(sid, self.stream_window)
                                     + frame.window_increment)
            return
        if isinstance(frame, GoAwayFrame):
            self.goaway = frame
            return
        st = self.streams.setdefault(frame.stream_id, Stream())
        if isinstance(frame, HeadersFrame):
            hs = [(bytes(n), bytes(v)) for n, v in self.dec.decode(frame.data, raw=True)]
            if st.headers:
                st.trailers = hs
            else:
                st.headers = hs
        elif isinstance(frame, DataFrame):
            st.data += frame.data
        elif isinstance(frame, RstStreamFrame):
            st.reset = frame.error_code
        if "END_STREAM" in frame.flags:
            st.ended = True

    def answered(self, sid: int) -> bool:
        st = self.streams.get(sid)
        return st is not None and (st.ended or st.reset is not None)


@pytest.fixture
def raws(env: Env) -> Iterator[list[Raw]]:
    opened: list[Raw] = []
    try:
        yield opened
    finally:
        for r in opened:
            r.close()


def raw(raws: list[Raw], path: str, **kw: bool) -> Raw:
    r = Raw(path, **kw)
    raws.append(r)
    return r


def served(path: str) -> bool:
    """A fresh connection's Echo is answered."""
    r = Raw(path)
    try:
        sid = r.request(message=b"still served")
        return r.pump(lambda: r.answered(sid)) and r.streams[sid].data == prefixed(b"still served")
    finally:
        r.close()


#: grpc_headers(ECHO) as charged (ovl_grpc.c charge): :path, content-type and te,
#: each name + value + 2 (the other pseudo-headers are not kept)
HEADER_CHARGE = (5 + len(ECHO) + 2) + (12 + 16 + 2) + (2 + 8 + 2)


# ----------------------------------------------------------------------------- streams


def test_streams_over_max_streams_end_the_connection(env: Env, raws: list[Raw]) -> None:
    """Past SETTINGS_MAX_CONCURRENT_STREAMS, once acknowledged, a client
    breaks the protocol: nghttp2 ends its connection (GOAWAY PROTOCOL_ERROR,
    RFC 9113 §5.1.2) and what it held is freed; others go on."""
    s = env.server(max_streams=4)
    c = raw(raws, s.path)
    [c.request(end=False) for _ in range(4)]  # headers and message, never ended
    assert wait_for(lambda: s.stats()["buffered"] > 4 * HEADER_CHARGE)
    c.request(end=False)
    assert c.pump(lambda: c.closed)
    assert c.goaway is not None and c.goaway.error_code == 1  # PROTOCOL_ERROR
    assert wait_for(lambda: s.stats()["buffered"] == 0)
    assert served(s.path)


def test_well_behaved_client_queues_at_max_streams(env: Env) -> None:
    """grpcio honours the limit: more concurrent calls than max_streams wait
    their turn on one channel, and all are served."""
    s = env.server(max_streams=2, workers=4)
    ch = env.channel(s.target)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: echo(ch, b"%d" % i), range(40)))
    assert got == [b"%d" % i for i in range(40)]


# ----------------------------------------------------------------------------- header bytes


def big_headers(n: int, size: int = 4000) -> list[tuple[str, str]]:
    """grpc_headers() plus n copies of one large field (HPACK sends it once)."""
    return grpc_headers(ECHO, extra=[("x-big", "h" * size)] * n)


def test_header_bytes_of_a_connection_are_bounded(env: Env, raws: list[Raw]) -> None:
    """Each request under max_header_bytes, never finished: the one that takes
    the connection over max_connection_header_bytes is answered at once; the
    others hold on; another connection is served."""
    s = env.server(max_header_bytes=64 << 10, max_connection_header_bytes=200 << 10)
    c = raw(raws, s.path)
    held = [c.request(big_headers(12), end=False) for _ in range(4)]  # ~48 KB each: 192 KB
    over = c.request(big_headers(12), end=False)
    assert c.pump(lambda: c.answered(over))
    assert c.streams[over].headers == status_only(
        8, b"the connection's requests hold more than 204800 bytes of metadata")
    assert c.streams[over].reset is None  # answered, not reset (grpcio: see answer_early)
    assert not any(c.answered(sid) for sid in held)
    assert 4 * 12 * 4000 < s.stats()["buffered"] < 200 << 10
    assert served(s.path)
    assert s.recorder.paths() == [ECHO]
    c.close()
    assert wait_for(lambda: s.stats()["buffered"] == 0)


def test_header_block_far_over_the_limit_answers_the_call(env: Env, raws: list[Raw]) -> None:
    """An uncompressed header block of ~300 KB (18 CONTINUATION frames: more
    than nghttp2's default 8) is RESOURCE_EXHAUSTED for that call, and the
    connection serves the next request."""
    s = env.server()
    c = raw(raws, s.path)
    sid = c.sid()
    c.enc.header_table_size = 0  # no indexing: every copy goes on the wire
    block = c.enc.encode([(n.encode(), v.encode()) for n, v in grpc_headers(ECHO)]
                         + [(b"x-big-%d" % i, b"u" * 3000) for i in range(100)],
                         huffman=False)
    assert len(block) > 290_000
    frames = []
    chunks = [block[i:i + 16384] for i in range(0, len(block), 16384)]
    for i, chunk in enumerate(chunks):
        f: Frame = HeadersFrame(sid) if i == 0 else _continuation(sid)
        f.data = chunk  # type: ignore[attr-defined]
        if i == len(chunks) - 1:
            f.flags.add("END_HEADERS")
        frames.append(bytes(f.serialize()))
    frames.append(c.data_frame(sid, prefixed(b"x"), end_stream=True))
    c.streams[sid] = Stream()
    c.send(*frames)
    assert c.pump(lambda: c.answered(sid))
    assert c.streams[sid].headers == status_only(8, b"request metadata larger than 65536 bytes")
    assert c.goaway is None
    nxt = c.request()
    assert c.pump(lambda: c.answered(nxt))
    assert c.streams[nxt].data == prefixed(b"raw")


def _continuation(sid: int) -> Frame:
    from hyperframe.frame import ContinuationFrame
    return ContinuationFrame(sid)


# ----------------------------------------------------------------------------- buffered bytes


def partial(c: Raw, declared: int, sent: int) -> int:
    """A request that declares a message of ``declared`` bytes and sends ``sent`` of them."""
    sid = c.sid()
    c.send(c.headers_frame(sid, grpc_headers(ECHO)),
           c.data_frame(sid, struct.pack(">BI", 0, declared) + b"b" * sent))
    return sid


def test_buffered_bytes_of_a_connection_are_bounded(env: Env, raws: list[Raw]) -> None:
    limit = 3 * (256 << 10) + 4096  # three declared 256 KiB messages and their headers
    s = env.server(max_message=256 << 10, max_connection_buffer_bytes=limit)
    c = raw(raws, s.path)
    held = [partial(c, 256 << 10, 1000) for _ in range(3)]
    over = partial(c, 256 << 10, 1000)
    assert c.pump(lambda: c.answered(over))
    assert not any(c.answered(sid) for sid in held)
    assert c.streams[over].headers == status_only(
        8, b"the connection's unfinished requests hold more than %d bytes" % limit)
    assert served(s.path)
    # what it still sends of the refused request is discarded, then it is served
    c.send(c.data_frame(over, b"b" * 5000, end_stream=True))
    c.send(c.data_frame(held[0], b"b" * ((256 << 10) - 1000), end_stream=True))
    assert c.pump(lambda: c.answered(held[0]))
    assert len(c.streams[held[0]].data) == (256 << 10) + 5
    c.close()
    assert wait_for(lambda: s.stats()["buffered"] == 0)


def test_total_buffer_refuses_the_largest_holder_for_a_small_newcomer(
        env: Env, raws: list[Raw]) -> None:
    """All connections together at max_buffer_bytes: a small request is
    served; room is made by refusing the largest unfinished request (of the
    connection holding the most).  A large newcomer displaces nothing
    smaller than itself: it is refused."""
    each = HEADER_CHARGE + 5  # a partial() request's headers and message prefix
    held = 2 * (each + (2 << 20)) + each + (1 << 20)
    s = env.server(max_message=2 << 20, max_connection_buffer_bytes=(4 << 20) + 1000,
                   max_buffer_bytes=held + 30)  # a small request does not fit
    hog, other = raw(raws, s.path), raw(raws, s.path)
    big = [partial(hog, 2 << 20, 100) for _ in range(2)]
    mid = partial(other, 1 << 20, 100)
    assert wait_for(lambda: s.stats()["buffered"] == held)
    newcomer = raw(raws, s.path)
    sid = newcomer.request(message=b"small")
    assert newcomer.pump(lambda: newcomer.answered(sid))
    assert newcomer.streams[sid].data == prefixed(b"small")
    assert hog.pump(lambda: any(hog.answered(b) for b in big))
    [victim] = [b for b in big if hog.answered(b)]
    assert hog.streams[victim].headers[3][1].startswith(b"refused to make room")
    assert not other.answered(mid)
    assert not any(hog.answered(b) for b in big if b != victim)
    for r in (hog, other, newcomer):
        r.close()
    assert wait_for(lambda: s.stats()["buffered"] == 0)


def test_total_buffer_refuses_a_newcomer_larger_than_every_holder(
        env: Env, raws: list[Raw]) -> None:
    each = HEADER_CHARGE + 5
    limit = 3 * (each + (512 << 10)) + 30
    s = env.server(max_message=1 << 20, max_buffer_bytes=limit)
    holders = [raw(raws, s.path) for _ in range(3)]
    sids = [partial(h, 512 << 10, 100) for h in holders]
    assert wait_for(lambda: s.stats()["buffered"] == limit - 30)
    newcomer = raw(raws, s.path)
    large = partial(newcomer, 1 << 20, 100)
    assert newcomer.pump(lambda: newcomer.answered(large))
    assert newcomer.streams[large].headers == status_only(
        8, b"the server holds %d bytes of unfinished requests at most: retry later" % limit)
    assert s.stats()["buffered"] <= limit
    # Its headers, small, may have displaced one holder before its message
    # was refused (the price of letting small requests through); the others
    # are served in full.
    for h in holders:
        h.pump(lambda: False, timeout=0.2)
    displaced = [h for h, sid in zip(holders, sids, strict=True) if h.answered(sid)]
    assert len(displaced) <= 1
    for h, sid in zip(holders, sids, strict=True):
        if h not in displaced:
            h.send(h.data_frame(sid, b"b" * ((512 << 10) - 100), end_stream=True))
            assert h.pump(lambda h=h, sid=sid: h.answered(sid))  # type: ignore[misc]
            assert len(h.streams[sid].data) == (512 << 10) + 5
    assert served(s.path)


# ----------------------------------------------------------------------------- time


def test_unfinished_request_is_answered_then_cut(env: Env, raws: list[Raw]) -> None:
    s = env.server(request_timeout=0.3)
    c = raw(raws, s.path)
    slow = partial(c, 100, 10)
    start = time.monotonic()
    assert c.pump(lambda: c.answered(slow))
    assert time.monotonic() - start >= 0.3
    assert c.streams[slow].headers == status_only(
        8, b"request not received in full within 300 ms")
    assert s.stats()["buffered"] == 0
    # still sending nothing: the stream is reset a timeout later
    assert c.pump(lambda: c.streams[slow].reset is not None)
    assert c.streams[slow].reset == CANCEL
    # the connection itself goes on
    ok = c.request()
    assert c.pump(lambda: c.answered(ok))
    assert c.streams[ok].data == prefixed(b"raw")


def test_slow_but_steady_request_within_the_timeout_is_served(env: Env, raws: list[Raw]) -> None:
    s = env.server(request_timeout=1.0)
    c = raw(raws, s.path)
    sid = partial(c, 30, 0)
    for _ in range(3):
        time.sleep(0.2)
        c.send(c.data_frame(sid, b"s" * 10))
    c.send(c.data_frame(sid, b"", end_stream=True))
    assert c.pump(lambda: c.answered(sid))
    assert c.streams[sid].data == prefixed(b"s" * 30)


def test_idle_connection_gets_goaway_and_grpcio_reconnects(env: Env, raws: list[Raw]) -> None:
    s = env.server(idle_timeout=0.3)
    c = raw(raws, s.path)
    sid = c.request()
    assert c.pump(lambda: c.answered(sid))
    assert c.pump(lambda: c.closed, timeout=LONG)
    assert c.goaway is not None and c.goaway.error_code == NO_ERROR
    assert s.stats()["shed"] >= 1
    ch = env.channel(s.target)
    assert echo(ch, b"1") == b"1"
    time.sleep(0.8)  # idle: closed under the channel
    assert wait_for(lambda: s.stats()["connections"] == 0)
    assert echo(ch, b"2") == b"2"  # grpcio reconnects by itself


def test_connection_with_an_open_stream_is_not_idle(env: Env, raws: list[Raw]) -> None:
    s = env.server(idle_timeout=0.2, request_timeout=30)
    c = raw(raws, s.path)
    sid = partial(c, 10, 1)
    time.sleep(0.8)
    assert not c.answered(sid) and not c.closed and c.goaway is None
    c.send(c.data_frame(sid, b"x" * 9, end_stream=True))
    assert c.pump(lambda: c.answered(sid))
    assert c.streams[sid].data == prefixed(b"b" + b"x" * 9)


# ----------------------------------------------------------------------------- connections


def test_connections_over_the_limit_replace_silent_ones(env: Env, raws: list[Raw]) -> None:
    """The probe's 2,000 connections that send nothing (or half a preface):
    each newcomer replaces a silent one, the oldest first; a connection with
    a call being handled is never replaced; a normal client gets in."""
    s = env.server(max_connections=4, workers=2)
    busy = raw(raws, s.path)
    held = busy.request(grpc_headers(BLOCK))
    assert wait_for(lambda: s.recorder.paths() == [BLOCK])
    silent = [raw(raws, s.path, preface=False) for _ in range(3)]
    assert wait_for(lambda: s.stats()["connections"] == 4)
    time.sleep(0.3)  # past the grace a just-connected client gets (NEW_GRACE_MS)
    for i in range(20):
        newcomer = raw(raws, s.path, preface=False)
        if i % 2:
            newcomer.send(PREFACE[:10])
        silent.append(newcomer)
    assert wait_for(lambda: s.stats()["connections"] <= 4)
    assert all(old.pump(lambda old=old: old.closed) for old in silent[:3])  # type: ignore[misc]
    assert served(s.path)  # and a normal client gets in
    assert not busy.answered(held) and not busy.closed
    s.recorder.release.set()
    assert busy.pump(lambda: busy.answered(held))
    assert busy.streams[held].data == prefixed(b"unblocked:raw")
    assert s.stats()["shed"] >= 20


def test_connections_holding_only_unfinished_or_refused_requests_are_replaced(
        env: Env, raws: list[Raw]) -> None:
    """Holding max_connections with requests never finished (or refused and
    never ended) does not lock new clients out: each newcomer replaces the
    oldest such connection."""
    s = env.server(max_connections=3, max_header_bytes=200)
    holders = [raw(raws, s.path) for _ in range(3)]
    unfinished = [partial(h, 10, 1) for h in holders[:2]]
    refused = holders[2].request(grpc_headers(ECHO, extra=[("x-big", "h" * 300)]), end=False)
    assert holders[2].pump(lambda: holders[2].answered(refused))
    assert wait_for(lambda: s.stats()["buffered"] >= 2 * HEADER_CHARGE)
    # the first newcomer replaces the connection holding only a refused stream
    assert served(s.path)
    assert holders[2].pump(lambda: holders[2].closed)
    assert not holders[0].closed and not holders[1].closed
    # the next ones (with the limit filled up again) the oldest unfinished
    for old in holders[:2]:
        again = raw(raws, s.path)
        partial(again, 10, 1)
        assert wait_for(lambda: s.stats()["connections"] == 3)
        assert served(s.path)
        assert old.pump(lambda old=old: old.closed)  # type: ignore[misc]
    assert unfinished and s.stats()["shed"] >= 3


def test_connection_refused_when_every_one_is_at_work(env: Env, raws: list[Raw]) -> None:
    """Connections whose requests are being handled are never replaced: at
    max_connections a newcomer is closed, and those calls complete."""
    s = env.server(max_connections=2, workers=3)
    busy = [raw(raws, s.path) for _ in range(2)]
    held = [b.request(grpc_headers(BLOCK)) for b in busy]
    assert wait_for(lambda: len(s.recorder.paths()) == 2)
    late = raw(raws, s.path)
    assert late.closed or late.pump(lambda: late.closed)
    s.recorder.release.set()
    for b, sid in zip(busy, held, strict=True):
        assert b.pump(lambda b=b, sid=sid: b.answered(sid))  # type: ignore[misc]
        assert b.streams[sid].data == prefixed(b"unblocked:raw")
    assert s.stats()["shed"] >= 1


# ----------------------------------------------------------------------------- resets


def cancel_pairs(c: Raw, n: int) -> None:
    """n requests, each cancelled (RST_STREAM CANCEL) right after it was sent."""
    frames = []
    for _ in range(n):
        sid = c.sid()
        frames.append(c.headers_frame(sid, grpc_headers(ECHO)))
        f = RstStreamFrame(sid)
        f.error_code = CANCEL
        frames.append(bytes(f.serialize()))
    c.send(*frames)


@pytest.mark.slow
def test_cancelling_client_is_cut_only_past_the_reset_rate(env: Env, raws: list[Raw]) -> None:
    """nghttp2's rapid-reset guard (CVE-2023-44487): a bucket of 1,000 stream
    resets refilled by 33 a second.  A client that cancels a lot but on
    average under that rate is never cut off; a flood is (GOAWAY)."""
    s = env.server()
    c = raw(raws, s.path)
    cancel_pairs(c, 950)
    for _ in range(5):  # then 25 a second for 5 s: 1,075 cancels in all
        time.sleep(1.0)
        cancel_pairs(c, 25)
    ok = c.request()
    assert c.pump(lambda: c.answered(ok))
    assert c.streams[ok].data == prefixed(b"raw")
    assert c.goaway is None
    cancel_pairs(c, 1200)
    assert c.pump(lambda: c.goaway is not None)
    assert served(s.path)


def test_grpcio_sees_resource_exhausted_for_a_message_over_the_connection_budget(
        env: Env) -> None:
    s = env.server(max_message=4 << 20, max_connection_buffer_bytes=1 << 20)
    ch = env.channel(s.target)
    with pytest.raises(grpc.RpcError) as info:
        echo(ch, b"z" * (2 << 20))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "hold more than 1048576 bytes" in (info.value.details() or "")
    assert echo(ch, b"fits") == b"fits"
    assert wait_for(lambda: s.stats()["buffered"] == 0)


# ----------------------------------------------------------------------------- all at once


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_clients_within_tiny_limits(env: Env, raws: list[Raw], seed: int) -> None:
    """Many raw clients doing everything above at random -- opening and
    closing connections past max_connections, unfinished, refused, reset and
    completed requests, oversized headers, silence -- against tiny limits,
    with the timeouts firing meanwhile.  Every limit holds at every step, a
    normal client is served after each burst, and once everyone is gone
    nothing is held.  (Run once under AddressSanitizer too: the eviction
    code freed a conn still in use before this.)"""
    rng = random.Random(seed)
    limits = {"max_connections": 6, "max_streams": 8, "max_header_bytes": 512,
              "max_connection_header_bytes": 2048, "max_connection_buffer_bytes": 64 << 10,
              "max_buffer_bytes": 160 << 10, "request_timeout": 0.2, "idle_timeout": 0.3}
    s = env.server(max_message=32 << 10, workers=3, **limits)
    clients: list[Raw] = []
    blocked = 0
    for step in range(300):
        action = rng.randrange(9)
        live = [c for c in clients if not c.closed]
        try:
            if action == 0 or not live:
                clients.append(raw(raws, s.path, preface=rng.random() < 0.9))
            elif action == 1:
                victim = rng.choice(live)
                victim.close()
                victim.closed = True
            else:
                c = rng.choice(live)
                if action == 2:
                    c.request(message=rng.randbytes(rng.randrange(100)))
                elif action == 3:
                    partial(c, rng.randrange(1, 32 << 10), rng.randrange(100))
                elif action == 4:
                    c.request(big_headers(1, rng.randrange(100, 1200)), end=rng.random() < 0.5)
                elif action == 5:
                    cancel_pairs(c, rng.randrange(1, 4))
                elif action == 6:
                    # one handler held at a time: with every worker held,
                    # nobody would run the event loop (by design)
                    block = not blocked and rng.random() < 0.1
                    blocked += block
                    c.request(grpc_headers(BLOCK if block else ECHO))
                elif action == 7:
                    c.pump(lambda: False, timeout=0.01)
                else:
                    time.sleep(rng.random() * 0.05)
        except OSError:  # the server closed it (a limit): a client goes on
            pass
        st = s.stats()
        assert st["buffered"] <= limits["max_buffer_bytes"], (seed, step, st)
        # replaced connections close at the end of the poller's round
        assert wait_for(lambda: s.stats()["connections"] <= limits["max_connections"]), (
            seed, step, s.stats())
        if step % 60 == 59:
            s.recorder.release.set()
            assert served(s.path), (seed, step)
            assert wait_for(lambda: s.stats()["pending"] == 0)
            s.recorder.release.clear()
            blocked = 0
    s.recorder.release.set()
    for c in clients:
        c.close()
    assert wait_for(lambda: s.stats()["connections"] == 0 and s.stats()["buffered"] == 0)
    assert wait_for(lambda: s.stats()["pending"] == 0)
    assert served(s.path)
