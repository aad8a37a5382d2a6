"""Checks that only hold for the overlay backend (SPEC §2): the on-disk
layout and modes, ownership of new layers, the exact ``mounts()`` tables in
containerd HEAD's order, configured mount options, the upperdir label, and
the relative-lowerdir route of the legacy mount.

These tests open :class:`OverlaySnapshotter` directly instead of going
through ``snapshotter_factory``: the other backends do not share them.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from overlay import support
from overlay.errors import AlreadyExistsError, InvalidArgumentError, UnavailableError
from overlay.mount import Mount, OverlayStrategy, mount_table
from overlay.overlayfs import OverlaySnapshotter
from overlay.snapshots import LABEL_SNAPSHOT_REF, LABEL_UPPERDIR, Info, Kind
from tests.conformance._support import (
    OPT,
    apply,
    assert_rejected,
    assert_same_tree,
    create_file,
    mounted,
    new_dir,
    walk_all,
)
from tests.conformance.conftest import Backend, Env

pytestmark = pytest.mark.privileged

Opener = Callable[..., OverlaySnapshotter]


@pytest.fixture
def open_overlay(tmp_path: Path, privileged: None) -> Iterator[Opener]:
    """``open_overlay(root=None, **options)``; everything opened is closed
    at teardown (reopening a root needs the previous one closed first)."""
    with contextlib.ExitStack() as stack:

        def opener(root: Path | None = None, **options: Any) -> OverlaySnapshotter:
            sn = OverlaySnapshotter(root if root is not None else tmp_path / "root", **options)
            stack.callback(sn.close)
            return sn

        yield opener


def _env(sn: OverlaySnapshotter, tmp_path: Path) -> Env:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return Env(Backend("overlay", lambda _: contextlib.nullcontext(sn)), sn, Path(sn.root), work)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _fs(root: Path, sid: str) -> str:
    return str(root / "snapshots" / sid / "fs")


def _work(root: Path, sid: str) -> str:
    return str(root / "snapshots" / sid / "work")


def _extras(configured: Sequence[str], root: Path) -> tuple[str, ...]:
    """SPEC §2.3/§2.5: configured options, then userxattr (if needed), then
    index=off (if the kernel has the index feature and none is configured)."""
    extra = list(configured)
    if "userxattr" not in extra and support.needs_userxattr(root):
        extra.append("userxattr")
    has_index = any(o == "index" or o.startswith("index=") for o in extra)
    if not has_index and Path("/sys/module/overlay/parameters/index").exists():
        extra.append("index=off")
    return tuple(extra)


# --------------------------------------------------------------------------------------------
# layout


def test_layout_ids_and_modes(open_overlay: Opener, tmp_path: Path) -> None:
    """``<root>/snapshots/<id>/{fs,work}``: fs 0755, work 0711 (actives only),
    whatever the umask; ids from "1", kept by Commit, never reused."""
    old = os.umask(0o077)
    try:
        sn = open_overlay(upperdir_label=True)
        root = Path(sn.root)
        sn.prepare("a", "")
        sn.view("v", "")
        sn.commit("c", "a")
        sn.prepare("b", "c")
        sn.remove("v")
        sn.cleanup()
        sn.prepare("d", "")
    finally:
        os.umask(old)
    assert _mode(root) == 0o700
    assert _mode(root / "snapshots") == 0o700
    assert _mode(root / "metadata.db") == 0o600
    ids = {i.name: Path(i.labels[LABEL_UPPERDIR]).parent.name for i in walk_all(sn)}
    assert ids == {"c": "1", "b": "3", "d": "4"}  # "2" was the view: never reused
    assert sorted(os.listdir(root / "snapshots")) == ["1", "3", "4"]
    for sid in ("1", "3", "4"):
        assert sorted(os.listdir(root / "snapshots" / sid)) == ["fs", "work"]
        assert _mode(root / "snapshots" / sid / "fs") == 0o755
        assert _mode(root / "snapshots" / sid / "work") == 0o711
    sn.view("v2", "c")
    assert sorted(os.listdir(root / "snapshots" / "5")) == ["fs"]  # a view has no workdir
    assert _mode(root / "snapshots" / "5" / "fs") == 0o755


def test_parent_owner_copied_to_fs(open_overlay: Opener, tmp_path: Path) -> None:
    """A new layer's fs takes the owner of its immediate parent's fs."""
    sn = open_overlay(upperdir_label=True)
    root = Path(sn.root)
    with mounted(sn.prepare("base-a", ""), tmp_path / "mnt") as mp:
        os.chown(mp, 1000, 1001)  # the mount root is the layer's fs
    sn.commit("base", "base-a")
    with mounted(sn.prepare("mid-a", "base"), tmp_path / "mnt") as mp:
        st = os.stat(mp)
        assert (st.st_uid, st.st_gid) == (1000, 1001)
        os.chown(mp, 2000, 2002)
    sn.commit("mid", "mid-a")
    sn.prepare("top", "mid")
    sn.view("view", "mid")
    sn.prepare("fresh", "")

    def owner(key: str) -> tuple[int, int]:
        st = os.lstat(sn.stat(key).labels[LABEL_UPPERDIR])
        return st.st_uid, st.st_gid

    assert owner("base") == (1000, 1001)
    assert owner("mid") == (2000, 2002)
    assert owner("top") == (2000, 2002)  # the immediate parent, not the root layer
    assert owner("view") == (2000, 2002)
    assert owner("fresh") == (0, 0)
    for key in ("top", "view", "fresh"):
        assert _mode(Path(sn.stat(key).labels[LABEL_UPPERDIR])) == 0o755
    with mounted(sn.mounts("top"), tmp_path / "mnt") as mp:
        st = os.stat(mp)
        assert (st.st_uid, st.st_gid, _mode(mp)) == (2000, 2002, 0o755)
    assert root.is_dir()


# --------------------------------------------------------------------------------------------
# mounts()


def _chain(sn: OverlaySnapshotter) -> None:
    """ids: c1=1, c2=2, c3=3 (a chain), then the snapshots under test."""
    parent = ""
    for i in (1, 2, 3):
        sn.prepare(f"c{i}-a", parent)
        sn.commit(f"c{i}", f"c{i}-a")
        parent = f"c{i}"


@pytest.mark.parametrize(
    "configured",
    [(), ("volatile",), ("index=on",), ("userxattr",), ("nodev", "metacopy=off")],
    ids=repr,
)
def test_mount_tables(open_overlay: Opener, configured: tuple[str, ...]) -> None:
    """SPEC §2.5 rows 1-5, HEAD order; configured options (then userxattr and
    index=off as probed) on overlay mounts only, never on bind mounts."""
    sn = open_overlay(mount_options=configured)
    root = Path(sn.root)
    extra = _extras(configured, root)
    _chain(sn)
    got = {
        "active-0": sn.prepare("active-0", ""),  # id 4
        "view-0": sn.view("view-0", ""),  # id 5
        "view-1": sn.view("view-1", "c1"),  # id 6
        "view-3": sn.view("view-3", "c3"),  # id 7
        "active-1": sn.prepare("active-1", "c1"),  # id 8
        "active-3": sn.prepare("active-3", "c3"),  # id 9
    }
    lower3 = f"lowerdir={_fs(root, '3')}:{_fs(root, '2')}:{_fs(root, '1')}"
    expected = {
        "active-0": [Mount("bind", _fs(root, "4"), "", ("rw", "rbind"))],
        "view-0": [Mount("bind", _fs(root, "5"), "", ("ro", "rbind"))],
        "view-1": [Mount("bind", _fs(root, "1"), "", ("ro", "rbind"))],
        "view-3": [Mount("overlay", "overlay", "", (lower3, *extra))],
        "active-1": [
            Mount("overlay", "overlay", "", (
                f"workdir={_work(root, '8')}",
                f"upperdir={_fs(root, '8')}",
                f"lowerdir={_fs(root, '1')}",
                *extra,
            ))
        ],
        "active-3": [
            Mount("overlay", "overlay", "", (
                f"workdir={_work(root, '9')}", f"upperdir={_fs(root, '9')}", lower3, *extra,
            ))
        ],
    }
    assert got == expected
    assert {k: sn.mounts(k) for k in expected} == expected
    if configured == ("volatile",):  # HEAD pins this one: 3 options
        assert len(expected["view-3"][0].options) == (3 if "index=off" in extra else 2)


@pytest.mark.parametrize("configured", [(), ("volatile",), ("nodev",)], ids=repr)
def test_configured_options_really_mount(
    open_overlay: Opener, tmp_path: Path, configured: tuple[str, ...]
) -> None:
    sn = open_overlay(mount_options=configured)
    env = _env(sn, tmp_path)
    _chain(sn)
    for key, create in (("a", sn.prepare), ("v", sn.view)):
        with mounted(create(key, "c3"), env.work / key) as mp:
            assert sorted(os.listdir(mp)) == []
            if key == "a":
                (mp / "x").write_bytes(b"x")


@pytest.mark.parametrize(
    "configured", [(), ("volatile",), ("ro",), ("index=off", "ro"), ("rw", "ro")], ids=repr
)
def test_never_ro_on_active(open_overlay: Opener, configured: tuple[str, ...]) -> None:
    """containerd HEAD's unpacker treats a Prepare whose last mount is
    read-only (``Mount.ReadOnly()``: any option equal to ``ro``) as already
    unpacked ("staged") and skips fetching and applying the layer.  So an
    active snapshot's last mount never carries ``ro`` (SPEC §2.5, §12.1),
    whatever the configured mount options; a configuration that would put it
    there must be refused when the snapshotter is built."""
    try:
        sn = open_overlay(mount_options=configured)
    except InvalidArgumentError:
        assert "ro" in configured
        return
    _chain(sn)
    for parent in ("", "c1", "c3"):
        key = f"active-{parent}"
        for mounts in (sn.prepare(key, parent), sn.mounts(key)):
            assert mounts, key
            assert "ro" not in mounts[-1].options, (key, mounts)
            assert mounts[-1].options[-1] != "ro", (key, mounts)


def test_relative_lowerdirs_on_legacy_mount(open_overlay: Opener, tmp_path: Path) -> None:
    """With mount(2), a stack whose absolute lowerdirs overflow a page is
    mounted with lowerdirs relative to ``<root>/snapshots`` and works."""
    root = tmp_path / ("deep-root-" + "x" * 150)
    sn = open_overlay(root)
    env = _env(sn, tmp_path)
    flat = new_dir(env.work, "flat-")
    parent = ""
    for i in range(40):
        changes = apply(create_file("/top", str(i).encode(), 0o644),
                        create_file(f"/f{i}", b"", 0o600))
        key = f"l{i}-a"
        mp = env.work / "mnt"
        with mounted(sn.prepare(key, parent), mp, strategy=OverlayStrategy.LEGACY):
            changes(mp)
            changes(flat)
        parent = f"l{i}"
        sn.commit(parent, key)
    mounts = sn.view("view", parent)
    assert len(",".join(mounts[0].options)) > os.sysconf("SC_PAGESIZE")
    mp = env.work / "view"
    with mounted(mounts, mp, strategy=OverlayStrategy.LEGACY):
        rows = [m for m in mount_table() if m.target == str(mp)]
        assert len(rows) == 1 and rows[0].fstype == "overlay"
        lower = next(o for o in rows[0].super_options if o.startswith("lowerdir="))
        layers = lower.removeprefix("lowerdir=").split(":")
        assert len(layers) == 40
        assert all(not p.startswith("/") for p in layers), layers[:3]
        assert_same_tree(flat, mp)


# --------------------------------------------------------------------------------------------
# labels, usage, removal


def test_upperdir_label(open_overlay: Opener, tmp_path: Path) -> None:
    """Stat, Update and Walk add ``containerd.io/snapshot/overlay.upperdir``;
    filters never see it and it is never stored."""
    sn = open_overlay(upperdir_label=True)
    root = Path(sn.root)
    sn.prepare("a", "", {"l": "1"})
    sn.commit("c", "a", {"l": "1"})
    sn.view("v", "c")
    expected = {"c": _fs(root, "1"), "v": _fs(root, "2")}
    for key, path in expected.items():
        assert dict(sn.stat(key).labels) == {**({"l": "1"} if key == "c" else {}),
                                             LABEL_UPPERDIR: path}
    assert {i.name: i.labels[LABEL_UPPERDIR] for i in walk_all(sn)} == expected
    updated = sn.update(Info(Kind.VIEW, "v", labels={"m": "2"}), "labels.m")
    assert dict(updated.labels) == {"m": "2", LABEL_UPPERDIR: expected["v"]}
    assert walk_all(sn, f'labels."{LABEL_UPPERDIR}"') == []
    assert sn.mounts("v") == [Mount("bind", _fs(root, "1"), "", ("ro", "rbind"))]
    sn.close()
    plain = open_overlay(root)
    assert dict(plain.stat("c").labels) == {"l": "1"}
    assert dict(plain.stat("v").labels) == {"m": "2"}


def test_committed_usage_is_stored(open_overlay: Opener, tmp_path: Path) -> None:
    """An active's usage is measured live; a committed one's at commit."""
    sn = open_overlay(upperdir_label=True)
    sn.prepare("a", "")
    fs = Path(sn.stat("a").labels[LABEL_UPPERDIR])
    before = sn.usage("a")
    (fs / "file").write_bytes(b"x" * 10000)
    live = sn.usage("a")
    assert live.inodes == before.inodes + 1
    assert live.size > before.size
    sn.commit("c", "a")
    assert sn.usage("c") == live
    (fs / "later").write_bytes(b"y" * 10000)
    assert sn.usage("c") == live


def test_remove_keeps_disk_until_cleanup(open_overlay: Opener) -> None:
    """Remove drops the record only (async removal); cleanup reclaims the
    directories of removed snapshots and nothing else."""
    sn = open_overlay()
    root = Path(sn.root)
    sn.prepare("a", "")
    sn.commit("c", "a")
    sn.prepare("b", "c")
    sn.view("v", "c")
    sn.remove("b")
    sn.remove("v")
    assert sorted(os.listdir(root / "snapshots")) == ["1", "2", "3"]
    sn.prepare("b", "c")  # the key is free at once
    report = sn.cleanup()
    assert report.directories == 2
    assert sorted(os.listdir(root / "snapshots")) == ["1", "4"]
    assert os.listdir(root / "trash") == []


def test_remove_sync(open_overlay: Opener) -> None:
    sn = open_overlay(sync_remove=True)
    root = Path(sn.root)
    sn.prepare("a", "")
    sn.commit("c", "a")
    sn.view("v", "c")
    sn.remove("v")
    assert sorted(os.listdir(root / "snapshots")) == ["1"]


def test_shared_target_reference(open_overlay: Opener, tmp_path: Path) -> None:
    """SPEC §12.1: a Prepare carrying ``containerd.io/snapshot.ref=<t>`` when a
    committed snapshot with that label and the same parent exists is
    AlreadyExists and creates nothing; another parent is a new snapshot."""
    sn = open_overlay()
    env = _env(sn, tmp_path)
    sn.prepare("base-a", "")
    sn.commit("base", "base-a")
    ref = {LABEL_SNAPSHOT_REF: "sha256:" + "1" * 64}
    sn.prepare("extract-1 layer", "base", ref)
    sn.commit("layer", "extract-1 layer", ref)
    assert_rejected(env, AlreadyExistsError, sn.prepare, "extract-2 layer", "base", ref)
    sn.prepare("extract-3 layer", "", ref)  # another parent: a different layer
    assert sn.stat("extract-3 layer").kind is Kind.ACTIVE


def test_closed_snapshotter_refuses(open_overlay: Opener) -> None:
    sn = open_overlay()
    sn.prepare("a", "", OPT)
    sn.close()
    sn.close()
    with pytest.raises(UnavailableError):
        sn.stat("a")
    with pytest.raises(UnavailableError):
        sn.prepare("b", "")
