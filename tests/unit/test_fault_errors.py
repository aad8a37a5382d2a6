"""errno → domain error (overlay._faults) and LMDB's errors → domain errors
(metastore._map_error): every known errno its kind and an actionable message
naming the filesystem; an unknown one left alone."""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
from pathlib import Path

import lmdb
import pytest

from overlay import _faults
from overlay.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    OverlayError,
    ReadOnlyError,
    ResourceExhaustedError,
    UnavailableError,
    UnknownError,
)
from overlay.metastore import _map_error


def findmnt(path: Path) -> tuple[str, str]:
    out = subprocess.run(["findmnt", "-no", "SOURCE,TARGET", "-T", str(path)], check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0], out[1]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_faults, "_warned", {})


def test_the_filesystem_of_a_path_even_one_not_made_yet(tmp_path: Path) -> None:
    dev, target = findmnt(tmp_path)
    for path in (tmp_path, tmp_path / "snapshots" / "new-abc" / "fs"):
        fs = _faults.filesystem(path)
        assert fs is not None
        assert (fs.source, fs.target) == (dev, target)
        vfs = os.statvfs(tmp_path)
        assert fs.size == vfs.f_blocks * vfs.f_frsize
        assert 0 <= fs.free <= fs.size
        assert fs.describe() == f"{dev} mounted at {target}"


def test_no_space(tmp_path: Path) -> None:
    dev, target = findmnt(tmp_path)
    err = _faults.from_errno(errno.ENOSPC, "prepare 'k'", tmp_path / "x")
    assert type(err) is ResourceExhaustedError
    assert re.fullmatch(
        re.escape(f"prepare 'k': no space left on {dev} mounted at {target} (")
        + r"\d+(\.\d)? [KMGT]?i?B, \d+(\.\d)? [KMGT]?i?B free\): free space there "
        r"\(`ovl cleanup` reclaims removed snapshots\): resource exhausted", str(err)), err
    quota = _faults.from_errno(errno.EDQUOT, "commit 'k'", tmp_path)
    assert type(quota) is ResourceExhaustedError
    assert str(quota) == (f"commit 'k': disk quota exceeded on {dev} mounted at {target}: "
                          "raise the quota or free space there: resource exhausted")


def test_read_only(tmp_path: Path) -> None:
    dev, target = findmnt(tmp_path)
    tail = (f"({dev} mounted at {target}): make it writable and restart the daemon "
            "(mount -o remount,rw; after an error: unmount, fsck, mount); reads keep working "
            "meanwhile: failed precondition")
    err = _faults.from_errno(errno.EROFS, "prepare 'k'", tmp_path / "x", root=str(tmp_path))
    assert type(err) is ReadOnlyError
    assert str(err) == (
        f"prepare 'k': the root {str(tmp_path)!r} is on a read-only filesystem {tail}")
    err = _faults.from_errno(errno.EROFS, "metastore 'm': commit failed", tmp_path)
    assert str(err) == f"metastore 'm': commit failed: the filesystem is read-only {tail}"


@pytest.mark.parametrize(
    ("code", "cls", "text"),
    [
        (errno.EIO, FailedPreconditionError, "input/output error on {on} ({path!r}): check "
         "the device (dmesg) and the filesystem (fsck): failed precondition"),
        (errno.EUCLEAN, FailedPreconditionError, "the filesystem is corrupted on {on} "
         "({path!r}): check the device (dmesg) and the filesystem (fsck): failed precondition"),
        (errno.ENOMEM, ResourceExhaustedError,
         "out of memory (or address space for the metadata map): resource exhausted"),
        (errno.EMFILE, ResourceExhaustedError,
         "too many open files in the daemon (raise its LimitNOFILE): resource exhausted"),
        (errno.ENFILE, ResourceExhaustedError,
         "too many open files on the host (raise fs.file-max): resource exhausted"),
        (errno.EMLINK, ResourceExhaustedError, "too many links to {path!r}: resource exhausted"),
        (errno.EACCES, FailedPreconditionError, "permission denied on {path!r}: check its owner "
         "and mode, an immutable attribute (lsattr) and the security policy (SELinux, "
         "AppArmor): failed precondition"),
        (errno.EPERM, FailedPreconditionError, "permission denied on {path!r}: check its owner "
         "and mode, an immutable attribute (lsattr) and the security policy (SELinux, "
         "AppArmor): failed precondition"),
    ],
)
def test_every_other_known_errno(tmp_path: Path, code: int, cls: type[OverlayError],
                                 text: str) -> None:
    dev, target = findmnt(tmp_path)
    path = str(tmp_path / "f")
    err = _faults.from_errno(code, "cleanup", path)
    assert type(err) is cls
    assert str(err) == "cleanup: " + text.format(on=f"{dev} mounted at {target}", path=path)
    assert code in _faults.KNOWN_ERRNOS


