"""Usage walk: native ``disk_usage`` (1 and N threads) vs ``du -s --block-size=1``.

One tree per (tree, filesystem), built once per module and walked by every
contender with warm caches.  Before the timing each contender's answer is
compared with ``du``'s; a difference is recorded in ``extra_info``, not
asserted.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.config import THREADS, Benchmark, Filesystem, filesystems, rounds
from bench.support import filesystem, record_rates, tree_info
from bench.trees import TREES, TreeStats, build, mark_topdir, scale
from overlay import _native

USAGE_TREES = ("nested", "rootfs-like")


@dataclass(frozen=True, slots=True)
class Usage:
    inodes: int | None
    bytes: int


@dataclass(frozen=True, slots=True)
class Contender:
    id: str
    label: str
    threads: int | None
    measure: Callable[[Path], Usage]


def _du_bytes(path: Path) -> int:
    out = subprocess.run(
        ["du", "-s", "--block-size=1", os.fspath(path)], check=True, capture_output=True, text=True
    ).stdout
    return int(out.split()[0])


def _du_inodes(path: Path) -> int:
    out = subprocess.run(
        ["du", "-s", "--inodes", os.fspath(path)], check=True, capture_output=True, text=True
    ).stdout
    return int(out.split()[0])


def _du(path: Path) -> Usage:
    return Usage(None, _du_bytes(path))


def _native_walker(threads: int) -> Callable[[Path], Usage]:
    def measure(path: Path) -> Usage:
        result = _native.disk_usage(path, threads=threads)
        return Usage(result.entries, result.bytes)

    return measure


CONTENDERS: tuple[Contender, ...] = (
    *(Contender(f"native{t}", f"native x{t}", t, _native_walker(t)) for t in THREADS),
    Contender("du", "du", None, _du),
)


@dataclass(frozen=True, slots=True)
class UsageTree:
    fs: Filesystem
    tree: str
    path: Path
    stats: TreeStats
    reference: Usage  # du's answer


@pytest.fixture(scope="module")
def usage_tree(request: pytest.FixtureRequest) -> Iterator[UsageTree]:
    fs_name, tree = request.param
    fs = filesystem(request, fs_name)
    work = Path(tempfile.mkdtemp(dir=fs.path, prefix=f"usage-{tree}-"))
    mark_topdir(work)
    try:
        path = work / f"tree-{secrets.token_hex(4)}"  # see trees.mark_topdir
        stats = build(tree, path)
        _native.syncfs(work)
        yield UsageTree(fs, tree, path, stats, Usage(_du_inodes(path), _du_bytes(path)))
    finally:
        _native.remove_tree(work)


TREE_CASES = [
    pytest.param((fs, tree), id=f"{fs}-{tree}") for fs in filesystems() for tree in USAGE_TREES
]


@pytest.mark.parametrize("contender", CONTENDERS, ids=[c.id for c in CONTENDERS])
@pytest.mark.parametrize("usage_tree", TREE_CASES, indirect=True)
def test_usage(benchmark: Benchmark, usage_tree: UsageTree, contender: Contender) -> None:
    t = usage_tree
    # Once outside the timing: the answer, checked against du's.
    first = contender.measure(t.path)
    info: dict[str, Any] = {
        "bytes": first.bytes,
        "du_bytes": t.reference.bytes,
        "du_inodes": t.reference.inodes,
        "matches_du": first.bytes == t.reference.bytes
        and first.inodes in (None, t.reference.inodes),
    }
    if first.inodes is not None:
        info["walk_inodes"] = first.inodes

    n = rounds()
    benchmark.group = f"usage: {t.tree} on {t.fs.name}"
    benchmark.extra_info.update(
        kind="usage", tree=t.tree, fs=t.fs.name, contender=contender.label,
        threads=contender.threads, scale=scale(), rounds=n,
        description=TREES[t.tree].description, **info,
    )
    benchmark.pedantic(contender.measure, args=(t.path,), rounds=n, iterations=1)
    benchmark.extra_info.update(tree_info(t.stats))
    record_rates(benchmark, t.stats.inodes, t.stats.inodes)
