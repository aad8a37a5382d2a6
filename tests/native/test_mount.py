"""mount(2), the new mount API and relative-path mounts, for real."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from overlay import _native
from overlay._native import MountFlag, UnmountFlag
from overlay.mount import MountTableWatch, mount_table
from tests.helpers import mounts_under


def make_layers(root: Path, count: int) -> list[Path]:
    """count layers, topmost first: each has 'common' (its own index),
    'only-<i>', and layer i hides 'hidden-<i+1>' of the layer below with a
    whiteout so the top wins everywhere."""
    layers = []
    for i in range(count):
        fs = root / f"{i:03d}" / "fs"
        fs.mkdir(parents=True)
        (fs / "common").write_text(str(i))
        (fs / f"only-{i}").write_text(f"layer {i}")
        layers.append(fs)
    return layers


def check_stack(target: Path, count: int) -> None:
    assert (target / "common").read_text() == "0"
    for i in (0, count // 2, count - 1):
        assert (target / f"only-{i}").read_text() == f"layer {i}"
    names = sorted(os.listdir(target))
    assert len(names) == count + 1


def test_bind_and_unmount(tmpfs: Path) -> None:
    src, dst = tmpfs / "src", tmpfs / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("hello")
    _native.mount(src, dst, None, MountFlag.BIND)
    assert (dst / "f").read_text() == "hello"
    (dst / "g").write_text("through")
    assert (src / "g").read_text() == "through"
    _native.unmount(dst)
    assert list(dst.iterdir()) == []


def test_rbind_carries_submounts(tmpfs: Path) -> None:
    src, sub, plain, rec = (tmpfs / n for n in ("src", "sub", "plain", "rec"))
    for d in (src, sub, plain, rec):
        d.mkdir()
    (src / "mnt").mkdir()
    (sub / "deep").write_text("sub")
    _native.mount(sub, src / "mnt", None, MountFlag.BIND)
    try:
        _native.mount(src, plain, None, MountFlag.BIND)
        _native.mount(src, rec, None, MountFlag.BIND | MountFlag.REC)
        try:
            assert not (plain / "mnt" / "deep").exists()
            assert (rec / "mnt" / "deep").read_text() == "sub"
        finally:
            _native.unmount(plain)
            _native.unmount(rec, UnmountFlag.DETACH)
    finally:
        _native.unmount(src / "mnt")


def test_read_only_bind(tmpfs: Path) -> None:
    src, dst = tmpfs / "src", tmpfs / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("ro")
    _native.mount(src, dst, None, MountFlag.BIND)
    try:
        _native.mount(None, dst, None, MountFlag.REMOUNT | MountFlag.BIND | MountFlag.RDONLY)
        assert (dst / "f").read_text() == "ro"
        with pytest.raises(OSError) as info:
            (dst / "new").write_text("x")
        assert info.value.errno == errno.EROFS
        with pytest.raises(OSError) as info:
            (dst / "f").unlink()
        assert info.value.errno == errno.EROFS
        (src / "still-writable").write_text("yes")
    finally:
        _native.unmount(dst)


@pytest.mark.parametrize("count", [2, 128, 500])
def test_overlay_new_api(tmpfs: Path, count: int) -> None:
    if not _native.mount_api_support() & _native.MountApi.LOWERDIR_ADD:
        pytest.fail("kernel lacks overlay lowerdir+ (needs Linux >= 6.8)")
    layers = make_layers(tmpfs / "layers", count)
    target = tmpfs / "merged"
    target.mkdir()
    _native.mount_overlay(target, layers, options=["index=off"])
    try:
        check_stack(target, count)
        with pytest.raises(OSError) as info:
            (target / "new").write_text("x")
        assert info.value.errno == errno.EROFS
    finally:
        _native.unmount(target)


@pytest.mark.parametrize("count", [1, 2, 128, 500])
def test_overlay_new_api_writable(tmpfs: Path, count: int) -> None:
    layers = make_layers(tmpfs / "layers", count)
    upper, work, target = tmpfs / "upper", tmpfs / "work", tmpfs / "merged"
    for d in (upper, work, target):
        d.mkdir()
    _native.mount_overlay(target, layers, upper=upper, work=work)
    try:
        check_stack(target, count)
        (target / "common").write_text("top")
        os.unlink(target / f"only-{count - 1}")
        assert (upper / "common").read_text() == "top"
        assert (layers[0] / "common").read_text() == "0"
        assert not (target / f"only-{count - 1}").exists()
        assert (layers[-1] / f"only-{count - 1}").exists()
    finally:
        _native.unmount(target)


def test_overlay_single_lower_needs_an_upper(tmpfs: Path) -> None:
    # overlayfs refuses a read-only stack of one layer (a view of one parent
    # is a read-only bind mount instead).
    layers = make_layers(tmpfs / "layers", 1)
    target = tmpfs / "merged"
    target.mkdir()
    with pytest.raises(OSError) as info:
        _native.mount_overlay(target, layers)
    assert info.value.errno == errno.EINVAL
    assert mounts_under(tmpfs) == [str(tmpfs)]


def test_overlay_long_layer_paths_use_descriptors(tmpfs: Path) -> None:
    # fsconfig() takes strings of at most 255 bytes; longer paths go by fd.
    if not _native.mount_api_support() & _native.MountApi.LOWERDIR_FD:
        pytest.fail("kernel lacks fd-valued lowerdir+ (needs Linux >= 6.13)")
    deep = tmpfs / ("x" * 200) / ("y" * 200)
    layers = make_layers(deep, 3)
    assert all(len(str(p)) > 256 for p in layers)
    target = tmpfs / "merged"
    target.mkdir()
    _native.mount_overlay(target, layers)
    try:
        check_stack(target, 3)
    finally:
        _native.unmount(target)


def test_overlay_relative_paths_from_private_cwd(tmpfs: Path) -> None:
    count = 128
    layers = make_layers(tmpfs / "layers", count)
    absolute = "lowerdir=" + ":".join(str(p) for p in layers)
    assert len(absolute) > _native.MAX_MOUNT_DATA
    relative = "lowerdir=" + ":".join(f"{i:03d}/fs" for i in range(count))
    target = tmpfs / "merged"
    target.mkdir()
    cwd = os.getcwd()
    _native.mount_at(tmpfs / "layers", "overlay", target, "overlay", 0, relative)
    try:
        assert os.getcwd() == cwd
        check_stack(target, count)
    finally:
        _native.unmount(target)


def test_oversized_options_are_refused_before_the_kernel(tmpfs: Path) -> None:
    layers = make_layers(tmpfs / "layers", 60)
    target = tmpfs / "merged"
    target.mkdir()
    data = "lowerdir=" + ":".join(str(p) for p in layers)
    assert len(data) > 4095
    with pytest.raises(OSError) as info:
        _native.mount("overlay", target, "overlay", 0, data)
    assert info.value.errno == errno.E2BIG
    assert info.value.filename == str(target)
    assert mounts_under(tmpfs) == [str(tmpfs)]


def test_legacy_overlay_mount(tmpfs: Path) -> None:
    layers = make_layers(tmpfs / "layers", 2)
    target = tmpfs / "merged"
    target.mkdir()
    data = "lowerdir=" + ":".join(str(p) for p in layers)
    _native.mount("overlay", target, "overlay", 0, data)
    try:
        check_stack(target, 2)
    finally:
        _native.unmount(target)


def test_overlay_errors_carry_the_kernel_message(tmpfs: Path) -> None:
    target = tmpfs / "merged"
    target.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        _native.mount_overlay(target, [tmpfs / "missing-layer"])
    assert info.value.filename == str(tmpfs / "missing-layer")
    assert f"lowerdir+ {tmpfs / 'missing-layer'}" in str(info.value.strerror)
    layers = make_layers(tmpfs / "layers", 501)
    with pytest.raises(OSError) as info2:
        _native.mount_overlay(target, layers)
    assert info2.value.errno == errno.EINVAL
    assert mounts_under(tmpfs) == [str(tmpfs)]


def test_lazy_unmount_of_a_busy_mount(tmpfs: Path) -> None:
    src, dst = tmpfs / "src", tmpfs / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("busy")
    _native.mount(src, dst, None, MountFlag.BIND)
    fd = os.open(dst / "f", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            _native.unmount(dst)
        assert info.value.errno == errno.EBUSY
        assert info.value.filename == str(dst)
        _native.unmount(dst, UnmountFlag.DETACH)
        assert str(dst) not in mounts_under(tmpfs)
        assert os.read(fd, 10) == b"busy"
    finally:
        os.close(fd)


def test_missing_source_names_the_source(tmpfs: Path) -> None:
    dst = tmpfs / "dst"
    dst.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        _native.mount(tmpfs / "nope", dst, None, MountFlag.BIND)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(tmpfs / "nope")


def test_errno_is_kept(tmpfs: Path) -> None:
    with pytest.raises(OSError) as info:
        _native.unmount(tmpfs / "not-a-mount-point-missing")
    assert info.value.errno == errno.ENOENT
    plain = tmpfs / "plain"
    plain.mkdir()
    with pytest.raises(OSError) as info:
        _native.unmount(plain)
    assert info.value.errno == errno.EINVAL
    assert info.value.filename == str(plain)


def test_renameat2(tmpfs: Path) -> None:
    a, b = tmpfs / "a", tmpfs / "b"
    a.write_text("A")
    b.write_text("B")
    with pytest.raises(FileExistsError):
        _native.renameat2(a, b, _native.RenameFlag.NOREPLACE)
    _native.renameat2(a, b, _native.RenameFlag.EXCHANGE)
    assert (a.read_text(), b.read_text()) == ("B", "A")
    _native.renameat2(a, tmpfs / "c", _native.RenameFlag.NOREPLACE)
    assert (tmpfs / "c").read_text() == "B"
    with pytest.raises(FileNotFoundError) as info:
        _native.renameat2(tmpfs / "gone", tmpfs / "d")
    assert info.value.filename == str(tmpfs / "gone")
    assert info.value.filename2 == str(tmpfs / "d")


def test_small_helpers(tmpfs: Path, tmp_path: Path) -> None:
    _native.syncfs(tmpfs)
    assert _native.fs_magic(tmpfs) == 0x01021994
    assert _native.fs_magic(tmp_path) == 0xEF53
    empty = tmpfs / "empty"
    empty.mkdir()
    assert _native.dir_has_dtype(empty) is True
    assert list(empty.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        _native.syncfs(tmpfs / "missing")


def test_mount_table_watch_parses_again_only_after_a_change(tmpfs: Path) -> None:
    watch = MountTableWatch()
    try:
        first = watch.rows()
        assert first == mount_table()
        assert watch.rows() is first  # nothing changed: not read again
        target = tmpfs / "m"
        target.mkdir()
        _native.mount("none", target, "tmpfs", 0, "size=1m")
        try:
            mounted = watch.rows()
            assert mounted is not first
            assert str(target) in [m.target for m in mounted]
            assert mounted == mount_table()
            assert watch.rows() is mounted
        finally:
            _native.unmount(target)
        after = watch.rows()
        assert str(target) not in [m.target for m in after]
        assert after == mount_table()
    finally:
        watch.close()
    watch.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        watch.rows()
