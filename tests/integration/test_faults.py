"""Faults of the host, answered in kind: a full disk, a root that turns
read-only while the daemon runs, a start on a read-only root, a full map.

Real filesystems: ext4 on a loop device whose image lives in the test's
``tmp_path``; the snapshotter in-process and a real ``ovl serve`` over gRPC,
asked the same things.  For each fault: every call's error class and whole
message, the whole store unchanged (every record, the id sequence and back
links, every directory and file under ``snapshots/`` and ``trash/``), the
daemon's log free of "unexpected" tracebacks, and recovery once the fault is
gone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay import cli, metastore
from overlay.client import RemoteSnapshotter
from overlay.errors import (
    FailedPreconditionError,
    OverlayError,
    ReadOnlyError,
    ResourceExhaustedError,
)
from overlay.overlayfs import OverlaySnapshotter
from overlay.server.config import Config, load_config
from overlay.snapshots import Info, Kind, Snapshotter
from tests.helpers import snapshot_tree, wait_for_socket

SERVE = [sys.executable, "-m", "overlay.cli", "serve"]
VIA = ["in-process", "grpc"]
MiB = 1 << 20

pytestmark = pytest.mark.usefixtures("privileged")


# --------------------------------------------------------------------------------------------
# filesystems


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def ext4(tmp_path: Path, options: str = "", size: int = 64 * MiB) -> Iterator[tuple[Path, Path]]:
    """A fresh ext4 (no blocks reserved for root) on a loop device, mounted
    at ``tmp_path/fs``: yields (mount point, image).  Unmounted at exit."""
    image, mnt = tmp_path / "fs.img", tmp_path / "fs"
    with open(image, "wb") as f:
        f.truncate(size)
    _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    mnt.mkdir()
    mount(image, mnt, options)
    try:
        yield mnt, image
    finally:
        unmount(mnt)


def mount(image: Path, mnt: Path, options: str = "") -> None:
    _run("mount", "-o", ",".join(filter(None, ["loop", options])), str(image), str(mnt))


def unmount(mnt: Path) -> None:
    """Unmount (the loop device goes with it); lazily if something still holds it."""
    if subprocess.run(["umount", str(mnt)], check=False, capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def source(mnt: Path) -> str:
    """/dev/loopN: what is mounted at ``mnt``."""
    out = subprocess.run(["findmnt", "-no", "SOURCE", str(mnt)], check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out.startswith("/dev/loop"), out
    return out


def trigger_error(mnt: Path) -> None:
    """An ext4 error, as a failing disk would cause: with errors=remount-ro the
    kernel turns the filesystem read-only (it stays so until fsck)."""
    trigger = Path("/sys/fs/ext4") / Path(source(mnt)).name / "trigger_fs_error"
    if not trigger.exists():
        message = f"the kernel has no {trigger} (CONFIG_EXT4_FS with sysfs error triggers)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: this must not skip)")
        pytest.skip(message)
    trigger.write_text("test_faults: a simulated disk error\n")
    with pytest.raises(OSError) as info:
        (mnt / "probe").mkdir()
    assert info.value.errno == errno.EROFS


def repair(image: Path, mnt: Path, options: str = "") -> None:
    """What an operator does after an error: unmount, fsck, mount again."""
    unmount(mnt)
    fsck = subprocess.run(["e2fsck", "-f", "-y", str(image)], check=False, capture_output=True,
                          text=True)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr  # 1: errors fixed
    mount(image, mnt, options)


def fill(mnt: Path) -> Path:
    """Take every free block of the filesystem at ``mnt``; the file to delete
    to free them again."""
    path = mnt / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for chunk in (MiB, 4096, 1):
            buf = b"\0" * chunk
            try:
                while True:
                    os.write(fd, buf)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.statvfs(mnt).f_bavail == 0
    return path


# --------------------------------------------------------------------------------------------
# the snapshotter under test: in-process, or a daemon over gRPC on the same root


class Served:
    """One snapshotter on ``root``: ``sn`` answers, ``log()`` is what it logged."""

    def __init__(self, via: str, root: Path, sockdir: Path, caplog: pytest.LogCaptureFixture,
                 config: Path | None = None) -> None:
        self.via, self.root, self.caplog = via, root, caplog
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = root.parent.parent / f"daemon-{time.monotonic_ns()}.log"
        self.sn: Snapshotter
        if via == "in-process":
            size, size_max = _map_sizes(config)
            self.sn = OverlaySnapshotter(root, map_size=size, map_size_max=size_max)
            return
        sock = sockdir / "ovl.sock"
        args = ["--root", str(root), "--address", str(sock)]
        if config is not None:
            args += ["--config", str(config)]
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([*SERVE, *args], stderr=err)
        wait_for_socket(sock, self.proc, "ovl serve")
        self.sn = RemoteSnapshotter(str(sock), timeout=60)

    def stop(self) -> int:
        """Close it; the daemon's exit status (0 in-process)."""
        self.sn.close()
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        if self.proc is not None:
            return self.stderr.read_text()
        return "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.caplog.records)

    def assert_no_surprise(self) -> None:
        """Nothing was logged as unexpected, with a traceback or as an error."""
        text = self.log()
        for word in ("unexpected", "Traceback", "ERROR"):
            assert word not in text, text

    def state(self) -> dict[str, Any]:
        """The whole store: every record and index entry, every snapshot's
        usage, every directory and file."""
        infos: list[Info] = []
        self.sn.walk(infos.append)
        return {
            "infos": infos,
            "usage": {i.name: self.sn.usage(i.name) for i in infos},
            "snapshots": snapshot_tree(self.root / "snapshots"),
            **self.light_state(),
        }

    def light_state(self) -> dict[str, Any]:
        """The records and index entries and the directory names: what a
        failed create could leave behind, cheaply."""
        if isinstance(self.sn, OverlaySnapshotter):
            with self.sn._ms.transaction() as txn:
                dump = metastore.dump(txn)
        else:
            store = metastore.MetaStore(self.root / "metadata.db", read_only=True)
            try:
                with store.transaction() as txn:
                    dump = metastore.dump(txn)
            finally:
                store.close()
        return {
            "dump": dump,
            "directories": sorted(os.listdir(self.root / "snapshots")),
            "trash": sorted(os.listdir(self.root / "trash")),
        }

    def wait_trash_empty(self) -> None:
        deadline = time.monotonic() + 60
        while os.listdir(self.root / "trash") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(self.root / "trash") == []


