"""The ``Mount`` value type and how to apply it: bind, rbind, read-only
remounts and overlays of any depth (up to the kernel's 500 layers).

Overlays go through the new mount API when the kernel has it (one
``lowerdir+`` per layer, no option-length limit).  Otherwise the option
string is handed to mount(2) as is when it fits one page, else with the
layer paths made relative to their common parent and mounted from a private
working directory; a stack that fits neither way is refused before any
syscall, never mounted truncated.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import re
import select
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from overlay import _native, support
from overlay._native import MountAttr, MountFlag
from overlay.errors import InvalidArgumentError, UnsupportedError

__all__ = [
    "Mount",
    "MountInfo",
    "MountTableWatch",
    "OverlayStrategy",
    "mount_all",
    "mount_table",
    "parse_options",
    "unmount",
    "unmount_all",
]


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount, as containerd's ``types.Mount``: type, source, options.

    ``target`` is a path relative to the mount point given to ``mount_all``
    ("" = the mount point itself).
    """

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


class OverlayStrategy(enum.Enum):
    AUTO = "auto"
    #: fsopen/fsconfig("lowerdir+")/fsmount/move_mount
    NEW_API = "new-api"
    #: mount(2); relative lowerdirs from a private cwd when absolute ones overflow
    LEGACY = "legacy"


# option -> (clear, set); containerd's Linux option table.
_FLAGS: dict[str, tuple[int, int]] = {
    "async": (MountFlag.SYNCHRONOUS, 0),
    "atime": (MountFlag.NOATIME, 0),
    "bind": (0, MountFlag.BIND),
    "defaults": (0, 0),
    "dev": (MountFlag.NODEV, 0),
    "diratime": (MountFlag.NODIRATIME, 0),
    "dirsync": (0, MountFlag.DIRSYNC),
    "exec": (MountFlag.NOEXEC, 0),
    "mand": (0, MountFlag.MANDLOCK),
    "noatime": (0, MountFlag.NOATIME),
    "nodev": (0, MountFlag.NODEV),
    "nodiratime": (0, MountFlag.NODIRATIME),
    "noexec": (0, MountFlag.NOEXEC),
    "nomand": (MountFlag.MANDLOCK, 0),
    "norelatime": (MountFlag.RELATIME, 0),
    "nostrictatime": (MountFlag.STRICTATIME, 0),
    "nosuid": (0, MountFlag.NOSUID),
    "rbind": (0, MountFlag.BIND | MountFlag.REC),
    "relatime": (0, MountFlag.RELATIME),
    "remount": (0, MountFlag.REMOUNT),
    "ro": (0, MountFlag.RDONLY),
    "rw": (MountFlag.RDONLY, 0),
    "strictatime": (0, MountFlag.STRICTATIME),
    "suid": (MountFlag.NOSUID, 0),
    "sync": (0, MountFlag.SYNCHRONOUS),
}

_PROPAGATION: dict[str, int] = {
    "private": MountFlag.PRIVATE,
    "rprivate": MountFlag.PRIVATE | MountFlag.REC,
    "shared": MountFlag.SHARED,
    "rshared": MountFlag.SHARED | MountFlag.REC,
    "slave": MountFlag.SLAVE,
    "rslave": MountFlag.SLAVE | MountFlag.REC,
    "unbindable": MountFlag.UNBINDABLE,
    "runbindable": MountFlag.UNBINDABLE | MountFlag.REC,
}

# mount flags a bind mount only honours on a second, remounting call
_REMOUNT_FLAGS = (
    MountFlag.RDONLY | MountFlag.NOSUID | MountFlag.NODEV | MountFlag.NOEXEC
    | MountFlag.NOATIME | MountFlag.NODIRATIME | MountFlag.RELATIME | MountFlag.STRICTATIME
)

_ATTRS: tuple[tuple[int, int], ...] = (
    (MountFlag.RDONLY, MountAttr.RDONLY),
    (MountFlag.NOSUID, MountAttr.NOSUID),
    (MountFlag.NODEV, MountAttr.NODEV),
    (MountFlag.NOEXEC, MountAttr.NOEXEC),
    (MountFlag.NOATIME, MountAttr.NOATIME),
    (MountFlag.STRICTATIME, MountAttr.STRICTATIME),
    (MountFlag.NODIRATIME, MountAttr.NODIRATIME),
)


@dataclass(frozen=True, slots=True)
class ParsedOptions:
    flags: int
    propagation: tuple[int, ...]
    data: tuple[str, ...]


def parse_options(options: Sequence[str]) -> ParsedOptions:
    """Split mount options into mount(2) flags, propagation changes and
    filesystem data (everything else, in order)."""
    flags = 0
    propagation: list[int] = []
    data: list[str] = []
    for opt in options:
        if opt in _FLAGS:
            clear, set_ = _FLAGS[opt]
            flags = (flags & ~clear) | set_
        elif opt in _PROPAGATION:
            propagation.append(_PROPAGATION[opt])
        else:
            data.append(opt)
    return ParsedOptions(flags, tuple(propagation), tuple(data))