@pytest.mark.parametrize("code", [errno.ENOENT, errno.EEXIST, errno.EINVAL, errno.EBUSY, 0,
                                  None])
def test_an_unknown_errno_is_left_alone(tmp_path: Path, code: int | None) -> None:
    assert _faults.from_errno(code, "prepare 'k'", tmp_path) is None
    if code:
        assert _faults.from_os_error(OSError(code, os.strerror(code), str(tmp_path)),
                                     "x") is None


def test_from_os_error_takes_the_path_from_the_exception(tmp_path: Path) -> None:
    dev, _ = findmnt(tmp_path)
    for name in (str(tmp_path / "new-x"), os.fsencode(tmp_path / "new-x")):
        err = _faults.from_os_error(OSError(errno.ENOSPC, "No space left", name), "view 'v'")
        assert isinstance(err, ResourceExhaustedError)
        assert str(err).startswith(f"view 'v': no space left on {dev} ")
    err = _faults.from_os_error(OSError(errno.ENOSPC, "No space left"), "view 'v'")
    assert str(err) == ("view 'v': no space left on the filesystem of '': free space there "
                        "(`ovl cleanup` reclaims removed snapshots): resource exhausted")


def test_lmdbs_eio_after_a_short_write_on_a_full_disk_only(tmpfs: Path) -> None:
    # tmpfs has gigabytes free: an EIO there is an i/o error, not a full disk
    err = _faults.from_errno(errno.EIO, "commit", tmpfs / "metadata.db", short_write=True)
    assert type(err) is FailedPreconditionError
    assert "input/output error" in str(err)


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (64 << 20, "64.0 MiB"),
    (3 << 29, "1.5 GiB"), (5 << 40, "5.0 TiB"), (1 << 60, "1024.0 PiB")])
def test_human_sizes(size: int, text: str) -> None:
    assert _faults.human(size) == text


def test_each_fault_is_logged_once_a_minute_without_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING, "overlay.faults")
    for _ in range(3):
        _faults.from_errno(errno.ENOSPC, "prepare 'k'", tmp_path)
    _faults.from_errno(errno.EROFS, "prepare 'k'", tmp_path)
    assert [(r.levelname, r.exc_info) for r in caplog.records] == [("WARNING", None)] * 2
    assert "no space left" in caplog.records[0].getMessage()
    assert "read-only" in caplog.records[1].getMessage()
    monkeypatch.setattr(_faults, "WARN_EVERY", 0.0)
    _faults.from_errno(errno.ENOSPC, "prepare 'k'", tmp_path)
    assert len(caplog.records) == 3


def lmdb_error(cls: type[lmdb.Error], code: int) -> lmdb.Error:
    """An error as py-lmdb raises it: the errno or MDB code in ``code``."""
    exc = cls("mdb_txn_commit: " + (os.strerror(code) if code > 0 else "MDB"))
    exc.code = code  # type: ignore[misc]
    return exc


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (lmdb_error(lmdb.DiskError, errno.ENOSPC), ResourceExhaustedError),
        (lmdb_error(lmdb.Error, errno.EDQUOT), ResourceExhaustedError),
        (lmdb_error(lmdb.Error, errno.EROFS), ReadOnlyError),
        (lmdb_error(lmdb.MemoryError, errno.ENOMEM), ResourceExhaustedError),
        (lmdb_error(lmdb.ReadersFullError, -30790), ResourceExhaustedError),
        (lmdb_error(lmdb.TxnFullError, -30788), ResourceExhaustedError),
        (lmdb_error(lmdb.LockError, errno.EAGAIN), UnavailableError),
        (lmdb_error(lmdb.MapResizedError, -30785), UnavailableError),
        (lmdb_error(lmdb.ReadonlyError, errno.EACCES), FailedPreconditionError),
        (lmdb_error(lmdb.CorruptedError, -30796), UnknownError),
        (lmdb_error(lmdb.BadValsizeError, -30781), InvalidArgumentError),
        (lmdb_error(lmdb.MapFullError, -30792), ResourceExhaustedError),
    ],
    ids=lambda v: type(v).__name__,
)
def test_lmdb_errors_are_the_kind_they_really_are(
        tmp_path: Path, exc: lmdb.Error, cls: type[OverlayError]) -> None:
    err = _map_error(exc, "metastore 'm': commit failed", str(tmp_path / "metadata.db"))
    assert isinstance(err, cls)
    assert str(err).startswith("metastore 'm': commit failed: ")
    assert str(err).endswith(": " + cls.kind_text)
