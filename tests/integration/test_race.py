"""Concurrency torture: creates, commits and removes racing ``cleanup`` (DESIGN invariants 1, 2).

Threads of this process and ``spawn``ed processes (never a fork of a process
with the store open) share one root.  Each worker loops prepare (over nothing,
a shared base or one of its own committed snapshots) → write files → commit →
sometimes view → remove, and after *every* operation checks that every
snapshot it knows to be live still has its directory and exactly the files it
wrote.  Meanwhile a thread and a process call ``cleanup()`` in a tight loop,
and a "crasher" process forks children that prepare in a loop and SIGKILLs
them at random instants, so that crash leftovers (a ``snapshots/<next id>``
with no record, a half-built ``new-*``, a trash half deleted) keep appearing
while cleanup and the other creators run.  At the end one more cleanup must
leave exactly the live ids under ``snapshots/`` and an empty trash.

The busy variant first mounts removed snapshots in every way containerd
does (a bind of an active, an overlay's upper and lower layers, a view's bind
of a committed layer, a mount inside a layer): every cleanup of the race must
report exactly those and leave them intact; after unmounting, they go.

``OVL_RACE_SECONDS`` sets the duration of each race (default 5),
``OVL_RACE_SEED`` the seed (printed on failure).
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import multiprocessing
import os
import random
import select
import signal
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from overlay import _native
from overlay.mount import mount_all, unmount
from overlay.overlayfs import OverlaySnapshotter
from overlay.snapshots import Kind
from tests.helpers import unmount_all_under
from tests.integration._torture import (
    Known,
    content,
    crash_in_child,
    disk,
    fill,
    final_check,
    kill_after_rename,
    live,
    problems,
    sid_of,
    upper_from_info,
    upper_from_mounts,
    write_files,
)

SECONDS = float(os.environ.get("OVL_RACE_SECONDS", "5"))
THREADS = 3
CRASH_PREFIX = "crash/"
#: how long a crash child may take to open the store
OPEN_TIMEOUT = 30.0
#: snapshotters a stuck thread may still be inside: never closed (close would wait forever)
STUCK: set[int] = set()

# ------------------------------------------------------------------------------ spawned children


def _child_entry(send: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it hangs, if it does
    try:
        send.send((True, fn(*args)))
    except BaseException:
        send.send((False, traceback.format_exc()))


class Spawned:
    """``fn(*args)`` in a ``spawn``ed process; ``result()`` returns its value or raises."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child_entry, args=(send, fn, args), daemon=True)
        self._proc.start()
        send.close()

    def done(self) -> bool:
        """Whether the result (or the child's death) is in."""
        return self._recv.poll(0)

    def result(self, timeout: float) -> Any:
        try:
            if not self._recv.poll(timeout):
                if self._proc.pid is not None:
                    os.kill(self._proc.pid, signal.SIGUSR1)  # its stacks, on stderr
                    time.sleep(1)
                raise AssertionError(f"spawned child {self._proc.pid} still running after "
                                     f"{timeout:.0f} s (its stacks are on stderr)")
            try:
                ok, value = self._recv.recv()
            except EOFError:
                self._proc.join(5)
                raise AssertionError(
                    f"spawned child died without a result (exit code {self._proc.exitcode})"
                ) from None
        finally:
            if self._proc.is_alive():
                self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._recv.close()
        if not ok:
            raise AssertionError(f"spawned child failed:\n{value}")
        return value


# ------------------------------------------------------------------------------------ workers


@dataclass(slots=True)
class WorkerResult:
    wid: str
    ops: int = 0
    errors: list[str] = field(default_factory=list)
    known: dict[str, Known] = field(default_factory=dict)


