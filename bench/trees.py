"""Tree builders for the removal and usage benchmarks.

Three shapes (issue 2): ``nested`` (100k empty files in ~5k nested
directories), ``rootfs-like`` (~30k names laid out like a Debian root filesystem:
small files with a little data, hard-link groups, relative and absolute
symlinks) and ``flat`` (100k empty files in one directory).  ``BENCH_SCALE``
multiplies every count.  The same seed builds the same tree every time, so
each contender removes an identical one.

Builders work on directory descriptors (``dir_fd``) and never stat what they
made: building stays cheap next to what is measured.
"""

from __future__ import annotations

import array
import fcntl
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SCALE_ENV", "TREES", "TreeKind", "TreeStats", "build", "mark_topdir", "scale", "scaled",
]

SCALE_ENV = "BENCH_SCALE"

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
#: Subdirectories per directory in the nested tree: 16 at the top is enough
#: for a parallel walk to split there (it wants nthreads * 4 subtrees).
_FANOUT = 16
_SEED = 0x0F5
_BLOB = random.Random(_SEED).randbytes(4096)


_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def mark_topdir(path: Path) -> bool:
    """Set ``chattr +T`` on the directory that will hold the trees, if the filesystem can.

    ext4 without a journal (this machine's root filesystem) will not reuse an
    inode freed less than 60 s ago (300 s while its table block is dirty:
    fs/ext4/ialloc.c, recently_deleted), and scans past each such inode on
    every allocation: rebuilding where a tree was just removed costs ~0.5 ms
    per file instead of ~20 us.  Below a TOPDIR directory the Orlov
    allocator puts each new tree in another block group, chosen by a hash of
    its name: so give each tree a new name.  Only the untimed building is
    affected.
    """
    fd = os.open(path, _DIR)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        flags[0] |= _FS_TOPDIR_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
    except OSError:
        return False  # tmpfs and others: no such flag, and no such problem
    finally:
        os.close(fd)
    return True


def scale() -> float:
    """``BENCH_SCALE`` (default 1.0): multiplies the file counts of every tree."""
    raw = os.environ.get(SCALE_ENV, "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SCALE_ENV}={raw!r}: not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{SCALE_ENV}={raw!r}: must be a positive number")
    return value


def scaled(count: int, factor: float, minimum: int = 1) -> int:
    return max(minimum, round(count * factor))


@dataclass(frozen=True, slots=True)
class TreeStats:
    """What a builder made.

    ``files`` counts names of regular files (a hard link is one more name);
    ``inodes`` counts distinct inodes, the root included (``du --inodes``).
    """

    dirs: int
    files: int
    symlinks: int
    inodes: int

    @property
    def names(self) -> int:
        """Entries a removal unlinks, the root included (``remove_tree().entries``)."""
        return self.dirs + self.files + self.symlinks

    @property
    def nondirs(self) -> int:
        return self.files + self.symlinks


@dataclass(frozen=True, slots=True)
class TreeKind:
    name: str
    description: str
    builder: Callable[[Path, float], TreeStats]


def _touch(dir_fd: int, name: str, size: int = 0) -> None:
    fd = os.open(name, _CREATE, 0o644, dir_fd=dir_fd)
    try:
        if size:
            os.write(fd, _BLOB[:size])
    finally:
        os.close(fd)


def build_nested(path: Path, factor: float) -> TreeStats:
    """Empty files spread evenly over directories ``_FANOUT`` wide, ~4 deep."""
    n_files = scaled(100_000, factor)
    n_dirs = scaled(5_000, factor)  # the root included
    per_dir, extra = divmod(n_files, n_dirs)
    path.mkdir()
    root = os.open(path, _DIR)
    try:
        # Directory i's children are i * _FANOUT + 1 ...: breadth-first
        # order, so rel[i] is known before directory i is filled.
        rel = [""]
        for i in range(n_dirs):
            fd = root if i == 0 else os.open(rel[i], _DIR, dir_fd=root)
            try:
                first = i * _FANOUT + 1
                for j in range(min(_FANOUT, max(0, n_dirs - first))):
                    name = f"d{j:x}"
                    os.mkdir(name, 0o755, dir_fd=fd)
                    rel.append(f"{rel[i]}/{name}" if i else name)
                for k in range(per_dir + (1 if i < extra else 0)):
                    _touch(fd, f"file-{k:04d}")
            finally:
                if fd != root:
                    os.close(fd)
    finally:
        os.close(root)
    return TreeStats(dirs=n_dirs, files=n_files, symlinks=0, inodes=n_dirs + n_files)