def _split_lowerdir(value: str) -> list[str]:
    # ':' separates layers; '\:' is a literal colon inside a path.
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append(value[i + 1])
            i += 2
            continue
        if ch == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return [p for p in parts if p]


def _mount_overlay(m: Mount, target: str, strategy: OverlayStrategy) -> None:
    parsed = parse_options(m.options)
    lowers: list[str] = []
    upper = work = None
    rest: list[str] = []
    for opt in parsed.data:
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            lowers = _split_lowerdir(value)
        elif key == "upperdir":
            upper = value
        elif key == "workdir":
            work = value
        else:
            rest.append(opt)
    if not lowers:
        raise InvalidArgumentError(f"overlay mount for {target!r} has no lowerdir")
    if strategy is OverlayStrategy.AUTO:
        api = support.mount_api()
        usable = bool(api & _native.MountApi.LOWERDIR_ADD) and (
            bool(api & _native.MountApi.LOWERDIR_FD)
            or all(len(p) < 256 for p in (*lowers, upper or "", work or ""))
        )
        strategy = OverlayStrategy.NEW_API if usable else OverlayStrategy.LEGACY
    if strategy is OverlayStrategy.NEW_API:
        attrs = 0
        for flag, attr in _ATTRS:
            if parsed.flags & flag:
                attrs |= attr
        _native.mount_overlay(target, lowers, upper, work, rest, attrs)
    else:
        _mount_overlay_legacy(m, target, lowers, upper, work, rest, parsed.flags)
    for prop in parsed.propagation:
        _native.mount(None, target, None, prop)


def _mount_overlay_legacy(
    m: Mount, target: str, lowers: list[str], upper: str | None, work: str | None,
    rest: list[str], flags: int,
) -> None:
    def options(paths: Sequence[str], up: str | None, wk: str | None) -> str:
        opts = []
        if wk is not None:
            opts.append(f"workdir={wk}")
        if up is not None:
            opts.append(f"upperdir={up}")
        opts.append("lowerdir=" + ":".join(p.replace(":", "\\:") for p in paths))
        return ",".join([*opts, *rest])

    data = options(lowers, upper, work)
    if len(os.fsencode(data)) <= _native.MAX_MOUNT_DATA:
        _native.mount(m.source, target, "overlay", flags, data)
        return
    # containerd's compaction: make every path relative to the common
    # parent of the layers (e.g. <root>/snapshots) and mount from there.
    every = [*lowers, *(p for p in (upper, work) if p is not None)]
    common = os.path.commonpath([os.path.dirname(p) for p in every])
    common = os.path.dirname(common) if common in every else common

    def rel(p: str) -> str:
        return os.path.relpath(p, common)

    data = options([rel(p) for p in lowers], rel(upper) if upper else None,
                   rel(work) if work else None)
    if len(os.fsencode(data)) > _native.MAX_MOUNT_DATA:
        raise UnsupportedError(
            f"an overlay of {len(lowers)} layers does not fit in one page of mount options "
            f"even with relative paths ({len(data)} bytes); this kernel lacks the new mount "
            "API's 'lowerdir+' (Linux >= 6.8), which mounts stacks of up to 500 layers"
        )
    # overlayfs ignores the source; naming the base directory there lets a
    # reader of mountinfo resolve the relative layer paths (cleanup's busy check)
    _native.mount_at(common, common, target, "overlay", flags, data)


def _mount_one(m: Mount, target: str, strategy: OverlayStrategy) -> None:
    if m.type == "overlay":
        _mount_overlay(m, target, strategy)
        return
    parsed = parse_options(m.options)
    data = ",".join(parsed.data) or None
    flags = parsed.flags
    if flags & MountFlag.BIND:
        # A bind mount ignores most flags on its first call (mount(8) does
        # the same): bind first, then remount with the flags that matter.
        _native.mount(m.source, target, None, flags & (MountFlag.BIND | MountFlag.REC), data)
        extra = flags & _REMOUNT_FLAGS
        if extra:
            try:
                _native.mount(None, target, None,
                              MountFlag.REMOUNT | MountFlag.BIND | extra, None)
            except OSError:
                _native.unmount(target, _native.UnmountFlag.DETACH)
                raise
    else:
        _native.mount(m.source, target, m.type or None, flags, data)
    for prop in parsed.propagation:
        _native.mount(None, target, None, prop)