def _map_sizes(config: Path | None) -> tuple[int, int]:
    """What the daemon would take from ``config``, for the in-process snapshotter."""
    cfg = load_config(str(config)) if config is not None else Config()
    return cfg.metadata_map_size, cfg.metadata_map_size_max


@contextlib.contextmanager
def served(via: str, root: Path, sockdir: Path, caplog: pytest.LogCaptureFixture,
           config: Path | None = None) -> Iterator[Served]:
    caplog.set_level(logging.INFO)
    s = Served(via, root, sockdir, caplog, config)
    try:
        yield s
    finally:
        code = s.stop()
    assert code == 0, s.log()


def set_up(sn: Snapshotter, root: Path) -> None:
    """A little of everything: a committed layer with a file, two actives and
    a view over it, and an orphan (removed, not cleaned up)."""
    sn.prepare("a")
    upper = root / "snapshots" / "1" / "fs"
    (upper / "file").write_bytes(b"layer content\n" * 100)
    sn.commit("A", "a", {"layer": "A"})
    sn.prepare("x0", "A")
    sn.prepare("x1", "A")
    sn.view("v", "A")
    sn.prepare("gone")
    sn.remove("gone")
    # what a disk error loses is what was never written back (the journal is
    # aborted): the store syncs each commit, a layer's files are the writer's
    os.sync()


def raises(cls: type[OverlayError], fn: Callable[[], object]) -> OverlayError:
    with pytest.raises(cls) as info:
        fn()
    return info.value


# --------------------------------------------------------------------------------------------
# a full disk


