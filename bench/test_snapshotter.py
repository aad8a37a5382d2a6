"""Issue 3: the snapshotter in-process, on tmpfs and on the ext4 loop device.

(a) ``remove``: remove latency against snapshot size (1, 1k and 100k files,
    times ``BENCH_SCALE``): ours (``OverlaySnapshotter.remove`` drops the
    record; the directory waits for ``cleanup``) against naive removal that
    deletes the directory inside the remove (``sync_remove=True``, or remove
    then ``shutil.rmtree`` of the snapshot directory).  ``cleanup()`` of the
    removed snapshot is timed on its own: it is where the disk work went.
    So is a 1-byte write + fsync after the same setup: the floor of any
    durable metadata commit there (our remove commits LMDB durably).
    Every round removes a fresh committed snapshot, built (untimed) in the
    round's setup; the previous round's leftovers are reclaimed first.
(b) ``ops``: prepare, commit, remove, stat and walk over ``1000 x
    BENCH_SCALE`` snapshots per round (walk: one walk over that many).
(c) ``mount``: ``mount_all`` + ``unmount`` of views and active snapshots over
    1, 16, 128 and 500 real committed layers (a view of one layer is a bind
    mount), with ``OverlayStrategy.NEW_API`` and ``LEGACY``.  A stack a
    strategy refuses is recorded as such (``refused``; the timing is then
    that of the refusal) and reported as "cannot".

Measured, never asserted: only that naive removal and cleanup did remove.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.config import Benchmark, Filesystem, rounds, snapshot_filesystems
from bench.support import filesystem, tree_info
from bench.trees import TreeStats, build, scale
from bench.workloads import (
    count,
    fresh_keys,
    populate,
    record_op_rate,
    remove_all,
    upper_dir,
    walk_count,
)
from overlay import _native
from overlay.errors import UnsupportedError
from overlay.mount import Mount, OverlayStrategy, mount_all, parse_options, unmount
from overlay.overlayfs import OverlaySnapshotter
from overlay.snapshots import CleanupReport
from tests.helpers import mounts_under, unmount_all_under

# ----------------------------------------------------------------- (a) remove

#: Snapshot sizes: nominal file counts (times BENCH_SCALE, at least 1).
SIZES: dict[str, int] = {"1": 1, "1k": 1_000, "100k": 100_000}


@dataclass(frozen=True, slots=True)
class Remover:
    id: str
    label: str
    #: "ours", "naive", "cleanup" (ours, the deferred half) or "floor" (a reference)
    role: str
    sync_remove: bool = False


REMOVERS: tuple[Remover, ...] = (
    Remover("ours", "ours: remove (reference drop)", "ours"),
    Remover("sync", "naive: remove, sync_remove=True", "naive", sync_remove=True),
    Remover("rmtree", "naive: remove + shutil.rmtree(dir)", "naive"),
    Remover("cleanup", "ours: cleanup() of the removed", "cleanup"),
    # Not a remove: what any durable metadata commit costs on this filesystem
    # right after the same setup (a 1-byte write and fsync, a journal commit).
    Remover("fsync", "floor: 1-byte write + fsync", "floor"),
)

REMOVE_CASES = [
    pytest.param(fs, size, r, id=f"{fs}-{size}-{r.id}")
    for fs in snapshot_filesystems()
    for size in SIZES
    for r in REMOVERS
]


@pytest.mark.parametrize(("fs", "size", "remover"), REMOVE_CASES, indirect=["fs"])
def test_remove(
    benchmark: Benchmark, fs: Filesystem, workdir: Path, size: str, remover: Remover
) -> None:
    sn = OverlaySnapshotter(workdir / "root", sync_remove=remover.sync_remove)
    factor = SIZES[size] * scale() / 100_000  # of the nested tree's 100k files
    built: list[TreeStats] = []
    dirs: list[Path] = []
    reports: list[CleanupReport] = []
    live: list[str] = []  # the floor's rounds remove nothing: do it here

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        remove_all(sn, live)
        live.clear()
        sn.cleanup()  # what the previous round left (ours leaves it all)
        key = f"layer-{len(built)}-{secrets.token_hex(4)}"
        upper = upper_dir(sn.prepare(key))
        built.append(build("nested", upper / "tree", factor))
        sn.commit(key + "@", key)
        if remover.role == "cleanup":
            sn.remove(key + "@")
        elif remover.role == "floor":
            live.append(key + "@")
        dirs.append(upper.parent)
        _native.syncfs(workdir)  # write back the building, as test_remove does
        return (key + "@", upper.parent), {}

    def run(name: str, snapshot_dir: Path) -> None:
        if remover.role == "cleanup":
            reports.append(sn.cleanup())
            return
        if remover.role == "floor":
            fd = os.open(workdir / "floor", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, b"x")
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        sn.remove(name)
        if remover.id == "rmtree":
            shutil.rmtree(snapshot_dir)

    n = rounds()
    benchmark.group = f"snapshot remove: {size}-file snapshot on {fs.name}"
    benchmark.extra_info.update(
        kind="snapshot-remove", size=size, fs=fs.name, contender=remover.label,
        role=remover.role, scale=scale(), rounds=n,
        description="remove of a committed snapshot holding a nested tree",
    )
    try:
        benchmark.pedantic(run, setup=setup, rounds=n, iterations=1)
        if remover.role in ("naive", "cleanup"):
            # naive removal and cleanup must really have deleted the directories
            left = [d for d in dirs if os.path.lexists(d)]
            if left:
                pytest.fail(f"{remover.label} left {left}")
        if reports:
            benchmark.extra_info["reclaimed_entries"] = reports[0].entries
    finally:
        sn.close()
    benchmark.extra_info.update(tree_info(built[0]))
    if benchmark.stats:
        benchmark.extra_info["median_s"] = float(benchmark.stats.stats.median)


# -------------------------------------------------------------------- (b) ops

OPS = ("prepare", "commit", "remove", "stat", "walk")
OP_CASES = [pytest.param(fs, op, id=f"{fs}-{op}") for fs in snapshot_filesystems() for op in OPS]


@pytest.mark.parametrize(("fs", "op"), OP_CASES, indirect=["fs"])
def test_ops(benchmark: Benchmark, fs: Filesystem, workdir: Path, op: str) -> None:
    sn = OverlaySnapshotter(workdir / "root")
    n = count()
    committed: list[str] = []  # live committed snapshots
    actives: list[str] = []  # live active snapshots

    def clear() -> None:
        remove_all(sn, committed)
        remove_all(sn, actives)
        committed.clear()
        actives.clear()
        sn.cleanup()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        if op in ("stat", "walk"):
            return (), {}  # the same snapshots every round
        clear()
        keys = fresh_keys(op, n)
        if op == "prepare":
            actives.extend(keys)
        elif op == "commit":
            for key in keys:
                sn.prepare(key)
            committed.extend(k + "@" for k in keys)
        else:  # remove: they are gone after the round
            keys = populate(sn, op, n)
        return (keys,), {}

    def prepare(keys: list[str]) -> None:
        for key in keys:
            sn.prepare(key)

    def commit(keys: list[str]) -> None:
        for key in keys:
            sn.commit(key + "@", key)

    def remove(names: list[str]) -> None:
        for name in names:
            sn.remove(name)

    def stat() -> None:
        for name in committed:
            sn.stat(name)

    def walk() -> None:
        walk_count(sn)

    timed: dict[str, Callable[..., None]] = {
        "prepare": prepare, "commit": commit, "remove": remove, "stat": stat, "walk": walk,
    }
    if op in ("stat", "walk"):
        committed.extend(populate(sn, op, n))

    nr = rounds()
    benchmark.group = f"snapshot ops on {fs.name}"
    benchmark.extra_info.update(
        kind="snapshot-ops", op=op, fs=fs.name, contender=f"in-process {op}", snapshots=n,
        scale=scale(), rounds=nr,
        description=f"{n:,} operations per round (walk: one walk over {n:,} snapshots)",
    )
    try:
        benchmark.pedantic(timed[op], setup=setup, rounds=nr, iterations=1)
    finally:
        sn.close()
    record_op_rate(benchmark, n)


# ------------------------------------------------------------------ (c) mount

#: Committed layers below the mounted view or active snapshot.
DEPTHS = (1, 16, 128, 500)
SNAPSHOT_KINDS = ("view", "active")
STRATEGIES = (OverlayStrategy.NEW_API, OverlayStrategy.LEGACY)


@dataclass(frozen=True, slots=True)
class Stacks:
    fs: Filesystem
    target: Path
    #: (snapshot kind, layers) -> its mounts
    mounts: dict[tuple[str, int], list[Mount]]


@pytest.fixture(scope="module")
def stacks(request: pytest.FixtureRequest) -> Iterator[Stacks]:
    """500 committed layers (one small file each) in a fresh root, a view and
    an active snapshot over the top 1, 16, 128 and 500 of them.

    Fresh root, so the snapshot ids (directory names) are 1 to ~510: what
    LEGACY's relative lowerdir string has to fit in a page depends on them.
    """
    fs = filesystem(request, request.param)
    work = Path(tempfile.mkdtemp(dir=fs.path, prefix="mount-"))
    sn = OverlaySnapshotter(work / "root")
    try:
        layers: list[str] = []
        for i in range(max(DEPTHS)):
            key = f"layer-{i:03d}"
            upper = upper_dir(sn.prepare(key, layers[-1] if layers else ""))
            (upper / f"file-{i:03d}").write_bytes(b"layer %d\n" % i)
            sn.commit(key + "@", key)
            layers.append(key + "@")
        mounts: dict[tuple[str, int], list[Mount]] = {}
        for depth in DEPTHS:
            mounts["view", depth] = sn.view(f"view-{depth}", layers[depth - 1])
            mounts["active", depth] = sn.prepare(f"active-{depth}", layers[depth - 1])
        target = work / "mnt"
        target.mkdir()
        yield Stacks(fs, target, mounts)
    finally:
        unmount_all_under(work)
        sn.close()
        _native.remove_tree(work)


def option_bytes(m: Mount) -> dict[str, int]:
    """An overlay's mount(2) option string length: with absolute paths, and
    with the paths relative to their common parent (LEGACY's fallback)."""
    data = parse_options(m.options).data
    paths: list[str] = []
    for option in data:
        key, _, value = option.partition("=")
        if key == "lowerdir":
            paths.extend(value.split(":"))
        elif key in ("upperdir", "workdir"):
            paths.append(value)
    common = os.path.commonpath([os.path.dirname(p) for p in paths])
    if common in paths:
        common = os.path.dirname(common)
    absolute = len(",".join(data))
    relative = absolute - sum(len(p) - len(os.path.relpath(p, common)) for p in paths)
    return {"absolute": absolute, "relative": relative, "limit": _native.MAX_MOUNT_DATA}


STACK_FS = [pytest.param(fs, id=fs) for fs in snapshot_filesystems()]


@pytest.mark.parametrize("layers", DEPTHS, ids=[f"{d}layers" for d in DEPTHS])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=[s.value for s in STRATEGIES])
@pytest.mark.parametrize("snapshot", SNAPSHOT_KINDS)
@pytest.mark.parametrize("stacks", STACK_FS, indirect=True)
def test_mount(benchmark: Benchmark, stacks: Stacks, snapshot: str,
               strategy: OverlayStrategy, layers: int) -> None:
    mounts = stacks.mounts[snapshot, layers]
    target = stacks.target

    def mount_unmount() -> None:
        mount_all(mounts, target, strategy=strategy)
        unmount(target)

    refused = None
    try:
        mount_unmount()  # once, untimed: can this strategy mount this stack at all?
    except (UnsupportedError, OSError) as exc:
        refused = f"{type(exc).__name__}: {exc}"

    def attempt() -> None:
        with contextlib.suppress(UnsupportedError, OSError):
            mount_unmount()

    nr = rounds()
    benchmark.group = f"mount: {snapshot} on {stacks.fs.name}"
    benchmark.extra_info.update(
        kind="mount", snapshot=snapshot, strategy=strategy.value, layers=layers,
        fs=stacks.fs.name, contender=f"{strategy.value} {snapshot}", mount_type=mounts[0].type,
        refused=refused, scale=scale(), rounds=nr,
        description=f"mount_all + unmount of a {snapshot} over {layers} committed layers",
    )
    if mounts[0].type == "overlay":
        benchmark.extra_info["option_bytes"] = option_bytes(mounts[0])
    benchmark.pedantic(attempt if refused else mount_unmount, rounds=nr, iterations=1)
    left = mounts_under(target)
    if left:
        unmount_all_under(target)
        pytest.fail(f"still mounted after the benchmark: {left}")
    if benchmark.stats:
        benchmark.extra_info["median_s"] = float(benchmark.stats.stats.median)

