"""Snapshot workloads shared by the snapshotter and daemon benchmarks (issues 3 and 4).

Everything here drives the :class:`~overlay.snapshots.Snapshotter` protocol,
so the same code runs against an ``OverlaySnapshotter`` in-process, our
daemon over its socket, and containerd's snapshots service.  Keys carry a
random token so rounds (and reruns) never collide.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.config import Benchmark
from bench.trees import scale, scaled
from overlay.mount import Mount
from overlay.snapshots import Info, Snapshotter

__all__ = [
    "CYCLE_OPS",
    "count",
    "cycle",
    "fresh_keys",
    "listdir_count",
    "populate",
    "record_op_rate",
    "remove_all",
    "upper_dir",
    "walk_count",
]

#: One cycle of the issue 4 workload, in order.
CYCLE_OPS = ("prepare", "commit", "stat", "remove")


def count(nominal: int = 1_000) -> int:
    """``nominal`` operations (snapshots, cycles) times ``BENCH_SCALE``, at least 1."""
    return scaled(nominal, scale())


def fresh_keys(prefix: str, n: int) -> list[str]:
    token = secrets.token_hex(4)
    return [f"{prefix}-{token}-{i:05d}" for i in range(n)]


def cycle(sn: Snapshotter, keys: Sequence[str]) -> dict[str, float]:
    """prepare → commit → stat → remove for each key; seconds spent per operation."""
    clock = time.perf_counter
    prepare = commit = stat = remove = 0.0
    for key in keys:
        name = key + "@"
        t0 = clock()
        sn.prepare(key)
        t1 = clock()
        sn.commit(name, key)
        t2 = clock()
        sn.stat(name)
        t3 = clock()
        sn.remove(name)
        t4 = clock()
        prepare += t1 - t0
        commit += t2 - t1
        stat += t3 - t2
        remove += t4 - t3
    return {"prepare": prepare, "commit": commit, "stat": stat, "remove": remove}


def populate(sn: Snapshotter, prefix: str, n: int, parent: str = "") -> list[str]:
    """``n`` committed snapshots (empty layers); their names."""
    names = []
    for key in fresh_keys(prefix, n):
        sn.prepare(key, parent)
        sn.commit(key + "@", key)
        names.append(key + "@")
    return names


def remove_all(sn: Snapshotter, names: Sequence[str]) -> None:
    """Remove ``names``, children first (reverse creation order)."""
    for name in reversed(names):
        sn.remove(name)


def walk_count(sn: Snapshotter) -> int:
    seen = 0

    def fn(info: Info) -> None:
        nonlocal seen
        seen += 1

    sn.walk(fn)
    return seen


def upper_dir(mounts: Sequence[Mount]) -> Path:
    """The writable layer of an active snapshot, from its mounts: the source
    of a bind mount (no parent), else the overlay's ``upperdir``."""
    for m in mounts:
        if m.type == "bind":
            return Path(m.source)
        for option in m.options:
            key, _, value = option.partition("=")
            if key == "upperdir":
                return Path(value)
    raise ValueError(f"no writable layer in {mounts}")


def record_op_rate(benchmark: Benchmark, ops: int, **info: Any) -> None:
    """Operations per round and ops/s at the median, in ``extra_info``."""
    benchmark.extra_info.update(ops=ops, **info)
    if benchmark.stats:
        median = float(benchmark.stats.stats.median)
        benchmark.extra_info["median_s"] = median
        if median > 0:
            benchmark.extra_info["ops_per_s"] = ops / median


def listdir_count(path: Path) -> int:
    try:
        return len(os.listdir(path))
    except FileNotFoundError:
        return 0
