"""remove drops references only; cleanup reclaims, never what is in use."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay import _native
from overlay.errors import UnsupportedError
from overlay.mount import mount_all, unmount
from overlay.overlayfs import OverlaySnapshotter
from tests.helpers import snapshot_tree


@pytest.fixture
def sn(tmpfs: Path) -> Iterator[OverlaySnapshotter]:
    s = OverlaySnapshotter(tmpfs / "root")
    try:
        yield s
    finally:
        s.close()


def upper(s: OverlaySnapshotter, key: str) -> Path:
    m = s.mounts(key)[0]
    for opt in m.options:
        if opt.startswith("upperdir="):
            return Path(opt.removeprefix("upperdir="))
    return Path(m.source)


def fill(path: Path, files: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for d in range(files // 1000 + 1):
            os.mkdir(f"d{d}", dir_fd=fd)
        for i in range(files):
            os.close(os.open(f"d{i // 1000}/f{i}", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    finally:
        os.close(fd)


def dirs(s: OverlaySnapshotter) -> tuple[list[str], list[str]]:
    root = Path(s.root)
    return sorted(os.listdir(root / "snapshots")), sorted(os.listdir(root / "trash"))


def test_remove_of_100k_files_touches_nothing_then_cleanup_reclaims(
    sn: OverlaySnapshotter,
) -> None:
    sn.prepare("big")
    fs = upper(sn, "big")
    fill(fs, 100_000)
    sn.commit("big-c", "big")
    before = os.stat(fs)
    usage_before = _native.disk_usage(fs)
    sn.remove("big-c")
    after = os.stat(fs)
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns, after.st_nlink) == (
        before.st_ino, before.st_mtime_ns, before.st_ctime_ns, before.st_nlink)
    assert _native.disk_usage(fs) == usage_before
    assert dirs(sn) == (["1"], [])
    report = sn.cleanup()
    assert report.busy == ()
    assert report.directories == 1
    assert report.entries == usage_before.entries + 2  # + snapshots/1 and its work/
    assert dirs(sn) == ([], [])


def test_key_is_free_at_once(sn: OverlaySnapshotter) -> None:
    sn.prepare("k")
    sn.remove("k")
    sn.prepare("k")
    assert dirs(sn) == (["1", "2"], [])
    sn.cleanup()
    assert dirs(sn) == (["2"], [])


def test_mounted_orphans_survive_and_are_reclaimed_after_unmount(
    sn: OverlaySnapshotter, tmpfs: Path
) -> None:
    sn.prepare("a")
    (upper(sn, "a") / "base").write_text("base")
    sn.commit("A", "a")
    sn.prepare("b", "A")
    target = tmpfs / "rootfs"
    target.mkdir()
    mount_all(sn.mounts("b"), target)
    try:
        (target / "top").write_text("top")
        sn.view("v", "A")
        vtarget = tmpfs / "view"
        vtarget.mkdir()
        mount_all(sn.mounts("v"), vtarget)  # a read-only bind of A's fs
        try:
            trees = {k: snapshot_tree(Path(sn.root) / "snapshots" / k) for k in ("1", "2")}
            for key in ("b", "v", "A"):
                sn.remove(key)
            report = sn.cleanup()
            assert sorted(report.busy) == [
                (str(Path(sn.root) / "snapshots" / "1"), errno.EBUSY),
                (str(Path(sn.root) / "snapshots" / "2"), errno.EBUSY),
            ]
            assert dirs(sn) == (["1", "2"], [])
            for k, tree in trees.items():
                assert snapshot_tree(Path(sn.root) / "snapshots" / k) == tree
            assert (target / "base").read_text() == "base"
        finally:
            unmount(vtarget)
        # the overlay still holds both layers
        report = sn.cleanup()
        assert sorted(p for p, _ in report.busy) == [
            str(Path(sn.root) / "snapshots" / "1"), str(Path(sn.root) / "snapshots" / "2")]
    finally:
        unmount(target)
    report = sn.cleanup()
    assert report.busy == ()
    assert report.directories == 2  # the view's own dir went in the first cleanup
    assert dirs(sn) == ([], [])


def test_trash_survives_a_restart(tmpfs: Path) -> None:
    s = OverlaySnapshotter(tmpfs / "root")
    s.prepare("a")
    fill(upper(s, "a"), 100)
    s.remove("a")
    moved, busy = s.collect_orphans()
    assert (moved, busy) == (1, [])
    assert len(dirs(s)[1]) == 1
    s.close()
    s = OverlaySnapshotter(tmpfs / "root")
    try:
        assert s.trash_backlog() == 1
        report = s.cleanup()
        assert report.directories == 1
        assert dirs(s) == ([], [])
    finally:
        s.close()


def test_immutable_file_stays_in_trash_until_it_can_go(tmp_path: Path,
                                                       privileged: None) -> None:
    s = OverlaySnapshotter(tmp_path / "root")  # ext4: chattr works
    try:
        s.prepare("a")
        frozen = upper(s, "a") / "frozen"
        frozen.write_text("x")
        (upper(s, "a") / "other").write_text("y")
        subprocess.run(["chattr", "+i", str(frozen)], check=True)
        s.remove("a")
        try:
            report = s.cleanup()
            assert len(report.busy) == 1
            path, err = report.busy[0]
            assert err == errno.EPERM
            assert path.startswith(str(tmp_path / "root" / "trash")) and path.endswith("/fs/frozen")
            assert dirs(s)[0] == []
            assert len(dirs(s)[1]) == 1
        finally:
            for p in (tmp_path / "root" / "trash").rglob("frozen"):
                subprocess.run(["chattr", "-i", str(p)], check=True)
        report = s.cleanup()
        assert report.busy == ()
        assert dirs(s) == ([], [])
    finally:
        s.close()


def test_sync_remove_deletes_after_the_commit(tmpfs: Path) -> None:
    s = OverlaySnapshotter(tmpfs / "root", sync_remove=True)
    try:
        s.prepare("a")
        fill(upper(s, "a"), 10)
        s.commit("A", "a")
        s.prepare("b", "A")
        s.remove("b")
        assert dirs(s) == (["1"], [])
        s.remove("A")
        assert dirs(s) == ([], [])
    finally:
        s.close()


def test_crash_leftovers_are_handled(sn: OverlaySnapshotter) -> None:
    snapshots = Path(sn.root) / "snapshots"
    # a create that died before its commit: a temp dir, and a renamed <id>
    (snapshots / "new-123abc" / "fs").mkdir(parents=True)
    (snapshots / "1" / "fs").mkdir(parents=True)
    (snapshots / "1" / "fs" / "stale").write_text("old")
    sn.prepare("k")  # gets id 1 again: the stale dir goes to the trash first
    assert list(upper(sn, "k").iterdir()) == []
    assert dirs(sn)[0] == ["1", "new-123abc"]
    assert len(dirs(sn)[1]) == 1
    sn.cleanup()
    assert dirs(sn) == (["1"], [])


def test_cleanup_progress(sn: OverlaySnapshotter) -> None:
    for i in range(3):
        sn.prepare(f"k{i}")
        sn.remove(f"k{i}")
    seen: list[tuple[int, int]] = []
    sn.cleanup(progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.fixture
def no_dtype_root(tmp_path: Path, privileged: None) -> Iterator[Path]:
    # ext2 without the filetype feature reports DT_UNKNOWN for every entry.
    image = tmp_path / "nodtype.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext2", "-q", "-F", "-O", "^filetype", str(image)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        _native.unmount(mnt)


def test_root_without_dtype_is_refused(no_dtype_root: Path) -> None:
    with pytest.raises(UnsupportedError) as info:
        OverlaySnapshotter(no_dtype_root / "root")
    assert "does not support d_type" in str(info.value)
    assert "ftype=1" in str(info.value)
    assert sorted(os.listdir(no_dtype_root)) == ["lost+found", "root"]
    assert os.listdir(no_dtype_root / "root") == []


def test_relative_layer_mounts_are_matched_to_their_own_root(tmpfs: Path) -> None:
    """A deep stack mounted with relative layer paths names its base as the
    mount source: its layers are busy in their own root, and same-named
    orphans of another root are not."""
    from overlay.mount import OverlayStrategy

    a = OverlaySnapshotter(tmpfs / "root-a")
    b = OverlaySnapshotter(tmpfs / "root-b")
    target = tmpfs / "stack"
    target.mkdir()
    try:
        parent = ""
        for i in range(130):
            a.prepare(f"k{i}", parent)
            a.commit(f"c{i}", f"k{i}")
            parent = f"c{i}"
        a.view("v", parent)
        mounts = a.mounts("v")
        assert len(",".join(mounts[0].options)) > 4096  # cannot go absolute
        mount_all(mounts, target, strategy=OverlayStrategy.LEGACY)
        try:
            for key in ("x", "y"):
                b.prepare(key)
                b.remove(key)
            report_b = b.cleanup()
            assert report_b.busy == ()
            assert report_b.directories == 2
            a.remove("v")
            for i in reversed(range(130)):
                a.remove(f"c{i}")
            report_a = a.cleanup()
            busy = sorted(int(Path(p).name) for p, _ in report_a.busy)
            assert busy == list(range(1, 131))
            assert len(dirs(a)[0]) == 130
        finally:
            unmount(target)
        assert a.cleanup().directories == 130
        assert dirs(a) == ([], [])
    finally:
        a.close()
        b.close()


def test_deferred_cleanup_warns_once_per_stuck_entry(tmp_path: Path, privileged: None,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The daemon's trash thread retries what it cannot delete; it says so
    once per entry, not at every retry (a root gone read-only, a busy mount)."""
    from overlay.server.cleaner import DeferredCleanup

    s = OverlaySnapshotter(tmp_path / "root")  # ext4: chattr works
    d = DeferredCleanup(s)
    d.RETRY_SECONDS = 0.05
    try:
        s.prepare("a")
        frozen = upper(s, "a") / "frozen"
        frozen.write_text("x")
        subprocess.run(["chattr", "+i", str(frozen)], check=True)
        s.remove("a")
        try:
            with caplog.at_level(logging.WARNING, logger="overlay.server.cleaner"):
                d.cleanup()
                time.sleep(1.0)  # ~10 retries
            stuck = [r for r in caplog.records if "could not remove" in r.getMessage()]
            assert len(stuck) == 1, [r.getMessage() for r in stuck]
            assert stuck[0].getMessage().endswith("frozen: Operation not permitted "
                                                  "(retried every 0.05 s)")
        finally:
            for p in (tmp_path / "root" / "trash").rglob("frozen"):
                subprocess.run(["chattr", "-i", str(p)], check=True)
        d.cleanup()
        assert d.wait_idle(10)
        assert dirs(s) == ([], [])
    finally:
        d.close()
