"""Filesystems to measure on: the root filesystem, a tmpfs, a journaled ext4 on a loop device.

The tmpfs and the ext4 loop device are set up once per session and always
torn down (unmount, ``losetup --detach``, image deleted), even when a
benchmark fails.  They need root: without it they skip locally and fail
under ``CI=true`` (``tests.helpers.require_privileges``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.config import Filesystem
from bench.support import filesystem
from bench.trees import mark_topdir, scale
from tests.helpers import require_privileges

#: The ext4 image is sparse: only what the benchmark writes takes space.
EXT4_IMAGE_BYTES = 4 << 30


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()}"
        )
    return done.stdout


def _unmount(target: Path) -> None:
    from overlay import _native

    try:
        _native.unmount(target)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        _native.unmount(target, _native.UnmountFlag.DETACH)


def _remove(path: Path) -> None:
    from overlay import _native

    if path.is_dir() and not path.is_symlink():
        _native.remove_tree(path)


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    # Other work on the machine skews the numbers: say how busy it was.
    machine_info["loadavg"] = list(os.getloadavg())
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["kernel"] = platform.release()


@pytest.fixture(scope="session")
def privileged() -> None:
    """Root (for mounts); skips locally, fails under CI=true."""
    require_privileges()


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory on the root filesystem, under pytest's tmp_path."""
    path = tmp_path_factory.mktemp("rootfs")
    try:
        yield path
    finally:
        _remove(path)


@pytest.fixture(scope="session")
def tmpfs(tmp_path_factory: pytest.TempPathFactory, privileged: None) -> Iterator[Path]:
    """A private tmpfs, mounted by the benchmark: removal is bound by the CPU."""
    from overlay import _native

    target = tmp_path_factory.mktemp("tmpfs")
    _native.mount("tmpfs", target, "tmpfs", 0, "mode=0755,size=8g")
    try:
        yield target
    finally:
        _unmount(target)
        target.rmdir()


@pytest.fixture(scope="session")
def ext4(tmp_path_factory: pytest.TempPathFactory, privileged: None) -> Iterator[Path]:
    """Journaled ext4 (mke2fs defaults) on a loop device over a sparse image.

    Inode tables and the journal are initialised by mkfs so that no
    ext4lazyinit thread competes with the benchmark.
    """
    from overlay import _native

    work = tmp_path_factory.mktemp("ext4")
    image = work / "ext4.img"
    target = work / "mnt"
    target.mkdir()
    # Every tree of one usage module at once, with room to spare.
    inodes = max(262_144, round(400_000 * scale()))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(image.unlink, missing_ok=True)
        with image.open("wb") as f:
            f.truncate(EXT4_IMAGE_BYTES)
        _run(["mkfs.ext4", "-q", "-F", "-N", str(inodes),
              "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)])
        device = _run(["losetup", "--find", "--show", str(image)]).strip()
        cleanup.callback(_run, ["losetup", "--detach", device])
        _native.mount(device, target, "ext4", 0, None)
        cleanup.callback(_unmount, target)
        yield target


@pytest.fixture
def fs(request: pytest.FixtureRequest) -> Filesystem:
    """The filesystem named by an indirect ``fs`` parameter."""
    name = request.param
    assert isinstance(name, str)
    return filesystem(request, name)


@pytest.fixture
def workdir(fs: Filesystem) -> Iterator[Path]:
    """A fresh directory on ``fs`` for trees, removed with whatever is left in it."""
    path = Path(tempfile.mkdtemp(dir=fs.path, prefix="bench-"))
    mark_topdir(path)
    try:
        yield path
    finally:
        _remove(path)
