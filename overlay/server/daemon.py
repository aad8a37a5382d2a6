"""``ovl serve``: the proxy snapshotter daemon containerd talks to.

Start-up: open the snapshotter (probing the kernel) and its metadata store,
listen on the unix socket (mode 0660, owned by root; a stale socket file is
replaced, a live one refused) or on the socket systemd passed (LISTEN_FDS),
then tell systemd READY=1 (Type=notify).  SIGTERM/SIGINT: stop taking calls,
drain the ones in flight, close the store.

Faults at start-up.  The store is opened before the socket is bound, so
READY=1 and a listening socket mean it is open.  When it cannot be opened the
daemon exits before listening, with ``ovl: <what is wrong>`` on stderr and the
exit status of its kind (``ovl --help``): 5 for a store of another schema or a
read-only root without a store yet, 7 for a store that cannot be opened
(not an LMDB file, say), 8 when there is no room to create it.

A root on a read-only filesystem (mounted ``ro``, or turned read-only by the
kernel after an error: ext4 ``errors=remount-ro``) is served read-only: we
chose that over refusing to start because a running daemon keeps Stat, List,
Mounts and Usage working for what is already there (containerd, the kubelet's
image accounting) and answers every write with FAILED_PRECONDITION
``... is on a read-only filesystem ...`` (:class:`~overlay.errors.ReadOnlyError`),
a message that reaches the person looking at the failed pull or pod, where a
daemon that is not there gives only "connection refused".  The same holds
when the root turns read-only while the daemon runs.  Once the filesystem is
writable again, restart the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from types import FrameType

from overlay.errors import InvalidArgumentError
from overlay.overlayfs import OverlaySnapshotter
from overlay.server.cleaner import DeferredCleanup
from overlay.server.config import Config
from overlay.server.metrics import Metrics
from overlay.server.rpc import RpcServer
from overlay.server.snapshots import make_server

__all__ = ["Daemon", "serve"]

log = logging.getLogger(__name__)

#: seconds in-flight calls get to finish on shutdown
DRAIN_SECONDS = 30.0
SD_LISTEN_FDS_START = 3


def sd_notify(state: str) -> bool:
    """Send ``state`` to systemd's NOTIFY_SOCKET, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(address)
            s.sendall(state.encode())
        except OSError as exc:
            log.warning("cannot notify systemd (%s): %s", address, exc)
            return False
    return True


def listen_fds() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_FDS/LISTEN_PID)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


class Daemon:
    """The running daemon: start() it, stop() it (from any thread)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self._server: RpcServer | None = None
        self._http: object | None = None
        self._socket_path: str | None = None
        self.backend: DeferredCleanup | None = None

    def start(self) -> None:
        cfg = self.config
        # The store opens here, read-write (or read-only on a read-only root),
        # before the socket exists: a store that cannot open fails the start.
        snapshotter = OverlaySnapshotter(
            cfg.root, sync_remove=cfg.sync_remove, upperdir_label=cfg.upperdir_label,
            mount_options=cfg.mount_options, trash_threads=cfg.cleanup_threads,
            map_size=cfg.metadata_map_size, map_size_max=cfg.metadata_map_size_max,
        )
        # the backlog gauges cost a walk of the trash: only when someone scrapes them
        self.backend = DeferredCleanup(snapshotter,
                                       self.metrics if cfg.metrics_address else None)
        self.metrics.watch(self.backend, snapshotter.store_stats)
        self.metrics.watch_transport(self._transport_stats)
        try:
            # metrics first: once the socket exists, everything is up
            if cfg.metrics_address:
                self._http = self.metrics.serve(cfg.metrics_address)
                log.info("metrics on http://%s/metrics", cfg.metrics_address)
            # per-call histograms cost a few us a call: only when someone scrapes them
            observe = self.metrics.observe if cfg.metrics_address else None
            activated = listen_fds()
            if activated:
                if len(activated) != 1:
                    for sock in activated:
                        sock.close()
                    raise InvalidArgumentError(
                        f"socket activation passed {len(activated)} sockets; expected one"
                    )
                self._server = make_server(self.backend, activated[0],
                                           max_workers=cfg.workers,
                                           observe=observe, limits=cfg.limits())
                self._server.start()
                log.info("serving on the socket passed by systemd (root %s)", cfg.root)
            else:
                old = os.umask(0o117)  # the socket is born 0660, never wider
                try:
                    self._server = make_server(self.backend, cfg.address,
                                               max_workers=cfg.workers,
                                               observe=observe, limits=cfg.limits())
                finally:
                    os.umask(old)
                self._socket_path = cfg.address
                os.chown(cfg.address, 0, 0)
                os.chmod(cfg.address, 0o660)
                self._server.start()
                log.info("serving on %s (root %s)", cfg.address, cfg.root)
        except BaseException:
            self.stop()
            raise
        sd_notify("READY=1")

    def _transport_stats(self) -> dict[str, int]:
        server = self._server
        if server is None:
            raise ValueError("not serving")
        return server.stats()

    def stop(self, grace: float = DRAIN_SECONDS) -> None:
        sd_notify("STOPPING=1")
        if self._server is not None:
            self._server.stop(grace)
            self._server = None
        if self._http is not None:
            shutdown = getattr(self._http, "shutdown", None)
            if shutdown is not None:
                shutdown()
            self._http = None
        if self._socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_path)
            self._socket_path = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM or SIGINT; returns the exit status."""
    logging.basicConfig(
        level=config.log_level_number,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    done = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        done.set()

    # Installed for the rest of the process's life: a second SIGTERM while
    # draining (systemd, an impatient operator) must not kill us half-closed.
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    daemon = Daemon(config)
    try:
        daemon.start()
        done.wait()
        log.info("signal %s: draining in-flight calls", signal.Signals(received[0]).name)
    finally:
        daemon.stop()
        # Everything is closed; a signal now (a second SIGTERM) would find the
        # interpreter finalizing, with the default handlers back, and kill us
        # with a failure status: keep it pending until we are gone.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    return 0
