"""The seven ways the daemon benchmarks (issues 4 and 8) reach a snapshotter.

* ``in-process``: an ``OverlaySnapshotter`` in the benchmark's own process;
* ``daemon``: our daemon (``python -m overlay.cli serve``, log level info, as
  deployed) on its own root, through ``RemoteSnapshotter`` on its socket;
* ``Go proxy``: the reference contender of issue 8, containerd 1.6's own
  overlay snapshotter served over gRPC by grpc-go with containerd's
  ``contrib/snapshotservice`` (``tests/integration/go/overlayproxy``, the
  external-snapshotter pattern of containerd's docs/PLUGINS.md), on its own
  root, through the same ``RemoteSnapshotter``.  It runs with the option
  containerd's built-in overlayfs plugin always sets, asynchronous remove
  (Remove drops the record, Cleanup deletes the directories): the same
  deferred deletion as our daemon's, reclaimed between rounds the same way;
* ``Go proxy, Remove deletes``: the same program exactly as PLUGINS.md
  writes it (``overlay.NewSnapshotter(root)``, no options): Remove deletes
  the directories itself, after listing every snapshot directory to find
  what no record owns (containerd's ``cleanupDirectories``), in the call;
* ``containerd → overlayfs``, ``containerd → ovl`` and ``containerd → Go
  proxy``: one private containerd 1.6 (as
  ``tests.integration.containerd_env.containerd_stack`` starts it, with the
  daemon behind ``proxy_plugins.ovl`` and a second Go proxy behind
  ``proxy_plugins.gooverlay``, but at log level info), reached with the same
  client on containerd's socket, in namespace ``bench``, with
  ``snapshotter`` set to containerd's built-in ``overlayfs``, to our proxy
  ``ovl`` or to the Go proxy ``gooverlay``.

The daemon and Go proxy contenders have processes of their own: containerd's
garbage collector removes every backend snapshot it has no record of, so a
client talking to a proxy behind containerd directly would lose its
snapshots mid-run.

containerd also collects every snapshot that nothing references, actives
included, so its contenders work under a lease (``containerd-lease`` header),
as containerd's own unpacker does.  Everything of one filesystem lives in one
work directory on it (every root, containerd's root and state), the sockets
in short private directories under /tmp.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.config import Filesystem
from bench.workloads import listdir_count, populate
from overlay.client import RemoteSnapshotter
from overlay.overlayfs import OverlaySnapshotter
from overlay.server.snapshots import LEASE_HEADER
from overlay.snapshots import Snapshotter
from tests.helpers import wait_for_socket
from tests.integration import gobuild
from tests.integration.containerd_env import (
    PLUGIN,
    Stack,
    _stop,
)
from tests.integration.containerd_env import containerd_stack as _containerd_stack

__all__ = [
    "CONTAINERD_CONTENDERS",
    "CONTENDERS",
    "GO_PLUGIN",
    "NAMESPACE",
    "Backends",
    "ContainerdSnapshots",
    "Contender",
    "Daemon",
    "GoProxy",
    "cpu_seconds",
    "go_proxy",
    "ovl_daemon",
]

NAMESPACE = "bench"
LEASE = "bench-lease"
#: seconds a client call may take before the benchmark gives up
CALL_TIMEOUT = 120.0
#: seconds to wait for deferred deletions (ours, containerd's GC) to finish
SETTLE_TIMEOUT = 120.0
#: ... or until the backend's directories have not changed for this long
QUIET_SECONDS = 1.0
BUILTIN = "overlayfs"
#: the proxy plugin name containerd knows the Go proxy by
GO_PLUGIN = "gooverlay"


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far (schedstat: nanoseconds, not ticks)."""
    total = 0
    tasks = Path(f"/proc/{pid}/task")
    for task in os.listdir(tasks):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((tasks / task / "schedstat").read_text().split()[0])
    return total / 1e9


@dataclass(frozen=True, slots=True)
class Contender:
    id: str
    label: str


CONTENDERS: tuple[Contender, ...] = (
    Contender("inproc", "in-process"),
    Contender("daemon", "daemon (unix socket)"),
    Contender("goproxy", "Go proxy (unix socket)"),
    Contender("goproxy-docs", "Go proxy, Remove deletes (PLUGINS.md)"),
    Contender("ctd-overlayfs", f"containerd -> {BUILTIN} (built-in)"),
    Contender("ctd-ovl", f"containerd -> {PLUGIN} (our proxy)"),
    Contender("ctd-goproxy", f"containerd -> {GO_PLUGIN} (Go proxy)"),
)
CONTAINERD_CONTENDERS = ("ctd-overlayfs", "ctd-ovl", "ctd-goproxy")
#: which snapshotter containerd is asked for, per contender
CONTAINERD_SNAPSHOTTER = {"ctd-overlayfs": BUILTIN, "ctd-ovl": PLUGIN,
                          "ctd-goproxy": GO_PLUGIN}


