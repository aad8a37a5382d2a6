"""Write the seed corpus of the HTTP/2 target (``tests/fuzz/corpus/grpc``).

    sudo .venv/bin/python -m tests.fuzz.seeds     # rewrites the corpus; commit it

Two kinds of seeds, each two flags bytes (native/fuzz/grpc_fuzz.c) then what
a client sends on one connection:

* ``grpcio-*``: real byte streams of grpcio, our client (containerd's grpc-go
  sends the same frames), captured by a proxy between it and the real daemon
  (the snapshots service over an overlay snapshotter in a temporary root) for
  a few call sequences;
* ``h2-*``: edge cases built frame by frame with hyperframe and hpack (the h2
  library's own layers), each aimed at one branch of the transport: what it
  refuses, what it limits, flow control, PINGs, resets, GOAWAY, CONTINUATION,
  padding, trailers, many streams, protocol errors.

The corpus also holds inputs libFuzzer found that add coverage (named by
their sha1, from ``python -m tests.fuzz --merge``): this script keeps them.
Needs root (the snapshotter checks overlayfs).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

CORPUS = Path(__file__).resolve().parent / "corpus" / "grpc"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SNAPSHOTS = "/containerd.services.snapshots.v1.Snapshots/"

# flags bits (grpc_fuzz.c)
PREPEND_PREFACE = 1
SMALL_SNDBUF = 2
TIME_PASSES = 4
AT_ONCE = 8
SMALL_MAX = 16
END_CLOSE = 1 << 5
END_DRAIN = 2 << 5
END_CUT = 3 << 5
LIFO = 128
STAY = 1 << 8
DRAIN_EARLY = 1 << 9

# the fuzz worker's answer, by the message's first byte (grpc_fuzz.c answer())
OK_EMPTY, ECHO, BIG, ERROR, LATER, MANY = range(6)


# ----------------------------------------------------------------------------- h2 seeds


def message(payload: bytes, *, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message."""
    return struct.pack(">BI", int(compressed), len(payload)) + payload


class Client:
    """Frames of one client connection, serialized with hyperframe."""

    def __init__(self) -> None:
        self.encoder = Encoder()
        self.out = bytearray(PREFACE)
        self.frame(SettingsFrame(0))

    def frame(self, frame: Frame) -> Client:
        self.out += frame.serialize()
        return self

    def raw(self, data: bytes) -> Client:
        self.out += data
        return self

    def headers(self, stream: int, headers: list[tuple[str, str]], *, end: bool = False,
                split: int = 0) -> Client:
        block = self.encoder.encode(headers)
        flags = {"END_STREAM"} if end else set()
        if not split:
            return self.frame(HeadersFrame(stream, block, flags={"END_HEADERS", *flags}))
        self.frame(HeadersFrame(stream, block[:split], flags=flags))
        for i in range(split, len(block), split):
            last = i + split >= len(block)
            self.frame(ContinuationFrame(stream, block[i:i + split],
                                         flags={"END_HEADERS"} if last else set()))
        return self

    def data(self, stream: int, data: bytes, *, end: bool = True, pad: int = 0) -> Client:
        frame = DataFrame(stream, data, flags={"END_STREAM"} if end else set())
        if pad:
            frame.flags.add("PADDED")
            frame.pad_length = pad
        return self.frame(frame)

    def call(self, stream: int, method: str, payload: bytes | None, *,
             extra: list[tuple[str, str]] | None = None, **kw: object) -> Client:
        """A unary call: headers, then the message (none: END_STREAM on HEADERS)."""
        self.headers(stream, request_headers(method, extra), end=payload is None,
                     **kw)  # type: ignore[arg-type]
        if payload is not None:
            self.data(stream, message(payload))
        return self


def request_headers(method: str, extra: list[tuple[str, str]] | None = None,
                    ) -> list[tuple[str, str]]:
    return [
        (":method", "POST"), (":scheme", "http"), (":path", SNAPSHOTS + method),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
        *(extra or []),
    ]


