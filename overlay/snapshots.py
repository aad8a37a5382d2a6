"""The snapshotter vocabulary: kinds, value types and the ``Snapshotter`` protocol.

No I/O happens here.  This module is to the project what containerd's
``core/snapshots/snapshotter.go`` is to containerd: the one place that says
what a snapshotter is and how a snapshot lives and dies.

Lifecycle
=========
A snapshotter holds three kinds of snapshots in **one key space**: an active
snapshot's *key*, a view's *key* and a committed snapshot's *name* may never
be equal.

* ``prepare(key, parent)`` creates an **active** snapshot: a writable
  directory layered over the committed ``parent`` (or over nothing when
  ``parent`` is ``""``).  It returns the mounts that expose it.
* ``view(key, parent)`` creates a **view**: the same, read-only.  A view can
  never be committed; ``remove`` releases it.
* ``commit(name, key)`` turns the active snapshot ``key`` into the committed
  snapshot ``name``.  The key disappears; the snapshot keeps its id and its
  directory, and its labels become exactly the labels given to ``commit``.
  Committed snapshots are immutable and are the only valid parents.
* ``remove(key)`` deletes any snapshot that is not a parent.  The key is
  free again at once.  Reclaiming the disk is the job of ``cleanup``, which
  never blocks a concurrent ``prepare`` for longer than a few renames.
* ``stat``, ``update`` (labels only), ``usage``, ``mounts`` and ``walk``
  inspect; ``close`` releases the store and may be called any number of times.

Keys and names are opaque strings: they may contain ``/``, spaces or any other
character and are never used as paths.

Errors are the typed errors of :mod:`overlay.errors`: a missing snapshot is
``NotFoundError``, a taken key ``AlreadyExistsError``, a parent that is not
committed ``InvalidArgumentError``, a remove of a parent or a commit of a
non-active snapshot ``FailedPreconditionError``.  A failing call changes
nothing.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from overlay.errors import InvalidArgumentError

if TYPE_CHECKING:
    from overlay.mount import Mount

__all__ = [
    "INHERITED_LABEL_PREFIX",
    "LABEL_GC_ROOT",
    "LABEL_SNAPSHOT_REF",
    "LABEL_UPPERDIR",
    "MAX_LABEL_BYTES",
    "CleanupReport",
    "Info",
    "Kind",
    "Snapshotter",
    "Usage",
    "WalkFunc",
    "check_labels",
    "filter_inherited_labels",
    "now_ns",
]

INHERITED_LABEL_PREFIX = "containerd.io/snapshot/"
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_UPPERDIR = "containerd.io/snapshot/overlay.upperdir"
LABEL_GC_ROOT = "containerd.io/gc.root"
#: containerd's limit for one label: len(key) + len(value) in bytes.
MAX_LABEL_BYTES = 4096


class Kind(enum.IntEnum):
    """Snapshot kinds, with containerd's numeric values (also the proto enum)."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    def __str__(self) -> str:
        return self.name.capitalize()

    @property
    def filter_value(self) -> str:
        """The value the ``kind`` filter field compares against (``active`` ...)."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Kind:
        """containerd's ``ParseKind``: case-insensitive; anything else is UNKNOWN."""
        try:
            kind = cls[text.upper()]
        except KeyError:
            return cls.UNKNOWN
        return kind


def now_ns() -> int:
    """The current time as nanoseconds since the Unix epoch (UTC)."""
    return time.time_ns()


@dataclass(frozen=True, slots=True)
class Info:
    """What ``stat`` and ``walk`` report about one snapshot.

    ``created_ns`` and ``updated_ns`` are nanoseconds since the Unix epoch;
    they are equal on a snapshot that was never updated.  ``labels`` may be
    read-only (a backend may hand the same Info to every caller): copy it,
    ``dict(info.labels)``, to change it.
    """

    kind: Kind
    name: str
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    """Disk usage of a snapshot's own layer (never its parents')."""

    inodes: int = 0
    size: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.inodes + other.inodes, self.size + other.size)


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What one ``cleanup`` call reclaimed.

    ``busy`` lists the orphan directories left in place (path, errno) because
    something still used them (a mount, an immutable file); the next cleanup
    tries them again.
    """

    directories: int = 0
    entries: int = 0
    bytes: int = 0
    busy: Sequence[tuple[str, int]] = ()


WalkFunc = Callable[[Info], None]


def filter_inherited_labels(labels: Mapping[str, str] | None) -> dict[str, str] | None:
    """The labels a metadata layer passes down to a backend (SPEC §1.2)."""
    if labels is None:
        return None
    return {
        k: v
        for k, v in labels.items()
        if k == LABEL_SNAPSHOT_REF or k.startswith(INHERITED_LABEL_PREFIX)
    }


def check_labels(labels: Mapping[str, str] | None) -> None:
    """Reject labels containerd would reject: empty keys, oversize pairs."""
    if not labels:
        return
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgumentError(f"label {key!r}: keys and values must be strings")
        if not key:
            raise InvalidArgumentError("label key must not be empty")
        try:
            size = len(key.encode()) + len(value.encode())
        except UnicodeEncodeError as exc:
            raise InvalidArgumentError(
                f"label {key[:64]!r}: not valid unicode text ({exc.reason})"
            ) from None
        if size > MAX_LABEL_BYTES:
            raise InvalidArgumentError(
                f"label key and value length ({size} bytes) greater than maximum size "
                f"({MAX_LABEL_BYTES} bytes), key: {key[:64]!r}"
            )


class Snapshotter(Protocol):
    """containerd's snapshotter contract (see the module docstring)."""

    def stat(self, key: str) -> Info: ...

    def update(self, info: Info, *fieldpaths: str) -> Info: ...

    def usage(self, key: str) -> Usage: ...

    def mounts(self, key: str) -> list[Mount]: ...

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]: ...

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]: ...

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        parent: str = "",
    ) -> None: ...

    def remove(self, key: str) -> None: ...

    def walk(self, fn: WalkFunc, *filters: str) -> None: ...

    def cleanup(self) -> CleanupReport: ...

    def close(self) -> None: ...
