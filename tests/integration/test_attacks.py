"""The attacks of issue 8's probe, replayed on a real ``ovl serve``: its
memory stays under a stated bound while they run, a normal client is served
meanwhile, and the memory goes back once the attackers are gone.

Bounds are the daemon's resident set size (VmRSS) over its own baseline,
measured after a warm-up; the limits are the defaults (``GrpcLimits``) unless
a test says otherwise.  The probe's numbers, before the limits: ~1 GB per
header-compression connection, 16 MiB per request body with no cap across
connections, no memory given back, and silent connections held forever.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.client import RemoteSnapshotter
from tests.helpers import wait_for_socket
from tests.integration.test_daemon import start, stop
from tests.integration.test_limits import Raw
from tests.integration.test_transport import ECHO, grpc_headers

MIB = 1 << 20


def rss(pid: int) -> int:
    """Resident set size in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Daemon:
    def __init__(self, proc: subprocess.Popen[str], sock: Path) -> None:
        self.proc = proc
        self.sock = sock

    def rss(self) -> int:
        return rss(self.proc.pid)

    def normal_client_served(self, n: int = 3) -> None:
        """A client of our own: prepare, commit, stat, remove, on a fresh connection."""
        with RemoteSnapshotter(str(self.sock)) as client:
            for i in range(n):
                key = f"k-{time.monotonic_ns()}-{i}"
                client.prepare(key)
                client.commit(key + "-c", key)
                assert client.stat(key + "-c").name == key + "-c"
                client.remove(key + "-c")

    def settle(self, until: Callable[[int], bool], timeout: float = 20.0) -> int:
        """Wait until ``until(rss)`` (memory is given back asynchronously: the
        transport trims after its next sweep); returns the last RSS."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.rss()
            if until(now) or time.monotonic() > deadline:
                return now
            time.sleep(0.2)


@pytest.fixture
def daemon_with(tmpfs: Path, sockdir: Path) -> Iterator[Callable[[str], Daemon]]:
    procs: list[subprocess.Popen[str]] = []

    def launch(config: str = "") -> Daemon:
        cfg = tmpfs / "config.toml"
        cfg.write_text(config)
        sock = sockdir / "ovl.sock"
        proc_ = start(["--config", str(cfg), "--root", str(tmpfs / "root"),
                       "--address", str(sock), "--log-level", "warning"])
        procs.append(proc_)
        wait_for_socket(sock, proc_, "ovl serve")
        d = Daemon(proc_, sock)
        d.normal_client_served(20)  # warm up: imports, caches, worker stacks
        return d

    try:
        yield launch
    finally:
        for p in procs:
            code, err = stop(p)
            assert code == 0, err


class Attackers:
    """Raw clients, closed at the end whatever happens."""

    def __init__(self) -> None:
        self.raws: list[Raw] = []

    def new(self, path: Path, **kw: bool) -> Raw:
        r = Raw(str(path), **kw)
        self.raws.append(r)
        return r

    def close(self) -> None:
        for r in self.raws:
            r.close()
        self.raws.clear()


@pytest.fixture
def attackers() -> Iterator[Attackers]:
    a = Attackers()
    try:
        yield a
    finally:
        a.close()


def test_header_compression_attack_is_bounded(daemon_with: Callable[[str], Daemon],
                                              attackers: Attackers) -> None:
    """The probe: 4 connections, each opening streams with ~255 copies of a
    4 KB header (HPACK sends it once), never finished; ~1 GB per connection
    before.  Default limits: each request is refused at 64 KiB of headers,
    a connection holds 1 MiB of headers at most, and a client that opens more
    streams than SETTINGS allows loses its connection."""
    d = daemon_with("")
    base = d.rss()
    headers = grpc_headers(ECHO, extra=[("x-big", "h" * 4000)] * 255)
    under = grpc_headers(ECHO, extra=[("x-big", "h" * 4000)] * 15)  # 60 KB: kept
    peak = base
    for _ in range(4):
        c = attackers.new(d.sock)
        for i in range(127):
            sid = c.sid()
            c.send(c.headers_frame(sid, under if i % 2 else headers))
        peak = max(peak, d.rss())
    time.sleep(0.5)
    peak = max(peak, d.rss())
    d.normal_client_served()
    peak = max(peak, d.rss())
    assert peak - base < 32 * MIB, f"RSS {base / MIB:.0f} -> {peak / MIB:.0f} MiB"
    attackers.close()
    after = d.settle(lambda r: r - base < 8 * MIB)
    print(f"headers: RSS {base / MIB:.1f} -> peak {peak / MIB:.1f} -> {after / MIB:.1f} MiB")
    assert after - base < 8 * MIB, f"RSS {base / MIB:.0f} -> {after / MIB:.0f} MiB after"


def test_request_body_attack_is_bounded_and_given_back(daemon_with: Callable[[str], Daemon],
                                                       attackers: Attackers) -> None:
    """The probe: streams that each send most of a 16 MiB message and never
    finish (20 of them took the daemon from 43 to 356 MB).  With a budget of
    48 MiB in all and 16 MiB per connection (smaller than the defaults, 128
    and 32, to keep the test short: the mechanism is the same), 6 connections
    of 4 such streams hold 48 MiB at most, and give it all back."""
    d = daemon_with("max_buffer_bytes = 50331648\nmax_connection_buffer_bytes = 16777216\n")
    base = d.rss()
    body = b"b" * (15 * MIB)
    peak = base
    for _ in range(6):
        c = attackers.new(d.sock)
        for _ in range(4):
            sid = c.sid()
            c.send(c.headers_frame(sid, grpc_headers(ECHO)))
            # a refused stream (over a budget) stops taking data: fine
            c.send_data(sid, struct.pack(">BI", 0, 16 * MIB - 100) + body)
            peak = max(peak, d.rss())
        d.normal_client_served(1)
    peak = max(peak, d.rss())
    assert peak - base < 48 * MIB + 24 * MIB, f"RSS {base / MIB:.0f} -> {peak / MIB:.0f} MiB"
    attackers.close()
    after = d.settle(lambda r: r - base < 8 * MIB)
    print(f"bodies: RSS {base / MIB:.1f} -> peak {peak / MIB:.1f} -> {after / MIB:.1f} MiB")
    assert after - base < 8 * MIB, f"RSS {base / MIB:.0f} -> {after / MIB:.0f} MiB after"
    d.normal_client_served()


def test_silent_connections_are_bounded(daemon_with: Callable[[str], Daemon],
                                        attackers: Attackers) -> None:
    """The probe: 2,000 connections that sent nothing or half a preface stayed
    open (16,568 fds with two holders).  At max_connections (default 512) each
    newcomer replaces the oldest silent one; a normal client gets in."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    try:
        d = daemon_with("")
        base_fds = open_fds(d.proc.pid)
        base = d.rss()
        socks = []
        try:
            for i in range(2000):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(s)
                s.connect(str(d.sock))
                if i % 2:
                    s.sendall(b"PRI * HTTP/2.0\r\n")  # half a preface
            time.sleep(0.5)
            fds = open_fds(d.proc.pid)
            print(f"silent: fds {base_fds} -> {fds}, RSS {base / MIB:.1f} -> {d.rss() / MIB:.1f}")
            assert fds <= base_fds + 512 + 4, fds
            d.normal_client_served()
            assert d.rss() - base < 32 * MIB
        finally:
            for s in socks:
                s.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_normal_client_served_throughout_a_body_flood(daemon_with: Callable[[str], Daemon],
                                                      attackers: Attackers) -> None:
    """While attackers keep the request budget full (default limits), calls of
    a normal client keep succeeding: small requests displace the largest
    unfinished ones."""
    d = daemon_with("")
    stop_flag = threading.Event()
    errors: list[BaseException] = []

    shed = [0]

    def flood() -> None:
        try:
            while not stop_flag.is_set():
                try:
                    c = attackers.new(d.sock)
                    for _ in range(2):
                        sid = c.sid()
                        c.send(c.headers_frame(sid, grpc_headers(ECHO)))
                        c.send_data(sid, struct.pack(">BI", 0, 16 * MIB - 1) + b"f" * (4 * MIB))
                except OSError:  # replaced at max_connections: an attacker goes on
                    shed[0] += 1
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 5
        calls = 0
        while time.monotonic() < deadline:
            d.normal_client_served(1)
            calls += 1
        print(f"flood: {calls} normal cycles in 5 s, RSS {d.rss() / MIB:.1f} MiB, "
              f"{len(attackers.raws)} attacker connections ({shed[0]} cut)")
        assert calls >= 3
    finally:
        stop_flag.set()
        attackers.close()
        t.join(30)
    assert not errors, errors
