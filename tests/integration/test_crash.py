"""Crash torture: SIGKILL at random instants of every mutation (DESIGN invariant 5).

For each mutation (prepare, view, commit, remove, cleanup) hundreds of trials
run on one store that lives on across them.  In each trial the parent, with
the store closed, forks a child; the child opens the store, performs a few
set-up operations, says it is ready, then runs a loop of the mutation under
test.  Around each API call it appends ``B <step>`` before and ``D <step>``
after the call returned to a journal (fsynced), so the parent knows which
operations certainly committed and which one, at most, was in flight.  The
parent SIGKILLs the child after a random delay (the first trial of each kind
and any child that finished before its kill measure how long the loop takes;
the delay is drawn below that), then reopens the store and checks:

* it opens cleanly, and its records are exactly what the journal implies (an
  operation in flight is either wholly done or not at all: a commit leaves
  either the active key or the committed name, never both or neither);
* every live snapshot has its ``fs`` (and ``work`` when active), holding
  exactly the files written into it;
* a following ``prepare`` works, also when the crash left a directory at the
  next id, and hands out an empty layer;
* after ``cleanup`` the directories under ``snapshots/`` are exactly the live
  ids and the trash is empty.

Deterministic companions kill the child at chosen instants (between the
rename of a new directory and the commit, halfway through moving orphans to
the trash, inside the native unlink of the trash).

``OVL_CRASH_SEED`` replays a run (the seed is printed on failure);
``OVL_CRASH_TRIALS`` sets the trials per mutation (default 100).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import statistics
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from overlay import _native
from overlay.errors import NotFoundError
from overlay.overlayfs import OverlaySnapshotter
from overlay.snapshots import Kind
from tests.integration._torture import (
    Known,
    content,
    crash_in_child,
    die,
    disk,
    files_under,
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

TRIALS = int(os.environ.get("OVL_CRASH_TRIALS", "100"))
#: live snapshots kept from one trial to the next (the rest is removed, left as orphans)
KEEP = 24
CHILD_TIMEOUT = 30.0

Step = tuple[str, ...]


# ------------------------------------------------------------------------------------ child


def run_step(sn: OverlaySnapshotter, step: Step) -> None:
    op, args = step[0], step[1:]
    if op == "prepare":
        sn.prepare(args[0], args[1])
    elif op == "view":
        sn.view(args[0], args[1])
    elif op == "write":
        write_files(upper_from_mounts(sn.mounts(args[0])), args[0], args[1:])
    elif op == "fill":
        fill(upper_from_mounts(sn.mounts(args[0])), int(args[1]), per_dir=50)
    elif op == "commit":
        sn.commit(args[0], args[1])
    elif op == "remove":
        sn.remove(args[0])
    elif op == "collect":
        sn.collect_orphans()
    elif op == "cleanup":
        sn.cleanup()
    else:
        raise AssertionError(f"unknown step {step}")


def child_main(root: str, steps: list[Step], ready_after: int, journal: str,
               ready: int) -> NoReturn:
    """Run ``steps`` with a journal; write to ``ready`` after the first
    ``ready_after`` of them.  Never returns (and never runs pytest's code)."""
    code = 1
    try:
        jfd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)

        def note(line: str) -> None:
            os.write(jfd, f"{line}\n".encode())
            os.fsync(jfd)

        try:
            sn = OverlaySnapshotter(root)
            for i, step in enumerate(steps):
                if i == ready_after:
                    note(f"R {time.monotonic_ns()}")
                    os.write(ready, b"r")
                note(f"B {i}")
                run_step(sn, step)
                note(f"D {i} {time.monotonic_ns()}")
            note(f"F {time.monotonic_ns()}")
            code = 0
        except BaseException:
            note("E " + traceback.format_exc().replace("\n", "\\n"))
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