@pytest.mark.parametrize("via", VIA)
def test_a_full_disk(tmp_path: Path, sockdir: Path, caplog: pytest.LogCaptureFixture,
                     via: str) -> None:
    with ext4(tmp_path) as (mnt, _image):
        root = mnt / "root"
        with served(via, root, sockdir, caplog) as s:
            sn = s.sn
            set_up(sn, root)
            for i in range(20):  # old pages for LMDB to reuse when the disk is full
                sn.update(Info(Kind.ACTIVE, "x1", "A", {"churn": str(i)}), "labels.churn")
            filler = fill(mnt)
            dev, db = source(mnt), str(root / "metadata.db")
            no_space = (rf"no space left on {re.escape(dev)} mounted at {re.escape(str(mnt))} "
                        r"\(\d+\.\d MiB, (0 B|\d+(\.\d)? KiB) free\): free space there "
                        r"\(`ovl cleanup` reclaims removed snapshots\): resource exhausted")
            before = s.state()

            # creating needs a directory: no room for one
            for what, call in (("prepare 'p'", lambda: sn.prepare("p", "A")),
                               ("view 'pv'", lambda: sn.view("pv", "A")),
                               ("prepare 'p0'", lambda: sn.prepare("p0"))):
                err = raises(ResourceExhaustedError, call)
                assert re.fullmatch(re.escape(what) + ": " + no_space, str(err)), err
                assert s.state() == before
            # labels that need new pages in the metadata file: no room for them
            big = {f"big{i}": "x" * 4000 for i in range(64)}
            err = raises(ResourceExhaustedError,
                         lambda: sn.update(Info(Kind.ACTIVE, "x1", "A", big), "labels"))
            assert re.fullmatch(re.escape(f"metastore {db!r}: commit failed: ") + no_space,
                                str(err)), err
            assert s.state() == before
            if via == "grpc":  # the command line, in-process on the same root: status 8
                assert cli.main(["snapshots", "prepare", "--root", str(root), "p"]) == 8
                assert s.state() == before

            # reads go on, and so does what needs no new space
            assert sn.stat("A").labels == {"layer": "A"}
            assert len(sn.mounts("x0")) == 1
            sn.commit("C", "x0")
            sn.remove("x1")
            sn.cleanup()
            s.wait_trash_empty()
            assert sorted(os.listdir(root / "snapshots")) == ["1", "2", "4"]  # A, C, v
            infos: list[Info] = []
            sn.walk(infos.append)
            assert sorted(i.name for i in infos) == ["A", "C", "v"]

            # space freed: everything works again
            filler.unlink()
            os.sync()
            sn.prepare("p", "A")
            sn.view("pv", "A")
            sn.update(Info(Kind.VIEW, "pv", "A", big), "labels")
            assert sn.stat("pv").labels == big
            assert sn.stat("A").labels == {"layer": "A"}
        log = s.log()
        assert "no space left on" in log  # a warning, once a minute at most
        s.assert_no_surprise()


def test_cleanup_on_a_full_disk_reclaims_even_without_room_in_the_trash(
        tmp_path: Path) -> None:
    """Moving 300 orphans into trash/ needs new directory blocks there, which a
    full disk does not have: those orphans are deleted where they are."""
    with ext4(tmp_path) as (mnt, _image):
        sn = OverlaySnapshotter(mnt / "root")
        try:
            for i in range(300):
                sn.prepare(f"k{i}")
            for i in range(300):
                sn.remove(f"k{i}")
            fill(mnt)
            report = sn.cleanup()
            assert report.busy == ()
            assert report.directories == 300
            assert os.listdir(mnt / "root" / "snapshots") == []
            assert os.listdir(mnt / "root" / "trash") == []
            sn.prepare("after")  # the space reclaimed is usable
        finally:
            sn.close()


# --------------------------------------------------------------------------------------------
# a root that turns read-only


def read_only_messages(root: Path, mnt: Path) -> tuple[str, str]:
    """The tail of what a write says when the root is read-only, from the
    snapshotter and from the metadata store."""
    on = f"({source(mnt)} mounted at {mnt}): make it writable and restart the daemon " \
         "(mount -o remount,rw; after an error: unmount, fsck, mount); " \
         "reads keep working meanwhile: failed precondition"
    return (f"the root {str(root)!r} is on a read-only filesystem {on}",
            f"the filesystem is read-only {on}")


