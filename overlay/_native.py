"""Typed wrappers over the compiled C core (``overlay._ovl``).

This is the only module that imports the compiled module.  Every failing
call raises the ``OSError`` subclass that matches its errno
(``FileNotFoundError`` for ENOENT, ...) with ``.errno`` and the path kept;
EINTR is retried.  CFFI releases the GIL around every C call, so a long
removal or walk never stalls other Python threads.
"""

from __future__ import annotations

import enum
import errno as _errno
import hashlib
import importlib
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "ABI_VERSION",
    "MAX_MOUNT_DATA",
    "GrpcCall",
    "GrpcLimits",
    "GrpcTransport",
    "MountApi",
    "MountAttr",
    "MountFlag",
    "RenameFlag",
    "TreeResult",
    "UnmountFlag",
    "dir_has_dtype",
    "disk_usage",
    "fs_magic",
    "mount",
    "mount_api_support",
    "mount_at",
    "mount_overlay",
    "new_cancel_flag",
    "remove_tree",
    "renameat2",
    "syncfs",
    "unmount",
]

#: The ABI this wrapper was written against (native/ovl.h OVL_ABI_VERSION).
ABI_VERSION = 6
#: mount(2) copies one page of data: a longer option string is refused
#: (the kernel could otherwise mount a silently truncated layer stack).
MAX_MOUNT_DATA = 4095

#: native/build.py's SOURCES: what the compiled-in hash covers.
_SOURCES = ("ovl.h", "ovl.c", "ovl_grpc.h", "ovl_grpc.c")

_REBUILD = "rebuild it with: pip install -e . (from the repository root, as README says)"

try:
    _ovl: Any = importlib.import_module("overlay._ovl")
except ImportError as exc:  # pragma: no cover - exercised by hand
    raise ImportError(
        f"overlay's native module overlay._ovl is missing or broken ({exc}); {_REBUILD}"
    ) from exc

ffi: Any = _ovl.ffi
lib: Any = _ovl.lib


def _check_build() -> None:
    built = int(lib.ovl_abi_version())
    if built != ABI_VERSION:
        raise ImportError(
            f"overlay's native module has ABI {built}, this code expects {ABI_VERSION}; {_REBUILD}"
        )
    native = Path(__file__).resolve().parent.parent / "native"
    sources = [native / name for name in _SOURCES]
    if all(p.is_file() for p in sources):
        digest = hashlib.sha256()
        for p in sources:
            digest.update(p.read_bytes())
        compiled = ffi.string(lib.ovl_source_hash()).decode()
        if compiled != digest.hexdigest():
            raise ImportError(
                "overlay's native module is stale: it was built from other sources than "
                f"{native} holds now; {_REBUILD}"
            )


_check_build()


class MountFlag(enum.IntFlag):
    """mount(2) flags (<sys/mount.h>); a unit test pins them to the C values."""

    RDONLY = 1
    NOSUID = 2
    NODEV = 4
    NOEXEC = 8
    SYNCHRONOUS = 16
    REMOUNT = 32
    MANDLOCK = 64
    DIRSYNC = 128
    NOATIME = 1024
    NODIRATIME = 2048
    BIND = 4096
    MOVE = 8192
    REC = 16384
    SILENT = 32768
    UNBINDABLE = 1 << 17
    PRIVATE = 1 << 18
    SLAVE = 1 << 19
    SHARED = 1 << 20
    RELATIME = 1 << 21
    STRICTATIME = 1 << 24


class UnmountFlag(enum.IntFlag):
    FORCE = 1
    DETACH = 2
    EXPIRE = 4
    NOFOLLOW = 8


class MountAttr(enum.IntFlag):
    """MOUNT_ATTR_* for fsmount(2)."""

    RDONLY = 0x1
    NOSUID = 0x2
    NODEV = 0x4
    NOEXEC = 0x8
    RELATIME = 0x0
    NOATIME = 0x10
    STRICTATIME = 0x20
    NODIRATIME = 0x80


class MountApi(enum.IntFlag):
    """What the kernel's new mount API offers for overlay (``mount_api_support``)."""

    FSOPEN = 1
    LOWERDIR_ADD = 2
    LOWERDIR_FD = 4


class RenameFlag(enum.IntFlag):
    NOREPLACE = 1
    EXCHANGE = 2
    WHITEOUT = 4


@dataclass(frozen=True, slots=True)
class TreeResult:
    """What a tree walk did: entries removed (or counted), bytes, failures.

    ``errors`` holds (path relative to the tree's root, errno); ``""`` is the
    root itself.
    """

    entries: int
    bytes: int
    errors: Sequence[tuple[str, int]] = field(default_factory=tuple)


