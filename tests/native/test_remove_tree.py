"""The native recursive unlink on real trees (tmpfs, and ext4 for chattr)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay import _native
from tests.helpers import snapshot_tree

THREADS = [1, 4]


def make_outside(root: Path) -> Path:
    outside = root / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "file").write_text("keep me")
    (outside / "dir" / "inner").write_text("keep me too")
    return outside


@pytest.mark.parametrize("threads", THREADS)
def test_symlinks_are_removed_not_followed(tmpfs: Path, threads: int) -> None:
    outside = make_outside(tmpfs)
    before = snapshot_tree(outside)
    tree = tmpfs / "tree"
    for i in range(10):
        d = tree / f"d{i}"
        d.mkdir(parents=True)
        (d / "to-dir").symlink_to(outside / "dir")
        (d / "to-file").symlink_to(outside / "file")
        (d / "to-root").symlink_to("/")
        (d / "dangling").symlink_to(tmpfs / "missing")
        (d / "relative-up").symlink_to("../../outside")
    result = _native.remove_tree(tree, threads=threads)
    assert result.errors == ()
    assert result.entries == 10 * 6 + 1
    assert not tree.exists()
    assert snapshot_tree(outside) == before


@pytest.mark.parametrize("threads", THREADS)
def test_root_that_is_a_symlink_is_refused(tmpfs: Path, threads: int) -> None:
    outside = make_outside(tmpfs)
    before = snapshot_tree(outside)
    link = tmpfs / "link"
    link.symlink_to(outside)
    with pytest.raises(OSError) as info:
        _native.remove_tree(link, threads=threads)
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert info.value.filename == str(link)
    assert link.is_symlink()
    assert snapshot_tree(outside) == before


@pytest.mark.parametrize("threads", THREADS)
def test_bind_mount_inside_is_reported_and_untouched(tmpfs: Path, threads: int) -> None:
    outside = make_outside(tmpfs)
    before = snapshot_tree(outside)
    tree = tmpfs / "tree"
    mnt = tree / "a" / "b" / "mnt"
    mnt.mkdir(parents=True)
    for i in range(20):
        (tree / "a" / f"f{i}").write_text("x")
        (tree / f"top{i}").mkdir()
        (tree / f"top{i}" / "g").write_text("y")
    _native.mount(outside, mnt, None, _native.MountFlag.BIND)
    try:
        result = _native.remove_tree(tree, threads=threads)
        assert result.errors == (("a/b/mnt", errno.EBUSY),)
        assert snapshot_tree(outside) == before
        assert snapshot_tree(mnt) == before
        # everything else went; only the path down to the mount point stays
        assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p != mnt and
                      mnt not in p.parents) == ["a", "a/b"]
    finally:
        _native.unmount(mnt)
    assert snapshot_tree(outside) == before
    assert _native.remove_tree(tree).errors == ()
    assert not tree.exists()


@pytest.mark.parametrize("threads", THREADS)
def test_file_bind_mount_is_reported(tmpfs: Path, threads: int) -> None:
    outside = make_outside(tmpfs)
    tree = tmpfs / "tree"
    tree.mkdir()
    target = tree / "mounted-file"
    target.write_text("")
    (tree / "sibling").write_text("s")
    _native.mount(outside / "file", target, None, _native.MountFlag.BIND)
    try:
        result = _native.remove_tree(tree, threads=threads)
        assert result.errors == (("mounted-file", errno.EBUSY),)
        assert target.read_text() == "keep me"
        assert not (tree / "sibling").exists()
    finally:
        _native.unmount(target)
    assert (outside / "file").read_text() == "keep me"


@pytest.mark.parametrize("threads", THREADS)
def test_hard_links_inside_and_to_outside(tmpfs: Path, threads: int) -> None:
    outside = make_outside(tmpfs)
    tree = tmpfs / "tree"
    for name in ("x", "y", "z"):
        (tree / name).mkdir(parents=True)
    data = tree / "x" / "data"
    data.write_bytes(b"d" * 100_000)
    os.link(data, tree / "y" / "link1")
    os.link(data, tree / "z" / "link2")
    os.link(outside / "file", tree / "z" / "outside-link")
    before = snapshot_tree(outside)
    result = _native.remove_tree(tree, threads=threads, count_bytes=True)
    assert result.errors == ()
    assert result.entries == 4 + 4
    # the 100 kB file is freed once; the outside file keeps its data
    assert 100_000 <= result.bytes < 100_000 + 8 * 4096 + 4 * 4096
    assert not tree.exists()
    after = snapshot_tree(outside)
    assert after["file"][:6] == before["file"][:6]
    assert os.stat(outside / "file").st_nlink == 1


@pytest.mark.parametrize("threads", THREADS)
def test_special_files(tmpfs: Path, threads: int) -> None:
    tree = tmpfs / "tree"
    (tree / "dev").mkdir(parents=True)
    os.mkfifo(tree / "fifo")
    os.mknod(tree / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(tree / "dev" / "loop", 0o660 | stat.S_IFBLK, os.makedev(7, 200))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tree / "sock"))
        os.mknod(tree / "whiteout", stat.S_IFCHR, os.makedev(0, 0))
        result = _native.remove_tree(tree, threads=threads)
    assert result.errors == ()
    assert result.entries == 7
    assert not tree.exists()


@pytest.mark.parametrize("threads", THREADS)
def test_names_that_are_not_utf8(tmpfs: Path, threads: int) -> None:
    tree = os.fsencode(tmpfs / "tree")
    os.mkdir(tree)
    bad_dir = os.path.join(tree, b"\xff\xfe-dir")
    os.mkdir(bad_dir)
    for name in (b"\x80", b"caf\xe9", b"new\nline", b" lead", b"trail ", b"-rf", b"*"):
        with open(os.path.join(bad_dir, name), "wb") as f:
            f.write(b"x")
    result = _native.remove_tree(os.fsdecode(tree), threads=threads)
    assert result.errors == ()
    assert result.entries == 9
    assert not os.path.exists(tree)


@pytest.mark.parametrize("threads", THREADS)
def test_mode_0000_directories(tmpfs: Path, threads: int) -> None:
    tree = tmpfs / "tree"
    locked = tree / "locked" / "deeper"
    locked.mkdir(parents=True)
    (locked / "f").write_text("x")
    locked.chmod(0)
    (tree / "locked").chmod(0)
    result = _native.remove_tree(tree, threads=threads)
    assert result.errors == ()
    assert not tree.exists()


def _make_deep(root: Path, depth: int, name: str) -> int:
    """A chain of ``depth`` directories built with dir fds (paths > PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            os.mkdir(name, dir_fd=fd)
            if i % 100 == 0:
                os.close(os.open("file", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    return len(name) * depth + depth


@pytest.mark.parametrize("threads", THREADS)
def test_depth_3000_beyond_path_max(tmpfs: Path, threads: int) -> None:
    tree = tmpfs / "tree"
    tree.mkdir()
    path_len = _make_deep(tree, 3000, "deep-dir")
    assert path_len > 4096 * 5
    result = _native.remove_tree(tree, threads=threads)
    assert result.errors == ()
    assert result.entries == 3000 + 30 + 1
    assert not tree.exists()


def test_deep_failure_reports_the_full_path(tmp_path: Path, privileged: None) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    _make_deep(tree, 700, "d")
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(700):
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("stuck", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        subprocess.run(["chattr", "+i", f"/proc/self/fd/{fd}/stuck"], check=True,
                       pass_fds=(fd,))
        try:
            result = _native.remove_tree(tree)
            assert result.errors == (("/".join(["d"] * 700) + "/stuck", errno.EPERM),)
        finally:
            subprocess.run(["chattr", "-i", f"/proc/self/fd/{fd}/stuck"], check=True,
                           pass_fds=(fd,))
    finally:
        os.close(fd)
    assert _native.remove_tree(tree).errors == ()


@pytest.fixture
def immutable_tree(tmp_path: Path, privileged: None) -> Iterator[Path]:
    # chattr needs a filesystem with inode flags: the ext4 root, not tmpfs.
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    for i in range(50):
        (tree / "dir" / f"sibling{i}").write_text("s")
        (tree / f"other{i}").mkdir()
        (tree / f"other{i}" / "f").write_text("o")
    frozen = tree / "dir" / "immutable"
    frozen.write_text("frozen")
    appendonly = tree / "dir" / "appendonly"
    appendonly.write_text("log")
    subprocess.run(["chattr", "+i", str(frozen)], check=True)
    subprocess.run(["chattr", "+a", str(appendonly)], check=True)
    try:
        yield tree
    finally:
        for p in (frozen, appendonly):
            if p.exists():
                subprocess.run(["chattr", "-i", "-a", str(p)], check=True)


@pytest.mark.parametrize("threads", THREADS)
def test_immutable_file_is_reported_and_siblings_removed(
    immutable_tree: Path, threads: int
) -> None:
    result = _native.remove_tree(immutable_tree, threads=threads)
    assert sorted(result.errors) == [
        ("dir/appendonly", errno.EPERM),
        ("dir/immutable", errno.EPERM),
    ]
    left = sorted(str(p.relative_to(immutable_tree)) for p in immutable_tree.rglob("*"))
    assert left == ["dir", "dir/appendonly", "dir/immutable"]
    assert (immutable_tree / "dir" / "immutable").read_text() == "frozen"


@pytest.mark.parametrize("threads", THREADS)
def test_keep_root(tmpfs: Path, threads: int) -> None:
    tree = tmpfs / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "c").write_text("c")
    mode = 0o711
    tree.chmod(mode)
    result = _native.remove_tree(tree, threads=threads, keep_root=True)
    assert result.errors == ()
    assert result.entries == 3
    assert list(tree.iterdir()) == []
    assert stat.S_IMODE(tree.stat().st_mode) == mode


def test_missing_and_non_directory_roots(tmpfs: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        _native.remove_tree(tmpfs / "missing")
    assert info.value.filename == str(tmpfs / "missing")
    (tmpfs / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        _native.remove_tree(tmpfs / "file")
    assert (tmpfs / "file").read_text() == "x"


def make_wide_tree(root: Path, files: int, dirs: int) -> None:
    """``files`` empty files spread over ``dirs`` nested directories."""
    per_dir = files // dirs
    made = 0
    for d in range(dirs):
        path = root / f"g{d % 50:02d}" / f"h{d // 50 % 10}" / f"d{d}"
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(per_dir):
                os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
                made += 1
        finally:
            os.close(fd)


@pytest.mark.parametrize("threads", THREADS)
def test_100k_entries(tmpfs: Path, threads: int) -> None:
    tree = tmpfs / "tree"
    make_wide_tree(tree, 100_000, 1_000)
    expected = sum(1 for _ in tree.rglob("*")) + 1
    assert expected >= 101_000
    result = _native.remove_tree(tree, threads=threads, count_bytes=True)
    assert result.errors == ()
    assert result.entries == expected
    assert not tree.exists()
