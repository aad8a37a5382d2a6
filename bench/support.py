"""Helpers shared by the benchmark modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.config import Benchmark, Filesystem
from bench.trees import TreeStats


def filesystem(request: pytest.FixtureRequest, name: str) -> Filesystem:
    """The session fixture ``name`` (``rootfs``, ``tmpfs``, ``ext4``) as a Filesystem."""
    path = request.getfixturevalue(name)
    assert isinstance(path, Path)
    return Filesystem(name, path)


def tree_info(stats: TreeStats) -> dict[str, Any]:
    return {
        "entries": stats.names,
        "files": stats.nondirs,
        "dirs": stats.dirs,
        "inodes": stats.inodes,
    }


def record_rates(benchmark: Benchmark, entries: int, files: int) -> None:
    """entries/s and files/s at the median, in ``extra_info`` (not when disabled)."""
    if benchmark.stats:
        median = float(benchmark.stats.stats.median)
        benchmark.extra_info["median_s"] = median
        if median > 0:
            benchmark.extra_info["entries_per_s"] = entries / median
            benchmark.extra_info["files_per_s"] = files / median
