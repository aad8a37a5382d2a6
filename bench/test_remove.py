"""Removal: native unlink (1 and N threads) vs ``rm -rf`` vs ``shutil.rmtree``.

Every round removes a tree built (untimed) in the round's setup, identical
for every contender; each (tree, filesystem) is one pytest-benchmark group.
Measured, never asserted: only that the tree is gone afterwards.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.config import THREADS, Benchmark, Filesystem, filesystems, rounds
from bench.support import record_rates, tree_info
from bench.trees import TREES, TreeStats, build, scale
from overlay import _native


@dataclass(frozen=True, slots=True)
class Contender:
    id: str
    label: str
    threads: int | None
    #: Removes the tree; returns the entries it reports removing, if it tells.
    remove: Callable[[Path], int | None]


def _native_remover(threads: int) -> Callable[[Path], int | None]:
    def remove(path: Path) -> int | None:
        result = _native.remove_tree(path, threads=threads)
        if result.errors:
            pytest.fail(f"remove_tree({path}, threads={threads}) failed: {result.errors[:5]}")
        return result.entries

    return remove


def _rm_rf(path: Path) -> int | None:
    subprocess.run(["rm", "-rf", "--", os.fspath(path)], check=True)
    return None


def _rmtree(path: Path) -> int | None:
    shutil.rmtree(path)
    return None


CONTENDERS: tuple[Contender, ...] = (
    *(Contender(f"native{t}", f"native x{t}", t, _native_remover(t)) for t in THREADS),
    Contender("rm-rf", "rm -rf", None, _rm_rf),
    Contender("rmtree", "shutil.rmtree", None, _rmtree),
)

CASES = [
    pytest.param(fs, tree, c, id=f"{fs}-{tree}-{c.id}")
    for fs in filesystems()
    for tree in TREES
    for c in CONTENDERS
]


@pytest.mark.parametrize(("fs", "tree", "contender"), CASES, indirect=["fs"])
def test_remove(
    benchmark: Benchmark, fs: Filesystem, workdir: Path, tree: str, contender: Contender
) -> None:
    built: list[TreeStats] = []
    reported: list[int] = []
    targets: list[Path] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        # A new random name every round: ext4 picks a top directory's block
        # group from a hash of its name alone (see trees.mark_topdir).
        target = workdir / f"tree-{len(targets)}-{secrets.token_hex(4)}"
        targets.append(target)
        built.append(build(tree, target))
        # Write back what building dirtied, so the removal does not pay for it.
        _native.syncfs(workdir)
        return (target,), {}

    def run(path: Path) -> None:
        entries = contender.remove(path)
        if entries is not None:
            reported.append(entries)

    def check_gone(path: Path) -> None:
        if os.path.lexists(path):
            pytest.fail(f"{contender.label} did not remove {path}")

    n = rounds()
    benchmark.group = f"remove: {tree} on {fs.name}"
    benchmark.extra_info.update(
        kind="remove", tree=tree, fs=fs.name, contender=contender.label,
        threads=contender.threads, scale=scale(), rounds=n, description=TREES[tree].description,
    )
    benchmark.pedantic(run, setup=setup, teardown=check_gone, rounds=n, iterations=1)
    for target in targets:  # teardown does not run under --benchmark-disable
        check_gone(target)

    stats = built[0]
    benchmark.extra_info.update(tree_info(stats))
    if any(r != stats.names for r in reported):
        benchmark.extra_info["reported_entries"] = sorted(set(reported))
    record_rates(benchmark, stats.names, stats.nondirs)
