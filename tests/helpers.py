"""Test helpers: privilege checks, mount bookkeeping, whole-tree snapshots."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest


def overlay_supported() -> bool:
    try:
        with open("/proc/filesystems") as f:
            if any(line.split()[-1] == "overlay" for line in f if line.strip()):
                return True
    except OSError:
        return False
    return Path("/sys/module/overlay").exists()


def require_privileges() -> None:
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not running as root")
    if not overlay_supported():
        reasons.append("the kernel has no overlayfs")
    if reasons:
        message = "privileged test: " + ", ".join(reasons)
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: this must not skip)")
        pytest.skip(message)


def mounts_under(root: Path) -> list[str]:
    from overlay.mount import mount_table  # the fuzzed parser (tests/fuzz/test_mountinfo.py)

    prefix = str(root.resolve())
    return [m.target for m in mount_table()
            if m.target == prefix or m.target.startswith(prefix + "/")]


def unmount_all_under(root: Path) -> None:
    """Lazily unmount everything at or below root, deepest first."""
    from overlay import _native

    for target in sorted(set(mounts_under(root)), key=len, reverse=True):
        with contextlib.suppress(OSError):
            _native.unmount(target, _native.UnmountFlag.DETACH)


def snapshot_tree(root: Path, *, contents: bool = True) -> dict[str, tuple[Any, ...]]:
    """Everything about a tree that a comparison should see.

    Per path: type and permission bits, owner, size, a content hash (files),
    the link target (symlinks), device numbers (devices), the xattrs, and a
    hard-link group (the smallest path sharing the inode).
    """
    out: dict[str, tuple[Any, ...]] = {}
    first_path: dict[tuple[int, int], str] = {}
    base = os.fsencode(root)

    def visit(path: bytes) -> None:
        st = os.lstat(path)
        rel = os.fsdecode(os.path.relpath(path, base)) if path != base else "."
        kind = stat.S_IFMT(st.st_mode)
        extra: Any = None
        if stat.S_ISREG(kind) and contents:
            with open(path, "rb") as f:
                extra = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISLNK(kind):
            extra = os.readlink(path)
        elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
            extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
        try:
            names = sorted(os.listxattr(path, follow_symlinks=False))
            xattrs = tuple(
                (n, os.getxattr(path, n, follow_symlinks=False)) for n in names
            )
        except OSError:
            xattrs = ()
        link = None
        if not stat.S_ISDIR(kind) and st.st_nlink > 1:
            link = first_path.setdefault((st.st_dev, st.st_ino), rel)
        out[rel] = (
            kind,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_size if not stat.S_ISDIR(kind) else None,
            extra,
            xattrs,
            link,
        )
        if stat.S_ISDIR(kind):
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name))

    visit(base)
    return out


def wait_for_socket(path: Path, proc: subprocess.Popen[Any], name: str,
                    timeout: float = 30.0) -> None:
    """Wait until something accepts connections on the unix socket ``path``;
    fail at once (with its stderr, when piped) if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.communicate()[1] if proc.stderr is not None else ""
            raise AssertionError(f"{name} exited with status {proc.returncode} before "
                                 f"listening: {err}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise AssertionError(f"{name} did not listen on {path} within {timeout:g}s")


#: One stored snapshot as plain values: (id, kind, name, parent, labels,
#: created_ns, updated_ns, inodes, size).
Record = tuple[str, int, str, str, dict[str, str], int, int, int, int]


def read_store(path: str) -> list[Record]:
    """Every snapshot of the metastore file ``path``, in walk order, read by a
    ``MetaStore`` of its own.  Run in another process (``spawn``), while the
    caller keeps its store open: what a fresh decode of the file gives."""
    from overlay import metastore

    store = metastore.MetaStore(path)
    try:
        with store.transaction() as txn:
            names: list[str] = []
            metastore.walk_info(txn, lambda info: names.append(info.name))
            out: list[Record] = []
            for name in names:
                sid, i, usage = metastore.get_info(txn, name)
                out.append((sid, int(i.kind), i.name, i.parent, dict(i.labels), i.created_ns,
                            i.updated_ns, usage.inodes, usage.size))
            return out
    finally:
        store.close()