def work(sn: OverlaySnapshotter, wid: str, seconds: float, seed: int, base: Known,
         watched: list[Known]) -> WorkerResult:
    """One worker's loop; stops at the first problem (reported, never raised)."""
    rng = random.Random(f"{seed}-{wid}")
    result = WorkerResult(wid)
    known = result.known
    children: defaultdict[str, set[str]] = defaultdict(set)
    committed: list[str] = []
    views: list[str] = []
    deadline = time.monotonic() + seconds

    def check(what: str) -> None:
        result.ops += 1
        bad = problems([base, *watched, *known.values()])
        if bad:
            raise AssertionError(f"after {what}: " + "; ".join(bad))

    def add(k: Known) -> None:
        known[k.key] = k
        if k.parent:
            children[k.parent].add(k.key)

    def drop(key: str) -> Known:
        k = known.pop(key)
        if k.parent:
            children[k.parent].discard(key)
        return k

    def remove(key: str) -> None:
        sn.remove(key)
        drop(key)
        if key in committed:
            committed.remove(key)
        check(f"remove {key!r}")

    try:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            parent = rng.choice(["", base.key, *committed[-3:]])
            key = f"{wid}/active {i}"
            fs = upper_from_mounts(sn.prepare(key, parent))
            if upper_from_info(sn.stat(key)) != fs:
                raise AssertionError(f"prepare {key!r}: mounts() and stat() disagree on {fs}")
            add(Known(key, Kind.ACTIVE, fs, parent))
            check(f"prepare {key!r} (parent {parent!r}) as {sid_of(fs)}")

            names = [f"f{j}" if rng.random() < 0.5 else f"d{j % 2}/f{j}"
                     for j in range(rng.randint(1, 4))]
            known[key].files = write_files(fs, key, names)
            check(f"writing into {key!r}")

            if rng.random() < 0.2:
                remove(key)
                continue
            name = f"{wid}/committed {i}"
            sn.commit(name, key)
            k = drop(key)
            add(Known(name, Kind.COMMITTED, k.fs, k.parent, k.files))
            committed.append(name)
            check(f"commit {name!r}")

            if rng.random() < 0.4:
                vkey, vparent = f"{wid}/view {i}", rng.choice(committed)
                mounts = sn.view(vkey, vparent)
                lower = mounts[0].source if mounts[0].type == "bind" else mounts[0].options[0]
                if known[vparent].fs not in lower:
                    raise AssertionError(f"view {vkey!r}: mounts {mounts} miss its parent's layer")
                add(Known(vkey, Kind.VIEW, upper_from_info(sn.stat(vkey)), vparent))
                views.append(vkey)
                check(f"view {vkey!r} of {vparent!r}")
            while len(views) > 2 or (views and rng.random() < 0.3):
                remove(views.pop(0))
            while len(committed) > 4:
                leaves = [c for c in committed if not children[c]]
                if leaves:
                    remove(leaves[0])
                elif views:
                    remove(views.pop(0))
                else:
                    break
    except Exception:
        result.errors.append(f"worker {wid}: {traceback.format_exc()}")
    return result


def process_worker(root: str, wid: str, seconds: float, seed: int, base: Known,
                   watched: list[Known]) -> WorkerResult:
    sn = OverlaySnapshotter(root, upperdir_label=True)
    try:
        return work(sn, wid, seconds, seed, base, watched)
    finally:
        sn.close()


def check_report(sn: OverlaySnapshotter, busy: list[Known]) -> list[str]:
    """One cleanup: it must name exactly the busy orphans, and leave them intact."""
    report = sn.cleanup()
    want = sorted(os.path.join(sn.root, "snapshots", k.sid) for k in busy)
    errors = []
    if sorted(p for p, _ in report.busy) != want:
        errors.append(f"cleanup reported busy {sorted(report.busy)}, expected {want}")
    errors.extend(problems(busy))
    return errors


def process_cleaner(root: str, seconds: float, busy: list[Known]) -> tuple[int, list[str]]:
    sn = OverlaySnapshotter(root, upperdir_label=True)
    runs, deadline = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            runs += 1
            errors = check_report(sn, busy)
            if errors:
                return runs, [f"cleaner process, run {runs}: {e}" for e in errors]
    finally:
        sn.close()
    return runs, []


def _crash_child(root: str, incarnation: int, base_key: str, ready: int) -> None:
    code = 1
    try:
        sn = OverlaySnapshotter(root)
        os.write(ready, b"r")
        for i in range(1_000_000):
            key = f"{CRASH_PREFIX}{incarnation}/{i}"
            sn.prepare(key, base_key if i % 2 else "")
            if i % 3 == 0:
                sn.remove(key)
            elif i % 3 == 1:
                sn.cleanup()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def process_crasher(root: str, seconds: float, seed: int,
                    base_key: str) -> tuple[int, int, int]:
    """Fork children (this process never opens the store) that create, remove
    and clean up in a loop, and SIGKILL each after a random delay.
    Returns (children killed, children that failed on their own, children
    that could not even open the store)."""
    rng = random.Random(f"{seed}-crasher")
    killed = failed = hung = 0
    deadline = time.monotonic() + seconds
    incarnation = 0
    while time.monotonic() < deadline:
        incarnation += 1
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _crash_child(root, incarnation, base_key, w)
        os.close(w)
        readable, _, _ = select.select([r], [], [], OPEN_TIMEOUT)
        started = bool(readable) and os.read(r, 1) == b"r"
        os.close(r)
        if started:
            time.sleep(rng.uniform(0, 0.03))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if not readable:
            hung += 1
            break
        if started and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            killed += 1
        else:
            failed += 1
    return killed, failed, hung