def check_writes_refused(s: Served, root: Path, mnt: Path, *, started_read_only: bool) -> None:
    """Every write answers FAILED_PRECONDITION saying the root is read-only
    and changes nothing; every read answers."""
    sn = s.sn
    before = s.state()
    at_root, at_store = read_only_messages(root, mnt)
    db = str(root / "metadata.db")
    store = f"metastore {db!r}: commit failed: {at_store}"
    cls = ReadOnlyError if s.via == "in-process" else FailedPreconditionError
    calls: list[tuple[str, Callable[[], object]]] = [
        (f"prepare 'p': {at_root}", lambda: sn.prepare("p", "A")),
        (f"view 'pv': {at_root}", lambda: sn.view("pv", "A")),
        (f"commit 'x0': {at_root}" if started_read_only else store,
         lambda: sn.commit("C", "x0")),
        (f"remove 'x1': {at_root}" if started_read_only else store, lambda: sn.remove("x1")),
        (f"update 'x1': {at_root}" if started_read_only else store,
         lambda: sn.update(Info(Kind.ACTIVE, "x1", "A", {"new": "label"}))),
        (f"cleanup: {at_root}", sn.cleanup),  # there is an orphan to move
    ]
    for message, call in calls:
        err = raises(FailedPreconditionError, call)
        assert type(err) is cls
        assert str(err) == message
        assert s.state() == before
    assert sn.stat("A").labels == {"layer": "A"}
    assert len(sn.mounts("x0")) == 1


def check_writes_work(sn: Snapshotter, root: Path) -> None:
    sn.prepare("p", "A")
    sn.commit("C", "x0")
    sn.remove("x1")
    sn.update(Info(Kind.VIEW, "v", "A", {"new": "label"}))
    sn.cleanup()
    infos: list[Info] = []
    sn.walk(infos.append)
    assert sorted(i.name for i in infos) == ["A", "C", "p", "v"]


@pytest.mark.parametrize("via", VIA)
def test_a_root_that_turns_read_only_while_serving(
        tmp_path: Path, sockdir: Path, caplog: pytest.LogCaptureFixture, via: str) -> None:
    with ext4(tmp_path, "errors=remount-ro") as (mnt, image):
        root = mnt / "root"
        with served(via, root, sockdir, caplog) as s:
            set_up(s.sn, root)
            before = s.state()
            trigger_error(mnt)
            check_writes_refused(s, root, mnt, started_read_only=False)
        s.assert_no_surprise()
        assert "read-only filesystem" in s.log()

        repair(image, mnt, "errors=remount-ro")
        with served(via, root, sockdir, caplog) as s:
            assert s.state() == before  # nothing lost, nothing half done
            check_writes_work(s.sn, root)
        s.assert_no_surprise()


# --------------------------------------------------------------------------------------------
# a start on a read-only root