class ContainerdSnapshots(RemoteSnapshotter):
    """``RemoteSnapshotter`` on containerd's socket that also sends a lease.

    The client has no lease option, so the header is appended to the
    metadata it sends with every call (its ``_metadata``).
    """

    def __init__(self, address: str, *, namespace: str, snapshotter: str, lease: str,
                 timeout: float) -> None:
        super().__init__(address, namespace=namespace, snapshotter=snapshotter, timeout=timeout)
        self._metadata = (*self._metadata, (LEASE_HEADER, lease))


@dataclass
class Daemon:
    root: Path
    sock: Path
    log: Path
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def ovl_daemon(workdir: Path, log_level: str = "info") -> Iterator[Daemon]:
    """``python -m overlay.cli serve`` on ``workdir/root``; stopped at exit."""
    sockdir = Path(tempfile.mkdtemp(prefix="ovl-bench-", dir="/tmp"))
    sock = sockdir / "ovl.sock"
    log = workdir / "daemon.log"
    try:
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "overlay.cli", "serve", "--root", str(workdir / "root"),
                 "--address", str(sock), "--log-level", log_level],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_socket(sock, process, "ovl serve")
            yield Daemon(workdir / "root", sock, log, process)
        finally:
            _stop(process, timeout=60)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


@dataclass
class GoProxy:
    root: Path
    sock: Path
    log: Path
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def go_proxy(workdir: Path, *, async_remove: bool = True) -> Iterator[GoProxy]:
    """``overlayproxy [-async-remove]`` on ``workdir/root`` (built once per
    source by ``tests.integration.gobuild``); stopped at exit.  Skips (fails
    under CI=true) without Go and Debian's Go packages."""
    gobuild.require_go()
    binary = gobuild.build("overlayproxy")
    sockdir = Path(tempfile.mkdtemp(prefix="ovl-bench-go-", dir="/tmp"))
    sock = sockdir / "go.sock"
    log = workdir / "overlayproxy.log"
    try:
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [binary, "-root", str(workdir / "root"), "-address", str(sock),
                 *(["-async-remove"] if async_remove else [])],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_socket(sock, process, "overlayproxy")
            yield GoProxy(workdir / "root", sock, log, process)
        finally:
            _stop(process, timeout=60)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


@contextlib.contextmanager
def containerd_stack(workdir: Path, log_level: str = "info",
                     go: GoProxy | None = None) -> Iterator[Stack]:
    """The tests' stack (our daemon, then a private containerd with it as
    ``proxy_plugins.ovl``; both always stopped) at ``log_level`` rather than
    debug, with the built-in overlayfs checked too, and ``go`` as
    ``proxy_plugins.gooverlay`` when given."""
    snapshotters = (BUILTIN, PLUGIN) if go is None else (BUILTIN, PLUGIN, GO_PLUGIN)
    proxies = {} if go is None else {GO_PLUGIN: go.sock}
    with _containerd_stack(workdir, log_level=log_level, snapshotters=snapshotters,
                           proxies=proxies) as stack:
        yield stack