# ---------------------------------------------------------------------------------- the race


def race(sn: OverlaySnapshotter, seed: int, base: Known, busy: list[Known]) -> None:
    """Run every worker and cleaner for SECONDS, then check the end state."""
    root = sn.root
    timeout = SECONDS + 60
    procs = {
        "worker": Spawned(process_worker, root, "p0", SECONDS, seed, base, busy),
        "cleaner": Spawned(process_cleaner, root, SECONDS, busy),
        "crasher": Spawned(process_crasher, root, SECONDS, seed, base.key),
    }
    results: list[WorkerResult] = []
    cleaner_errors: list[str] = []
    cleanups = 0
    stop = threading.Event()

    def thread_worker(wid: str) -> None:
        results.append(work(sn, wid, SECONDS, seed, base, busy))

    def thread_cleaner() -> None:
        nonlocal cleanups
        try:
            while not stop.is_set():
                cleanups += 1
                errors = check_report(sn, busy)
                if errors:
                    cleaner_errors.extend(f"cleaner thread, run {cleanups}: {e}" for e in errors)
                    return
        except Exception:
            cleaner_errors.append(f"cleaner thread: {traceback.format_exc()}")

    threads = [threading.Thread(target=thread_worker, args=(f"t{n}",), daemon=True)
               for n in range(THREADS)]
    cleaner = threading.Thread(target=thread_cleaner, daemon=True)
    for t in [*threads, cleaner]:
        t.start()
    try:
        for t in threads:
            t.join(timeout)
        worker_result: WorkerResult = procs["worker"].result(timeout)
        cleaner_runs, errors = procs["cleaner"].result(timeout)
        killed, crashed_badly, hung = procs["crasher"].result(timeout)
    finally:
        stop.set()
        cleaner.join(timeout)
        if any(t.is_alive() for t in [*threads, cleaner]):
            STUCK.add(id(sn))
    assert id(sn) not in STUCK, "a thread is stuck (in the store's write lock?)"
    results.append(worker_result)
    cleaner_errors.extend(errors)

    failures = [e for r in results for e in r.errors] + cleaner_errors
    if crashed_badly:
        failures.append(f"{crashed_badly} crasher children died on their own (see stderr)")
    if hung:
        failures.append(f"a crasher child could not open the store in {OPEN_TIMEOUT} s")
    ops = {r.wid: r.ops for r in results}
    print(f"race: ops per worker {ops}, cleanups {cleanups} (thread) + {cleaner_runs} "
          f"(process), crash children killed {killed}")
    assert not failures, "\n".join(failures)
    # Sanity, not speed: every party really ran.
    assert all(ops.values()) and cleanups and cleaner_runs and killed, (ops, cleanups, killed)

    known = {k: v for r in results for k, v in r.known.items()}
    records = live(sn)
    unexpected = sorted(set(records) - set(known) - {base.key}
                        - {k for k in records if k.startswith(CRASH_PREFIX)})
    lost = sorted(set(known) - set(records))
    assert not unexpected and not lost, f"records: unexpected {unexpected}, lost {lost}"
    assert not problems([base, *busy, *known.values()])
    for key, info in records.items():
        if key in known:
            assert info.kind is known[key].kind and info.parent == known[key].parent, (key, info)
            assert upper_from_info(info) == known[key].fs, (key, info)


@pytest.fixture
def seed() -> Iterator[int]:
    value = int(os.environ.get("OVL_RACE_SEED", random.randrange(1 << 32)))
    print(f"race seed: {value} (rerun with OVL_RACE_SEED={value})")
    yield value


@pytest.fixture
def sn(tmpfs: Path) -> Iterator[OverlaySnapshotter]:
    s = OverlaySnapshotter(tmpfs / "root", upperdir_label=True)
    try:
        yield s
    finally:
        if id(s) not in STUCK:
            s.close()


def make_base(sn: OverlaySnapshotter) -> Known:
    fs = upper_from_mounts(sn.prepare("base-active"))
    files = write_files(fs, "base", ["etc/os-release", "bin/sh", "README"])
    sn.commit("base", "base-active")
    return Known("base", Kind.COMMITTED, fs, "", files)


