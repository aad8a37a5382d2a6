"""Shared by the race and crash tortures: what a snapshot should look like on disk.

Everything here goes through the public API only.  A snapshot's directory is
found from ``mounts()`` (an active's upperdir or bind source) or from the
``containerd.io/snapshot/overlay.upperdir`` label (``upperdir_label=True``),
never by guessing ids.  Module-level functions only, so that a ``spawn``
child can import them.
"""

from __future__ import annotations

import hashlib
import os
import signal
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from overlay import _native
from overlay.mount import Mount
from overlay.overlayfs import OverlaySnapshotter
from overlay.snapshots import LABEL_UPPERDIR, Info, Kind


@dataclass(slots=True)
class Known:
    """A snapshot a test knows to be live, and what its layer must hold.

    ``files`` maps a path relative to ``fs`` to its content; ``None`` when a
    write was interrupted (the content is then unknown and not checked).
    """

    key: str
    kind: Kind
    fs: str
    parent: str = ""
    files: dict[str, bytes] | None = field(default_factory=dict)

    @property
    def sid(self) -> str:
        return sid_of(self.fs)


def sid_of(fs: str) -> str:
    """``<root>/snapshots/<id>/fs`` → ``<id>``."""
    return os.path.basename(os.path.dirname(fs))


def upper_from_mounts(mounts: Sequence[Mount]) -> str:
    """An active snapshot's own layer: the overlay upperdir, else the bind source."""
    for opt in mounts[0].options:
        if opt.startswith("upperdir="):
            return opt.removeprefix("upperdir=")
    return mounts[0].source


def upper_from_info(info: Info) -> str:
    """Any snapshot's own layer, from the label ``upperdir_label=True`` adds."""
    return info.labels[LABEL_UPPERDIR]


def content(key: str, name: str) -> bytes:
    """What file ``name`` of snapshot ``key`` holds: deterministic, distinct per key."""
    digest = hashlib.sha256(f"{key}\0{name}".encode()).hexdigest().encode()
    return digest * (1 + digest[0] % 5)


def write_files(fs: str, key: str, names: Iterable[str]) -> dict[str, bytes]:
    """Write each file (creating parent directories) and return what was written."""
    written: dict[str, bytes] = {}
    for name in names:
        path = os.path.join(fs, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = content(key, name)
        with open(path, "wb") as f:
            f.write(data)
        written[name] = data
    return written


def fill(fs: str, count: int, per_dir: int = 200) -> None:
    """``count`` small files in subdirectories (a tree worth reclaiming)."""
    fd = os.open(fs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            if i % per_dir == 0:
                os.mkdir(f"fill{i // per_dir}", 0o755, dir_fd=fd)
            f = os.open(f"fill{i // per_dir}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
            try:
                os.write(f, b"x" * (i % 64))
            finally:
                os.close(f)
    finally:
        os.close(fd)


def files_under(fs: str) -> dict[str, bytes]:
    """Every regular file below ``fs`` with its content (paths relative to ``fs``)."""
    found: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(fs):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, fs)] = f.read()
    return found


def problems(known: Iterable[Known]) -> list[str]:
    """What is wrong on disk with snapshots that must be live: a missing ``fs``
    (or ``work`` for an active), missing, extra or changed files."""
    out: list[str] = []
    for k in known:
        if not os.path.isdir(k.fs):
            out.append(f"{k.kind!s} {k.key!r}: {k.fs} is gone")
            continue
        if k.kind is Kind.ACTIVE and not os.path.isdir(os.path.join(os.path.dirname(k.fs), "work")):
            out.append(f"{k.kind!s} {k.key!r}: the work directory beside {k.fs} is gone")
        if k.files is None:
            continue
        try:
            found = files_under(k.fs)
        except OSError as exc:
            out.append(f"{k.kind!s} {k.key!r}: cannot read {k.fs}: {exc}")
            continue
        if found != k.files:
            missing = sorted(set(k.files) - set(found))
            extra = sorted(set(found) - set(k.files))
            changed = sorted(n for n in set(found) & set(k.files) if found[n] != k.files[n])
            out.append(
                f"{k.kind!s} {k.key!r} ({k.fs}): missing {missing}, extra {extra}, "
                f"changed {changed}"
            )
    return out


def live(sn: OverlaySnapshotter) -> dict[str, Info]:
    """Every snapshot's Info by key (``sn`` must have ``upperdir_label=True``)."""
    found: dict[str, Info] = {}

    def collect(info: Info) -> None:
        found[info.name] = info

    sn.walk(collect)
    return found


def disk(root: str) -> tuple[set[str], set[str]]:
    """(entries of snapshots/, entries of trash/)."""
    return set(os.listdir(os.path.join(root, "snapshots"))), set(
        os.listdir(os.path.join(root, "trash"))
    )


def final_check(sn: OverlaySnapshotter, busy: Iterable[str] = ()) -> list[str]:
    """Run ``cleanup`` and compare the disk with the records: ``snapshots/``
    holds exactly the live ids (plus the ``busy`` orphans, which the report
    must name) and the trash is empty."""
    out: list[str] = []
    report = sn.cleanup()
    reported = sorted(path for path, _ in report.busy)
    expected_busy = sorted(os.path.join(sn.root, "snapshots", b) for b in busy)
    if reported != expected_busy:
        out.append(f"cleanup reported busy {report.busy}, expected {expected_busy}")
    ids = {sid_of(upper_from_info(info)) for info in live(sn).values()}
    snapshots, trash = disk(sn.root)
    if snapshots != ids | set(busy):
        out.append(
            f"after cleanup snapshots/ holds {sorted(snapshots)}; live ids {sorted(ids)}, "
            f"busy {sorted(busy)} (orphans left: {sorted(snapshots - ids - set(busy))}, "
            f"live without a directory: {sorted(ids - snapshots)})"
        )
    if trash:
        out.append(f"after cleanup the trash still holds {sorted(trash)}")
    return out


# ----------------------------------------------------------------------- crash injection


def crash_in_child(root: str, body: Callable[[OverlaySnapshotter], None]) -> None:
    """Fork (the store closed here) a child that opens the store and runs
    ``body``, which must end with the child SIGKILLed."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body(OverlaySnapshotter(root))
            code = 2  # the crash point was never reached
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the child did not die at the crash point (status {status:#x})")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_rename(when: Callable[[str], bool]) -> None:
    """In the child: SIGKILL right after a rename whose destination ``when`` accepts."""
    real = _native.renameat2

    def renameat2(src: Any, dst: Any, flags: Any = 0) -> None:
        real(src, dst, flags)
        if when(os.fspath(dst)):
            die()

    _native.renameat2 = renameat2  # type: ignore[assignment]