def h2_seeds() -> dict[str, tuple[int, bytes]]:
    seeds: dict[str, tuple[int, bytes]] = {}

    def add(name: str, flags: int, client: Client) -> None:
        seeds["h2-" + name] = (flags, bytes(client.out))

    add("unary-each-answer", 0, Client()
        .call(1, "Stat", bytes([OK_EMPTY]) + b"\n\x03key")
        .call(3, "Stat", bytes([ECHO]) + b"echo me")
        .call(5, "Mounts", bytes([ERROR]) + "not found: \xff\x00 ünïcode %".encode())
        .call(7, "List", bytes([MANY, 200]))
        .call(9, "Usage", b"")
        .call(11, "Prepare", bytes([LATER]) + b"held"))
    add("no-preface-prepended", PREPEND_PREFACE, Client().call(1, "Stat", b"\x00"))
    seeds["h2-no-preface-prepended"] = (PREPEND_PREFACE, seeds["h2-no-preface-prepended"][1]
                                        [len(PREFACE):])
    add("no-message", 0, Client().call(1, "Stat", None))
    add("get-405", 0, Client().headers(1, [(":method", "GET"), (":scheme", "http"),
                                           (":path", "/"), (":authority", "x")], end=True))
    add("content-type-415", 0, Client()
        .headers(1, [(":method", "POST"), (":scheme", "http"), (":path", SNAPSHOTS + "Stat"),
                     (":authority", "x"), ("content-type", "application/json")])
        .data(1, message(b"{}")))
    add("content-type-suffixes", 0, Client()
        .call(1, "Stat", b"\x00", extra=[("content-type", "application/grpc+proto")])
        .call(3, "Stat", b"\x00", extra=[("content-type", "application/grpc;x=y")])
        .call(5, "Stat", b"\x00", extra=[("content-type", "application/grpcx")]))
    add("grpc-encoding-gzip", 0, Client().call(1, "Stat", b"\x00",
                                               extra=[("grpc-encoding", "gzip")]))
    add("compressed-flag", 0, Client()
        .headers(1, request_headers("Stat")).data(1, message(b"\x00", compressed=True)))
    add("truncated-message", 0, Client()
        .headers(1, request_headers("Stat")).data(1, message(b"0123456789")[:9]))
    add("two-messages", 0, Client()
        .headers(1, request_headers("Stat")).data(1, message(b"\x01a") + message(b"\x01b")))
    add("over-max-message", SMALL_MAX, Client()
        .headers(1, request_headers("Stat")).data(1, struct.pack(">BI", 0, 4097) + b"\x01" * 64)
        .call(3, "Stat", bytes([ECHO]) * 4096))
    add("message-in-pieces", 0, Client()
        .headers(1, request_headers("Stat"))
        .data(1, b"\x00", end=False).data(1, b"\x00\x00", end=False)
        .data(1, b"\x00\x05\x01ab", end=False).data(1, b"", end=False, pad=7)
        .data(1, b"cd", end=True, pad=3))
    add("continuation", 0, Client()
        .call(1, "Stat", b"\x01c", split=5,
              extra=[("containerd-namespace", "default"), ("x-long", "v" * 300)]))
    add("metadata-and-trailers", 0, Client()
        .headers(1, request_headers("Stat", [("containerd-namespace", "ns"),
                                             ("containerd-lease", "l"), ("grpc-timeout", "5S"),
                                             ("user-agent", "grpc-go/1.59.0"),
                                             ("x-bin", "AAEC")]))
        .data(1, message(b"\x01t"), end=False)
        .headers(1, [("x-trailer", "1")], end=True))
    add("pings-held", 0, Client()
        .raw(b"".join(PingFrame(0, bytes([i]) * 8).serialize() for i in range(20))))
    add("pings", TIME_PASSES, Client()
        .frame(PingFrame(0, b"12345678")).frame(PingFrame(0, b"abcdefgh"))
        .call(1, "Stat", b"\x01p")
        .raw(b"".join(PingFrame(0, bytes([i]) * 8).serialize() for i in range(10)))
        .frame(PingFrame(0, b"ackackac", flags={"ACK"})))
    add("flow-control", 0, Client()
        .frame(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1,
                                          SettingsFrame.MAX_FRAME_SIZE: 16384}))
        .call(1, "List", bytes([BIG, 8]))
        .call(3, "List", bytes([BIG, 2]))
        .frame(WindowUpdateFrame(1, 100000)).frame(WindowUpdateFrame(0, 1 << 20))
        .frame(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535}))
        .frame(WindowUpdateFrame(3, 1 << 20)))
    add("flow-control-small-sndbuf", SMALL_SNDBUF | LIFO, Client()
        .call(1, "List", bytes([BIG, 20])).call(3, "List", bytes([BIG, 4]))
        .frame(WindowUpdateFrame(0, 1 << 24)).frame(WindowUpdateFrame(1, 1 << 24))
        .frame(WindowUpdateFrame(3, 1 << 24)))
    add("reset-while-held", 0, Client()
        .call(1, "Prepare", bytes([LATER]) + b"x")
        .frame(RstStreamFrame(1, 8))
        .call(3, "Prepare", bytes([BIG, 10]))
        .frame(RstStreamFrame(3, 8)))
    add("reset-while-queued", AT_ONCE, Client()
        .call(1, "Stat", b"\x01q").frame(RstStreamFrame(1, 8)).call(3, "Stat", b"\x01r"))
    add("reset-mid-request", 0, Client()
        .headers(1, request_headers("Stat")).data(1, message(b"\x01abc")[:6], end=False)
        .frame(RstStreamFrame(1, 0)).call(3, "Stat", b"\x01ok"))
    add("goaway-from-client", 0, Client()
        .call(1, "Stat", bytes([LATER])).frame(GoAwayFrame(0, last_stream_id=0, error_code=0))
        .call(3, "Stat", b"\x01after goaway"))
    add("drain-with-held-calls", END_DRAIN, Client()
        .call(1, "Stat", bytes([LATER])).call(3, "List", bytes([BIG, 6]))
        .call(5, "Stat", b"\x01"))
    add("drain-early", END_DRAIN | DRAIN_EARLY, Client()
        .call(1, "Stat", bytes([LATER])).call(3, "Stat", b"\x01")
        .call(5, "List", bytes([BIG, 6])).call(7, "Stat", b"\x01late")
        .frame(PingFrame(0, b"12345678")).frame(WindowUpdateFrame(0, 1 << 20))
        .frame(WindowUpdateFrame(5, 1 << 20)))
    add("drain-client-stays", END_DRAIN | STAY, Client()
        .call(1, "Stat", bytes([LATER])).call(3, "Stat", b"\x01"))
    # HPACK: one 4000-byte header in the dynamic table, then referenced 300
    # times by its index: 1.2 MB of metadata from 4.5 KB on the wire
    bomb = Encoder()
    block = bomb.encode(request_headers("Stat", [("x-bomb", "b" * 4000)]))
    add("hpack-metadata-bomb", 0, Client()
        .frame(HeadersFrame(1, block + b"\xbe" * 300, flags={"END_HEADERS"}))
        .data(1, message(b"\x01")))
    add("cut-with-held-calls", END_CUT, Client()
        .call(1, "Stat", bytes([LATER])).call(3, "List", bytes([BIG, 6])))
    add("close-with-held-calls", END_CLOSE, Client()
        .call(1, "Stat", bytes([LATER])).call(3, "List", bytes([BIG, 6])))
    many = Client()
    for i in range(120):
        many.call(1 + 2 * i, "Stat", bytes([i % 6, 1]) + b"m")
    add("many-streams", AT_ONCE, many)
    add("priority", 0, Client()
        .frame(PriorityFrame(1, depends_on=0, stream_weight=200))
        .headers(1, request_headers("Stat"))
        .frame(PriorityFrame(3, depends_on=1, stream_weight=1, exclusive=True))
        .data(1, message(b"\x01")))
    add("headers-priority-padding", 0, Client().frame(HeadersFrame(
        1, Encoder().encode(request_headers("Stat")), flags={"END_HEADERS", "PRIORITY", "PADDED"},
        pad_length=9, depends_on=0, stream_weight=16)).data(1, message(b"\x01pp")))
    add("data-on-stream-0", 0, Client().raw(DataFrame(1, b"").serialize()[:5]
                                            + b"\x00\x00\x00\x00\x00"))
    add("decreasing-stream-ids", 0, Client().call(5, "Stat", b"\x01").call(3, "Stat", b"\x01"))
    add("even-stream-id", 0, Client().call(2, "Stat", b"\x01"))
    add("uppercase-header", 0, Client().headers(1, [*request_headers("Stat"), ("X-Upper", "1")])
        .data(1, message(b"\x01u")))
    add("bad-hpack", 0, Client().raw(HeadersFrame(1, b"\xff\xff\xff\xff\x0f",
                                                  flags={"END_HEADERS"}).serialize()))
    add("window-overflow", 0, Client().call(1, "Stat", bytes([LATER]))
        .frame(WindowUpdateFrame(0, 0x7FFFFFFF)).frame(WindowUpdateFrame(0, 0x7FFFFFFF)))
    add("unknown-frame-type", 0, Client().raw(b"\x00\x00\x03\x0b\x00\x00\x00\x00\x01abc")
        .call(1, "Stat", b"\x01"))
    add("settings-ack-and-header-table", 0, Client()
        .frame(SettingsFrame(0, flags={"ACK"}))
        .frame(SettingsFrame(0, settings={SettingsFrame.HEADER_TABLE_SIZE: 0,
                                          SettingsFrame.MAX_CONCURRENT_STREAMS: 1,
                                          SettingsFrame.ENABLE_PUSH: 0}))
        .call(1, "Stat", b"\x01a").call(3, "Stat", b"\x01b"))
    return seeds