def build_flat(path: Path, factor: float) -> TreeStats:
    """Empty files in a single directory."""
    n_files = scaled(100_000, factor)
    path.mkdir()
    fd = os.open(path, _DIR)
    try:
        for k in range(n_files):
            _touch(fd, f"file-{k:06d}")
    finally:
        os.close(fd)
    return TreeStats(dirs=1, files=n_files, symlinks=0, inodes=1 + n_files)


class _PathBuilder:
    """Creates entries by path relative to one open root, parents on demand."""

    def __init__(self, root_fd: int) -> None:
        self.fd = root_fd
        self.made: set[str] = set()
        self.files = 0
        self.links = 0
        self.symlinks = 0

    def mkdir(self, rel: str) -> None:
        if not rel or rel in self.made:
            return
        parent, _, _ = rel.rpartition("/")
        self.mkdir(parent)
        os.mkdir(rel, 0o755, dir_fd=self.fd)
        self.made.add(rel)

    def file(self, rel: str, size: int) -> None:
        self.mkdir(rel.rpartition("/")[0])
        _touch(self.fd, rel, size)
        self.files += 1

    def link(self, rel: str, existing: str) -> None:
        self.mkdir(rel.rpartition("/")[0])
        os.link(existing, rel, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
        self.files += 1
        self.links += 1

    def symlink(self, rel: str, target: str) -> None:
        self.mkdir(rel.rpartition("/")[0])
        os.symlink(target, rel, dir_fd=self.fd)
        self.symlinks += 1

    def stats(self) -> TreeStats:
        dirs = len(self.made) + 1
        return TreeStats(
            dirs=dirs,
            files=self.files,
            symlinks=self.symlinks,
            inodes=dirs + self.files - self.links + self.symlinks,
        )


_LANGS = ("de", "es", "fr", "it", "ja", "nl", "pl", "pt_BR", "ru", "zh_CN")
_REGIONS = ("Africa", "America", "Antarctica", "Asia", "Atlantic", "Australia", "Europe",
            "Indian", "Pacific")
_SHARE_SUBDIRS = ("data", "icons/hicolor/48x48/apps", "icons/hicolor/scalable/apps",
                  "templates", "examples", "lua/modules", "help/C")


def build_rootfs(path: Path, factor: float) -> TreeStats:
    """A Debian-like root filesystem: ~30k names, most with 100 B - 4 KiB of data.

    Per package: docs, dpkg lists, a shared library with its soname symlinks,
    sometimes a binary (a few with hard-linked aliases), a man page, an
    alternatives symlink, config in etc/, a Python package with __pycache__,
    translations and a data tree.  Plus tzdata with posix/ as hard links.
    """
    rng = random.Random(_SEED)
    packages = scaled(1_050, factor)
    zones = scaled(600, factor)
    path.mkdir()
    root = os.open(path, _DIR)
    try:
        b = _PathBuilder(root)
        for d in ("usr/bin", "usr/sbin", "usr/lib64", "usr/lib/x86_64-linux-gnu",
                  "usr/lib/python3/dist-packages", "usr/share/doc", "usr/share/man/man1",
                  "etc/alternatives", "var/lib/dpkg/info", "var/cache/apt", "var/log/apt",
                  "var/tmp", "tmp", "root", "home", "opt", "srv", "mnt", "proc", "sys", "dev"):
            b.mkdir(d)
        for name in ("bin", "sbin", "lib", "lib64"):
            b.symlink(name, f"usr/{name}")
        for k in range(packages):
            pkg = f"pkg{k:04d}"
            b.file(f"usr/share/doc/{pkg}/copyright", rng.randint(200, 4096))
            b.file(f"usr/share/doc/{pkg}/changelog.Debian.gz", rng.randint(100, 2048))
            b.file(f"var/lib/dpkg/info/{pkg}.list", rng.randint(50, 4096))
            b.file(f"var/lib/dpkg/info/{pkg}.md5sums", rng.randint(50, 4096))
            if k % 2 == 0:
                lib = f"usr/lib/x86_64-linux-gnu/lib{pkg}"
                b.file(f"{lib}.so.1.2.{k % 7}", rng.randint(1024, 4096))
                b.symlink(f"{lib}.so.1", f"lib{pkg}.so.1.2.{k % 7}")
                if k % 6 == 0:
                    b.symlink(f"{lib}.so", f"lib{pkg}.so.1")
            if k % 3 == 0:
                b.file(f"usr/bin/{pkg}", rng.randint(1024, 4096))
                b.file(f"usr/share/man/man1/{pkg}.1.gz", rng.randint(300, 3000))
                b.symlink(f"etc/alternatives/{pkg}", f"/usr/bin/{pkg}")
                if k % 15 == 0:
                    b.link(f"usr/bin/{pkg}-1.{k % 9}", f"usr/bin/{pkg}")
                    b.link(f"usr/sbin/{pkg}d", f"usr/bin/{pkg}")
            if k % 4 == 0:
                b.file(f"etc/{pkg}/{pkg}.conf", rng.randint(100, 2000))
                b.file(f"etc/{pkg}/conf.d/00-defaults", rng.randint(50, 500))
            if k % 5 == 0:
                py = f"usr/lib/python3/dist-packages/{pkg}"
                b.file(f"{py}/__init__.py", 0)
                for m in range(rng.randint(3, 12)):
                    b.file(f"{py}/mod{m}.py", rng.randint(200, 4096))
                    b.file(f"{py}/__pycache__/mod{m}.cpython-311.pyc", rng.randint(200, 4096))
            if k % 3 == 1:
                for lang in _LANGS:
                    b.file(f"usr/share/locale/{lang}/LC_MESSAGES/{pkg}.mo",
                           rng.randint(500, 4096))
            if rng.random() < 0.6:
                subdirs = rng.sample(_SHARE_SUBDIRS, rng.randint(1, 3))
                for n in range(rng.randint(5, 40)):
                    b.file(f"usr/share/{pkg}/{subdirs[n % len(subdirs)]}/item{n:02d}",
                           rng.randint(100, 4096))
        for z in range(zones):
            zone = f"{_REGIONS[z % len(_REGIONS)]}/City{z:03d}"
            b.file(f"usr/share/zoneinfo/{zone}", rng.randint(100, 3000))
            b.link(f"usr/share/zoneinfo/posix/{zone}", f"usr/share/zoneinfo/{zone}")
            if z % 10 == 0:
                b.symlink(f"usr/share/zoneinfo/Alias{z:03d}", zone)
        for log in ("dpkg.log", "alternatives.log", "apt/history.log", "apt/term.log"):
            b.file(f"var/log/{log}", rng.randint(1000, 4096))
        b.symlink("etc/localtime", "/usr/share/zoneinfo/Europe/City006")
        b.symlink("etc/mtab", "../proc/self/mounts")
        return b.stats()
    finally:
        os.close(root)


TREES: dict[str, TreeKind] = {
    "nested": TreeKind("nested", "100k empty files in ~5k nested directories", build_nested),
    "rootfs-like": TreeKind("rootfs-like", "~30k-name rootfs-like tree, hard links and symlinks",
                            build_rootfs),
    "flat": TreeKind("flat", "100k empty files in one directory", build_flat),
}


def build(kind: str, path: Path, factor: float | None = None) -> TreeStats:
    """Build tree ``kind`` at ``path`` (which must not exist) at ``factor`` x its size."""
    return TREES[kind].builder(path, scale() if factor is None else factor)
