"""OS failures as domain errors: what the disk said, as a typed error a person can act on.

The domain layer (overlayfs, metastore) catches an ``OSError`` (or an LMDB
error carrying an errno) where it meets the disk and asks :func:`from_errno`
for the error to raise instead.  Each errno listed here stands for a state of
the host, not a bug, so it gets its kind and a message that names the
filesystem and says what to do:

=====================  ==============================  ===========================
errno                  error                           the message says
=====================  ==============================  ===========================
ENOSPC, EDQUOT         ResourceExhaustedError          device, mount point, size and
                                                       what is free (inodes when
                                                       those ran out); free space
EROFS                  ReadOnlyError                   the filesystem is read-only;
                                                       how to make it writable
EIO, EUCLEAN           FailedPreconditionError         check the device and fsck
ENOMEM, EMFILE,        ResourceExhaustedError          what ran out
ENFILE, EMLINK
EACCES, EPERM          FailedPreconditionError         the path; what to check
=====================  ==============================  ===========================

Any other errno returns ``None``: the caller lets the ``OSError`` go, the
server answers UNKNOWN and logs it with its traceback, as the surprise it is.
Each fault of the host is also logged once a minute (per kind and device) as
a warning, without a traceback, so the daemon's log says why calls fail.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass

from overlay.errors import (
    FailedPreconditionError,
    OverlayError,
    ReadOnlyError,
    ResourceExhaustedError,
)
from overlay.mount import mount_table

__all__ = ["KNOWN_ERRNOS", "Filesystem", "filesystem", "from_errno", "from_os_error", "human"]

log = logging.getLogger("overlay.faults")

#: seconds between two warnings about the same fault on the same device
WARN_EVERY = 60.0

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_BROKEN = frozenset({errno.EIO, errno.EUCLEAN})
_RUN_OUT = frozenset({errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EMLINK})
_DENIED = frozenset({errno.EACCES, errno.EPERM})
#: every errno :func:`from_errno` turns into a domain error
KNOWN_ERRNOS = _NO_SPACE | _BROKEN | _RUN_OUT | _DENIED | {errno.EROFS}

_warned: dict[tuple[int, str], float] = {}  # (errno, filesystem) → when
_warned_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class Filesystem:
    """The filesystem a path is on, and how full it is (for messages)."""

    source: str  # what is mounted: /dev/loop3, tmpfs, ...
    target: str  # where: the mount point
    fstype: str
    size: int  # bytes
    free: int  # bytes available, as df shows them (what ext4 keeps in reserve excluded)
    inodes: int  # 0 when the filesystem does not count them (btrfs)
    inodes_free: int

    def describe(self) -> str:
        """``/dev/loop3 mounted at /mnt``."""
        return f"{self.source} mounted at {self.target}"


def human(size: int) -> str:
    """``64.0 MiB``, ``0 B``: sizes as the messages show them."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor (a failed mkdir names a path
    that is not there)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path) and path != "/":
        path = os.path.dirname(path)
    return path


def filesystem(path: str | os.PathLike[str]) -> Filesystem | None:
    """Which filesystem ``path`` is on and how full it is; None when even
    that cannot be found out (the message then names the path only)."""
    try:
        where = _existing(os.fspath(path))
        st = os.stat(where)
        vfs = os.statvfs(where)
        real = os.path.realpath(where)
        table = mount_table()
    except OSError:
        return None
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"

    def covers(target: str) -> bool:
        return real == target or real.startswith(target.rstrip("/") + "/")

    rows = [m for m in table if covers(m.target)]
    # the deepest mount above the path, of the path's own device when it shows
    best = max(rows, key=lambda m: (m.device == device, len(m.target)), default=None)
    return Filesystem(
        source=best.source if best is not None else device,
        target=best.target if best is not None else "?",
        fstype=best.fstype if best is not None else "?",
        size=vfs.f_blocks * vfs.f_frsize,
        free=vfs.f_bavail * vfs.f_frsize,
        inodes=vfs.f_files,
        inodes_free=vfs.f_ffree,
    )


