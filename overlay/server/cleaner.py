"""Cleanup that returns in bounded time: the daemon's view of the backend.

containerd's GC calls Cleanup while holding its snapshotter lock, so a slow
Cleanup stalls every Prepare on the node (containerd#11021, #13798).  Here
``cleanup()`` only moves the orphans into the trash (a rename each, under
the metadata lock) and wakes a background thread that deletes the trash
(in batches: what gathers within :attr:`DeferredCleanup.BATCH_SECONDS`);
the metrics show what is still waiting as a backlog.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping

from overlay import _native
from overlay.mount import Mount
from overlay.overlayfs import OverlaySnapshotter
from overlay.server.metrics import Metrics
from overlay.snapshots import CleanupReport, Info, Usage, WalkFunc

__all__ = ["DeferredCleanup"]

log = logging.getLogger(__name__)


class DeferredCleanup:
    """A Snapshotter that delegates to an OverlaySnapshotter, except that
    ``cleanup()`` leaves the deletion to a background thread."""

    #: how often the worker retries entries that could not go (busy, immutable)
    RETRY_SECONDS = 60.0
    #: after a wake-up, how long the worker lets more orphans gather before it
    #: deletes: containerd's GC calls Cleanup after nearly every removal, and a
    #: deletion run per call would contend with the RPC workers (the GIL, two
    #: CPUs) hundreds of times a second
    BATCH_SECONDS = 0.1

    def __init__(self, backend: OverlaySnapshotter, metrics: Metrics | None = None) -> None:
        self.backend = backend
        self._metrics = metrics
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ovl-trash", daemon=True)
        self._thread.start()
        self._wake.set()  # a trash left by the previous run is resumed at once

    # --------------------------------------------------------------- delegation

    def stat(self, key: str) -> Info:
        return self.backend.stat(key)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        return self.backend.update(info, *fieldpaths)

    def usage(self, key: str) -> Usage:
        return self.backend.usage(key)

    def mounts(self, key: str) -> list[Mount]:
        return self.backend.mounts(key)

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self.backend.prepare(key, parent, labels)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self.backend.view(key, parent, labels)

    def commit(
        self, name: str, key: str, labels: Mapping[str, str] | None = None, parent: str = ""
    ) -> None:
        self.backend.commit(name, key, labels, parent)

    def remove(self, key: str) -> None:
        self.backend.remove(key)

    def walk(self, fn: WalkFunc, *filters: str) -> None:
        self.backend.walk(fn, *filters)

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> CleanupReport:
        """Move the orphans to the trash (bounded: one rename each) and let the
        background thread delete them.  Reports the busy orphans left in place."""
        moved, busy = self.backend.collect_orphans()
        if moved or self.backend.trash_backlog():
            self._idle.clear()
            self._wake.set()
        return CleanupReport(directories=moved, busy=tuple(busy))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the trash worker has nothing left to do (tests, shutdown)."""
        return self._idle.wait(timeout)

    def _measure(self) -> None:
        if self._metrics is None:
            return
        trash = os.path.join(self.backend.root, "trash")
        total = 0
        names = os.listdir(trash) if os.path.isdir(trash) else []
        for name in names:
            with contextlib.suppress(OSError):
                total += _native.disk_usage(os.path.join(trash, name)).bytes
        self._metrics.backlog_directories.set(len(names))
        self._metrics.backlog_bytes.set(total)

    def _run(self) -> None:
        reported: set[tuple[str, int]] = set()
        while not self._stop.is_set():
            self._wake.wait(self.RETRY_SECONDS)
            if self._stop.wait(self.BATCH_SECONDS):
                break
            self._wake.clear()
            try:
                self._measure()
                report = self.backend.empty_trash(stop=self._stop.is_set)
                if self._metrics is not None:
                    self._metrics.reclaimed_bytes.inc(report.bytes)
                # each entry once, not at every retry: a busy mount or a root
                # gone read-only would otherwise repeat itself every minute
                busy = set(report.busy)
                for path, err in sorted(busy - reported):
                    log.warning("cleanup could not remove %s: %s (retried every %g s)",
                                path, os.strerror(err), self.RETRY_SECONDS)
                reported = busy
                self._measure()
            except Exception:
                log.exception("emptying the trash failed; retrying later")
            if not self._wake.is_set():
                self._idle.set()

    def close(self) -> None:
        """Stop the worker (the trash stays for the next start) and close."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self.backend.close()