@dataclass(slots=True)
class Journal:
    done: list[int] = field(default_factory=list)
    begun: list[int] = field(default_factory=list)
    ready_ns: int | None = None
    last_done_ns: int | None = None
    error: str = ""

    @classmethod
    def read(cls, path: str) -> Journal:
        j = cls()
        with open(path) as f:
            text = f.read()
        for line in text.split("\n")[:-1]:  # a line cut by the kill has no "\n"
            tag, _, rest = line.partition(" ")
            if tag == "R":
                j.ready_ns = int(rest)
            elif tag == "B":
                j.begun.append(int(rest))
            elif tag == "D":
                i, ns = rest.split()
                j.done.append(int(i))
                j.last_done_ns = int(ns)
            elif tag == "E":
                j.error = rest.replace("\\n", "\n")
        return j

    @property
    def in_flight(self) -> list[int]:
        return sorted(set(self.begun) - set(self.done))


def run_child(root: str, steps: list[Step], ready_after: int, journal: str,
              delay: float | None) -> tuple[bool, Journal]:
    """Fork the child (the store is closed here), kill it ``delay`` seconds
    after it said it was ready (None: let it finish; the time the parent
    takes to notice is taken off).  Returns (killed, journal)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child_main(root, steps, ready_after, journal, w)
    os.close(w)
    try:
        readable, _, _ = select.select([r], [], [], CHILD_TIMEOUT)
        started = bool(readable) and os.read(r, 1) == b"r"
        if started and delay is not None:
            ready_ns = Journal.read(journal).ready_ns or time.monotonic_ns()
            time.sleep(max(0.0, delay - (time.monotonic_ns() - ready_ns) / 1e9))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + CHILD_TIMEOUT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"child hung (journal: {Journal.read(journal)})")
            time.sleep(0.001)
    finally:
        os.close(r)
    j = Journal.read(journal)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if (not killed and os.waitstatus_to_exitcode(status) != 0) or j.error:
        raise AssertionError(f"child failed (status {status:#x}):\n{j.error}")
    if not started:
        raise AssertionError(f"child never got ready (status {status:#x}): {j}")
    return killed, j


# ------------------------------------------------------------------------------------ model


@dataclass(slots=True)
class Expect:
    kind: Kind
    parent: str
    files: dict[str, bytes] | None = field(default_factory=dict)


Model = dict[str, Expect]


def exists(sn: OverlaySnapshotter, key: str) -> bool:
    try:
        sn.stat(key)
    except NotFoundError:
        return False
    return True


def settle(sn: OverlaySnapshotter, model: Model, step: Step, done: bool) -> None:
    """Apply ``step`` to the model: certainly (``done``) or as the store shows
    it, for the one in flight when the child died."""
    op, args = step[0], step[1:]
    if op in ("prepare", "view"):
        if done or exists(sn, args[0]):
            model[args[0]] = Expect(Kind.ACTIVE if op == "prepare" else Kind.VIEW, args[1])
    elif op == "write":
        files = model[args[0]].files
        if files is not None and done:
            files.update((n, content(args[0], n)) for n in args[1:])
        else:
            model[args[0]].files = None  # partly written: not checked
    elif op == "fill":
        model[args[0]].files = None
    elif op == "commit":
        name, key = args
        if not done:
            has_name, has_key = exists(sn, name), exists(sn, key)
            assert has_name != has_key, (
                f"commit {key!r} -> {name!r} cut by the kill left name: {has_name}, "
                f"key: {has_key}")
            done = has_name
        if done:
            e = model.pop(key)
            model[name] = Expect(Kind.COMMITTED, e.parent, e.files)
    elif op == "remove" and (done or not exists(sn, args[0])):
        del model[args[0]]


def leaves(model: Model, exclude: AbstractSet[str] = frozenset()) -> list[str]:
    parents = {e.parent for e in model.values()} | exclude
    return sorted(k for k in model if k not in parents)


def committed(model: Model) -> list[str]:
    return sorted(k for k, e in model.items() if e.kind is Kind.COMMITTED)


# ------------------------------------------------------------------------------------- plans


def plan(kind: str, t: int, model: Model, rng: random.Random) -> tuple[list[Step], int]:
    """(steps, how many of them are set-up done before the child says ready)."""
    bases = committed(model)

    def parent() -> str:
        return rng.choice(["", *bases])

    def names(key: str) -> tuple[str, ...]:
        return tuple(f"{key}-f{j}" if j % 2 else f"d/{key}-f{j}" for j in range(3))

    setup: list[Step] = []
    loop: list[Step] = []
    p = f"t{t}/"
    if kind == "prepare":
        loop = [("prepare", f"{p}a{i}", parent()) for i in range(40)]
    elif kind == "view":
        loop = [("view", f"{p}v{i}", parent()) for i in range(40)]
    elif kind == "commit":
        for i in range(40):
            setup += [("prepare", f"{p}a{i}", parent()), ("write", f"{p}a{i}", *names(f"a{i}"))]
            loop.append(("commit", f"{p}c{i}", f"{p}a{i}"))
    elif kind == "remove":
        c0, c1 = f"{p}c0", f"{p}c1"
        used = {parent() for _ in range(2)} - {""}
        first = sorted(used)[0] if used else ""
        setup += [("prepare", f"{p}a0", first), ("write", f"{p}a0", *names("a0")),
                  ("commit", c0, f"{p}a0"),
                  ("prepare", f"{p}a1", c0), ("write", f"{p}a1", *names("a1")),
                  ("commit", c1, f"{p}a1")]
        others: list[str] = []
        for i, on in enumerate([c1, c0, "", *sorted(used)] * 4):
            setup += [("prepare", f"{p}x{i}", on), ("write", f"{p}x{i}", *names(f"x{i}"))]
            others.append(f"{p}x{i}")
        # views are cheap to set up and make the removal loop long enough
        # (tens of ms) that a kill reliably lands inside it, however slowly
        # the parent wakes up on a busy machine
        for i, on in enumerate([c0, c1, "", *sorted(used)] * 15):
            setup.append(("view", f"{p}v{i}", on))
            others.append(f"{p}v{i}")
        old = leaves(model, used)
        others += rng.sample(old, min(10, len(old)))
        rng.shuffle(others)
        loop = [("remove", k) for k in [*others, c1, c0]]
    elif kind == "cleanup":
        for i in range(4):
            setup += [("prepare", f"{p}g{i}", parent()), ("fill", f"{p}g{i}", "1500")]
        setup += [("remove", f"{p}g0"), ("remove", f"{p}g1"), ("collect",)]
        loop = [("cleanup",), ("remove", f"{p}g2"), ("cleanup",), ("prepare", f"{p}h", ""),
                ("remove", f"{p}g3"), ("remove", f"{p}h"), ("cleanup",)]
    else:
        raise AssertionError(kind)
    return setup + loop, len(setup)


# ---------------------------------------------------------------------------------- checks


@dataclass(slots=True)
class Stats:
    trials: int = 0
    killed: int = 0
    in_flight: Counter[str] = field(default_factory=Counter)
    leftovers: Counter[str] = field(default_factory=Counter)
    probe_over_leftover: int = 0

    def __str__(self) -> str:
        return (f"{self.trials} trials, {self.killed} killed, cut in flight: "
                f"{dict(self.in_flight)}, reopened with: {dict(self.leftovers)}, "
                f"prepare met a stale snapshots/<its id>: {self.probe_over_leftover}")


def check_store(sn: OverlaySnapshotter, model: Model) -> set[str]:
    """Records are exactly the model, each with its directories and files.
    Returns the live ids."""
    records = live(sn)
    assert set(records) == set(model), (
        f"records the journal does not explain: {sorted(set(records) - set(model))}; "
        f"journaled but missing: {sorted(set(model) - set(records))}")
    known = []
    for key, e in model.items():
        info = records[key]
        assert (info.kind, info.parent) == (e.kind, e.parent), (key, info, e)
        known.append(Known(key, e.kind, upper_from_info(info), e.parent, e.files))
    bad = problems(known)
    assert not bad, "\n".join(bad)
    return {k.sid for k in known}


def probe(sn: OverlaySnapshotter, t: int, ids: set[str], model: Model,
          rng: random.Random) -> str:
    """A prepare after the crash works and hands out a fresh, empty layer."""
    key = f"t{t}/probe"
    fs = upper_from_mounts(sn.prepare(key, rng.choice(["", *committed(model)])))
    assert sid_of(fs) not in ids, f"prepare after a crash reused live id {sid_of(fs)}"
    assert files_under(fs) == {}, f"prepare after a crash handed out a non-empty {fs}"
    assert os.path.isdir(os.path.join(os.path.dirname(fs), "work"))
    sn.remove(key)
    return sid_of(fs)


def prune(sn: OverlaySnapshotter, model: Model, rng: random.Random) -> None:
    """Keep the store small: remove leaves (their directories stay, as orphans)."""
    while len(model) > KEEP:
        candidates = leaves(model)
        uncommitted = [k for k in candidates if model[k].kind is not Kind.COMMITTED]
        key = rng.choice(uncommitted or candidates)
        sn.remove(key)
        del model[key]


def verify(root: str, model: Model, steps: list[Step], j: Journal, t: int,
           rng: random.Random, stats: Stats) -> None:
    sn = OverlaySnapshotter(root, upperdir_label=True)  # opens cleanly
    try:
        for i in j.done:
            settle(sn, model, steps[i], done=True)
        assert len(j.in_flight) <= 1, j
        for i in j.in_flight:
            stats.in_flight[steps[i][0]] += 1
            settle(sn, model, steps[i], done=False)
        ids = check_store(sn, model)
        snapshots, trash = disk(root)
        left = snapshots - ids
        if any(name.startswith("new-") for name in left):
            stats.leftovers["new-*"] += 1
        if any(not name.startswith("new-") for name in left):
            stats.leftovers["orphans"] += 1
        if trash:
            stats.leftovers["trash"] += 1
        if rng.random() < 0.5:
            if probe(sn, t, ids, model, rng) in left:
                stats.probe_over_leftover += 1
            bad = final_check(sn)
        else:
            bad = final_check(sn)
            probe(sn, t, ids, model, rng)
        assert not bad, "\n".join(bad)
        check_store(sn, model)
        prune(sn, model, rng)
    finally:
        sn.close()


# ----------------------------------------------------------------------------------- tests


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("OVL_CRASH_SEED", random.randrange(1 << 32)))
    print(f"crash seed: {value} (rerun with OVL_CRASH_SEED={value})")
    return value


@pytest.mark.parametrize("kind", ["prepare", "view", "commit", "remove", "cleanup"])
def test_sigkill_at_random_instants(privileged: None, tmpfs: Path, seed: int,
                                    kind: str) -> None:
    rng = random.Random(f"{seed}-{kind}")
    root = str(tmpfs / "root")
    journal = str(tmpfs / "journal")
    model: Model = {}
    # a few committed parents to build on
    sn = OverlaySnapshotter(root)
    for i in range(3):
        fs = upper_from_mounts(sn.prepare(f"seed{i}-active", f"seed{i - 1}" if i else ""))
        files = write_files(fs, f"seed{i}-active", [f"s{i}", f"dir/s{i}"])
        sn.commit(f"seed{i}", f"seed{i}-active")
        model[f"seed{i}"] = Expect(Kind.COMMITTED, f"seed{i - 1}" if i else "", files)
    sn.close()

    stats = Stats()
    # Delays are drawn below how long the mutations took in the last unkilled
    # trials (their median), scaled so that about 60% of the trials are killed
    # whatever the machine's load does to those durations: a kill widens the
    # range a little, a trial that finished first narrows it.
    spans: list[float] = []
    scale = 1.0
    for t in range(TRIALS):
        steps, ready_after = plan(kind, t, model, rng)
        delay = None if t == 0 else rng.uniform(0, scale * statistics.median(spans[-5:]))
        j: Journal | None = None
        try:
            killed, j = run_child(root, steps, ready_after, journal, delay)
            if not killed:
                assert j.ready_ns is not None and j.last_done_ns is not None
                spans.append((j.last_done_ns - j.ready_ns) / 1e9)
            if delay is not None:
                scale *= 1.05 if killed else 0.93
            stats.trials += 1
            stats.killed += killed
            verify(root, model, steps, j, t, rng, stats)
        except BaseException as exc:
            in_flight = [steps[i] for i in j.in_flight] if j is not None else "?"
            exc.add_note(f"seed {seed} (OVL_CRASH_SEED={seed}), {kind} trial {t}, "
                         f"delay {delay}, step in flight: {in_flight}; so far: {stats}")
            raise
    print(f"{kind}: {stats}")
    # Not a speed assertion: the kills must really land inside the mutations.
    assert stats.killed >= TRIALS // 3, stats
    assert stats.in_flight, stats


# ---------------------------------------------------------------- deterministic crash points


@pytest.fixture
def store(privileged: None, tmpfs: Path) -> Iterator[str]:
    yield str(tmpfs / "root")


def reopen_and_check(root: str, model: Model, probe_first: bool) -> None:
    sn = OverlaySnapshotter(root, upperdir_label=True)
    try:
        ids = check_store(sn, model)
        if probe_first:
            probe(sn, 0, ids, model, random.Random(0))
        assert not final_check(sn)
        check_store(sn, model)
        if not probe_first:
            probe(sn, 0, ids, model, random.Random(0))
            assert not final_check(sn)
    finally:
        sn.close()


def setup_store(root: str, keys: dict[str, int]) -> tuple[Model, dict[str, str]]:
    """Actives ``key`` with a few files, and ``keys[key]`` more (unchecked).
    Returns the model and each key's layer."""
    sn = OverlaySnapshotter(root)
    model: Model = {}
    layers: dict[str, str] = {}
    try:
        for key, files in keys.items():
            fs = layers[key] = upper_from_mounts(sn.prepare(key))
            written = write_files(fs, key, ["a", "b/c"])
            if files:
                fill(fs, files)
            model[key] = Expect(Kind.ACTIVE, "", None if files else written)
    finally:
        sn.close()
    return model, layers


