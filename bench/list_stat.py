"""Server CPU of List and Stat: our daemon and the Go proxy side by side (issue 8, item 5).

``python -m bench.list_stat [--snapshots N] [--rounds R] [--labels K]``
starts both servers (``ovl serve`` and containerd 1.6's overlay snapshotter
over grpc-go, as :mod:`bench.services` does), gives each ``N`` committed
snapshots (``K`` labels each, as containerd's inherited labels look), then
runs ``R`` rounds alternating between the two, each round a batch of Lists
and a batch of Stats through the same Python client.  Per round it reads
the server's CPU time (every thread, ``/proc/<pid>/task/*/schedstat``) and
the client's wall clock; it prints the medians and the ratios (> 1: ours
costs less).  ``--baseline SOURCE`` adds a third contender, the daemon run
from another source tree (``git archive main | tar -x -C SOURCE``, with the
built ``overlay/_ovl*.so`` copied in): before and after in one run.
Measured, never asserted: the machine may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.services import cpu_seconds, go_proxy, ovl_daemon
from bench.workloads import walk_count
from overlay.client import RemoteSnapshotter
from overlay.snapshots import Info
from tests.helpers import wait_for_socket
from tests.integration.containerd_env import _stop


def _labels(i: int, count: int) -> dict[str, str] | None:
    if not count:
        return None
    # what containerd passes down to a proxy: inherited labels, a digest-sized value
    return {f"containerd.io/snapshot/bench.{j}": f"sha256:{i:064x}" for j in range(count)}


def _populate(sn: RemoteSnapshotter, n: int, labels: int) -> list[str]:
    names = []
    for i in range(n):
        key = f"bench/{i}/sha256:{i:064x}"
        sn.prepare(key, "", _labels(i, labels))
        sn.commit(key + "@", key, _labels(i, labels))
        names.append(key + "@")
    return names


def _measure(pid: int, op: Callable[[], object], times: int) -> tuple[float, float, float]:
    """(server CPU, client CPU, client wall) seconds per call of ``op``."""
    me = os.getpid()
    cpu0, mine0, t0 = cpu_seconds(pid), cpu_seconds(me), time.perf_counter()
    for _ in range(times):
        op()
    wall, cpu, mine = (time.perf_counter() - t0, cpu_seconds(pid) - cpu0,
                       cpu_seconds(me) - mine0)
    return cpu / times, mine / times, wall / times


@contextlib.contextmanager
def _baseline(workdir: Path, source: Path, sock: Path) -> Iterator[int]:
    """``ovl serve`` run from another source tree on ``sock``; its pid."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    with open(workdir / "daemon.log", "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "overlay.cli", "serve", "--root", str(workdir / "root"),
             "--address", str(sock), "--log-level", "info"],
            cwd=source, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_socket(sock, process, "ovl serve (baseline)")
        yield process.pid
    finally:
        _stop(process, timeout=60)


@contextlib.contextmanager
def _contenders(workdir: Path, baseline: Path | None
                ) -> Iterator[dict[str, tuple[int, RemoteSnapshotter]]]:
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[int, Path]] = {}
        for name in ("ovl", "go"):
            (workdir / name).mkdir()
        ours = stack.enter_context(ovl_daemon(workdir / "ovl"))
        servers["ovl"] = ours.process.pid, ours.sock
        go = stack.enter_context(go_proxy(workdir / "go"))
        servers["go"] = go.process.pid, go.sock
        if baseline is not None:
            (workdir / "base").mkdir()
            # the socket in a short directory: sun_path holds 107 bytes
            sock = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="ovl-base-", dir="/tmp"))) / "ovl.sock"
            pid = stack.enter_context(_baseline(workdir / "base", baseline.resolve(), sock))
            servers["base"] = pid, sock
        out = {}
        for name, (pid, sock) in servers.items():
            client = stack.enter_context(RemoteSnapshotter(str(sock), timeout=120))
            out[name] = (pid, client)
        yield out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.list_stat", description=__doc__)
    ap.add_argument("--snapshots", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--labels", type=int, default=0)
    ap.add_argument("--lists", type=int, default=10, help="Lists per round")
    ap.add_argument("--stats", type=int, default=500, help="Stats per round")
    ap.add_argument("--dir", default=None, help="work directory (default: a new one in /tmp)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="SOURCE",
                    help="also measure a daemon run from another source tree (before/after)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ovl-liststat-", dir=args.dir) as tmp, \
            _contenders(Path(tmp), args.baseline) as contenders:
        names: dict[str, list[str]] = {}
        for name, (_, client) in contenders.items():
            names[name] = _populate(client, args.snapshots, args.labels)
            assert walk_count(client) == args.snapshots
        results: dict[str, dict[str, list[float]]] = {
            name: {k: [] for k in ("list_cpu", "list_client", "list_wall", "stat_cpu",
                                   "stat_client", "stat_wall")}
            for name in contenders
        }
        for _ in range(args.rounds):
            for name, (pid, client) in contenders.items():
                infos: list[Info] = []

                def list_all(client: RemoteSnapshotter = client,
                             infos: list[Info] = infos) -> None:
                    infos.clear()
                    client.walk(infos.append)

                cpu, mine, wall = _measure(pid, list_all, args.lists)
                assert len(infos) == args.snapshots
                results[name]["list_cpu"].append(cpu / args.snapshots)
                results[name]["list_client"].append(mine / args.snapshots)
                results[name]["list_wall"].append(wall)
                keys = iter(names[name] * (args.stats // len(names[name]) + 1))

                def stat(client: RemoteSnapshotter = client,
                         keys: Iterator[str] = keys) -> None:
                    client.stat(next(keys))

                cpu, mine, wall = _measure(pid, stat, args.stats)
                results[name]["stat_cpu"].append(cpu)
                results[name]["stat_client"].append(mine)
                results[name]["stat_wall"].append(wall)
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    print(f"{args.snapshots} snapshots, {args.labels} labels each, {args.rounds} rounds "
          f"({args.lists} Lists, {args.stats} Stats each); medians")
    base = "base" in med
    head = f"{'':28}{'ovl':>12}{'go':>12}{'go/ovl':>9}"
    print(head + (f"{'baseline':>12}{'base/ovl':>10}" if base else ""))
    rows = (("List: server CPU / snapshot", "list_cpu", 1e6, "us"),
            ("List: client CPU / snapshot", "list_client", 1e6, "us"),
            ("List: client wall / call", "list_wall", 1e3, "ms"),
            ("Stat: server CPU / call", "stat_cpu", 1e6, "us"),
            ("Stat: client CPU / call", "stat_client", 1e6, "us"),
            ("Stat: client wall / call", "stat_wall", 1e6, "us"))
    for label, key, scale, unit in rows:
        ours, go = med["ovl"][key], med["go"][key]
        line = f"{label:28}{ours * scale:>9.2f} {unit}{go * scale:>9.2f} {unit}{go / ours:>8.2f}x"
        if base:
            before = med["base"][key]
            line += f"{before * scale:>9.2f} {unit}{before / ours:>9.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
