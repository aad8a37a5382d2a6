"""The native usage walk against du and find on real trees."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from pathlib import Path

import pytest

from overlay import _native

THREADS = [1, 2, 4]


def build(root: Path) -> int:
    """A tree with hard links, symlinks, sparse and real data; returns the
    number of extra hard-link names (the difference to ``find | wc -l``)."""
    for i in range(30):
        d = root / f"d{i % 7}" / f"e{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "data").write_bytes(os.urandom(1000 * i))
        (d / "empty").touch()
        (d / "sym").symlink_to("data")
    sparse = root / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(50 * 1024 * 1024)
    big = root / "d0" / "big"
    big.write_bytes(b"b" * 300_000)
    extra = 0
    for i in range(5):
        os.link(big, root / f"d{i + 1}" / f"big-link{i}")
        extra += 1
    os.link(root / "d1" / "e1" / "data", root / "d2" / "data-link")
    extra += 1
    return extra


def du(path: Path, *args: str) -> int:
    out = subprocess.run(["du", "-s", *args, str(path)], check=True, capture_output=True,
                         text=True).stdout
    return int(out.split()[0])


def find_count(path: Path) -> int:
    out = subprocess.run(["find", str(path)], check=True, capture_output=True).stdout
    return out.count(b"\n")


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("where", ["tmpfs", "ext4"])
def test_matches_du_and_find(tmpfs: Path, tmp_path: Path, where: str, threads: int) -> None:
    root = (tmpfs if where == "tmpfs" else tmp_path) / "tree"
    root.mkdir()
    extra_links = build(root)
    result = _native.disk_usage(root, threads=threads)
    assert result.errors == ()
    assert result.bytes == du(root, "--block-size=1")
    # inodes: du --inodes counts each inode once, as we do; find counts names
    assert result.entries == du(root, "--inodes")
    assert result.entries == find_count(root) - extra_links


@pytest.mark.parametrize("threads", THREADS)
def test_does_not_cross_mounts(tmpfs: Path, threads: int) -> None:
    root = tmpfs / "tree"
    (root / "a" / "mnt").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"x" * 5000)
    other = tmpfs / "other"
    other.mkdir()
    (other / "big").write_bytes(b"y" * 1_000_000)
    before = _native.disk_usage(root, threads=threads)
    _native.mount(other, root / "a" / "mnt", None, _native.MountFlag.BIND)
    try:
        during = _native.disk_usage(root, threads=threads)
        assert during.errors == ()
        # The mount point counts as the one directory it shows, its contents
        # not at all.  (du -x would descend: a bind mount of the same
        # filesystem keeps st_dev; we stop at every mount.)
        assert during.entries == before.entries
        assert during.bytes == before.bytes
        assert du(root, "-x", "--block-size=1") > 1_000_000
    finally:
        _native.unmount(root / "a" / "mnt")


def test_cancel(tmpfs: Path) -> None:
    root = tmpfs / "tree"
    root.mkdir()
    for i in range(200):
        (root / f"d{i}").mkdir()
        (root / f"d{i}" / "f").touch()
    flag = _native.new_cancel_flag()
    flag[0] = 1
    with pytest.raises(OSError) as info:
        _native.disk_usage(root, cancel=flag)
    assert info.value.errno == errno.ECANCELED
    assert info.value.filename == str(root)


def test_cancel_from_another_thread(tmpfs: Path) -> None:
    root = tmpfs / "tree"
    for i in range(300):
        d = root / f"d{i}"
        d.mkdir(parents=True)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        for j in range(100):
            os.close(os.open(f"f{j}", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        os.close(fd)
    flag = _native.new_cancel_flag()
    timer = threading.Timer(0.0, lambda: flag.__setitem__(0, 1))
    timer.start()
    timer.join()
    with pytest.raises(OSError) as info:
        _native.disk_usage(root, cancel=flag)
    assert info.value.errno == errno.ECANCELED
    flag[0] = 0
    assert _native.disk_usage(root, cancel=flag).entries == 300 * 101 + 1


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        _native.disk_usage(tmp_path / "nope")
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(tmp_path / "nope")


def test_empty_dir_counts_itself(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    result = _native.disk_usage(d)
    assert result.entries == 1
    assert result.bytes == os.stat(d).st_blocks * 512