@pytest.mark.parametrize("probe_first", [True, False])
def test_crash_between_rename_and_commit(store: str, probe_first: bool) -> None:
    """The new directory is at snapshots/<id>, its record never committed."""
    model, layers = setup_store(store, {"a": 0})

    def body(sn: OverlaySnapshotter) -> None:
        kill_after_rename(lambda dst: os.path.basename(dst).isdigit())
        sn.prepare("b")

    crash_in_child(store, body)
    snapshots, _ = disk(store)
    stale = snapshots - {sid_of(layers["a"])}
    assert len(stale) == 1, snapshots
    # whatever lies there must not leak into a new snapshot
    with open(os.path.join(store, "snapshots", stale.pop(), "fs", "stale"), "w") as f:
        f.write("stale")
    reopen_and_check(store, model, probe_first)


def test_crash_while_moving_orphans_to_the_trash(store: str) -> None:
    model, _ = setup_store(store, {f"k{i}": 0 for i in range(5)})

    def body(sn: OverlaySnapshotter) -> None:
        for i in range(4):
            sn.remove(f"k{i}")
        moved = []

        def second(dst: str) -> bool:
            if os.path.dirname(dst) == os.path.join(store, "trash"):
                moved.append(dst)
            return len(moved) == 2

        kill_after_rename(second)
        sn.cleanup()

    crash_in_child(store, body)
    for i in range(4):
        del model[f"k{i}"]
    snapshots, trash = disk(store)
    assert (len(snapshots), len(trash)) == (3, 2), (snapshots, trash)
    reopen_and_check(store, model, probe_first=False)


def test_crash_inside_the_native_unlink_of_the_trash(store: str) -> None:
    model, _ = setup_store(store, {"big": 20_000, "small": 0})

    def body(sn: OverlaySnapshotter) -> None:
        sn.remove("big")
        real = _native.remove_tree

        def remove_tree(*args: Any, **kwargs: Any) -> _native.TreeResult:
            threading.Timer(0.005, die).start()
            return real(*args, **kwargs)

        _native.remove_tree = remove_tree
        sn.cleanup()

    crash_in_child(store, body)
    del model["big"]
    assert len(disk(store)[1]) == 1, "the trash entry the kill cut"
    reopen_and_check(store, model, probe_first=True)
