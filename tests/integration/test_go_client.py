"""A client we did not write: containerd 1.6's Go proxy snapshotter over grpc-go 1.33.

``go/snapclient`` (built offline from Debian's Go packages by
``tests.integration.gobuild``) dials the socket the way grpc-go users do (the
bare path as target and ``:authority``, a unix context dialer), wraps the
connection in ``snapshots/proxy`` and drives all ten Snapshots RPCs through
containerd's ``snapshots.Snapshotter`` interface, classifying errors with
``errdefs``.  It runs against ``ovl serve`` (our daemon as deployed) and
against containerd's own overlay snapshotter served by ``go/overlayproxy``,
so every check it makes is containerd's behaviour, not only ours.  Then our
own client must see the state the program left.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from overlay.client import RemoteSnapshotter
from overlay.snapshots import Info
from tests.helpers import wait_for_socket
from tests.integration.gobuild import GO_DIR, build, go, require_go
from tests.integration.test_daemon import daemon, stop

__all__ = ["daemon"]  # a fixture reused from test_daemon

RPCS = {"Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
        "Cleanup"}
#: what the scenario leaves: base <- mid <- final
LEFT = ["base", "final", "mid"]
RUN_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class Target:
    root: Path
    sock: Path
    flags: tuple[str, ...]


@pytest.fixture(scope="module")
def snapclient() -> Path:
    require_go()
    return build("snapclient")


@pytest.fixture
def overlayproxy(tmpfs: Path, sockdir: Path) -> Iterator[tuple[Path, Path]]:
    """containerd 1.6's overlay snapshotter served by go/overlayproxy on a
    tmpfs root; stopped (SIGTERM, exit status 0) at the end."""
    require_go()
    binary = build("overlayproxy")
    root, sock = tmpfs / "go-root", sockdir / "go.sock"
    proc = subprocess.Popen([binary, "-root", str(root), "-address", str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, proc, "overlayproxy")
        yield root, sock
    finally:
        code, err = stop(proc)
    assert code == 0, err


@pytest.fixture(params=["ovl", "containerd-overlay"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "ovl":
        root, sock, _proc = request.getfixturevalue("daemon")
        return Target(root, sock, ())
    root, sock = request.getfixturevalue("overlayproxy")
    # containerd's services return Walk's error unmapped: a bad filter
    # reaches a Go client as codes.Unknown (ours answers INVALID_ARGUMENT)
    return Target(root, sock, ("-bad-filter-error", "unknown"))


def _state(infos: list[Info]) -> list[dict[str, Any]]:
    return sorted(({"name": i.name, "kind": i.kind.name.lower(), "parent": i.parent,
                    "labels": dict(i.labels)} for i in infos), key=lambda s: s["name"])


def test_containerd_go_client(target: Target, snapclient: Path) -> None:
    done = subprocess.run([snapclient, "-address", str(target.sock), *target.flags],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    checks = [line for line in lines if "check" in line]
    failed = [f"{c['check']}: {c.get('detail')}" for c in checks if not c["ok"]]
    assert not failed, "\n".join(failed) + "\n" + done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    summaries = [line["summary"] for line in lines if "summary" in line]
    assert summaries == [{"passed": len(checks), "failed": 0}]
    assert {rpc for c in checks for rpc in c["rpcs"]} == RPCS

    reported = next(line["state"] for line in lines if "state" in line)
    for entry in reported:
        entry["labels"] = entry["labels"] or {}
    assert [e["name"] for e in reported] == LEFT
    infos: list[Info] = []
    with RemoteSnapshotter(str(target.sock), timeout=60) as client:
        client.walk(infos.append)
    assert _state(infos) == reported
    # what it removed is gone from the disk too (Cleanup ran): one
    # directory per snapshot left
    assert len(os.listdir(target.root / "snapshots")) == len(LEFT)


def test_go_sources_are_formatted_and_vetted() -> None:
    require_go()
    unformatted = subprocess.run(["gofmt", "-l", str(GO_DIR)], capture_output=True,
                                 text=True, check=False)
    assert unformatted.returncode == 0 and not unformatted.stdout, (
        unformatted.stdout + unformatted.stderr)
    programs = [f"./{p.name}" for p in sorted(GO_DIR.iterdir()) if p.is_dir()]
    assert programs
    vet = go("vet", *programs)
    assert vet.returncode == 0, vet.stdout + vet.stderr