def _warn(code: int, fs: Filesystem | None, message: str) -> None:
    key = (code, f"{fs.source} {fs.target}" if fs is not None else "")
    now = time.monotonic()
    with _warned_lock:
        last = _warned.get(key)
        if last is not None and now - last < WARN_EVERY:
            return
        _warned[key] = now
    log.warning("%s", message)


def from_errno(
    code: int | None,
    what: str,
    path: str | os.PathLike[str] | None,
    *,
    root: str | None = None,
    short_write: bool = False,
) -> OverlayError | None:
    """The domain error for errno ``code`` met while doing ``what`` (the
    message's context, e.g. ``prepare 'k'``) on ``path``; None for an errno
    this module does not know.  ``root``, when given, is what a read-only
    message names (the snapshotter's root) instead of ``path``.

    ``short_write``: the errno is LMDB's EIO for a write that stopped short,
    which on a filesystem without free space is ENOSPC in disguise (LMDB
    reports every short write as EIO).
    """
    if code is None or code not in KNOWN_ERRNOS:
        return None
    spath = os.fspath(path) if path is not None else ""
    fs = filesystem(spath) if spath else None
    on = fs.describe() if fs is not None else f"the filesystem of {spath!r}"
    if short_write and code == errno.EIO and fs is not None and fs.free < _SHORT_WRITE_FULL:
        code = errno.ENOSPC
    err: OverlayError
    if code in _NO_SPACE:
        if code == errno.EDQUOT:
            text = f"disk quota exceeded on {on}: raise the quota or free space there"
        elif fs is not None and fs.inodes and fs.inodes_free == 0:
            text = (f"no inodes left on {on} ({fs.inodes} inodes, 0 free): "
                    "remove files there (`ovl cleanup` reclaims removed snapshots)")
        else:
            full = f" ({human(fs.size)}, {human(fs.free)} free)" if fs is not None else ""
            text = (f"no space left on {on}{full}: free space there "
                    "(`ovl cleanup` reclaims removed snapshots)")
        err = ResourceExhaustedError(f"{what}: {text}")
    elif code == errno.EROFS:
        subject = f"the root {root!r} is on a read-only filesystem" if root else (
            "the filesystem is read-only")
        err = ReadOnlyError(
            f"{what}: {subject} ({on}): make it writable and restart the daemon "
            "(mount -o remount,rw; after an error: unmount, fsck, mount); "
            "reads keep working meanwhile"
        )
    elif code in _BROKEN:
        problem = "input/output error" if code == errno.EIO else "the filesystem is corrupted"
        err = FailedPreconditionError(
            f"{what}: {problem} on {on} ({spath!r}): check the device (dmesg) and the "
            "filesystem (fsck)"
        )
    elif code in _RUN_OUT:
        text = {
            errno.ENOMEM: "out of memory (or address space for the metadata map)",
            errno.EMFILE: "too many open files in the daemon (raise its LimitNOFILE)",
            errno.ENFILE: "too many open files on the host (raise fs.file-max)",
            errno.EMLINK: f"too many links to {spath!r}",
        }[code]
        err = ResourceExhaustedError(f"{what}: {text}")
    else:
        err = FailedPreconditionError(
            f"{what}: permission denied on {spath!r}: check its owner and mode, an immutable "
            "attribute (lsattr) and the security policy (SELinux, AppArmor)"
        )
    _warn(code, fs, err.message)
    return err


#: below this much free space, LMDB's EIO after a short write means "full"
_SHORT_WRITE_FULL = 16 << 20


def from_os_error(
    exc: OSError, what: str, path: str | os.PathLike[str] | None = None, *, root: str | None = None
) -> OverlayError | None:
    """:func:`from_errno` for an ``OSError`` (``path`` defaults to its filename)."""
    where = path if path is not None else exc.filename
    if isinstance(where, bytes):
        where = os.fsdecode(where)
    if not isinstance(where, str | os.PathLike):
        where = None
    return from_errno(exc.errno, what, where, root=root)