def test_create_commit_remove_race_cleanup(privileged: None, sn: OverlaySnapshotter,
                                           seed: int) -> None:
    base = make_base(sn)
    race(sn, seed, base, busy=[])
    assert not final_check(sn)


def test_busy_orphans_survive_the_race_then_go(privileged: None, sn: OverlaySnapshotter,
                                               tmpfs: Path, seed: int) -> None:
    base = make_base(sn)
    targets = {name: tmpfs / f"mnt-{name}" for name in ("bind", "overlay", "view")}
    for t in targets.values():
        t.mkdir()
    mounted: list[Path] = []
    try:
        # an active's bind mount (a layer with no parent)
        bind = Known("busy/bind", Kind.ACTIVE, upper_from_mounts(sn.prepare("busy/bind")))
        bind.files = write_files(bind.fs, bind.key, ["a", "dir/b"])
        mount_all(sn.mounts(bind.key), targets["bind"])
        mounted.append(targets["bind"])
        (targets["bind"] / "through-mount").write_bytes(b"bind")
        bind.files["through-mount"] = b"bind"

        # an overlay: its upper layer, and its lower layer committed then removed
        lower = Known("busy/lower", Kind.COMMITTED,
                      upper_from_mounts(sn.prepare("busy/lower-active", "base")), "base")
        lower.files = write_files(lower.fs, lower.key, ["lower-file"])
        sn.commit(lower.key, "busy/lower-active")
        upper = Known("busy/overlay", Kind.ACTIVE,
                      upper_from_mounts(sn.prepare("busy/overlay", lower.key)), lower.key)
        mount_all(sn.mounts(upper.key), targets["overlay"])
        mounted.append(targets["overlay"])
        (targets["overlay"] / "top").write_bytes(b"top")
        upper.files = {"top": b"top"}

        # a view: a read-only bind of its (removed) parent's layer
        viewed = Known("busy/viewed", Kind.COMMITTED,
                       upper_from_mounts(sn.prepare("busy/viewed-active")))
        viewed.files = write_files(viewed.fs, viewed.key, ["v1", "v/2"])
        sn.commit(viewed.key, "busy/viewed-active")
        sn.view("busy/view", viewed.key)
        view_fs = upper_from_info(sn.stat("busy/view"))  # not busy: reclaimed at once
        mount_all(sn.mounts("busy/view"), targets["view"])
        mounted.append(targets["view"])

        # a mount inside a layer
        inner = Known("busy/inner", Kind.ACTIVE, upper_from_mounts(sn.prepare("busy/inner")))
        inner.files = write_files(inner.fs, inner.key, ["x"])
        os.mkdir(os.path.join(inner.fs, "mnt"))
        _native.mount("tmpfs", os.path.join(inner.fs, "mnt"), "tmpfs", 0, "size=1m")
        mounted.append(Path(inner.fs) / "mnt")
        (Path(inner.fs) / "mnt" / "in-tmpfs").write_bytes(b"inner")
        inner.files["mnt/in-tmpfs"] = b"inner"

        for key in ("busy/bind", "busy/overlay", "busy/lower", "busy/view", "busy/viewed",
                    "busy/inner"):
            sn.remove(key)
        busy = [bind, upper, lower, viewed, inner]
        assert not check_report(sn, busy)
        assert not os.path.exists(os.path.dirname(view_fs)), "the view's own dir is not busy"

        race(sn, seed, base, busy)

        assert not problems(busy)
        assert (targets["bind"] / "dir" / "b").read_bytes() == bind.files["dir/b"]
        assert (targets["overlay"] / "lower-file").read_bytes() == lower.files["lower-file"]
        assert (targets["overlay"] / "etc" / "os-release").read_bytes() == content(
            "base", "etc/os-release")
        assert (targets["view"] / "v" / "2").read_bytes() == viewed.files["v/2"]
        assert not final_check(sn, busy=[k.sid for k in busy])
    finally:
        for target in reversed(mounted):
            with contextlib.suppress(OSError):
                unmount(target)
        unmount_all_under(tmpfs / "root")
        for t in targets.values():
            unmount_all_under(t)
    assert not final_check(sn)


def process_empty_trash(root: str, barrier: Any) -> list[tuple[str, int]]:
    sn = OverlaySnapshotter(root)
    try:
        if barrier is not None:
            barrier.wait(60)
        return list(sn.empty_trash().busy)
    finally:
        sn.close()