# ----------------------------------------------------------------------------- grpcio captures


@contextlib.contextmanager
def recording_proxy(upstream: str, path: str) -> Iterator[list[bytearray]]:
    """A unix socket at ``path`` forwarding to ``upstream``; yields the list
    of what each connection's client sent."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    streams: list[bytearray] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()

    def pipe(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(upstream)
            record = bytearray()
            streams.append(record)
            for args in ((client, server, record), (server, client, None)):
                t = threading.Thread(target=pipe, args=args, daemon=True)
                t.start()
                threads.append(t)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield streams
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        acceptor.join(5)
        for t in threads:
            t.join(5)


def grpcio_seeds() -> dict[str, tuple[int, bytes]]:
    import grpc

    from overlay.client import RemoteSnapshotter
    from overlay.errors import NotFoundError
    from overlay.overlayfs import OverlaySnapshotter
    from overlay.server.snapshots import make_server

    scenarios: dict[str, Callable[[RemoteSnapshotter], None]] = {}

    def cycle(c: RemoteSnapshotter) -> None:
        c.prepare("base-extract", "", {"containerd.io/snapshot.ref": "sha256:abc"})
        c.commit("base", "base-extract", {"containerd.io/gc.root": "x"})
        c.prepare("app", "base")
        c.view("base-view", "base")
        c.mounts("app")
        c.stat("base")
        c.walk(lambda info: None, 'parent=="base"', "labels.\"containerd.io/gc.root\"")
        c.usage("base")
        c.remove("app")
        c.cleanup()

    def errors(c: RemoteSnapshotter) -> None:
        with contextlib.suppress(NotFoundError):
            c.stat("missing")
        with contextlib.suppress(Exception):
            c.walk(lambda info: None, "name~=(")

    def many(c: RemoteSnapshotter) -> None:
        for i in range(130):
            c.prepare(f"k{i}", "", {"i": str(i)})
        c.walk(lambda info: None)

    scenarios["cycle"] = cycle
    scenarios["errors"] = errors
    scenarios["list-two-batches"] = many

    seeds: dict[str, tuple[int, bytes]] = {}
    with tempfile.TemporaryDirectory(prefix="ovl-seeds-", dir="/tmp") as tmp:
        for name, scenario in scenarios.items():
            root = Path(tmp) / name
            backend = OverlaySnapshotter(root)
            server = make_server(backend, f"{tmp}/{name}.sock", max_workers=2)
            server.start()
            try:
                with recording_proxy(f"{tmp}/{name}.sock", f"{tmp}/{name}-proxy.sock") as got:
                    client = RemoteSnapshotter(f"unix://{tmp}/{name}-proxy.sock",
                                               namespace="default", timeout=30)
                    scenario(client)
                    client.close()
            finally:
                server.stop(1)
                backend.close()
            seeds[f"grpcio-{name}"] = (0, bytes(got[0]))
        # a call cancelled by its deadline while the handler holds it: RST_STREAM
        seeds["grpcio-cancelled"] = (0, cancelled_capture(Path(tmp), grpc))
    return seeds


def cancelled_capture(tmp: Path, grpc: object) -> bytes:
    import grpc as g

    from overlay._native import GrpcLimits
    from overlay.server.rpc import RpcServer

    release = threading.Event()

    def slow(call: object) -> tuple[g.StatusCode, str, bytes]:
        release.wait(5)
        return g.StatusCode.OK, "", b""

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp / "slow.sock"))
    listener.listen(8)
    server = RpcServer(listener, slow, workers=2, limits=GrpcLimits(max_message=1 << 20))
    server.start()
    try:
        with recording_proxy(str(tmp / "slow.sock"), str(tmp / "slow-proxy.sock")) as got:
            channel = g.insecure_channel(f"unix://{tmp}/slow-proxy.sock")
            stub = channel.unary_unary(SNAPSHOTS + "Stat")
            with contextlib.suppress(g.RpcError):
                stub(bytes([LATER]) + b"slow", timeout=0.3)
            release.set()
            stub(b"\x00", timeout=5)
            channel.close()
    finally:
        server.stop(1)
    return bytes(got[0])


def main() -> None:
    seeds = {**h2_seeds(), **grpcio_seeds()}
    CORPUS.mkdir(parents=True, exist_ok=True)
    for old in CORPUS.glob("*-*"):  # ours; libFuzzer's merges are named by their sha1
        old.unlink()
    for name, (flags, data) in sorted(seeds.items()):
        (CORPUS / name).write_bytes(flags.to_bytes(2, "little") + data)
    print(f"wrote {len(seeds)} seeds to {CORPUS}")


if __name__ == "__main__":
    main()
