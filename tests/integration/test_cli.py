"""``ovl`` through ``main(argv)``: in-process on a root, and against a daemon."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.cli import main
from tests.helpers import mounts_under
from tests.integration.grpc_backend import serve


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), stdout=out)
    return code, out.getvalue()


@pytest.fixture(params=["root", "daemon"])
def where(request: pytest.FixtureRequest, tmpfs: Path) -> Iterator[list[str]]:
    root = tmpfs / "root"
    if request.param == "root":
        yield ["--root", str(root)]
        return
    from overlay.overlayfs import OverlaySnapshotter

    backend = OverlaySnapshotter(root)
    try:
        with serve(backend) as address:
            # the root rides along at the end (an in-test detail, never passed on)
            yield ["--address", address, str(root)]
    finally:
        backend.close()


def opts(where: list[str]) -> list[str]:
    return where[:2]


def sn(where: list[str], *argv: str) -> tuple[int, str]:
    return run("snapshots", argv[0], *opts(where), *argv[1:])


def test_lifecycle_and_listing(where: list[str]) -> None:
    assert sn(where, "prepare", "a") == (0, f"mount -t bind {_fs(where, 1)} <target> -o rw,rbind\n")
    assert sn(where, "commit", "A", "a", "--label", "team=x")[0] == 0
    code, out = sn(where, "prepare", "b", "A", "--label", "k=v")
    assert code == 0 and out.startswith("mount -t overlay overlay <target> -o workdir=")
    assert sn(where, "view", "v", "A")[0] == 0
    code, out = sn(where, "ls")
    assert out.splitlines() == [
        "KEY  PARENT  KIND",
        "A            Committed",
        "b    A       Active",
        "v    A       View",
    ]
    code, out = sn(where, "ls", "kind==active", "--format", "json")
    assert [i["Name"] for i in json.loads(out)] == ["b"]
    code, out = sn(where, "tree")
    assert out.splitlines() == ["A (committed)", "├── b (active)", "└── v (view)"]
    code, out = sn(where, "info", "b")
    info = json.loads(out)
    assert (info["Kind"], info["Name"], info["Parent"], info["Labels"]) == (
        "Active", "b", "A", {"k": "v"})
    assert info["Created"] == info["Updated"] and info["Created"].endswith("Z")
    code, out = sn(where, "label", "b", "z=1", "k=")
    assert (code, out) == (0, "z=1\n")
    code, out = sn(where, "usage", "A", "--format", "json")
    assert json.loads(out)[0]["key"] == "A" and json.loads(out)[0]["inodes"] >= 1
    code, out = sn(where, "mounts", "/mnt/x", "v")
    assert out == f"mount -t bind {_fs(where, 1)} /mnt/x -o ro,rbind\n"


def _fs(where: list[str], sid: int) -> str:
    root = where[1] if where[0] == "--root" else where[-1]
    return f"{root}/snapshots/{sid}/fs"


def test_exit_codes_and_messages(where: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert sn(where, "prepare", "a")[0] == 0
    assert sn(where, "info", "missing")[0] == 3
    assert "ovl: snapshot 'missing': not found" in capsys.readouterr().err
    assert sn(where, "prepare", "a")[0] == 4
    assert "already exists" in capsys.readouterr().err
    assert sn(where, "commit", "A", "a")[0] == 0
    assert sn(where, "prepare", "c", "A")[0] == 0
    assert sn(where, "rm", "A")[0] == 5
    assert "remove" in capsys.readouterr().err
    assert sn(where, "ls", "name==")[0] == 6
    assert "expected a value after '=='" in capsys.readouterr().err
    assert sn(where, "ls", "name~=(")[0] == 6
    assert sn(where, "prepare", "x", "--label", "novalue")[0] == 6
    assert run("snapshots", "bogus")[0] == 2
    assert run()[0] == 2


def test_mount_umount_and_cleanup(where: list[str], tmpfs: Path) -> None:
    target = tmpfs / "mnt"
    target.mkdir()
    assert sn(where, "prepare", "a")[0] == 0
    assert run("snapshots", "mount", *opts(where), str(target), "a")[0] == 0
    try:
        (target / "hello").write_text("hi")
    finally:
        assert run("snapshots", "umount", str(target))[0] == 0
    assert mounts_under(target) == []
    assert sn(where, "commit", "A", "a")[0] == 0
    code, out = sn(where, "usage", "A")
    assert code == 0 and out.splitlines()[1].split()[0] == "A"
    assert sn(where, "rm", "A")[0] == 0
    code, out = run("cleanup", *opts(where), "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["busy"] == []
    root = tmpfs / "root"
    if where[0] == "--root":
        assert report["directories"] == 1 and report["entries"] >= 3
        assert not report["background"]
    else:
        # the daemon's answer says nothing of the deletion; this in-test server
        # runs the plain backend, whose cleanup deletes before it returns
        assert report["background"]
    assert os.listdir(root / "snapshots") == []
    assert os.listdir(root / "trash") == []


def test_no_daemon_is_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run("snapshots", "ls", "--address", str(tmp_path / "none.sock"))
    assert code == 7
    assert "ovl serve" in capsys.readouterr().err


def test_global_options_before_the_verb(where: list[str]) -> None:
    """--root / --address (-a) / --namespace (-n) / --format before the verb,
    as with ctr -a ADDR -n NS ...: the same as after it."""
    assert sn(where, "prepare", "g")[0] == 0
    flag, value = opts(where)
    after = run("snapshots", "ls", flag, value, "--format", "json")
    before = run(flag, value, "--format", "json", "snapshots", "ls")
    short = run("-a" if flag == "--address" else flag, value, "--format=json", "sn", "ls")
    assert after == before == short
    assert after[0] == 0 and json.loads(after[1])[0]["Name"] == "g"
    # after the verb wins over before it, as for any repeated option
    assert run("--format", "json", "snapshots", "ls", "--format", "table", flag, value)[1] \
        .startswith("KEY")


def test_global_options_conflicts_are_usage_errors(tmp_path: Path) -> None:
    assert run("--root", str(tmp_path / "r"), "snapshots", "ls", "-a", "/x.sock")[0] == 2
    assert run("--address", "/x.sock", "snapshots", "ls", "--root", str(tmp_path / "r"))[0] == 2
    assert run("--format", "json", "serve", "--root", str(tmp_path / "r"))[0] == 2
    assert run("-n", "k8s.io", "serve")[0] == 2
    assert not (tmp_path / "r").exists()