def _wait(done: Callable[[], bool], timeout: float = SETTLE_TIMEOUT) -> float | None:
    """Poll ``done``; the seconds it took, or None after ``timeout``."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.05)
    return time.monotonic() - start


def _quiet(measure: Callable[[], tuple[int, ...]], done: Callable[[tuple[int, ...]], bool],
           still: float = QUIET_SECONDS, timeout: float = SETTLE_TIMEOUT) -> float | None:
    """Poll ``measure`` until ``done`` says so, or until it has not changed for
    ``still`` seconds; the seconds it took, or None after ``timeout``."""
    start = since = time.monotonic()
    last = measure()
    while not done(last):
        time.sleep(0.05)
        now = time.monotonic()
        current = measure()
        if current != last:
            last, since = current, now
        elif now - since >= still:
            break
        if now - start > timeout:
            return None
    return time.monotonic() - start


class Backends:
    """The contenders of one filesystem, started on first use, stopped at ``close``."""

    def __init__(self, fs: Filesystem, workdir: Path) -> None:
        self.fs = fs
        self.workdir = workdir
        self._exit = contextlib.ExitStack()
        self._clients: dict[str, Snapshotter] = {}
        self._inproc: OverlaySnapshotter | None = None
        self._daemon: Daemon | None = None
        self._go: GoProxy | None = None
        self._go_docs: GoProxy | None = None
        self._stack: Stack | None = None
        self._stack_go: GoProxy | None = None

    def close(self) -> None:
        try:
            for client in self._clients.values():
                client.close()
        finally:
            self._clients.clear()
            self._exit.close()

    def _containerd(self) -> Stack:
        if self._stack is None:
            work = self.workdir / "containerd"
            work.mkdir()
            # A Go proxy of its own behind containerd, started first, stopped
            # last; without Go only the containerd -> Go proxy contender skips.
            if not gobuild.missing():
                (work / "go").mkdir()
                self._stack_go = self._exit.enter_context(go_proxy(work / "go"))
            # starts our daemon too; skips (fails under CI=true) without containerd
            self._stack = self._exit.enter_context(containerd_stack(work, go=self._stack_go))
            self._stack.ctr(NAMESPACE, "leases", "create", "--id", LEASE, "--expires", "0")
        return self._stack

    def client(self, contender: str) -> Snapshotter:
        """The snapshotter of ``contender`` (a ``Contender.id``), warmed up."""
        if contender in self._clients:
            return self._clients[contender]
        client: Snapshotter
        if contender == "inproc":
            self._inproc = OverlaySnapshotter(self.workdir / "inproc")
            client = self._inproc
        elif contender == "daemon":
            work = self.workdir / "daemon"
            work.mkdir()
            self._daemon = self._exit.enter_context(ovl_daemon(work))
            client = RemoteSnapshotter(str(self._daemon.sock), timeout=CALL_TIMEOUT)
        elif contender == "goproxy":
            work = self.workdir / "goproxy"
            work.mkdir()
            self._go = self._exit.enter_context(go_proxy(work))
            client = RemoteSnapshotter(str(self._go.sock), timeout=CALL_TIMEOUT)
        elif contender == "goproxy-docs":
            work = self.workdir / "goproxy-docs"
            work.mkdir()
            self._go_docs = self._exit.enter_context(go_proxy(work, async_remove=False))
            client = RemoteSnapshotter(str(self._go_docs.sock), timeout=CALL_TIMEOUT)
        elif contender in CONTAINERD_CONTENDERS:
            stack = self._containerd()
            if contender == "ctd-goproxy" and self._stack_go is None:
                gobuild.require_go()
            client = ContainerdSnapshots(
                str(stack.ctd_sock), namespace=NAMESPACE, lease=LEASE, timeout=CALL_TIMEOUT,
                snapshotter=CONTAINERD_SNAPSHOTTER[contender])
        else:
            raise ValueError(f"unknown contender {contender!r}")
        self._clients[contender] = client
        # Warm up (connections, first transactions) outside every timing.
        for name in populate(client, "warmup", 3):
            client.remove(name)
        self.settle(contender, 0)
        return client

    def processes(self, contender: str) -> dict[str, int]:
        """The processes doing ``contender``'s work (for CPU accounting): this
        one (the client, and the in-process snapshotter), our daemon or the
        Go proxy, containerd."""
        procs = {"client": os.getpid()}
        if contender == "daemon" and self._daemon is not None:
            procs["ovl"] = self._daemon.process.pid
        if contender == "goproxy" and self._go is not None:
            procs["go"] = self._go.process.pid
        if contender == "goproxy-docs" and self._go_docs is not None:
            procs["go"] = self._go_docs.process.pid
        if contender in CONTAINERD_CONTENDERS and self._stack is not None:
            assert self._stack.containerd is not None and self._stack.daemon is not None
            procs["containerd"] = self._stack.containerd.pid
            if contender == "ctd-ovl":
                procs["ovl"] = self._stack.daemon.pid
            if contender == "ctd-goproxy" and self._stack_go is not None:
                procs["go"] = self._stack_go.process.pid
        return procs

    def settle(self, contender: str, live: int) -> float | None:
        """Let deferred deletions finish before a round: reclaim what earlier
        rounds removed and wait until the backend holds ``live`` snapshot
        directories and an empty trash.  The seconds waited, None on timeout.

        In-process: ``cleanup()``.  Daemon: ``cleanup()`` moves the orphans to
        the trash, its worker thread empties it.  Go proxy: ``cleanup()``
        deletes them before it returns.  Through containerd, its
        garbage collector removes and cleans up the backend snapshots on its
        own schedule (while the rounds run, too): only wait for it.
        """
        if contender == "inproc":
            assert self._inproc is not None
            self._inproc.cleanup()
            return 0.0
        if contender == "daemon":
            assert self._daemon is not None
            self._clients[contender].cleanup()
            return self._settled(self._daemon.root, live)
        if contender in ("goproxy", "goproxy-docs"):
            go = self._go if contender == "goproxy" else self._go_docs
            assert go is not None
            self._clients[contender].cleanup()
            return self._settled(go.root, live)  # it has no trash: always 0
        # containerd's collector may leave the last removed snapshot or two for
        # its next run (a removal racing the run that was already going): so
        # also accept a backend that has stopped changing.
        stack = self._containerd()
        if contender == "ctd-ovl":
            root = stack.root
            return _quiet(lambda: (listdir_count(root / "snapshots"),
                                   listdir_count(root / "trash")),
                          lambda c: c[0] <= live and c[1] == 0)
        if contender == "ctd-goproxy":
            assert self._stack_go is not None
            go_root = self._stack_go.root
            return _quiet(lambda: (listdir_count(go_root / "snapshots"),),
                          lambda c: c[0] <= live)
        root = stack.ctd_root / f"io.containerd.snapshotter.v1.{BUILTIN}"
        return _quiet(lambda: (listdir_count(root / "snapshots"),), lambda c: c[0] <= live)

    @staticmethod
    def _settled(root: Path, live: int) -> float | None:
        return _wait(lambda: listdir_count(root / "snapshots") <= live
                     and listdir_count(root / "trash") == 0)