def _raise(path: str | os.PathLike[str] | None, path2: str | os.PathLike[str] | None = None,
           err: int | None = None, detail: str = "") -> NoReturn:
    code = ffi.errno if err is None else err
    message = os.strerror(code)
    if detail:
        message = f"{message} ({detail})"
    if path2 is not None:
        raise OSError(code, message, os.fspath(path) if path else None, None, os.fspath(path2))
    raise OSError(code, message, os.fspath(path) if path is not None else None)


def _b(path: str | os.PathLike[str] | bytes) -> bytes:
    return os.fsencode(path)


def _opt(value: str | os.PathLike[str] | bytes | None) -> Any:
    return ffi.NULL if value is None else _b(value)


def _check_mount_data(target: str | os.PathLike[str], data: str | None) -> None:
    if data is not None and len(_b(data)) > MAX_MOUNT_DATA:
        _raise(target, err=_errno.E2BIG,
               detail=f"{len(_b(data))} bytes of mount options, the kernel takes {MAX_MOUNT_DATA}")


def mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2).  ``data`` longer than one page raises E2BIG before any call."""
    _check_mount_data(target, data)
    while True:
        if lib.ovl_mount(_opt(source), _b(target), _opt(fstype), flags, _opt(data)) == 0:
            return
        if ffi.errno != _errno.EINTR:
            # ENOENT may be the source or the target: name the source first
            # when it is the one missing.
            code = ffi.errno
            if code == _errno.ENOENT and source is not None and not os.path.lexists(source):
                _raise(source, err=code)
            _raise(target, err=code)


def mount_at(
    cwd: str | os.PathLike[str],
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2) with relative paths in ``data`` resolved against ``cwd``.

    A helper thread unshares its filesystem context and changes directory;
    the process's working directory never changes.
    """
    _check_mount_data(target, data)
    while True:
        rc = lib.ovl_mount_at(_b(cwd), _opt(source), _b(target), _opt(fstype), flags, _opt(data))
        if rc == 0:
            return
        if ffi.errno != _errno.EINTR:
            _raise(target)


