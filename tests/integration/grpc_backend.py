"""An overlay snapshotter served over gRPC, in-process: for the conformance
suite's "grpc" backend and the gRPC integration tests.

``remote_overlay(root)`` starts a server over a fresh ``OverlaySnapshotter`` at
``root`` and yields a ``RemoteSnapshotter`` talking to it; both stop at exit.
The socket lives in a short private directory under /tmp, whatever the length
of ``root`` (a unix socket path is limited to 107 bytes).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from overlay.client import RemoteSnapshotter
from overlay.overlayfs import OverlaySnapshotter
from overlay.server.snapshots import make_server
from overlay.snapshots import Snapshotter

__all__ = ["remote_overlay", "serve"]


@contextlib.contextmanager
def serve(backend: Snapshotter, *, max_workers: int = 8) -> Iterator[str]:
    """Serve ``backend`` on a fresh unix socket; yields its address
    (``unix:///…``).  Stops the server (not the backend) at exit."""
    sock_dir = tempfile.mkdtemp(prefix="ovl-grpc-", dir="/tmp")
    address = f"unix://{sock_dir}/snapshots.sock"
    server = make_server(backend, address, max_workers=max_workers)
    server.start()
    try:
        yield address
    finally:
        server.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


@contextlib.contextmanager
def remote_overlay(
    root: Path,
    *,
    namespace: str | None = None,
    timeout: float | None = 60.0,
    **options: Any,
) -> Iterator[RemoteSnapshotter]:
    """A ``RemoteSnapshotter`` over a fresh ``OverlaySnapshotter(root, **options)``
    served in-process; client, server and backend are closed at exit."""
    backend = OverlaySnapshotter(root, **options)
    try:
        with serve(backend) as address:
            client = RemoteSnapshotter(address, namespace=namespace, timeout=timeout)
            try:
                yield client
            finally:
                client.close()
    finally:
        backend.close()


@contextlib.contextmanager
def daemon_overlay(root: Path, *, namespace: str | None = None,
                   timeout: float | None = 60.0) -> Iterator[RemoteSnapshotter]:
    """The whole daemon (``overlay.server.daemon.Daemon``: deferred cleanup,
    metrics interceptor, socket mode) in-process, and a client talking to it."""
    from overlay.server.config import Config
    from overlay.server.daemon import Daemon

    sock_dir = tempfile.mkdtemp(prefix="ovl-daemon-", dir="/tmp")
    daemon = Daemon(Config(root=str(root), address=f"{sock_dir}/overlay.sock"))
    daemon.start()
    try:
        client = RemoteSnapshotter(f"unix://{sock_dir}/overlay.sock", namespace=namespace,
                                   timeout=timeout)
        try:
            yield client
        finally:
            client.close()
    finally:
        daemon.stop(grace=5)
        shutil.rmtree(sock_dir, ignore_errors=True)
