"""Kernel and filesystem probes, run once at construction (SPEC §2.3)."""

from __future__ import annotations

import functools
import os
import platform
import re
from pathlib import Path

from overlay import _native
from overlay.errors import UnsupportedError

__all__ = [
    "TMPFS_MAGIC",
    "check_dtype",
    "check_overlay",
    "in_user_namespace",
    "kernel_version",
    "mount_api",
    "needs_userxattr",
    "supports_index_option",
]

TMPFS_MAGIC = 0x01021994


def kernel_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    if match is None:
        return (0, 0)
    return (int(match.group(1)), int(match.group(2)))


def check_overlay() -> None:
    """Raise UnsupportedError unless the kernel offers overlayfs."""
    try:
        with open("/proc/filesystems") as f:
            if any(line.split() and line.split()[-1] == "overlay" for line in f):
                return
    except OSError as exc:
        raise UnsupportedError(f"cannot read /proc/filesystems: {exc}") from exc
    if Path("/sys/module/overlay").exists():
        return
    raise UnsupportedError(
        "the kernel does not support overlayfs: load it with 'modprobe overlay' "
        "(CONFIG_OVERLAY_FS) and try again"
    )


def check_dtype(root: str | os.PathLike[str]) -> None:
    """containerd's d_type check: overlayfs needs it from the backing filesystem."""
    try:
        ok = _native.dir_has_dtype(root)
    except OSError as exc:
        raise UnsupportedError(
            f"cannot check d_type support of {os.fspath(root)!r}: {exc}"
        ) from exc
    if not ok:
        raise UnsupportedError(
            f"{os.fspath(root)} does not support d_type. If the backing filesystem is xfs, "
            "please reformat with ftype=1 to enable d_type support"
        )


def in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields[:3] != ["0", "0", "4294967295"]


def needs_userxattr(root: str | os.PathLike[str]) -> bool:
    """containerd's NeedsUserXAttr: only inside a user namespace, never on tmpfs."""
    if not in_user_namespace():
        return False
    try:
        if _native.fs_magic(root) == TMPFS_MAGIC:
            return False
    except OSError:
        return False
    return kernel_version() >= (5, 11)


def supports_index_option() -> bool:
    """Whether overlay has an ``index`` feature we should turn off explicitly."""
    return Path("/sys/module/overlay/parameters/index").exists()


@functools.cache
def mount_api() -> _native.MountApi:
    """What the new mount API offers for overlay on this kernel (probed once)."""
    return _native.mount_api_support()
