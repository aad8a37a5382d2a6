"""``OverlaySnapshotter``: containerd's overlay snapshotter, made safer.

Layout (SPEC §2.2)::

    <root>/metadata.db          the LMDB metastore
    <root>/snapshots/<id>/fs    a snapshot's layer (the overlay upperdir), 0755
    <root>/snapshots/<id>/work  the overlay workdir (active snapshots only), 0711
    <root>/trash/               orphans on their way out

How it keeps its promises:

* A snapshot directory is created only while holding the metastore's write
  transaction: built as ``snapshots/new-*`` and renamed to ``<id>`` before
  the commit.  ``cleanup`` decides what is orphaned under the same lock, so it
  can never see a create half done (DESIGN invariant 1).
* ``remove`` drops the record and nothing else: O(1) whatever the size.
* ``cleanup`` moves each orphan into ``trash/`` under the lock (one rename
  each) and deletes the trash with the native unlink *after* releasing it,
  so creates never wait for the disk.  Nothing outside the lock ever touches
  ``snapshots/``: an id freed by a rolled-back create may be handed out again,
  so only the lock holder may decide what a ``snapshots/<id>`` is.
* A crash at any instant leaves either a committed record with its
  directory, or a directory without a record (an orphan for the next
  cleanup; a create that meets one under its own id moves it to the trash
  first).

Faults of the host come out typed (:mod:`overlay._faults`): a full disk is
ResourceExhaustedError, a read-only root ReadOnlyError (FAILED_PRECONDITION).
A root whose filesystem is read-only at construction is opened read-only:
reads work, every write is refused with ReadOnlyError.  The store is opened
at construction, so a root whose store cannot be opened fails there.

Several processes may share one root (the daemon and ``ovl --root``, say):
LMDB's lock serialises their writers, and each trash entry is locked while it
is deleted.  Within one process a root is opened once: a second
``OverlaySnapshotter`` on it is refused with UnavailableError (LMDB allows one
environment per file and process), so share the instance between threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from overlay import _faults, _native, metastore, support
from overlay.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    ReadOnlyError,
    UnavailableError,
)
from overlay.mount import Mount, MountInfo, MountTableWatch
from overlay.snapshots import (
    LABEL_SNAPSHOT_REF,
    LABEL_UPPERDIR,
    CleanupReport,
    Info,
    Kind,
    Usage,
    WalkFunc,
    check_labels,
)

__all__ = ["MountConfig", "OverlaySnapshotter", "compute_mounts"]

log = logging.getLogger(__name__)

#: Called while the trash is emptied: (directories done, directories total).
Progress = Callable[[int, int], None]


#: errnos that say the filesystem (not one file) is failing: read-only, broken
_FS_FAULTS = frozenset({errno.EROFS, errno.EIO, errno.EUCLEAN})


def _writable(path: str) -> bool:
    """Whether the filesystem of the directory ``path`` takes writes: an unnamed
    file (O_TMPFILE) made and dropped, which leaves nothing behind, even after a
    crash.  ST_RDONLY is not enough: ext4 turned read-only after an error
    (errors=remount-ro) keeps a read-write mount and refuses each write."""
    try:
        fd = os.open(path, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        # anything else (no O_TMPFILE support, a full disk) does not make the
        # filesystem read-only: the writes themselves will say what is wrong
        return exc.errno != errno.EROFS
    os.close(fd)
    return True


@contextlib.contextmanager
def _locked(path: str) -> Iterator[bool]:
    """Hold an exclusive flock on the directory ``path``; yields False when
    it is gone or someone else holds it (never blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield False
        return
    except OSError:
        # not a directory (a stray file): nothing to lock, remove it plainly
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(path)
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class MountConfig:
    """What ``mounts()`` needs besides the record: decided once at start-up."""

    root: str
    #: configured options, then userxattr / index=off as probed (HEAD order)
    extra_options: tuple[str, ...] = ()


def compute_mounts(config: MountConfig, snap: metastore.Snapshot) -> list[Mount]:
    """The mounts of an active snapshot or view: a pure function (SPEC §2.5)."""
    snapshots = os.path.join(config.root, "snapshots")

    def upper(sid: str) -> str:
        return os.path.join(snapshots, sid, "fs")

    if not snap.parent_ids:
        # an empty layer: its own (empty) fs directory
        ro = "ro" if snap.kind is Kind.VIEW else "rw"
        return [Mount("bind", upper(snap.id), "", (ro, "rbind"))]
    lowerdir = "lowerdir=" + ":".join(upper(p) for p in snap.parent_ids)
    if snap.kind is Kind.VIEW:
        if len(snap.parent_ids) == 1:
            return [Mount("bind", upper(snap.parent_ids[0]), "", ("ro", "rbind"))]
        return [Mount("overlay", "overlay", "", (lowerdir, *config.extra_options))]
    work = os.path.join(snapshots, snap.id, "work")
    options = (f"workdir={work}", f"upperdir={upper(snap.id)}", lowerdir)
    return [Mount("overlay", "overlay", "", (*options, *config.extra_options))]


def _active_id(txn: metastore.Txn, key: str) -> str | None:
    """The id of ``key`` when it is an active snapshot, else None."""
    try:
        sid, info, _ = metastore.get_info(txn, key)
    except NotFoundError:
        return None
    return sid if info.kind is Kind.ACTIVE else None


class OverlaySnapshotter:
    """containerd's overlay snapshotter contract on overlayfs (see module doc)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        sync_remove: bool = False,
        upperdir_label: bool = False,
        mount_options: Sequence[str] = (),
        trash_threads: int = 2,
        map_size: int = metastore.DEFAULT_MAP_SIZE,
        map_size_max: int = metastore.DEFAULT_MAP_SIZE_MAX,
    ) -> None:
        if "ro" in mount_options:
            # containerd's unpacker takes an active mount carrying `ro` for an
            # already unpacked layer and skips it (SPEC §2.5).
            raise InvalidArgumentError(
                "mount option 'ro' would make every active snapshot read-only; "
                "views are read-only already"
            )
        support.check_overlay()
        self._root = os.path.abspath(os.fspath(root))
        self._closed = False
        self._snapshots = os.path.join(self._root, "snapshots")
        self._trash = os.path.join(self._root, "trash")
        with self._host_faults("set up the root"):
            os.makedirs(self._root, mode=0o700, exist_ok=True)
            support.check_dtype(self._root)
            self._read_only = not _writable(self._root)
            for d in (self._snapshots, self._trash):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(d, 0o700)
        self._sync_remove = sync_remove
        self._upperdir_label = upperdir_label
        self._trash_threads = max(1, trash_threads)
        options = list(mount_options)
        if "userxattr" not in options and support.needs_userxattr(self._root):
            options.append("userxattr")
        has_index = any(o == "index" or o.startswith("index=") for o in options)
        if not has_index and support.supports_index_option():
            options.append("index=off")
        self._config = MountConfig(self._root, tuple(options))
        # Opened now, not at the first call: a store that cannot be opened
        # fails here, before a daemon says it is ready.
        self._ms = self._open_store(map_size, map_size_max)
        # busy-orphan checks: the mount table, parsed again only when it changed
        self._mounts = MountTableWatch()
        self._snapshots_real = os.path.realpath(self._snapshots)
        self._trash_lock = threading.Lock()

    def _open_store(self, map_size: int, map_size_max: int) -> metastore.MetaStore:
        path = os.path.join(self._root, "metadata.db")
        while True:
            if self._read_only and not os.path.exists(path):
                self._check_writable("create the metadata store")
            ms = metastore.MetaStore(path, map_size=map_size, map_size_max=map_size_max,
                                     read_only=self._read_only)
            try:
                ms.open()
            except ReadOnlyError:
                ms.close()
                if self._read_only:
                    raise
                self._read_only = True  # the probe passed, LMDB's files refuse writes
                continue
            except BaseException:
                ms.close()
                raise
            if self._read_only:
                log.warning(
                    "root %s is on a read-only filesystem: serving reads only; writes answer "
                    "FAILED_PRECONDITION until it is writable again and the snapshotter "
                    "restarted", self._root)
            return ms

    # ------------------------------------------------------------------ helpers

    @property
    def root(self) -> str:
        return self._root

    @property
    def mount_config(self) -> MountConfig:
        return self._config

    @property
    def read_only(self) -> bool:
        """Whether the root was read-only at start: reads only, writes refused."""
        return self._read_only

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError(f"snapshotter at {self._root!r} is closed")

    def _check_writable(self, what: str) -> None:
        if self._closed:
            raise UnavailableError(f"snapshotter at {self._root!r} is closed")
        if self._read_only:
            err = _faults.from_errno(errno.EROFS, what, self._root, root=self._root)
            assert err is not None
            raise err

    @contextlib.contextmanager
    def _host_faults(self, what: str) -> Iterator[None]:
        """OS failures of the host (a full or read-only filesystem, an i/o
        error) as typed errors whose message starts with ``what``; any other
        OSError goes through as it is (a surprise, logged as such)."""
        try:
            yield
        except OSError as exc:
            err = _faults.from_os_error(exc, what, root=self._root)
            if err is None:
                raise
            raise err from exc

    def _upper(self, sid: str) -> str:
        return os.path.join(self._snapshots, sid, "fs")

    def _with_upperdir(self, sid: str, info: Info) -> Info:
        if not self._upperdir_label:
            return info
        labels = dict(info.labels)
        labels[LABEL_UPPERDIR] = self._upper(sid)
        return Info(info.kind, info.name, info.parent, labels, info.created_ns, info.updated_ns)

    # ---------------------------------------------------------------- inspect

    def stat(self, key: str) -> Info:
        self._check_open()
        with self._ms.transaction(write=False) as txn:
            sid, info, _ = metastore.get_info(txn, key)
        return self._with_upperdir(sid, info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        self._check_writable(f"update {info.name!r}")

        def body(txn: metastore.Txn) -> tuple[str, Info]:
            updated = metastore.update_info(txn, info, *fieldpaths)
            sid = metastore.get_info(txn, updated.name)[0] if self._upperdir_label else ""
            return sid, updated

        sid, updated = self._ms.write(body)
        return self._with_upperdir(sid, updated)

    def usage(self, key: str) -> Usage:
        self._check_open()
        with self._ms.transaction(write=False) as txn:
            sid, info, usage = metastore.get_info(txn, key)
        if info.kind is not Kind.ACTIVE:
            return usage
        return self._live_usage(key, sid)

    def _live_usage(self, key: str, sid: str) -> Usage:
        """Walk an active snapshot's layer (no lock held by the caller, ideally)."""
        try:
            with self._host_faults(f"usage {key!r}"):
                result = _native.disk_usage(self._upper(sid))
        except FileNotFoundError as exc:
            raise NotFoundError(f"snapshot {key!r}: its directory is gone ({exc})") from exc
        return Usage(result.entries, result.bytes)

    def mounts(self, key: str) -> list[Mount]:
        self._check_open()
        with self._ms.transaction(write=False) as txn:
            snap = metastore.get_snapshot(txn, key)
        return compute_mounts(self._config, snap)

    def walk(self, fn: WalkFunc, *filters: str) -> None:
        """Call ``fn`` for each snapshot matching any filter, in key order.

        The matches are read in one read transaction and ``fn`` runs after it
        ends, so ``fn`` may call anything (stat, prepare, remove).
        """
        self._check_open()
        if not self._upperdir_label:
            infos: list[Info] = []
            with self._ms.transaction(write=False) as txn:
                metastore.walk_info(txn, infos.append, *filters)
            for info in infos:
                fn(info)
            return
        found: list[tuple[str, Info]] = []
        with self._ms.transaction(write=False) as txn:

            def collect(info: Info) -> None:
                found.append((metastore.get_info(txn, info.name)[0], info))

            metastore.walk_info(txn, collect, *filters)
        for sid, info in found:
            fn(self._with_upperdir(sid, info))

    # ----------------------------------------------------------------- create

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _shared_target(self, txn: metastore.Txn, labels: Mapping[str, str], parent: str) -> None:
        """Remote/shared snapshots: a committed snapshot with the same target
        reference and parent already exists → AlreadyExists, create nothing."""
        target = labels.get(LABEL_SNAPSHOT_REF)
        if not target:
            return
        # through the parent's back links: no scan of the store (but for a
        # base layer, whose siblings are every parentless snapshot)
        hits = [
            info.name for info in metastore.children(txn, parent)
            if info.kind is Kind.COMMITTED and info.labels.get(LABEL_SNAPSHOT_REF) == target
        ]
        if hits:
            raise AlreadyExistsError(
                f"target snapshot {target!r} (parent {parent!r}) exists as {hits[0]!r}: "
                "already exists"
            )

    def _create(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> list[Mount]:
        what = f"{'view' if kind is Kind.VIEW else 'prepare'} {key!r}"
        self._check_writable(what)
        check_labels(labels)

        made: list[str] = []  # the id whose directory is in place, once it is

        def body(txn: metastore.Txn) -> metastore.Snapshot:
            made.clear()
            if labels:
                self._shared_target(txn, labels, parent)
            temp = tempfile.mkdtemp(prefix="new-", dir=self._snapshots)
            try:
                os.mkdir(os.path.join(temp, "fs"), 0o755)
                os.chmod(os.path.join(temp, "fs"), 0o755)  # whatever the umask
                if kind is Kind.ACTIVE:
                    os.mkdir(os.path.join(temp, "work"), 0o711)
                    os.chmod(os.path.join(temp, "work"), 0o711)
                snap = metastore.create_snapshot(txn, kind, key, parent, labels)
                if snap.parent_ids:
                    st = os.lstat(self._upper(snap.parent_ids[0]))
                    os.lchown(os.path.join(temp, "fs"), st.st_uid, st.st_gid)
                final = os.path.join(self._snapshots, snap.id)
                self._claim(final)
                _native.renameat2(temp, final, _native.RenameFlag.NOREPLACE)
                made.append(snap.id)
            except BaseException:
                # The rename is the last step, so the temp dir is still ours,
                # and we still hold the lock: nobody else can be using it.
                self._discard_now(temp)
                raise
            return snap

        def undo(txn: metastore.Txn) -> None:
            # The commit failed after the rename (a full map or disk, a read-only
            # filesystem).  Under the writer lock again: an id above the last one
            # committed is nobody's, so its directory is ours to take back.  If it
            # cannot go (read-only), it is an orphan for cleanup or the next create.
            for sid in made:
                if int(sid) > metastore.last_id(txn):
                    with contextlib.suppress(OSError):
                        _native.remove_tree(os.path.join(self._snapshots, sid))

        with self._host_faults(what):
            # A full map: the transaction is run again in a bigger one.
            snap = self._ms.write(body, undo=undo)
        return compute_mounts(self._config, snap)

    def _claim(self, path: str) -> None:
        """Under the write lock: a directory already at a fresh id's path is
        a crash leftover (its create never committed).  Move it to the trash."""
        if os.path.lexists(path):
            log.warning("moving stale %s (left by an interrupted create) to the trash", path)
            self._to_trash(path)

    def _discard_now(self, path: str) -> None:
        with contextlib.suppress(OSError):
            _native.remove_tree(path)

    # ------------------------------------------------------------ commit/remove

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        parent: str = "",
    ) -> None:
        self._check_writable(f"commit {key!r}")
        check_labels(labels)
        # Usage is measured before taking the write lock (a big layer's walk
        # must not stall every prepare).  Errors are left to commit_active, so
        # they come in SPEC's order (a taken name first, even for a bogus key).
        measured: tuple[str, Usage] | None = None
        with self._host_faults(f"commit {key!r}"):
            with self._ms.transaction(write=False) as txn:
                found = _active_id(txn, key)
            if found is not None:
                measured = (found, self._live_usage(key, found))

            def body(txn: metastore.Txn) -> None:
                nonlocal measured
                now = _active_id(txn, key)
                if now is not None and (measured is None or measured[0] != now):
                    # removed and prepared again meanwhile: measure the new one (rare)
                    measured = (now, self._live_usage(key, now))
                usage = measured[1] if measured is not None and now is not None else Usage()
                metastore.commit_active(txn, key, name, usage, labels, parent)

            self._ms.write(body)

    def remove(self, key: str) -> None:
        self._check_writable(f"remove {key!r}")
        self._ms.write(lambda txn: metastore.remove(txn, key))
        if self._sync_remove:
            self.cleanup()

    # ----------------------------------------------------------------- cleanup

    def _fs_path(self, table: Sequence[MountInfo]) -> tuple[str, str] | None:
        """(device, path of snapshots/ inside its filesystem), for matching
        bind mounts in mountinfo."""
        real = self._snapshots_real
        best: MountInfo | None = None
        for m in table:
            t = m.target.rstrip("/") or "/"
            if (real == t or real.startswith(t.rstrip("/") + "/")) and (
                best is None or len(t) >= len(best.target)
            ):
                best = m
        if best is None:
            return None
        inside = os.path.relpath(real, best.target)
        path = os.path.normpath(os.path.join(best.root, inside))
        return best.device, path

    def _busy(self, names: Iterable[str]) -> dict[str, str]:
        """Orphans something still uses: a mount inside, an overlay layer, the
        source of a bind mount.  name → what uses it."""
        wanted = set(names)
        if not wanted:
            return {}
        busy: dict[str, str] = {}
        snapshots = self._snapshots_real
        table = self._mounts.rows()  # parsed again only when a mount came or went
        fs = self._fs_path(table)

        def owner(path: str, base: str) -> str | None:
            if not (path == base or path.startswith(base.rstrip("/") + "/")):
                return None
            rest = os.path.relpath(path, base).split("/", 1)[0]
            return rest if rest in wanted else None

        for m in table:
            hits = {owner(m.target, snapshots)}
            for p in m.layer_paths():
                if p.startswith("/"):
                    hits.add(owner(p, snapshots))
                elif m.source.startswith("/"):
                    # our own relative mounts name their base as the source
                    hits.add(owner(os.path.normpath(os.path.join(m.source, p)), snapshots))
                else:
                    # a relative layer path with an unknown base (containerd
                    # compacts deep stacks so): any orphan it could name is busy
                    first = os.path.normpath(p).split("/", 1)[0]
                    hits.add(first if first in wanted else None)
            if fs is not None and m.device == fs[0] and m.root != "/":
                hits.add(owner(m.root, fs[1]))
            for h in hits - {None}:
                assert h is not None
                busy.setdefault(h, f"{m.fstype} mount at {m.target}")
        return busy

    def _to_trash(self, path: str) -> str:
        name = os.path.basename(path)
        while True:
            dest = os.path.join(self._trash, f"{name}.{secrets.token_hex(6)}")
            try:
                _native.renameat2(path, dest, _native.RenameFlag.NOREPLACE)
                return dest
            except FileExistsError:
                continue

    def collect_orphans(self) -> tuple[int, list[tuple[str, int]]]:
        """Under the write lock, move every orphan into the trash: O(1) each.

        Returns (orphans moved, busy orphans left in place as (path, errno)).
        On a disk too full for an orphan's new name in the trash, that orphan
        is deleted where it is instead (and counted as moved).
        """
        moved, busy, in_place = self._collect()
        return moved + in_place.directories, busy

    def _collect(self) -> tuple[int, list[tuple[str, int]], CleanupReport]:
        """collect_orphans: (moved to the trash, busy, what was deleted in place)."""
        self._check_writable("cleanup")

        def body(txn: metastore.Txn) -> tuple[int, list[tuple[str, int]], CleanupReport]:
            moved = gone = entries = size = 0
            busy: list[tuple[str, int]] = []
            live = set(metastore.id_map(txn))
            orphans = [e for e in os.listdir(self._snapshots) if e not in live]
            in_use = self._busy(orphans)
            for name in orphans:
                path = os.path.join(self._snapshots, name)
                if name in in_use:
                    log.info("orphan %s is busy (%s): left for the next cleanup",
                             path, in_use[name])
                    busy.append((path, errno.EBUSY))
                    continue
                try:
                    self._to_trash(path)
                    moved += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno in _FS_FAULTS:
                        raise  # the filesystem, not this orphan: every other one fails alike
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        busy.append((path, exc.errno or errno.EIO))
                        continue
                    # No room for its new name in trash/ (a directory block): delete it
                    # where it is, under the lock.  Slower, but reclaiming is what a
                    # full disk needs, and the deletion itself needs no space.
                    result = _native.remove_tree(path, threads=self._trash_threads,
                                                 count_bytes=True)
                    entries, size = entries + result.entries, size + result.bytes
                    if result.errors:
                        busy.extend((os.path.join(path, p), e) for p, e in result.errors)
                    else:
                        gone += 1
            # The txn only served as the lock: its commit writes nothing.
            return moved, busy, CleanupReport(gone, entries, size)

        with self._host_faults("cleanup"):
            return self._ms.write(body)

    def trash_backlog(self) -> int:
        """Directories waiting in the trash."""
        try:
            return len(os.listdir(self._trash))
        except FileNotFoundError:
            return 0

    def empty_trash(
        self, progress: Progress | None = None, stop: Callable[[], bool] | None = None
    ) -> CleanupReport:
        """Delete everything in the trash (no lock held).  Entries that cannot
        go entirely (an immutable file, a mount) stay, reported, for the next
        time.  Safe to run from several threads or processes at once: each
        entry is locked (flock) while it is deleted, and a locked entry is
        left to its remover, so two removers never walk the same tree.  A
        remover that dies drops its lock with it.  ``stop`` is asked between
        entries; when true the rest waits."""
        if self._read_only:
            return CleanupReport()  # nothing can go
        with self._trash_lock, self._host_faults("cleanup"):
            entries = sorted(os.listdir(self._trash))
            removed = count = size = 0
            failed: list[tuple[str, int]] = []
            for done, name in enumerate(entries, 1):
                if stop is not None and stop():
                    break
                if any(e in _FS_FAULTS for _, e in failed[-1:]):
                    break  # the filesystem refuses: the rest would fail alike
                path = os.path.join(self._trash, name)
                with _locked(path) as mine:
                    if not mine:
                        continue  # gone, or another remover holds it
                    try:
                        result = _native.remove_tree(path, threads=self._trash_threads,
                                                     count_bytes=True)
                    except FileNotFoundError:
                        result = _native.TreeResult(0, 0)
                    except OSError as exc:
                        failed.append((path, exc.errno or errno.EIO))
                        result = _native.TreeResult(0, 0)
                count += result.entries
                size += result.bytes
                if result.errors:
                    failed.extend((os.path.join(path, p), e) for p, e in result.errors)
                elif not os.path.lexists(path):
                    removed += 1
                if progress is not None:
                    progress(done, len(entries))
        return CleanupReport(removed, count, size, tuple(failed))

    def cleanup(self, progress: Progress | None = None) -> CleanupReport:
        """Reclaim every orphan: move them to the trash under the lock, then
        delete the trash without it (the trash left by a crash included)."""
        _, busy, here = self._collect()
        report = self.empty_trash(progress)
        return CleanupReport(here.directories + report.directories,
                             here.entries + report.entries, here.bytes + report.bytes,
                             (*busy, *report.busy))

    def store_stats(self) -> tuple[int, int]:
        """(bytes used, map size) of the metadata store."""
        self._check_open()
        with self._ms.transaction(write=False) as txn:
            st = metastore.stats(txn)
        return st.used_bytes, st.map_size

    # ------------------------------------------------------------------- close

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._mounts.close()
        self._ms.close()
