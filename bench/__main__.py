"""``python -m bench``: run the benchmarks side by side, then print the ratios.

    python -m bench [--json FILE] [--plots DIR] [--report FILE] [pytest arguments...]

Runs ``pytest bench --benchmark-json=FILE`` (other arguments pass through to
pytest, e.g. ``-k tmpfs``), then prints one table per group: each
contender's median time, files/s, and its speed relative to ``rm -rf`` and
``shutil.rmtree`` (usage: to ``du``), with issue 2's goals beside them; then
the snapshotter and daemon tables of issues 3 and 4 (``bench.tables``:
remove latency vs snapshot size, operation rates, mount depth, in-process vs
daemon vs containerd), with their goals.  The goals are reported, never
asserted.  Plots (issue 2's kinds) are written only
when matplotlib is importable.  ``--report FILE`` prints the tables of an earlier run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import tables
from bench.config import FILESYSTEMS, GOALS, Goal
from bench.text import duration as _time
from bench.text import rate as _rate
from bench.text import ratio as _ratio
from bench.text import table as _table
from bench.trees import TREES

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
KINDS = ("remove", "usage")
#: What each kind's contenders are compared with, in column order.
REFERENCES = {"remove": ("rm -rf", "shutil.rmtree"), "usage": ("du",)}
RATE_LABEL = {"remove": "files/s", "usage": "inodes/s"}


@dataclass(frozen=True, slots=True)
class Row:
    contender: str
    threads: int | None
    median: float
    rounds: int
    info: dict[str, Any]

    @property
    def native(self) -> bool:
        return self.threads is not None

    def rate(self, kind: str) -> float | None:
        count = self.info.get("files" if kind == "remove" else "inodes")
        if not isinstance(count, int) or self.median <= 0:
            return None
        return count / self.median


@dataclass(slots=True)
class Group:
    kind: str
    tree: str
    fs: str
    rows: list[Row] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.kind}: {self.tree} on {self.fs}"

    def median_of(self, contender: str) -> float | None:
        for row in self.rows:
            if row.contender == contender:
                return row.median
        return None

    def goals(self) -> list[Goal]:
        return [g for g in GOALS
                if g.kind == self.kind and self.tree in g.trees and self.fs in g.filesystems]


def _order(items: Sequence[str], value: str) -> int:
    return items.index(value) if value in items else len(items)


def machine(path: Path) -> str:
    info = json.loads(path.read_text()).get("machine_info", {})
    load = info.get("loadavg")
    parts = [f"{info.get('cpu_count', '?')} CPUs", f"kernel {info.get('kernel', '?')}",
             f"python {info.get('python_version', '?')}"]
    if isinstance(load, list) and len(load) == 3:
        parts.append("load average at the end {:.2f} / {:.2f} / {:.2f} (1/5/15 min)".format(*load))
    return "machine: " + ", ".join(parts)


def load(path: Path) -> list[Group]:
    """The groups of a ``--benchmark-json`` file, in a stable order."""
    data = json.loads(path.read_text())
    groups: dict[tuple[str, str, str], Group] = {}
    for bench in data.get("benchmarks", []):
        info: dict[str, Any] = dict(bench.get("extra_info", {}))
        kind, tree, fs = info.get("kind"), info.get("tree"), info.get("fs")
        if not (isinstance(kind, str) and isinstance(tree, str) and isinstance(fs, str)):
            continue
        group = groups.setdefault((kind, tree, fs), Group(kind, tree, fs))
        stats = bench["stats"]
        group.rows.append(Row(
            contender=str(info.get("contender", bench["name"])),
            threads=info.get("threads"),
            median=float(stats["median"]),
            rounds=int(stats["rounds"]),
            info=info,
        ))
    ordered = sorted(groups.values(), key=lambda g: (
        _order(KINDS, g.kind), _order(list(TREES), g.tree), _order(list(FILESYSTEMS), g.fs)))
    for g in ordered:
        g.rows.sort(key=lambda r: (not r.native, r.threads or 0, r.contender))
    return ordered


def render(group: Group) -> str:
    refs = REFERENCES.get(group.kind, ())
    goals = group.goals()
    first = group.rows[0].info if group.rows else {}
    sizes = ", ".join(
        f"{first[k]:,} {k}" for k in ("entries", "files", "dirs", "inodes")
        if isinstance(first.get(k), int)
    )
    lines = [f"== {group.title} ==",
             f"   {first.get('description', '')} ({sizes}; scale {first.get('scale')}, "
             f"{first.get('rounds')} rounds, median of them)"]
    if goals:
        wanted = ", ".join(f">= {g.ratio:g}x {g.versus}" for g in goals)
        lines.append(f"   goal (issue 2, not asserted): native {wanted}")
    header = ["contender", "median", RATE_LABEL.get(group.kind, "/s"), *(f"vs {r}" for r in refs)]
    if group.kind == "usage":
        header.append("= du")
    if goals:
        header.append("goal")
    body: list[list[str]] = []
    for row in group.rows:
        cells = [row.contender, _time(row.median), _rate(row.rate(group.kind))]
        for ref in refs:
            ratio = _ratio(group.median_of(ref), row.median)
            cells.append("-" if ratio is None else f"{ratio:.2f}x")
        if group.kind == "usage":
            same = row.info.get("matches_du")
            cells.append("yes" if same is True else "NO" if same is False else "?")
        if not goals:
            body.append(cells)
            continue
        note = ""
        if row.native:
            missed = []
            for g in goals:
                ratio = _ratio(group.median_of(g.versus), row.median)
                if ratio is None:
                    missed.append(f"no {g.versus} to compare")
                elif ratio < g.ratio:
                    missed.append(f"{ratio:.2f}x < {g.ratio:g}x {g.versus}")
            note = "met" if not missed else "missed: " + ", ".join(missed)
        cells.append(note)
        body.append(cells)
    lines.append(_table(header, body, note=bool(goals)))
    mismatched = [r for r in group.rows if r.info.get("matches_du") is False]
    for r in mismatched:
        lines.append(f"   {r.contender}: {r.info.get('bytes')} bytes, "
                     f"{r.info.get('walk_inodes', '?')} inodes; du: {r.info.get('du_bytes')} "
                     f"bytes, {r.info.get('du_inodes')} inodes")
    for r in group.rows:
        if "reported_entries" in r.info:
            lines.append(f"   {r.contender} reported {r.info['reported_entries']} entries removed,"
                         f" the tree had {r.info.get('entries')}")
    return "\n".join(lines)


def report(groups: Sequence[Group]) -> str:
    return "\n\n".join(render(g) for g in groups)


def plot(groups: Sequence[Group], directory: Path) -> list[Path]:
    """One bar chart per kind (rates per contender, per group), if matplotlib is there."""
    if importlib.util.find_spec("matplotlib") is None:
        return []
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    written = []
    directory.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        chosen = [g for g in groups if g.kind == kind and g.rows]
        if not chosen:
            continue
        fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 1.2 + 1.1 * len(chosen) * 1.6),
                                 squeeze=False)
        for ax, g in zip(axes[:, 0], chosen, strict=True):
            labels = [r.contender for r in g.rows]
            rates = [r.rate(kind) or 0.0 for r in g.rows]
            ax.barh(labels, rates, color=["C0" if r.native else "C7" for r in g.rows])
            ax.invert_yaxis()
            ax.set_title(g.title, fontsize=9)
            ax.tick_params(labelsize=8)
        axes[-1, 0].set_xlabel(RATE_LABEL[kind])
        fig.tight_layout()
        out = directory / f"{kind}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", allow_abbrev=False,
        description="Run the benchmarks side by side and print ratios; "
                    "unknown arguments go to pytest.",
    )
    parser.add_argument("--json", type=Path, default=Path(".benchmarks/bench.json"),
                        help="where pytest-benchmark writes its results (%(default)s)")
    parser.add_argument("--plots", type=Path, default=Path(".benchmarks"),
                        help="directory for plots, written if matplotlib is importable "
                             "(%(default)s)")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="only print the tables of an earlier --benchmark-json file")
    args, pytest_args = parser.parse_known_args(argv)

    code = 0
    if args.report is not None:
        results = args.report
    else:
        results = args.json.resolve()
        results.parent.mkdir(parents=True, exist_ok=True)
        results.unlink(missing_ok=True)  # never report a stale run
        command = [sys.executable, "-m", "pytest", str(BENCH_DIR),
                   f"--benchmark-json={results}",
                   "--benchmark-columns=min,median,max,rounds", *pytest_args]
        code = subprocess.run(command, cwd=ROOT, check=False).returncode
    if not results.is_file():
        print(f"no results in {results} (pytest exited with {code})", file=sys.stderr)
        return code or 1
    groups = load(results)
    entries = tables.load(results)
    if not groups and not entries:
        print(f"{results} holds no timed benchmarks (--benchmark-disable?)", file=sys.stderr)
        return code
    print()
    print(machine(results))
    print()
    print("\n\n".join(text for text in (report(groups), tables.report(entries)) if text))
    for path in plot(groups, args.plots):
        print(f"plot: {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