def started_on_the_trash(trash: str, before: dict[str, int]) -> bool:
    """Has a remover begun on the trash?  An entry renamed or gone, or fewer
    directories in one (``before``: entry -> directories in its fs)."""
    now = set(os.listdir(trash))
    if now != set(before):
        return True
    return any(len(os.listdir(os.path.join(trash, e, "fs"))) < n for e, n in before.items())


@pytest.mark.parametrize("start", ["together", "late"])
def test_two_processes_emptying_one_trash_report_nothing(privileged: None,
                                                         sn: OverlaySnapshotter,
                                                         start: str) -> None:
    """``empty_trash`` is documented safe from several processes at once, and
    its report lists only what it could not remove.  Two processes racing on
    the same trash must then both report nothing and leave it empty: whether
    they start together, or the second starts while the first is inside an
    entry (a daemon's background cleanup and ``ovl cleanup``)."""
    sizes = [3000] * 8 if start == "together" else [100_000]
    for n, size in enumerate(sizes):
        key = f"big {n}"
        fill(upper_from_mounts(sn.prepare(key)), size, per_dir=10 if size < 10_000 else 20)
        sn.remove(key)
    assert sn.collect_orphans() == (len(sizes), [])
    assert sn.trash_backlog() == len(sizes)
    if start == "together":
        barrier = multiprocessing.get_context("spawn").Barrier(2)
        racers = [Spawned(process_empty_trash, sn.root, barrier) for _ in range(2)]
    else:
        trash = os.path.join(sn.root, "trash")
        before = {e: len(os.listdir(os.path.join(trash, e, "fs"))) for e in os.listdir(trash)}
        racers = [Spawned(process_empty_trash, sn.root, None)]
        deadline = time.monotonic() + 60
        while not (started_on_the_trash(trash, before) or racers[0].done()
                   or time.monotonic() > deadline):
            time.sleep(0.001)
        racers.append(Spawned(process_empty_trash, sn.root, None))
    reports = [r.result(60) for r in racers]
    assert reports == [[], []], [
        f"{len(r)} reported, e.g. {[(p, errno.errorcode[e]) for p, e in r[:3]]}" for r in reports]
    assert sn.trash_backlog() == 0, os.listdir(os.path.join(sn.root, "trash"))


def process_slow_cleanup(root: str, entered: str) -> list[tuple[str, int]]:
    """cleanup() with a native unlink that first says so, then dawdles."""
    real = _native.remove_tree

    def slow(path: Any, *args: Any, **kwargs: Any) -> _native.TreeResult:
        with open(entered, "a") as f:
            f.write(f"{path}\n")
        time.sleep(0.5)
        return real(path, *args, **kwargs)

    _native.remove_tree = slow
    sn = OverlaySnapshotter(root)
    try:
        return list(sn.cleanup().busy)
    finally:
        sn.close()


def test_cleanup_work_after_the_lock_never_hits_a_reused_id(privileged: None,
                                                            tmpfs: Path) -> None:
    """A create killed between its rename and its commit leaves snapshots/<id>
    with the id not consumed, so the next create gets the same id.  Cleanup
    must move that orphan away under the lock: if it only deleted it after
    releasing the lock, a create in between would lose its new directory."""
    root = str(tmpfs / "root")
    sn = OverlaySnapshotter(root)
    a = upper_from_mounts(sn.prepare("a"))
    sn.close()

    def body(child: OverlaySnapshotter) -> None:
        kill_after_rename(lambda dst: os.path.basename(dst).isdigit())
        child.prepare("b")

    crash_in_child(root, body)
    assert len(disk(root)[0] - {sid_of(a)}) == 1, "the crash left snapshots/<next id>"
    entered = str(tmpfs / "entered")
    cleaner = Spawned(process_slow_cleanup, root, entered)
    deadline = time.monotonic() + 60
    while not os.path.exists(entered) and time.monotonic() < deadline:
        time.sleep(0.001)
    # The cleaner released the lock and is in its slow unlink: create now.
    sn = OverlaySnapshotter(root, upperdir_label=True)
    try:
        fs = upper_from_mounts(sn.prepare("new"))  # the id the crashed create had
        new = Known("new", Kind.ACTIVE, fs, "", write_files(fs, "new", ["x", "y/z"]))
        assert cleaner.result(60) == []
        assert not problems([new])
        assert not final_check(sn)
        assert not problems([new])
    finally:
        sn.close()
