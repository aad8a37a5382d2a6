"""Issues 4 and 8: one metadata workload in-process, through our daemon, through
containerd's overlay snapshotter served by Go, and through containerd.

Contenders (``bench.services``): an ``OverlaySnapshotter`` in-process; our
daemon over its unix socket; the Go proxy (containerd 1.6's overlay
snapshotter served by grpc-go) over its unix socket; and one private
containerd 1.6 reached with the same gRPC client on its socket, in one
namespace under a lease, with ``snapshotter`` set to its built-in
``overlayfs``, to our proxy ``ovl`` or to the Go proxy ``gooverlay``.  All
six keep their roots on the same filesystem, and run side by side in one
run.

* ``cycle``: prepare → commit → stat → remove, ``1000 x BENCH_SCALE`` times
  per round; each operation's share is timed too (``op_seconds``).
* ``walk``: one walk (containerd: List) over ``1000 x BENCH_SCALE`` committed
  snapshots per round.

Before each round (untimed) the removed snapshots of the previous one are
reclaimed: ``cleanup()`` in-process, on the daemon and on the Go proxy;
through containerd its garbage collector does it on its own schedule (during
the rounds too, as it would in production), and the round waits until the
backend is back to its live snapshots.  Measured, never asserted.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.config import Benchmark, rounds, snapshot_filesystems
from bench.services import CONTENDERS, Backends, Contender, cpu_seconds
from bench.support import filesystem
from bench.trees import scale
from bench.workloads import (
    CYCLE_OPS,
    count,
    cycle,
    fresh_keys,
    populate,
    record_op_rate,
    remove_all,
    walk_count,
)
from overlay import _native

FS_CASES = [pytest.param(fs, id=fs) for fs in snapshot_filesystems()]


@pytest.fixture(scope="module")
def backends(request: pytest.FixtureRequest) -> Iterator[Backends]:
    fs = filesystem(request, request.param)
    work = Path(tempfile.mkdtemp(dir=fs.path, prefix="daemon-"))
    b = Backends(fs, work)
    try:
        yield b
    finally:
        try:
            b.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                _native.remove_tree(work)


class CpuMeter:
    """CPU seconds each process of a contender spends per timed round."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = procs
        self.rounds: dict[str, list[float]] = {name: [] for name in procs}
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.procs.items()}

    def stop(self) -> None:
        for name, pid in self.procs.items():
            self.rounds[name].append(cpu_seconds(pid) - self._start[name])


def _describe(benchmark: Benchmark, workload: str, b: Backends, contender: Contender,
              n: int, description: str) -> int:
    nr = rounds()
    benchmark.group = f"daemon: {workload} on {b.fs.name}"
    benchmark.extra_info.update(
        kind="daemon", workload=workload, fs=b.fs.name, contender=contender.label,
        contender_id=contender.id, snapshots=n, scale=scale(), rounds=nr,
        description=description,
    )
    return nr


@pytest.mark.parametrize("contender", CONTENDERS, ids=[c.id for c in CONTENDERS])
@pytest.mark.parametrize("backends", FS_CASES, indirect=True)
def test_cycle(benchmark: Benchmark, backends: Backends, contender: Contender) -> None:
    sn = backends.client(contender.id)
    n = count()
    per_round: list[dict[str, float]] = []
    waits: list[float | None] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        waits.append(backends.settle(contender.id, 0))
        return (fresh_keys("cycle", n),), {}

    meter = CpuMeter(backends.processes(contender.id))

    def run(keys: list[str]) -> None:
        meter.start()
        per_round.append(cycle(sn, keys))
        meter.stop()

    nr = _describe(benchmark, "cycle", backends, contender, n,
                   f"prepare -> commit -> stat -> remove, {n:,} cycles per round")
    benchmark.pedantic(run, setup=setup, rounds=nr, iterations=1)
    benchmark.extra_info["op_seconds"] = {op: [r[op] for r in per_round] for op in CYCLE_OPS}
    benchmark.extra_info["unsettled_rounds"] = sum(w is None for w in waits)
    benchmark.extra_info["cpu_seconds"] = meter.rounds
    record_op_rate(benchmark, len(CYCLE_OPS) * n, cycles=n)


@pytest.mark.parametrize("contender", CONTENDERS, ids=[c.id for c in CONTENDERS])
@pytest.mark.parametrize("backends", FS_CASES, indirect=True)
def test_walk(benchmark: Benchmark, backends: Backends, contender: Contender) -> None:
    sn = backends.client(contender.id)
    n = count()
    names = populate(sn, "walk", n)
    try:
        settled = backends.settle(contender.id, n)
        nr = _describe(benchmark, "walk", backends, contender, n,
                       f"one walk (containerd: List) over {n:,} committed snapshots per round")
        benchmark.extra_info.update(walked=walk_count(sn), unsettled_rounds=int(settled is None))
        meter = CpuMeter(backends.processes(contender.id))

        def run() -> None:
            meter.start()
            walk_count(sn)
            meter.stop()

        benchmark.pedantic(run, rounds=nr, iterations=1)
        benchmark.extra_info["cpu_seconds"] = meter.rounds
        record_op_rate(benchmark, n)
    finally:
        remove_all(sn, names)