def unmount(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2); ``UnmountFlag.DETACH`` for a lazy unmount."""
    while True:
        if lib.ovl_umount2(_b(target), flags) == 0:
            return
        if ffi.errno != _errno.EINTR:
            _raise(target)


def mount_overlay(
    target: str | os.PathLike[str],
    lowers: Sequence[str | os.PathLike[str]],
    upper: str | os.PathLike[str] | None = None,
    work: str | os.PathLike[str] | None = None,
    options: Sequence[str] = (),
    attrs: int = 0,
) -> None:
    """Mount an overlay with the new mount API: one ``lowerdir+`` per layer.

    ``lowers`` is topmost first.  ``options`` are filesystem parameters
    (``index=off``, ``userxattr``, ...); mount attributes go in ``attrs``.
    The kernel's own complaint, if any, ends the error message.
    """
    keep = [ffi.new("char[]", _b(p)) for p in lowers]
    lowers_c = ffi.new("const char *[]", keep)
    okeep = [ffi.new("char[]", o.encode()) for o in options]
    options_c = ffi.new("const char *[]", okeep) if okeep else ffi.NULL
    log = ffi.new("char[]", 4096)
    while True:
        rc = lib.ovl_mount_overlay(
            _b(target), lowers_c, len(keep), _opt(upper), _opt(work),
            options_c, len(okeep), attrs, log, 4096,
        )
        if rc == 0:
            return
        code = ffi.errno
        if code != _errno.EINTR:
            detail = ffi.string(log).decode(errors="replace")
            culprit: str | os.PathLike[str] = target
            if code == _errno.ENOENT:
                missing = [p for p in (*lowers, upper, work) if p is not None
                           and not os.path.lexists(p)]
                culprit = missing[0] if missing else target
            _raise(culprit, err=code, detail=detail)


def mount_api_support() -> MountApi:
    return MountApi(lib.ovl_mount_api_support())


@ffi.def_extern()  # type: ignore[untyped-decorator]
def ovl_py_report(ctx: Any, path: Any, err: int) -> None:
    sink: list[tuple[str, int]] = ffi.from_handle(ctx)
    sink.append((os.fsdecode(ffi.string(path)), err))


def _tree_call(fn: Any, path: str | os.PathLike[str], *args: Any) -> TreeResult:
    stats = ffi.new("struct ovl_tree_stats *")
    sink: list[tuple[str, int]] = []
    handle = ffi.new_handle(sink)
    rc = fn(_b(path), *args, stats, lib.ovl_py_report, handle)
    if rc != 0:
        code = ffi.errno
        # Nothing reported: the call itself failed (missing root); a
        # cancelled or out-of-memory walk is incomplete: never a result.
        if not sink or code in (_errno.ECANCELED, _errno.ENOMEM):
            _raise(path, err=code)
    return TreeResult(int(stats.entries), int(stats.bytes), tuple(sink))


def remove_tree(
    path: str | os.PathLike[str],
    *,
    threads: int = 1,
    keep_root: bool = False,
    count_bytes: bool = False,
) -> TreeResult:
    """Remove the directory ``path`` and everything below it.

    Never follows a symlink, never crosses into another mount, never leaves
    ``path``.  What cannot be removed (a busy mount point, an immutable file)
    is returned in ``errors``; everything else is removed.  A missing or
    non-directory ``path`` raises.  ``count_bytes`` adds an lstat per file to
    report the bytes freed.
    """
    flags = (lib.OVL_TREE_KEEP_ROOT if keep_root else 0) | (
        lib.OVL_TREE_COUNT_BYTES if count_bytes else 0)
    return _tree_call(lib.ovl_remove_tree, path, flags, max(1, threads))


def disk_usage(
    path: str | os.PathLike[str],
    *,
    threads: int = 1,
    cancel: Any = None,
) -> TreeResult:
    """(inodes, bytes) of the tree at ``path``, like ``du -xs --block-size=1``.

    ``entries`` counts distinct inodes (the root included, hard links once);
    ``bytes`` sums st_blocks*512 over them.  Mounts below are not entered.
    ``cancel``: a ``ffi.new("int *")`` another thread may set to 1, which
    stops the walk with ``OSError(ECANCELED)``.
    """
    return _tree_call(lib.ovl_disk_usage, path, max(1, threads),
                      ffi.NULL if cancel is None else cancel)


def new_cancel_flag() -> Any:
    """A flag for ``disk_usage(cancel=...)``: set ``flag[0] = 1`` to cancel."""
    return ffi.new("int *")


def renameat2(
    old: str | os.PathLike[str], new: str | os.PathLike[str], flags: int = 0
) -> None:
    """renameat2(2): ``RenameFlag.NOREPLACE`` / ``EXCHANGE``."""
    while True:
        if lib.ovl_renameat2(_b(old), _b(new), flags) == 0:
            return
        if ffi.errno != _errno.EINTR:
            _raise(old, new)


def syncfs(path: str | os.PathLike[str]) -> None:
    """syncfs(2) on the filesystem holding ``path``."""
    if lib.ovl_syncfs(_b(path)) != 0:
        _raise(path)


def dir_has_dtype(path: str | os.PathLike[str]) -> bool:
    """Whether the filesystem of directory ``path`` fills in d_type."""
    rc = lib.ovl_dir_has_dtype(_b(path))
    if rc < 0:
        _raise(path)
    return bool(rc)


def fs_magic(path: str | os.PathLike[str]) -> int:
    """statfs(2) f_type of the filesystem holding ``path``."""
    out = ffi.new("int64_t *")
    if lib.ovl_fs_magic(_b(path), out) != 0:
        _raise(path)
    return int(out[0])


# ----------------------------------------------------------------------------- gRPC transport


@dataclass(frozen=True, slots=True)
class GrpcCall:
    """One request taken from a :class:`GrpcTransport`: answer it exactly once
    with :meth:`GrpcTransport.reply`."""

    path: str
    #: the request's headers other than HTTP/2 pseudo-headers, in order
    metadata: tuple[tuple[str, str], ...]
    message: bytes
    handle: Any = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class GrpcLimits:
    """What a :class:`GrpcTransport` lets its clients hold (``struct
    ovl_grpc_limits``; the daemon's config keys of the same names).

    Over a request limit, that call is answered RESOURCE_EXHAUSTED without
    reaching a worker (at once, with RST_STREAM NO_ERROR, when the client is
    still sending) and its bytes are freed; other calls and clients go on.
    When all unfinished requests together would pass ``max_buffer_bytes``,
    the largest unfinished request of the connection holding the most is
    refused first, if it is larger than the newcomer.  At
    ``max_connections`` a new connection replaces (GOAWAY) the oldest that
    never opened a stream, else the one idle longest, else one holding only
    refused or unfinished requests (so they cannot lock new clients out); it
    is closed itself when every one has a request queued, handled or answered.
    """

    #: one request message (containerd's default gRPC limit)
    max_message: int = 16 << 20
    max_connections: int = 512
    #: concurrent streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS)
    max_streams: int = 128
    #: decoded header bytes (name + value + 2 each) of one request
    max_header_bytes: int = 64 << 10
    #: ... of the requests one connection holds
    max_connection_header_bytes: int = 1 << 20
    #: request bytes (headers and messages) one connection holds unfinished or queued
    max_connection_buffer_bytes: int = 32 << 20
    #: request bytes all connections hold
    max_buffer_bytes: int = 128 << 20
    #: seconds a request may take to arrive in full
    request_timeout: float = 30.0
    #: seconds a connection without streams stays open (then GOAWAY; clients reconnect)
    idle_timeout: float = 600.0

    def __post_init__(self) -> None:
        for name in ("max_message", "max_connections", "max_streams", "max_header_bytes",
                     "max_connection_header_bytes", "max_connection_buffer_bytes",
                     "max_buffer_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_streams >= 1 << 31 or self.max_connections >= 1 << 31:
            raise ValueError("max_streams and max_connections must be below 2**31")
        for name in ("request_timeout", "idle_timeout"):
            if not 0.001 <= getattr(self, name) <= 86400 * 365:
                raise ValueError(f"{name} must be between 0.001 and {86400 * 365} seconds")


def _metadata(raw: bytes) -> tuple[tuple[str, str], ...]:
    if not raw:
        return ()
    parts = raw.decode("latin-1").split("\0")
    return tuple(zip(parts[0:-1:2], parts[1::2], strict=True))


class GrpcTransport:
    """gRPC over HTTP/2 served by the C core (``native/ovl_grpc.c``, libnghttp2).

    The C event loop accepts and parses; :meth:`next` hands a finished request
    to the calling thread (any number of threads may wait in it, without the
    GIL) and :meth:`reply` sends the answer from that thread.
    """

    def __init__(self, listener: socket.socket, limits: GrpcLimits) -> None:
        """Serve ``listener`` (a listening stream socket, taken over: closed with
        the transport) within ``limits``."""
        c = ffi.new("struct ovl_grpc_limits *")
        c.max_message = limits.max_message
        c.max_connections = limits.max_connections
        c.max_streams = limits.max_streams
        c.max_header_bytes = limits.max_header_bytes
        c.max_conn_header_bytes = limits.max_connection_header_bytes
        c.max_conn_buffer = limits.max_connection_buffer_bytes
        c.max_buffer = limits.max_buffer_bytes
        c.request_timeout_ms = max(1, round(limits.request_timeout * 1000))
        c.idle_timeout_ms = max(1, round(limits.idle_timeout * 1000))
        out = ffi.new("struct ovl_grpc_server **")
        if lib.ovl_grpc_start(listener.detach(), c, out) != 0:
            _raise(None)
        self._server: Any = out[0]
        self._lock = threading.Lock()
        self._closed = False

    def next(self) -> GrpcCall | None:
        """The next request; ``None`` once :meth:`shutdown` ran and none is left."""
        out = ffi.new("struct ovl_grpc_call **")
        if lib.ovl_grpc_next(self._server, out) != 0:
            if ffi.errno == _errno.ESHUTDOWN:
                return None
            _raise(None)  # pragma: no cover - ovl_grpc_next fails no other way
        call = out[0]
        return GrpcCall(
            path=ffi.string(call.path).decode("latin-1"),
            metadata=_metadata(ffi.buffer(call.metadata, call.metadata_len)[:]),
            message=ffi.buffer(call.message, call.message_len)[:],
            handle=call,
        )

    def reply(self, call: GrpcCall, status: int, message: str = "", body: bytes = b"") -> bool:
        """Answer ``call``: status 0 sends ``body`` (length-prefixed messages)
        and an OK trailer; any other status a trailers-only error with
        ``message``.  False when the client went away first."""
        if lib.ovl_grpc_reply(self._server, call.handle, status,
                              message.encode("utf-8", "replace"), body, len(body)) == 0:
            return True
        if ffi.errno == _errno.EPIPE:
            return False
        _raise(None)

    def shutdown(self, grace: float) -> int:
        """Stop accepting, GOAWAY, give requests already in ``grace`` seconds;
        then :meth:`next` returns ``None``.  Returns the connections cut."""
        return int(lib.ovl_grpc_shutdown(self._server, max(0, round(grace * 1000))))

    def stats(self) -> dict[str, int]:
        """accepted, connections (open now), calls (handed out), pending,
        rejected (answered by the transport itself), shed (connections closed
        for a limit), buffered (request bytes held now).  ValueError once closed."""
        st = ffi.new("struct ovl_grpc_stats *")
        with self._lock:
            if self._closed:
                raise ValueError("the gRPC transport is closed")
            lib.ovl_grpc_stats(self._server, st)
        return {k: int(getattr(st, k))
                for k in ("accepted", "connections", "calls", "pending", "rejected", "shed",
                          "buffered")}

    def close(self) -> None:
        """Release the transport: after :meth:`shutdown`, once no thread is in
        :meth:`next` or holds an unanswered call."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        lib.ovl_grpc_free(self._server)
