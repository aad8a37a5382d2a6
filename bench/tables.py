"""Report tables of the snapshotter and daemon benchmarks (issues 3, 4 and 8).

Read from a ``--benchmark-json`` file by ``python -m bench``, next to issue
2's removal and usage tables:

* ``snapshot-remove``: per filesystem, each contender's median remove time
  per snapshot size, how it grows from the smallest to the largest, issue
  3's goal for ours, and how many times faster ours is than each naive one;
* ``snapshot-ops``: in-process ops/s of prepare, commit, remove, stat, walk;
* ``mount``: per filesystem, mount + unmount time per stack depth for each
  strategy and snapshot kind, LEGACY's speed relative to NEW_API, and what
  a strategy could not mount;
* ``daemon``: per workload and filesystem, ops/s in-process, through our
  daemon, through the Go proxy (containerd's overlay snapshotter served by
  grpc-go), and through containerd (built-in overlayfs vs our proxy vs the
  Go proxy), with ratios and the goals of issues 4 and 8.

Goals are reported, never asserted.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import (
    FILESYSTEMS,
    GO_CONTAINERD_GOAL,
    GO_DIRECT_GOALS,
    PROXY_GOAL,
    REMOVE_FLAT_GOAL,
    REMOVE_LATENCY_GOAL,
)
from bench.text import duration, rate, ratio, table

__all__ = ["Entry", "load", "report"]

KINDS = ("snapshot-remove", "snapshot-ops", "mount", "daemon")
SIZES = ("1", "1k", "100k")
OPS = ("prepare", "commit", "remove", "stat", "walk")
CYCLE_OPS = ("prepare", "commit", "stat", "remove")
STRATEGIES = ("new-api", "legacy")
SNAPSHOT_KINDS = ("view", "active")
DAEMON_ORDER = ("inproc", "daemon", "goproxy", "goproxy-docs", "ctd-overlayfs", "ctd-ovl",
                "ctd-goproxy")
BUILTIN, PROXY = "ctd-overlayfs", "ctd-ovl"
DAEMON, GO, GO_DOCS, CTD_GO = "daemon", "goproxy", "goproxy-docs", "ctd-goproxy"


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str
    median: float
    rounds: int
    info: dict[str, Any]

    def get(self, key: str) -> Any:
        return self.info.get(key)


def load(path: Path) -> list[Entry]:
    """The benchmarks of a ``--benchmark-json`` file that these tables report."""
    data = json.loads(path.read_text())
    out = []
    for bench in data.get("benchmarks", []):
        info: dict[str, Any] = dict(bench.get("extra_info", {}))
        if info.get("kind") in KINDS:
            stats = bench["stats"]
            out.append(Entry(str(info["kind"]), float(stats["median"]), int(stats["rounds"]),
                             info))
    return out


def _fs_order(entries: Sequence[Entry]) -> list[str]:
    names = {str(e.get("fs")) for e in entries}
    return sorted(names, key=lambda n: (list(FILESYSTEMS).index(n) if n in FILESYSTEMS
                                        else len(FILESYSTEMS), n))


def _head(title: str, first: Entry, extra: str = "") -> list[str]:
    return [f"== {title} ==",
            f"   {first.get('description')}{extra} (scale {first.get('scale')}, "
            f"{first.get('rounds')} rounds, median of them)"]


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ------------------------------------------------------------------- remove


def _remove(entries: Sequence[Entry], fs: str) -> str | None:
    mine = [e for e in entries if e.kind == "snapshot-remove" and e.get("fs") == fs]
    if not mine:
        return None
    sizes = [s for s in SIZES if any(e.get("size") == s for e in mine)]
    contenders: list[str] = []
    for e in mine:
        if e.get("contender") not in contenders:
            contenders.append(str(e.get("contender")))
    roles = {str(e.get("contender")): str(e.get("role")) for e in mine}
    order = ("ours", "naive", "cleanup", "floor")
    contenders.sort(key=lambda c: order.index(roles[c]) if roles[c] in order else len(order))

    def median(contender: str, size: str) -> float | None:
        for e in mine:
            if e.get("contender") == contender and e.get("size") == size:
                return e.median
        return None

    def files(size: str) -> str:
        n = next((e.get("files") for e in mine if e.get("size") == size), None)
        return f"{n:,} file{'s' if n != 1 else ''}" if isinstance(n, int) else size

    lines = _head(f"snapshot remove vs snapshot size on {fs}", mine[0])
    lines.append(f"   goal (issue 3, not asserted): ours flat across sizes (largest within "
                 f"{REMOVE_FLAT_GOAL:g}x of the 1-file remove) and every remove under "
                 f"{duration(REMOVE_LATENCY_GOAL)}")
    small, large = sizes[0], sizes[-1]
    header = ["contender", *(files(s) for s in sizes), f"{large} / {small}", "goal"]
    body = []
    ours = next((c for c in contenders if roles[c] == "ours"), None)
    for c in contenders:
        medians = [median(c, s) for s in sizes]
        growth = ratio(medians[-1], medians[0])  # large / small
        note = ""
        if roles[c] == "ours":
            missed = []
            if growth is None or growth > REMOVE_FLAT_GOAL:
                missed.append(f"{large} is {_x(growth)} the 1-file remove")
            slowest = max((m for m in medians if m is not None), default=None)
            if slowest is None or slowest >= REMOVE_LATENCY_GOAL:
                missed.append(f"slowest {duration(slowest) if slowest else '-'} "
                              f">= {duration(REMOVE_LATENCY_GOAL)}")
            note = "met" if not missed else "missed: " + ", ".join(missed)
        body.append([c, *("-" if m is None else duration(m) for m in medians), _x(growth), note])
    lines.append(table(header, body, note=True))
    if ours is not None:
        lines.append(f"   ours vs the others: how many times faster ours is (their median / "
                     f"ours), {' / '.join(files(s) for s in sizes)}:")
        for c in contenders:
            if c == ours:
                continue
            cells = [_x(ratio(median(c, s), median(ours, s))) for s in sizes]
            lines.append(f"     {c}: {' / '.join(cells)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- ops


def _ops(entries: Sequence[Entry]) -> str | None:
    mine = [e for e in entries if e.kind == "snapshot-ops"]
    if not mine:
        return None
    filesystems = _fs_order(mine)
    n = mine[0].get("snapshots")
    lines = [f"== snapshot operations in-process, {n:,} per round ==",
             f"   {mine[0].get('description')} (scale {mine[0].get('scale')}, "
             f"{mine[0].get('rounds')} rounds, median of them); walk: snapshots walked/s"]
    header = ["op"]
    for fs in filesystems:
        header += [f"{fs} median", f"{fs} ops/s", f"{fs} per op"]
    if len(filesystems) == 2:
        header.append(f"{filesystems[1]} vs {filesystems[0]}")
    body = []
    for op in OPS:
        row = [op]
        medians = []
        for fs in filesystems:
            e = next((e for e in mine if e.get("op") == op and e.get("fs") == fs), None)
            medians.append(e.median if e else None)
            ops = e.get("ops") if e else None
            if e is None or not isinstance(ops, int) or e.median <= 0:
                row += ["-", "-", "-"]
                continue
            row += [duration(e.median), rate(ops / e.median), duration(e.median / ops)]
        if len(filesystems) == 2:
            row.append(_x(ratio(medians[0], medians[1])))
        if len(row) > 1:
            body.append(row)
    lines.append(table(header, body, note=False))
    return "\n".join(lines)


# -------------------------------------------------------------------- mount


def _mount(entries: Sequence[Entry], fs: str) -> str | None:
    mine = [e for e in entries if e.kind == "mount" and e.get("fs") == fs]
    if not mine:
        return None
    depths = sorted({int(e.get("layers")) for e in mine})

    def find(snapshot: str, strategy: str, depth: int) -> Entry | None:
        for e in mine:
            if (e.get("snapshot"), e.get("strategy"), e.get("layers")) == (
                    snapshot, strategy, depth):
                return e
        return None

    def cell(e: Entry | None) -> str:
        if e is None:
            return "-"
        return "cannot" if e.get("refused") else duration(e.median)

    def median(e: Entry | None) -> float | None:
        return None if e is None or e.get("refused") else e.median

    lines = [f"== mount + unmount of a layer stack on {fs} ==",
             f"   mount_all + unmount of a view / an active snapshot over N committed layers "
             f"(scale {mine[0].get('scale')}, {mine[0].get('rounds')} rounds, median of them)"]
    header = ["contender", *(f"{d} layer{'s' if d != 1 else ''}" for d in depths),
              f"{depths[-1]} / {depths[0]}"]
    body = []
    for snapshot in SNAPSHOT_KINDS:
        for strategy in STRATEGIES:
            row = [find(snapshot, strategy, d) for d in depths]
            if all(e is None for e in row):
                continue
            growth = ratio(median(row[-1]), median(row[0]))
            body.append([f"{strategy} {snapshot}", *(cell(e) for e in row), _x(growth)])
    lines.append(table(header, body, note=False))
    lines.append("   legacy's speed vs new-api (new-api median / legacy median), "
                 + " / ".join(str(d) for d in depths) + " layers:")
    for snapshot in SNAPSHOT_KINDS:
        cells = [_x(ratio(median(find(snapshot, "new-api", d)),
                          median(find(snapshot, "legacy", d)))) for d in depths]
        lines.append(f"     {snapshot}: {' / '.join(cells)}")
    one = find("view", "new-api", 1)
    if one is not None and one.get("mount_type") == "bind":
        lines.append("   a view of 1 layer is a read-only bind mount: no overlay, "
                     "the same for both strategies")
    for snapshot in SNAPSHOT_KINDS:
        e = find(snapshot, "legacy", depths[-1])
        sizes = e.get("option_bytes") if e is not None else None
        if isinstance(sizes, dict):
            absolute, relative, limit = (int(sizes.get(k, 0))
                                         for k in ("absolute", "relative", "limit"))
            verdict = ("fits as is" if absolute <= limit else
                       "fits only with relative paths (short snapshot ids)"
                       if relative <= limit else "does not fit")
            lines.append(
                f"   legacy {snapshot} over {depths[-1]} layers: mount(2) options of "
                f"{absolute:,} bytes with absolute paths, {relative:,} relative to "
                f"their common parent; a page holds {limit:,}: {verdict}")
    for e in mine:
        if e.get("refused"):
            lines.append(f"   cannot: {e.get('strategy')} {e.get('snapshot')} over "
                         f"{e.get('layers')} layers: {e.get('refused')}")
    return "\n".join(lines)


# ------------------------------------------------------------------- daemon


def _op_rate(e: Entry, op: str) -> float | None:
    seconds = e.get("op_seconds")
    n = e.get("snapshots")
    if not isinstance(seconds, dict) or not isinstance(n, int) or not seconds.get(op):
        return None
    median = statistics.median(seconds[op])
    return n / median if median > 0 else None


def _cpu_cell(e: Entry) -> str:
    """"client 700 us + containerd 980 us = 1.68 ms" for one contender."""
    rounds = e.get("cpu_seconds")
    n = e.get("snapshots")
    if not isinstance(rounds, dict) or not isinstance(n, int) or n <= 0:
        return ""
    per = {name: statistics.median(values) / n for name, values in rounds.items() if values}
    if not per:
        return ""
    parts = [f"{name} {duration(v)}" for name, v in per.items()]
    return " + ".join(parts) + f" = {duration(sum(per.values()))}"


def _goals(checks: Sequence[tuple[str, float | None, float]]) -> str:
    """"met", or what was missed, over (versus, speed ratio, goal) triples."""
    missed = [f"no {versus} to compare" if r is None else f"{r:.2f}x < {goal:g}x {versus}"
              for versus, r, goal in checks if r is None or r < goal]
    return "met" if not missed else "missed: " + ", ".join(missed)


def _daemon(entries: Sequence[Entry], workload: str, fs: str) -> str | None:
    mine = [e for e in entries
            if e.kind == "daemon" and e.get("workload") == workload and e.get("fs") == fs]
    if not mine:
        return None
    mine.sort(key=lambda e: DAEMON_ORDER.index(e.get("contender_id"))
              if e.get("contender_id") in DAEMON_ORDER else len(DAEMON_ORDER))
    by_id = {e.get("contender_id"): e for e in mine}
    inproc, builtin = by_id.get("inproc"), by_id.get(BUILTIN)
    go_direct, go_ctd = by_id.get(GO), by_id.get(CTD_GO)
    direct_goal = GO_DIRECT_GOALS.get(workload, 1.0)

    def speed(reference: Entry | None, e: Entry | None) -> float | None:
        return ratio(reference.median if reference else None, e.median if e else None)

    title = ("prepare -> commit -> stat -> remove cycles" if workload == "cycle"
             else "walk over committed snapshots")
    lines = _head(f"daemon: {title} on {fs}", mine[0])
    lines.append(f"   goals (not asserted): issue 4, through containerd, our proxy >= "
                 f"{PROXY_GOAL:g}x the built-in overlayfs; issue 8, our daemon >= "
                 f"{direct_goal:g}x the Go proxy directly, and through containerd our proxy "
                 f">= {GO_CONTAINERD_GOAL:g}x the Go proxy")
    header = ["contender", "median"]
    if workload == "cycle":
        header += ["cycles/s", "ops/s", *(f"{op}/s" for op in CYCLE_OPS)]
    else:
        header += ["snapshots/s"]
    header += ["vs in-process", "vs ctd overlayfs", "goal"]
    body = []
    for e in mine:
        n = e.get("snapshots")
        per_s = n / e.median if isinstance(n, int) and e.median > 0 else None
        row = [str(e.get("contender")), duration(e.median)]
        if workload == "cycle":
            row += [rate(per_s), rate(per_s * len(CYCLE_OPS) if per_s else None),
                    *(rate(_op_rate(e, op)) for op in CYCLE_OPS)]
        else:
            row += [rate(per_s)]
        row += [_x(speed(inproc, e)), _x(speed(builtin, e))]
        note = ""
        if e.get("contender_id") == PROXY:
            checks = [("ctd overlayfs", speed(builtin, e), PROXY_GOAL)]
            if go_ctd is not None:
                checks.append(("ctd Go proxy", speed(go_ctd, e), GO_CONTAINERD_GOAL))
            note = _goals(checks)
        elif e.get("contender_id") == DAEMON and go_direct is not None:
            note = _goals([("Go proxy", speed(go_direct, e), direct_goal)])
        body.append([*row, note])
    lines.append(table(header, body, note=True))
    proxy = by_id.get(PROXY)
    pairs = [("our proxy vs the built-in overlayfs, through containerd", proxy, builtin),
             ("our daemon vs the Go proxy, directly", by_id.get(DAEMON), go_direct),
             ("our daemon vs the Go proxy as PLUGINS.md writes it (Remove deletes), directly",
              by_id.get(DAEMON), by_id.get(GO_DOCS)),
             ("our proxy vs the Go proxy, through containerd", proxy, go_ctd)]
    for what, ours, theirs in pairs:
        if ours is None or theirs is None:
            continue
        line = f"   {what}: {_x(speed(theirs, ours))}"
        if workload == "cycle":
            line += "; per operation: " + ", ".join(
                f"{op} {_x(ratio(_op_rate(ours, op), _op_rate(theirs, op)))}"
                for op in CYCLE_OPS)
        lines.append(line)
    if workload == "walk":
        lines.append("   through containerd, List reads containerd's own metadata, then "
                     "asks the snapshotter for one Stat per snapshot (through a proxy: one "
                     "gRPC call each)")
        odd = [f"{e.get('contender')} saw {e.get('walked')}" for e in mine
               if e.get("walked") != e.get("snapshots")]
        if odd:
            lines.append(f"   snapshots walked != {mine[0].get('snapshots')}: "
                         + ", ".join(odd))
    cpu = [_cpu_cell(e) for e in mine]
    if any(cpu):
        unit = "cycle" if workload == "cycle" else "snapshot walked"
        lines.append(f"   CPU per {unit} (median round), by process:")
        lines += [f"     {e.get('contender')}: {c}" for e, c in zip(mine, cpu, strict=True) if c]
    for e in mine:
        if e.get("unsettled_rounds"):
            lines.append(f"   {e.get('contender')}: {e.get('unsettled_rounds')} round(s) "
                         "started before the previous removals were reclaimed")
    return "\n".join(lines)


def report(entries: Sequence[Entry]) -> str:
    sections: list[str | None] = []
    filesystems = _fs_order(entries)
    sections += [_remove(entries, fs) for fs in filesystems]
    sections.append(_ops(entries))
    sections += [_mount(entries, fs) for fs in filesystems]
    sections += [_daemon(entries, w, fs) for w in ("cycle", "walk") for fs in filesystems]
    return "\n\n".join(s for s in sections if s)
