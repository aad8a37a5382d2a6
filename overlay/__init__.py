"""overlay: an overlayfs-native container snapshotter.

The public API, re-exported here (a test pins this list):

* the vocabulary: :class:`Kind`, :class:`Info`, :class:`Usage`,
  :class:`CleanupReport`, the :class:`Snapshotter` protocol;
* the errors of :mod:`overlay.errors`;
* :class:`Mount` with :func:`mount_all` / :func:`unmount` / :func:`unmount_all`;
* the backend :class:`OverlaySnapshotter` and the gRPC :class:`RemoteSnapshotter`
  (imported lazily: the latter needs grpc).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from overlay.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OverlayError,
    ReadOnlyError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    UnsupportedError,
)
from overlay.mount import Mount, mount_all, unmount, unmount_all
from overlay.snapshots import CleanupReport, Info, Kind, Snapshotter, Usage

if TYPE_CHECKING:
    from overlay.client import RemoteSnapshotter
    from overlay.overlayfs import OverlaySnapshotter

__all__ = [
    "AlreadyExistsError",
    "CleanupReport",
    "FailedPreconditionError",
    "Info",
    "InvalidArgumentError",
    "Kind",
    "Mount",
    "NotFoundError",
    "OverlayError",
    "OverlaySnapshotter",
    "ReadOnlyError",
    "RemoteSnapshotter",
    "ResourceExhaustedError",
    "Snapshotter",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "UnsupportedError",
    "Usage",
    "mount_all",
    "unmount",
    "unmount_all",
]


def __getattr__(name: str) -> Any:
    if name == "OverlaySnapshotter":
        from overlay.overlayfs import OverlaySnapshotter

        return OverlaySnapshotter
    if name == "RemoteSnapshotter":
        from overlay.client import RemoteSnapshotter

        return RemoteSnapshotter
    raise AttributeError(f"module 'overlay' has no attribute {name!r}")