def mount_all(
    mounts: Sequence[Mount],
    target: str | os.PathLike[str],
    *,
    strategy: OverlayStrategy = OverlayStrategy.AUTO,
) -> None:
    """Mount every mount in order at ``target`` (or below it, by ``Mount.target``).

    On failure the mounts already made are undone and the error re-raised.
    """
    root = os.fspath(target)
    done: list[str] = []
    try:
        for m in mounts:
            dest = os.path.join(root, m.target.lstrip("/")) if m.target else root
            _mount_one(m, dest, strategy)
            done.append(dest)
    except BaseException:
        for dest in reversed(done):
            with contextlib.suppress(OSError):
                _native.unmount(dest, _native.UnmountFlag.DETACH)
        raise


def unmount(target: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount the topmost mount at ``target``."""
    _native.unmount(target, _native.UnmountFlag.DETACH if lazy else 0)


def unmount_all(target: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount every mount stacked at ``target``; a non-mount point is fine."""
    while True:
        try:
            unmount(target, lazy=lazy)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return
            raise


@dataclass(frozen=True, slots=True)
class MountInfo:
    """One line of /proc/self/mountinfo (paths unescaped)."""

    mount_id: int
    device: str  # "major:minor"
    root: str  # the path inside the source filesystem that is mounted
    target: str
    fstype: str
    source: str
    super_options: tuple[str, ...]

    def layer_paths(self) -> tuple[str, ...]:
        """For an overlay: every lowerdir/upperdir/workdir/datadir path it uses,
        as the kernel shows them (absolute, or relative when mounted that way)."""
        if self.fstype != "overlay":
            return ()
        paths: list[str] = []
        for opt in self.super_options:
            key, _, value = opt.partition("=")
            if key in ("lowerdir", "lowerdir+", "datadir+"):
                paths.extend(_split_lowerdir(value))
            elif key in ("upperdir", "workdir"):
                paths.append(value)
        return tuple(paths)


_OCTAL_ESCAPE: Final = re.compile(rb"\\([0-3][0-7][0-7])")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash (and, in superblock
    # options, ',' and '=') as \ooo octal; nothing else is escaped, so any
    # other backslash sequence is left as it is.
    if "\\" not in field:
        return field
    raw = field.encode("utf-8", "surrogateescape")
    out = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), raw)
    return out.decode("utf-8", "surrogateescape")


def _split_super(options: str) -> tuple[str, ...]:
    # The kernel escapes a comma (and space, tab, newline, backslash) inside a
    # value as \ooo octal, so a plain split is exact.
    return tuple(_unescape(p) for p in options.split(",") if p)


def _parse_line(line: str) -> MountInfo:
    parts = line.split(" ")
    # ' - ' ends the optional fields; fstype, source and options follow it
    try:
        sep = parts.index("-", 6)
    except ValueError:
        raise ValueError(f"mountinfo line {line!r}: no ' - ' after six fields") from None
    if len(parts) < sep + 3:
        raise ValueError(f"mountinfo line {line!r}: fewer than two fields after ' - '")
    return MountInfo(
        mount_id=int(parts[0]),
        device=parts[2],
        root=_unescape(parts[3]),
        target=_unescape(parts[4]),
        fstype=_unescape(parts[sep + 1]),
        source=_unescape(parts[sep + 2]),
        super_options=_split_super(parts[sep + 3]) if len(parts) > sep + 3 else (),
    )


def _parse_table(text: str) -> list[MountInfo]:
    """The rows of a mountinfo text; ValueError for a line the kernel would not write.

    Lines end at a newline only: a path may hold a carriage return, a vertical
    tab, U+0085 or U+2028 unescaped, where str.splitlines() would cut it."""
    return [_parse_line(line) for line in text.split("\n") if line]


def _read_all(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


def mount_table() -> list[MountInfo]:
    """The calling process's mounts, from /proc/self/mountinfo."""
    fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _parse_table(_read_all(fd))
    finally:
        os.close(fd)


class MountTableWatch:
    """The process's mount table, parsed again only when it changed.

    An open /proc/self/mountinfo polls POLLPRI|POLLERR after any mount or
    unmount in the mount namespace (proc(5)), so an unchanged table costs one
    poll(2) instead of reading and parsing every line: on a host running
    containers that is hundreds of lines, and cleanup consults the table
    under the metadata lock (while containerd's GC holds its own).
    Thread-safe; :meth:`close` it.
    """

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLPRI | select.POLLERR)
        self._rows: list[MountInfo] | None = None
        self._lock = threading.Lock()

    def rows(self) -> list[MountInfo]:
        """The current table; the same list object as long as nothing changed."""
        with self._lock:
            if self._fd < 0:
                raise ValueError("MountTableWatch is closed")
            changed = any(ev & (select.POLLPRI | select.POLLERR)
                          for _, ev in self._poll.poll(0))
            if changed or self._rows is None:
                self._rows = _parse_table(_read_all(self._fd))
            return self._rows

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._poll.unregister(self._fd)
                os.close(self._fd)
                self._fd = -1