@pytest.mark.parametrize("how", ["mounted-ro", "after-an-error"])
def test_a_daemon_started_on_a_read_only_root_serves_reads_and_refuses_writes(
        tmp_path: Path, sockdir: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    with ext4(tmp_path, "errors=remount-ro") as (mnt, image):
        root = mnt / "root"
        with served("in-process", root, sockdir, caplog) as s:
            set_up(s.sn, root)
            before = s.state()
        if how == "mounted-ro":
            _run("mount", "-o", "remount,ro", str(mnt))
        else:
            trigger_error(mnt)

        with served("grpc", root, sockdir, caplog) as s:
            assert s.state() == before
            check_writes_refused(s, root, mnt, started_read_only=True)
            # the command line on the same root does the same, with exit status 5
            assert cli.main(["snapshots", "prepare", "--root", str(root), "p"]) == 5
        log = s.log()
        assert (f"root {root} is on a read-only filesystem: serving reads only; writes answer "
                "FAILED_PRECONDITION") in log
        s.assert_no_surprise()
        with served("in-process", root, sockdir, caplog) as s:
            assert isinstance(s.sn, OverlaySnapshotter) and s.sn.read_only
            check_writes_refused(s, root, mnt, started_read_only=True)

        if how == "mounted-ro":
            _run("mount", "-o", "remount,rw", str(mnt))
        else:
            repair(image, mnt, "errors=remount-ro")
        with served("grpc", root, sockdir, caplog) as s:
            assert s.state() == before
            check_writes_work(s.sn, root)
        s.assert_no_surprise()


@pytest.mark.parametrize("made", ["nothing", "the directories"])
def test_a_daemon_cannot_start_on_a_read_only_root_without_a_store(
        tmp_path: Path, sockdir: Path, made: str) -> None:
    with ext4(tmp_path) as (mnt, _image):
        root = mnt / "root"
        if made == "the directories":
            for d in (root, root / "snapshots", root / "trash"):
                d.mkdir()
        _run("mount", "-o", "remount,ro", str(mnt))
        sock = sockdir / "ovl.sock"
        proc = subprocess.run([*SERVE, "--root", str(root), "--address", str(sock)],
                              check=False, capture_output=True, text=True, timeout=120)
        what = "set up the root" if made == "nothing" else "create the metadata store"
        at_root, _ = read_only_messages(root, mnt)
        assert proc.returncode == 5, proc.stderr
        assert proc.stderr.splitlines()[-1] == f"ovl: {what}: {at_root}"
        assert not sock.exists()  # it never listened


def test_a_daemon_whose_store_cannot_open_exits_before_listening(
        tmpfs: Path, sockdir: Path) -> None:
    root = tmpfs / "root"
    for d in (root, root / "snapshots", root / "trash"):
        d.mkdir()
    (root / "metadata.db").write_bytes(b"not an lmdb file" * 1000)
    sock = sockdir / "ovl.sock"
    proc = subprocess.run([*SERVE, "--root", str(root), "--address", str(sock)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr
    db = str(root / "metadata.db")
    assert proc.stderr.splitlines()[-1] == (
        f"ovl: cannot open metastore {db!r}: {db}: MDB_INVALID: File is not an LMDB file: "
        "unavailable")
    assert not sock.exists()


# --------------------------------------------------------------------------------------------
# a full metadata map


@pytest.mark.parametrize("via", VIA)
def test_a_tiny_map_grows_and_a_full_one_is_resource_exhausted(
        tmpfs: Path, sockdir: Path, caplog: pytest.LogCaptureFixture, via: str) -> None:
    config = tmpfs / "config.toml"
    label = {"l": "x" * 1000}
    # a map of 64 KiB that may grow to 1 MiB: grows (four times), then fills
    config.write_text('metadata_map_size = "64 KiB"\nmetadata_map_size_max = "1 MiB"\n')
    root = tmpfs / "root"
    with served(via, root, sockdir, caplog, config) as s:
        sn = s.sn
        n = 0
        before: dict[str, Any] = {}
        while True:
            if n >= 300:
                before = s.light_state()
            try:
                sn.prepare(f"k{n}", "", label)
            except ResourceExhaustedError as exc:
                err = exc
                break
            n += 1
            assert n < 2000, "the map never filled"
        assert 300 < n < 1000  # records of about 1 KiB: far more than 64 KiB holds
        assert s.light_state() == before  # the failed prepare left nothing
        full = s.state()
        with pytest.raises(ResourceExhaustedError):
            sn.prepare(f"k{n}", "", label)
        assert s.state() == full
        db = str(root / "metadata.db")
        assert str(err) == (
            f"metastore {db!r}: the metadata map is full at 1.0 MiB, its maximum: raise "
            "metadata_map_size_max in the daemon's config, or remove snapshots: "
            "resource exhausted")
        # what fits still goes: a removal makes room for the next prepare
        sn.remove("k0")
        sn.prepare("k-again", "", label)
    log = s.log()
    assert "the metadata map was full at 64.0 KiB; grown to 128.0 KiB" in log
    assert "full at 512.0 KiB; grown to 1.0 MiB" in log
    s.assert_no_surprise()
