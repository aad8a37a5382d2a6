"""Helpers for the conformance suite: file-tree appliers (containerd's
``fstest``), mounting with guaranteed unmount, layer chains checked against a
flat reference directory, and whole-state dumps for "changes nothing" checks.

Everything here talks to a backend only through the ``Snapshotter`` protocol
and ``mount_all`` / ``unmount``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from overlay.errors import OverlayError
from overlay.mount import Mount, OverlayStrategy, mount_all, unmount
from overlay.snapshots import Info, Kind, Snapshotter
from tests.conformance.conftest import Env
from tests.helpers import snapshot_tree

#: The labels containerd's suite passes to every Prepare/View/Commit.
GC_ROOT = "containerd.io/gc.root"
OPT: dict[str, str] = {GC_ROOT: "2024-01-01T00:00:00Z"}

# --------------------------------------------------------------------------------------------
# Appliers: a change to a directory tree, applied to a mount and to a flat copy alike.

Applier = Callable[[Path], None]


def _at(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def apply(*appliers: Applier) -> Applier:
    def run(root: Path) -> None:
        for a in appliers:
            a(root)

    return run


def create_file(path: str, data: bytes, mode: int) -> Applier:
    """Create or truncate-and-rewrite a file, then set its mode exactly."""

    def run(root: Path) -> None:
        p = _at(root, path)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.chmod(p, mode)

    return run


def write_file(path: str, data: bytes, offset: int) -> Applier:
    """Overwrite bytes in place (an existing file, not a new inode)."""

    def run(root: Path) -> None:
        fd = os.open(_at(root, path), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    return run


def create_dir(path: str, mode: int) -> Applier:
    def run(root: Path) -> None:
        p = _at(root, path)
        os.mkdir(p, mode)
        os.chmod(p, mode)

    return run


def remove_all(path: str) -> Applier:
    """``os.RemoveAll``: a tree, a file or nothing at all."""

    def run(root: Path) -> None:
        p = _at(root, path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    return run


def chown(path: str, uid: int, gid: int) -> Applier:
    def run(root: Path) -> None:
        os.lchown(_at(root, path), uid, gid)

    return run


def chmod(path: str, mode: int) -> Applier:
    def run(root: Path) -> None:
        os.chmod(_at(root, path), mode)

    return run


def symlink(target: str, path: str) -> Applier:
    def run(root: Path) -> None:
        os.symlink(target, _at(root, path))

    return run


def link(old: str, new: str) -> Applier:
    def run(root: Path) -> None:
        os.link(_at(root, old), _at(root, new), follow_symlinks=False)

    return run


def rename(old: str, new: str) -> Applier:
    def run(root: Path) -> None:
        os.rename(_at(root, old), _at(root, new))

    return run


def set_xattr(path: str, name: str, value: bytes) -> Applier:
    def run(root: Path) -> None:
        os.setxattr(_at(root, path), name, value, follow_symlinks=False)

    return run


def remove_xattr(path: str, name: str) -> Applier:
    def run(root: Path) -> None:
        os.removexattr(_at(root, path), name, follow_symlinks=False)

    return run


def mkfifo(path: str, mode: int) -> Applier:
    def run(root: Path) -> None:
        p = _at(root, path)
        os.mkfifo(p, mode)
        os.chmod(p, mode)

    return run


def mknod_char(path: str, mode: int, major: int, minor: int) -> Applier:
    def run(root: Path) -> None:
        p = _at(root, path)
        os.mknod(p, 0o020000 | mode, os.makedev(major, minor))
        os.chmod(p, mode)

    return run


# --------------------------------------------------------------------------------------------
# Trees


def new_dir(parent: Path, prefix: str, mode: int = 0o755) -> Path:
    """A fresh directory with an exact mode (a snapshot's root is 0755)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(d, mode)
    return d


def assert_same_tree(expected: Path, actual: Path, what: str = "") -> None:
    """Whole-tree equality: types, modes, owners, sizes, contents, symlink
    targets, device numbers, xattrs and hard-link groups."""
    want, got = snapshot_tree(expected), snapshot_tree(actual)
    if want == got:
        return
    diff = {
        path: {"expected": want.get(path), "actual": got.get(path)}
        for path in sorted(set(want) | set(got))
        if want.get(path) != got.get(path)
    }
    pytest.fail(f"{what or actual}: tree differs from {expected}: {diff}")


# --------------------------------------------------------------------------------------------
# Mounting


@contextlib.contextmanager
def mounted(
    mounts: Sequence[Mount],
    target: Path,
    *,
    strategy: OverlayStrategy = OverlayStrategy.AUTO,
) -> Iterator[Path]:
    """Mount ``mounts`` at ``target`` (created if needed) and unmount them on
    the way out, even when the body fails."""
    assert len(mounts) >= 1, "expected mounts to have entries"
    target.mkdir(parents=True, exist_ok=True)
    mount_all(mounts, target, strategy=strategy)
    try:
        yield target
    finally:
        for m in reversed(mounts):
            dest = target / m.target.lstrip("/") if m.target else target
            try:
                unmount(dest)
            except OSError:
                unmount(dest, lazy=True)  # something still holds it: detach
                raise


_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def apply_to_mounts(env: Env, mounts: Sequence[Mount], applier: Applier) -> None:
    target = new_dir(env.work, "prepare-")
    with mounted(mounts, target):
        applier(target)
    target.rmdir()


def create_snapshot(env: Env, parent: str, applier: Applier) -> str:
    """Prepare on ``parent``, apply through the mounts, commit; the new name."""
    name = unique("layer")
    key = f"{name}-prepare"
    mounts = env.sn.prepare(key, parent, OPT)
    apply_to_mounts(env, mounts, applier)
    env.sn.commit(name, key, OPT)
    return name


def check_snapshot(env: Env, name: str, expected: Path) -> None:
    """Mount a view of ``name`` and compare it with ``expected``."""
    view = f"{name}-view"
    mounts = env.sn.view(view, name, OPT)
    try:
        target = new_dir(env.work, "check-")
        with mounted(mounts, target):
            assert_same_tree(expected, target, f"view of {name}")
        target.rmdir()
    finally:
        env.sn.remove(view)


def check_snapshots(env: Env, *appliers: Applier) -> list[str]:
    """containerd's ``checkSnapshots``: a chain of committed snapshots, one per
    applier; after each, a view must equal a flat directory that received
    the same appliers.  Returns the committed names, bottom first."""
    flat = new_dir(env.work, "flat-")
    parent = ""
    names = []
    for i, a in enumerate(appliers, 1):
        name = create_snapshot(env, parent, a)
        a(flat)
        try:
            check_snapshot(env, name, flat)
        except BaseException as exc:
            exc.add_note(f"snapshot {i} of {len(appliers)}")
            raise
        names.append(name)
        parent = name
    return names


# --------------------------------------------------------------------------------------------
# State


def walk_all(sn: Snapshotter, *filters: str) -> list[Info]:
    out: list[Info] = []
    sn.walk(out.append, *filters)
    return out


def walk_names(sn: Snapshotter, *filters: str) -> list[str]:
    return sorted(i.name for i in walk_all(sn, *filters))


def state(env: Env) -> dict[str, Any]:
    """Everything observable: every Info (with usage, and mounts for actives
    and views) and the listing of the backend's root directory tree."""
    snaps: dict[str, Any] = {}
    for info in walk_all(env.sn):
        mounts = env.sn.mounts(info.name) if info.kind is not Kind.COMMITTED else None
        snaps[info.name] = (info, env.sn.stat(info.name), env.sn.usage(info.name), mounts)
    return {"snapshots": snaps, "root": snapshot_tree(env.root, contents=False)}


E = TypeVar("E", bound=OverlayError)


def assert_rejected(
    env: Env, error: type[E], call: Callable[..., object], *args: Any, **kwargs: Any
) -> E:
    """``call(*args)`` raises exactly ``error`` and changes nothing at all."""
    before = state(env)
    with pytest.raises(OverlayError) as info:
        call(*args, **kwargs)
    err = info.value
    assert type(err) is error, f"expected {error.__name__}, got {type(err).__name__}: {err}"
    assert isinstance(err, error)
    after = state(env)
    assert after == before, "a rejected call changed the snapshotter's state"
    return err
