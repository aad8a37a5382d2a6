"""The per-snapshotter metadata store: snapshot records in LMDB.

This is containerd's ``core/snapshots/storage`` (``metastore.go`` + ``bolt.go``)
on LMDB: a :class:`MetaStore` owns the environment and hands out transactions;
free functions taking the transaction first read and write snapshot records.
The transaction is always explicit, never hidden in global or thread state::

    store = MetaStore(root / "metadata.lmdb")
    with store.transaction(write=True) as txn:
        snap = create_snapshot(txn, Kind.ACTIVE, "k", parent="base")
        ...  # create the snapshot's directories while the txn is held
    with store.transaction() as txn:
        sid, info, usage = get_info(txn, "k")

A write transaction commits when its ``with`` block ends normally and aborts
when it raises; a read transaction always aborts.  A function that raises
has written nothing: every check runs before the first write, in the order
containerd checks (SPEC §3.4), so a caller may even commit after catching.

Environment and concurrency
---------------------------
* One file: the LMDB data file is ``path`` itself (``subdir=False``, mode
  0600) with LMDB's lock file ``<path>-lock`` beside it.  The parent
  directory must exist.
* Opened by ``open()`` or lazily by the first transaction (as containerd
  does), so building a ``MetaStore`` never touches the disk and ``close()``
  on a store that was never used is a no-op.  ``close()`` is idempotent; a
  closed store refuses new transactions with :class:`UnavailableError`.
* The map grows on demand: it starts at ``map_size``; a write transaction
  that finds it full is aborted, the map doubles (up to ``map_size_max``)
  and :meth:`MetaStore.write` runs the transaction again.  Growing needs
  every transaction of the process closed (LMDB's ``mdb_env_set_mapsize``),
  so it waits for the read transactions in flight and holds new ones back
  meanwhile.  Another process that grew the map is followed at the next
  transaction (``MDB_MAP_RESIZED``: its size is adopted).  A map at its
  maximum is :class:`ResourceExhaustedError`, with nothing written.
* Faults of the host come out typed (:mod:`overlay._faults`): a full
  filesystem under the data file is :class:`ResourceExhaustedError`, a
  read-only one :class:`ReadOnlyError`; a store opened ``read_only`` (its
  filesystem is read-only) reads and refuses every write transaction.
* Durable: LMDB's default sync mode, so a write transaction whose ``with``
  block has returned is on disk and survives SIGKILL (and power loss).  A
  process killed inside a write transaction loses only that transaction; the
  writer lock is a robust mutex, so the next writer proceeds.
* Several processes may use one file at once; LMDB's lock file arbitrates
  (one writer at a time across all of them, readers never block and see the
  last commit made before they began).  Within a process a file may be open
  in only one ``MetaStore`` at a time (LMDB's locks are per process and file);
  a second one fails with :class:`UnavailableError`.  Do not use a store
  across ``fork()``; open a new one in the child.
* Threads: a write transaction stays on the thread that began it (DESIGN
  invariant 7; using it from another thread raises
  :class:`FailedPreconditionError`).  Write transactions of one store are
  serialized by a lock; beginning a second one on a thread that already holds
  one raises instead of deadlocking.  Read transactions are independent of
  threads (py-lmdb opens environments with ``MDB_NOTLS``), so a read
  transaction may be opened while another is open on the same thread, e.g. a
  ``stat`` inside a ``walk`` callback.

Reading
-------
A record decodes to the same ``Info`` whatever reads it, so each store
keeps a memo of decoded records keyed by the record's stored bytes (its
LMDB key and value): a record read again unchanged, in any transaction, is
not decoded again.  A record that changed has other bytes, so nothing stale
is ever served.  The ``Info`` objects handed out are shared and immutable
(frozen, with read-only labels: copy them, ``dict(info.labels)``, to
change them).  The memo holds :data:`MEMO_ENTRIES` records at most (the
least recently used leave first) and no record longer than
:data:`MEMO_RECORD_MAX` bytes.

Schema (version 1)
------------------
Three named sub-databases:

``snapshots``
    record key → record.  The record key is the snapshot key (or name) as
    UTF-8 when it is at most 400 bytes long.  A longer key is stored under
    ``key[:400] + b"\\xff" + sha256(key)`` with the full key inside the record
    (``0xff`` never occurs in UTF-8, so the two forms cannot collide, and LMDB's
    511-byte key limit is never reached).  Iteration, hence ``walk_info`` and
    ``id_map``, follows the byte order of the keys, except that long keys
    sharing their first 400 bytes come in hash order among themselves.
``parents``
    ``parent_id`` ‖ ``child_id`` (each 8-byte big-endian) → child key (UTF-8):
    the back links, so "has children" is one prefix seek.
``meta``
    ``b"version"`` → schema version (4-byte big-endian); ``b"sequence"`` →
    the last id handed out (8-byte big-endian).  Ids start at 1 and are
    never reused; the sequence lives in the transaction, so an aborted create
    consumes nothing.  Commit keeps the active snapshot's id.

A record is a fixed header, ``struct`` format ``>BBBxQqqqqII``: record
version (1), kind, flags (bit 0: the full key follows), id, created and
updated (integer nanoseconds since the epoch), inodes and size (zero unless
committed), length of the parent name, length of the full key (0 unless
flag bit 0).  Then the parent name, the full key, and finally the labels as
compact JSON with sorted keys, or nothing when there are no labels.  Labels
with empty values are never stored.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ParamSpec, TypeVar

import lmdb

from overlay import _faults
from overlay.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OverlayError,
    ResourceExhaustedError,
    UnavailableError,
    UnknownError,
)
from overlay.filters import ALWAYS, info_adaptor
from overlay.filters import parse as parse_filters
from overlay.snapshots import Info, Kind, Usage, check_labels, now_ns

__all__ = [
    "DEFAULT_MAP_SIZE",
    "DEFAULT_MAP_SIZE_MAX",
    "MEMO_ENTRIES",
    "MEMO_RECORD_MAX",
    "MIN_MAP_SIZE",
    "SCHEMA_VERSION",
    "MetaStore",
    "Snapshot",
    "StoreStats",
    "Txn",
    "children",
    "commit_active",
    "create_snapshot",
    "dump",
    "get_info",
    "get_snapshot",
    "id_map",
    "last_id",
    "remove",
    "stats",
    "update_info",
    "walk_info",
]

SCHEMA_VERSION = 1
_RECORD_VERSION = 1
_FLAG_FULL_KEY = 0x01

#: Keys up to this many UTF-8 bytes are their own record key (see module docstring).
_INLINE_KEY_MAX = 400
_LONG_KEY_MARK = b"\xff"

_DB_SNAPSHOTS = b"snapshots"
_DB_PARENTS = b"parents"
_DB_META = b"meta"
_DB_NAMES = (_DB_SNAPSHOTS, _DB_PARENTS, _DB_META)
_META_VERSION = b"version"
_META_SEQUENCE = b"sequence"

_HEADER = struct.Struct(">BBBxQqqqqII")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_LINK = struct.Struct(">QQ")

_INT64_MAX = (1 << 63) - 1

#: Decoded records a store keeps, the least recently used leaving first (see
#: "Reading" in the module docstring).
MEMO_ENTRIES = 1 << 14
#: Records longer than this (bytes) are decoded at every read, so that the
#: memo's memory stays bounded (a record is ~100 bytes plus its labels).
MEMO_RECORD_MAX = 16 << 10

#: The labels of an Info without any (read-only, so one object serves all).
_NO_LABELS: Mapping[str, str] = MappingProxyType({})

_P = ParamSpec("_P")
_R = TypeVar("_R")

log = logging.getLogger(__name__)


def _pages(size: int) -> int:
    """``size`` rounded up to whole pages (LMDB wants a multiple of the OS page size)."""
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a backend needs to lay out an active snapshot or a view.

    ``parent_ids`` runs from the immediate parent to the root.
    """

    id: str
    kind: Kind
    parent_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreStats:
    """LMDB space accounting, for metrics.

    ``used_bytes`` is the high-water mark of pages in the data file (LMDB reuses
    freed pages instead of shrinking); ``map_size`` the most it may grow to.
    """

    map_size: int
    used_bytes: int
    page_size: int
    readers: int
    max_readers: int
    snapshots: int


@dataclass(slots=True)
class _Record:
    id: int
    kind: Kind
    key: str
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    inodes: int = 0
    size: int = 0


# --------------------------------------------------------------------------------------------
# Errors


class _MapFullError(ResourceExhaustedError):
    """A write found the map full; the transaction grows it (see :meth:`MetaStore.write`)."""


class _MapGrownError(ResourceExhaustedError):
    """The map was full and has grown: the same transaction, run again, may fit."""


def _map_error(exc: lmdb.Error, where: str, path: str | None = None) -> OverlayError:
    """An ``lmdb.Error`` as a domain error; the caller raises it ``from exc``.

    LMDB passes the kernel's errno through (``exc.code`` > 0; its own codes
    are negative), so a full or read-only filesystem under the data file
    gets the same error as anywhere else (:mod:`overlay._faults`).
    """
    text = f"{where}: {exc}"
    if isinstance(exc, lmdb.MapFullError):
        return _MapFullError(f"{where}: the metadata map is full")
    if isinstance(exc, lmdb.ReadonlyError):
        # EACCES in LMDB 0.9's words: a write in a read-only transaction
        return FailedPreconditionError(text)
    code = getattr(exc, "code", 0)
    if isinstance(code, int) and code > 0:
        err = _faults.from_errno(code, where, path, short_write=True)
        if err is not None:
            return err
    if isinstance(
        exc, lmdb.ReadersFullError | lmdb.TxnFullError | lmdb.TlsFullError | lmdb.MemoryError
    ):
        return ResourceExhaustedError(text)
    if isinstance(exc, lmdb.MapResizedError | lmdb.LockError | lmdb.DbsFullError):
        return UnavailableError(text)
    if isinstance(
        exc,
        lmdb.CorruptedError
        | lmdb.PageNotFoundError
        | lmdb.PanicError
        | lmdb.VersionMismatchError
        | lmdb.InvalidError
        | lmdb.IncompatibleError,
    ):
        return UnknownError(f"{where}: metadata store is corrupt or incompatible: {exc}")
    if isinstance(exc, lmdb.BadValsizeError):
        return InvalidArgumentError(text)
    return UnknownError(text)


def _guard(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Let no ``lmdb.Error`` escape a public function: map it to a domain error."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except lmdb.Error as exc:
            where, path = fn.__name__, None
            if args and isinstance(args[0], Txn):
                where, path = f"metastore {args[0].path!r}: {where}", args[0].path
            raise _map_error(exc, where, path) from exc

    return wrapper


# --------------------------------------------------------------------------------------------
# Environment and transactions


class Txn:
    """One LMDB transaction of a :class:`MetaStore` and its sub-database handles.

    Only valid inside the ``with store.transaction(...)`` block that made it;
    pass it to this module's functions.  A write transaction may only be used
    on the thread that began it.
    """

    __slots__ = (
        "_closed",
        "_env",
        "_memo",
        "_meta",
        "_parents",
        "_path",
        "_snapshots",
        "_thread",
        "_txn",
        "_write",
    )

    def __init__(
        self,
        env: lmdb.Environment,
        txn: lmdb.Transaction[bytes],
        dbs: tuple[lmdb._Database, lmdb._Database, lmdb._Database],
        *,
        write: bool,
        path: str,
        memo: Callable[[bytes, bytes], _Entry],
    ) -> None:
        self._env = env
        self._txn = txn
        self._memo = memo
        self._snapshots, self._parents, self._meta = dbs
        self._write = write
        self._path = path
        self._thread = threading.get_ident()
        self._closed = False

    @property
    def write(self) -> bool:
        """Whether this is a write transaction."""
        return self._write

    @property
    def path(self) -> str:
        """The data file of the store this transaction belongs to."""
        return self._path

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("write" if self._write else "read")
        return f"<Txn {state} {self._path!r}>"

    def _use(self, *, write: bool = False) -> lmdb.Transaction[bytes]:
        if self._closed:
            raise FailedPreconditionError("metastore transaction is already finished")
        if self._write and threading.get_ident() != self._thread:
            raise FailedPreconditionError(
                "metastore write transaction used from another thread than the one that began it"
            )
        if write and not self._write:
            raise FailedPreconditionError("metastore change needs a write transaction")
        return self._txn


_Dbs = tuple[lmdb._Database, lmdb._Database, lmdb._Database]
#: A decoded record: what get_info returns.
_Entry = tuple[str, Info, Usage]

#: The map a store starts with, and the most it grows to, unless told otherwise.
DEFAULT_MAP_SIZE = 1 << 30
DEFAULT_MAP_SIZE_MAX = 1 << 40
#: The smallest map accepted: LMDB needs a handful of pages for an empty store.
MIN_MAP_SIZE = 64 << 10
#: How long growing the map waits for the read transactions in flight.
RESIZE_WAIT_SECONDS = 30.0


class MetaStore:
    """The LMDB environment of one snapshotter's metadata (see the module docstring).

    ``path`` is the data file; LMDB keeps its lock file at ``<path>-lock``.
    The environment is opened by :meth:`open` or, lazily, by the first
    transaction; several processes may share the file (LMDB's own locking),
    one ``MetaStore`` per file and process.

    The map (address space, not disk) starts at ``map_size`` and grows on
    demand: a write that finds it full doubles it, up to ``map_size_max``
    (see :meth:`write`).  ``read_only`` opens the file read-only (a root on a
    read-only filesystem): reads work, every write transaction is refused
    with :class:`~overlay.errors.ReadOnlyError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        map_size_max: int = DEFAULT_MAP_SIZE_MAX,
        read_only: bool = False,
    ) -> None:
        if not MIN_MAP_SIZE <= map_size <= map_size_max:
            raise InvalidArgumentError(
                f"metastore map size {map_size!r} must be at least {MIN_MAP_SIZE} and at most "
                f"the maximum {map_size_max!r}"
            )
        self._path = os.fspath(path)
        self._map_size = _pages(map_size)
        self._map_size_max = _pages(map_size_max)
        self._read_only = read_only
        self._env: lmdb.Environment | None = None
        self._dbs: _Dbs | None = None
        self._pid = 0
        self._closed = False
        self._open_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._writer: int | None = None
        # Growing the map (set_mapsize) invalidates every transaction of the
        # process, so it waits until no read transaction is open and holds new
        # ones back meanwhile: readers per thread, under _gate_lock (taken bare on the
        # hot path: a read transaction costs one acquire and release more).
        self._gate_lock = threading.Lock()
        self._gate = threading.Condition(self._gate_lock)
        self._readers: dict[int, int] = {}
        self._resizing = False
        # (see "Reading" in the module docstring; lru_cache is thread-safe)
        self._memo = functools.lru_cache(maxsize=MEMO_ENTRIES)(_decode_entry)

    @property
    def path(self) -> str:
        return self._path

    @property
    def read_only(self) -> bool:
        """Whether the store was opened read-only (writes are refused)."""
        return self._read_only

    def __repr__(self) -> str:
        return f"MetaStore({self._path!r})"

    def open(self) -> None:
        """Open the environment now (it opens lazily otherwise), so that a
        store that cannot be opened fails here, with its domain error."""
        self._environment()

    def _environment(self) -> tuple[lmdb.Environment, _Dbs]:
        with self._open_lock:
            if self._closed:
                raise UnavailableError(f"metastore {self._path!r} is closed")
            if self._env is not None and self._dbs is not None:
                if self._pid != os.getpid():
                    raise UnavailableError(
                        f"metastore {self._path!r} was opened by another process (fork); "
                        "open a new one"
                    )
                return self._env, self._dbs
            try:
                env = lmdb.open(
                    self._path,
                    map_size=self._map_size,
                    subdir=False,
                    mode=0o600,
                    max_dbs=4,
                    max_readers=1024,
                    readonly=self._read_only,
                )
            except lmdb.Error as exc:
                where = f"cannot open metastore {self._path!r}"
                err = _faults.from_errno(getattr(exc, "code", 0), where, self._path)
                raise (err or UnavailableError(f"{where}: {exc}")) from exc
            try:
                dbs = self._init_schema(env)
            except BaseException:
                env.close()
                raise
            self._env, self._dbs, self._pid = env, dbs, os.getpid()
            return env, dbs

    def _init_schema(self, env: lmdb.Environment) -> _Dbs:
        # Open (creating if needed) the sub-databases and check the schema version in one
        # write transaction; it writes nothing when the file is already initialized.  No
        # _write_lock: the env is not published yet, and taking it under _open_lock would
        # invert close()'s lock order.  Read-only: the sub-databases must exist already
        # and the version is read in a read transaction.
        create = not self._read_only
        try:
            if not create:
                # py-lmdb keeps a handle opened in a read-only environment only when it
                # opens it in a transaction of its own
                try:
                    dbs = tuple(env.open_db(name, create=False) for name in _DB_NAMES)
                except lmdb.NotFoundError as exc:
                    raise FailedPreconditionError(
                        f"metastore {self._path!r} is read-only and was never initialized"
                    ) from exc
            txn = env.begin(write=create)
            try:
                if create:
                    dbs = tuple(env.open_db(name, txn=txn) for name in _DB_NAMES)
                raw = txn.get(_META_VERSION, db=dbs[2])
                if raw is None and create:
                    txn.put(_META_VERSION, _U32.pack(SCHEMA_VERSION), db=dbs[2])
                elif raw is None or len(raw) != _U32.size or _U32.unpack(raw)[0] != SCHEMA_VERSION:
                    found = _U32.unpack(raw)[0] if raw and len(raw) == _U32.size else raw
                    raise FailedPreconditionError(
                        f"metastore {self._path!r} has schema version {found!r}, "
                        f"this build reads version {SCHEMA_VERSION}"
                    )
                txn.commit()
            except BaseException:
                txn.abort()
                raise
        except lmdb.Error as exc:
            raise _map_error(exc, f"cannot open metastore {self._path!r}", self._path) from exc
        assert len(dbs) == 3
        return dbs

    # ------------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def transaction(self, write: bool = False) -> Iterator[Txn]:
        """A transaction: committed when the block ends normally (write), else aborted.

        A write that finds the map full aborts, grows the map (when it may)
        and raises :class:`~overlay.errors.ResourceExhaustedError`; use
        :meth:`write` to have the transaction run again in the bigger map.
        """
        env, dbs = self._environment()
        if write:
            with self._write_transaction(env, dbs, None) as txn:
                yield txn
            return
        ltxn, me = self._begin_read(env)
        txn = Txn(env, ltxn, dbs, write=False, path=self._path, memo=self._memo)
        try:
            yield txn
        finally:
            txn._closed = True
            with contextlib.suppress(lmdb.Error):
                ltxn.abort()
            self._leave_read(me)

    def write(self, fn: Callable[[Txn], _R], *, undo: Callable[[Txn], None] | None = None) -> _R:
        """``fn(txn)`` in a write transaction, committed; its result.

        When the map is full, the transaction is aborted, the map grows
        (doubling, up to ``map_size_max``) and ``fn`` runs again from the
        start, in a new transaction: ``fn`` must undo what it did outside the
        store when it raises, as any write transaction's body must.  A map
        that cannot grow further is
        :class:`~overlay.errors.ResourceExhaustedError`, with nothing written.

        ``undo(txn)`` is for the one failure ``fn`` cannot see, the commit's
        own (a full map or disk, a read-only filesystem): it runs then, in a
        new write transaction that is never committed, so under the writer
        lock of every process sharing the file, to take back what ``fn`` did
        outside the store.  What it raises is added to the error as a note.
        """
        env, dbs = self._environment()
        while True:
            try:
                with self._write_transaction(env, dbs, undo) as txn:
                    return fn(txn)
            except _MapGrownError:
                continue

    @contextlib.contextmanager
    def _write_transaction(
        self, env: lmdb.Environment, dbs: _Dbs, undo: Callable[[Txn], None] | None
    ) -> Iterator[Txn]:
        if self._read_only:
            err = _faults.from_errno(errno.EROFS, f"metastore {self._path!r}", self._path)
            assert err is not None
            raise err
        me = threading.get_ident()
        if self._writer == me:
            raise FailedPreconditionError(
                f"metastore {self._path!r}: this thread already holds a write transaction"
            )
        with self._write_lock:
            self._writer = me
            try:
                try:
                    ltxn = env.begin(write=True)
                except lmdb.MapResizedError:
                    if self._readers.get(me) or not self._set_map_size(env, 0):
                        raise UnavailableError(
                            f"metastore {self._path!r}: another process grew the metadata "
                            "map and read transactions are open: retry"
                        ) from None
                    ltxn = self._begin(env, write=True)
                except lmdb.Error as exc:
                    raise self._begin_error(exc) from exc
                txn = Txn(env, ltxn, dbs, write=True, path=self._path, memo=self._memo)
                try:
                    yield txn
                except BaseException as exc:
                    txn._closed = True
                    try:
                        ltxn.abort()
                    except lmdb.Error as abort_exc:
                        exc.add_note(f"rollback failed: {abort_exc}")
                    if isinstance(exc, _MapFullError | lmdb.MapFullError):
                        raise self._grow(env) from exc
                    raise
                txn._closed = True
                try:
                    ltxn.commit()
                except lmdb.Error as exc:
                    if undo is not None:
                        self._undo(env, dbs, undo, exc)
                    if isinstance(exc, lmdb.MapFullError):  # the free list did not fit
                        raise self._grow(env) from exc
                    raise _map_error(exc, f"metastore {self._path!r}: commit failed",
                                     self._path) from exc
            finally:
                self._writer = None

    def _undo(self, env: lmdb.Environment, dbs: _Dbs, undo: Callable[[Txn], None],
              exc: BaseException) -> None:
        """Run ``undo`` in a write transaction of its own, then abort it."""
        try:
            ltxn = env.begin(write=True)
        except lmdb.Error as begin_exc:
            exc.add_note(f"could not take back the transaction's other changes: {begin_exc}")
            return
        txn = Txn(env, ltxn, dbs, write=True, path=self._path, memo=self._memo)
        try:
            undo(txn)
        except Exception as undo_exc:
            exc.add_note(f"taking back the transaction's other changes failed: {undo_exc}")
        finally:
            txn._closed = True
            with contextlib.suppress(lmdb.Error):
                ltxn.abort()

    def _begin(self, env: lmdb.Environment, *, write: bool) -> lmdb.Transaction[bytes]:
        try:
            return env.begin(write=write)
        except lmdb.Error as exc:
            raise self._begin_error(exc) from exc

    def _begin_read(self, env: lmdb.Environment) -> tuple[lmdb.Transaction[bytes], int]:
        """A read transaction, counted as open (see :meth:`_set_map_size`)."""
        me = self._enter_read()
        try:
            return env.begin(), me
        except lmdb.MapResizedError:
            self._leave_read(me)
        except lmdb.Error as exc:
            self._leave_read(me)
            raise self._begin_error(exc) from exc
        self._adopt_map(env)
        me = self._enter_read()
        try:
            return env.begin(), me
        except lmdb.Error as exc:
            self._leave_read(me)
            raise self._begin_error(exc) from exc

    def _begin_error(self, exc: lmdb.Error) -> OverlayError:
        if self._closed:  # close() won the race since _environment() returned
            return UnavailableError(f"metastore {self._path!r} is closed")
        return _map_error(exc, f"metastore {self._path!r}: begin", self._path)

    # ------------------------------------------------------------------ the map

    def _enter_read(self) -> int:
        me = threading.get_ident()
        with self._gate_lock:
            if self._resizing and not self._readers.get(me):
                # (a thread already reading goes on: the resize waits for it anyway)
                self._gate.wait_for(lambda: not self._resizing)
            self._readers[me] = self._readers.get(me, 0) + 1
        return me

    def _leave_read(self, me: int) -> None:
        with self._gate_lock:
            left = self._readers[me] - 1
            if left:
                self._readers[me] = left
            else:
                del self._readers[me]
                if self._resizing:
                    self._gate.notify_all()

    def _set_map_size(self, env: lmdb.Environment, size: int) -> bool:
        """``set_mapsize`` once no read transaction is open (new ones wait);
        False if they stayed open too long.  The caller holds the write lock
        (so no write transaction is open) and no read transaction."""
        with self._gate:
            self._resizing = True
            try:
                if not self._gate.wait_for(lambda: not self._readers, RESIZE_WAIT_SECONDS):
                    return False
                env.set_mapsize(size)
                return True
            finally:
                self._resizing = False
                self._gate.notify_all()

    def _adopt_map(self, env: lmdb.Environment) -> None:
        """Another process grew the map past ours (MDB_MAP_RESIZED): adopt its
        size, which needs every transaction of this process closed."""
        me = threading.get_ident()
        if self._writer == me or self._readers.get(me):
            raise UnavailableError(
                f"metastore {self._path!r}: another process grew the metadata map while "
                "this thread holds a transaction: retry"
            )
        with self._write_lock:
            ok = self._set_map_size(env, 0)
        if not ok:
            raise UnavailableError(
                f"metastore {self._path!r}: another process grew the metadata map and read "
                f"transactions stayed open for {RESIZE_WAIT_SECONDS:g}s: retry"
            )

    def _grow(self, env: lmdb.Environment) -> OverlayError:
        """After a write found the map full and was aborted (write lock held):
        double the map, up to the maximum.  The error to raise: ``_MapGrownError``
        when it grew (:meth:`write` runs the transaction again)."""
        where = f"metastore {self._path!r}"
        current = int(env.info()["map_size"])
        full = f"{where}: the metadata map is full at {_faults.human(current)}"
        if current >= self._map_size_max:
            return ResourceExhaustedError(
                f"{full}, its maximum: raise metadata_map_size_max in the daemon's config, "
                "or remove snapshots"
            )
        if self._readers.get(threading.get_ident()):
            return ResourceExhaustedError(
                f"{full} and cannot grow while this thread holds a read transaction"
            )
        new = min(self._map_size_max, _pages(current * 2))
        try:
            grown = self._set_map_size(env, new)
        except lmdb.Error as exc:
            return _map_error(exc, f"{full}; growing it to {_faults.human(new)}", self._path)
        if not grown:
            return ResourceExhaustedError(
                f"{full}; growing it waits for the read transactions, which stayed open for "
                f"{RESIZE_WAIT_SECONDS:g}s: retry"
            )
        log.info("%s: the metadata map was full at %s; grown to %s",
                 where, _faults.human(current), _faults.human(new))
        return _MapGrownError(f"{full}; grown to {_faults.human(new)}: retry")

    def close(self) -> None:
        """Close the environment; a no-op when never opened or already closed.

        Waits for a write transaction in flight on another thread (LMDB would
        otherwise abort it from this thread, which its writer lock forbids).
        Read transactions still open become unusable.  Closing on a thread that
        holds a write transaction of this store is refused.
        """
        if self._env is not None and self._pid != os.getpid():
            # A forked child: the environment (and maybe the locks) belong to the parent.
            self._closed, self._env, self._dbs = True, None, None
            return
        if self._writer == threading.get_ident():
            raise FailedPreconditionError(
                f"metastore {self._path!r}: close inside a write transaction"
            )
        # Lock order everywhere: _write_lock, then _open_lock.
        with self._write_lock, self._open_lock:
            self._closed = True
            env, self._env, self._dbs = self._env, None, None
            if env is not None and self._pid == os.getpid():
                env.close()


# --------------------------------------------------------------------------------------------
# Encoding


def _text(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a string, not {type(value).__name__}")
    try:
        return value.encode()
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(f"{what} {value!r} is not valid unicode") from exc


def _key(value: object, what: str = "snapshot key") -> bytes:
    raw = _text(value, what)
    if not raw:
        raise InvalidArgumentError(f"{what} must not be empty")
    return raw


def _record_key(raw: bytes) -> bytes:
    if len(raw) <= _INLINE_KEY_MAX:
        return raw
    return raw[:_INLINE_KEY_MAX] + _LONG_KEY_MARK + hashlib.sha256(raw).digest()


def _clean_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """Validated labels without the empty values (which mean "no label")."""
    if not labels:
        return {}
    for k, v in labels.items():
        # check_labels measures with str.encode(), which raises on lone surrogates.
        _text(k, "label key")
        _text(v, f"label {k!r} value" if isinstance(k, str) else "label value")
    check_labels(labels)
    return {k: v for k, v in labels.items() if v != ""}


def _check_int64(value: int, what: str) -> None:
    if not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
        raise InvalidArgumentError(f"{what} must be an integer in [0, 2**63), not {value!r}")


def _encode(rec: _Record, raw_key: bytes) -> bytes:
    parent = rec.parent.encode()
    full = raw_key if len(raw_key) > _INLINE_KEY_MAX else b""
    labels = (
        json.dumps(rec.labels, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()
        if rec.labels
        else b""
    )
    header = _HEADER.pack(
        _RECORD_VERSION,
        int(rec.kind),
        _FLAG_FULL_KEY if full else 0,
        rec.id,
        rec.created_ns,
        rec.updated_ns,
        rec.inodes,
        rec.size,
        len(parent),
        len(full),
    )
    return b"".join((header, parent, full, labels))


def _decode(rkey: bytes, data: bytes) -> _Record:
    try:
        version, kind, flags, sid, created, updated, inodes, size, plen, klen = _HEADER.unpack_from(
            data
        )
        if version != _RECORD_VERSION:
            raise ValueError(f"unsupported record version {version}")
        pos = _HEADER.size
        parent = data[pos : pos + plen].decode()
        pos += plen
        key = data[pos : pos + klen].decode() if flags & _FLAG_FULL_KEY else rkey.decode()
        pos += klen
        labels: dict[str, str] = json.loads(data[pos:]) if len(data) > pos else {}
        return _Record(sid, Kind(kind), key, parent, labels, created, updated, inodes, size)
    except (struct.error, ValueError) as exc:
        raise UnknownError(f"corrupt metastore record {rkey[:64]!r}: {exc}") from exc


def _info(rec: _Record) -> Info:
    # Read-only labels of their own: an Info may be shared (the memo).
    return Info(
        kind=rec.kind,
        name=rec.key,
        parent=rec.parent,
        labels=MappingProxyType(dict(rec.labels)) if rec.labels else _NO_LABELS,
        created_ns=rec.created_ns,
        updated_ns=rec.updated_ns,
    )


def _decode_entry(rkey: bytes, data: bytes) -> _Entry:
    rec = _decode(rkey, data)
    return str(rec.id), _info(rec), Usage(rec.inodes, rec.size)


def _entry(txn: Txn, rkey: bytes, data: bytes) -> _Entry:
    """The stored record ``rkey`` → ``data`` decoded, through the store's memo."""
    if len(data) > MEMO_RECORD_MAX:
        return _decode_entry(rkey, data)
    return txn._memo(rkey, data)


# --------------------------------------------------------------------------------------------
# Record access (internal; every check happens before the first put)


def _load(txn: Txn, raw_key: bytes) -> _Record | None:
    ltxn = txn._use()
    rkey = _record_key(raw_key)
    data = ltxn.get(rkey, db=txn._snapshots)
    if data is None:
        return None
    rec = _decode(rkey, data)
    if rec.key.encode() != raw_key:  # a sha256 collision between two long keys
        raise UnknownError(f"metastore record key clash for {raw_key[:64]!r}")
    return rec


def _get_entry(txn: Txn, raw_key: bytes) -> _Entry | None:
    """What :func:`_load` finds, decoded for reading (through the memo)."""
    rkey = _record_key(raw_key)
    data = txn._use().get(rkey, db=txn._snapshots)
    if data is None:
        return None
    entry = _entry(txn, rkey, data)
    # an inline key is its own record key: only a long one can clash
    if len(raw_key) > _INLINE_KEY_MAX and entry[1].name.encode() != raw_key:
        raise UnknownError(f"metastore record key clash for {raw_key[:64]!r}")
    return entry


def _store(txn: Txn, rec: _Record) -> None:
    raw = rec.key.encode()
    txn._use(write=True).put(_record_key(raw), _encode(rec, raw), db=txn._snapshots)


def _next_id(txn: Txn) -> int:
    ltxn = txn._use(write=True)
    raw = ltxn.get(_META_SEQUENCE, db=txn._meta)
    sid = (_U64.unpack(raw)[0] if raw is not None else 0) + 1
    ltxn.put(_META_SEQUENCE, _U64.pack(sid), db=txn._meta)
    return sid


def _has_children(txn: Txn, sid: int) -> bool:
    prefix = _U64.pack(sid)
    with txn._use().cursor(db=txn._parents) as cur:
        return cur.set_range(prefix) and cur.key()[: len(prefix)] == prefix


def _parent_ids(txn: Txn, parent: str, child: str) -> tuple[str, ...]:
    ids: list[str] = []
    seen: set[str] = set()
    while parent:
        if parent in seen:
            raise UnknownError(f"metastore: parent cycle through {parent!r}")
        seen.add(parent)
        rec = _load(txn, parent.encode())
        if rec is None:
            raise NotFoundError(f"missing parent {parent!r} of snapshot {child!r}")
        ids.append(str(rec.id))
        child, parent = parent, rec.parent
    return tuple(ids)


def _iter_entries(txn: Txn) -> Iterator[_Entry]:
    memo = txn._memo
    with txn._use().cursor(db=txn._snapshots) as cur:
        for rkey, data in cur:
            yield memo(rkey, data) if len(data) <= MEMO_RECORD_MAX else _decode_entry(rkey, data)


# --------------------------------------------------------------------------------------------
# The operations (containerd's storage package)


@_guard
def last_id(txn: Txn) -> int:
    """The last snapshot id handed out (0 for none yet): any id above it has
    never been committed."""
    raw = txn._use().get(_META_SEQUENCE, db=txn._meta)
    return _U64.unpack(raw)[0] if raw is not None else 0


@_guard
def get_info(txn: Txn, key: str) -> tuple[str, Info, Usage]:
    """The id, Info and stored Usage of ``key``; NotFound if absent."""
    entry = _get_entry(txn, _key(key))
    if entry is None:
        raise NotFoundError(f"snapshot {key!r}")
    return entry


@_guard
def get_snapshot(txn: Txn, key: str) -> Snapshot:
    """Id, kind and parent ids of the active or view ``key``.

    NotFound if absent (or a parent is missing); FailedPrecondition if committed.
    """
    rec = _load(txn, _key(key))
    if rec is None:
        raise NotFoundError(f"snapshot {key!r}")
    if rec.kind not in (Kind.ACTIVE, Kind.VIEW):
        raise FailedPreconditionError(f"requested snapshot {key!r} not active or view")
    return Snapshot(str(rec.id), rec.kind, _parent_ids(txn, rec.parent, key))


@_guard
def create_snapshot(
    txn: Txn,
    kind: Kind,
    key: str,
    parent: str = "",
    labels: Mapping[str, str] | None = None,
) -> Snapshot:
    """Create the active or view ``key`` over the committed ``parent`` ("" = none).

    Checks, in order: kind (InvalidArgument), key and labels (InvalidArgument),
    parent missing (NotFound), parent not committed (InvalidArgument), key taken
    by any snapshot (AlreadyExists).
    """
    txn._use(write=True)
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise InvalidArgumentError(f"snapshot type {kind!s} invalid; only active and view")
    raw = _key(key)
    clean = _clean_labels(labels)
    parent_rec: _Record | None = None
    if parent:
        parent_rec = _load(txn, _key(parent, "parent"))
        if parent_rec is None:
            raise NotFoundError(f"missing parent {parent!r}")
        if parent_rec.kind != Kind.COMMITTED:
            raise InvalidArgumentError(f"parent {parent!r} is not a committed snapshot")
    else:
        _text(parent, "parent")
    if _load(txn, raw) is not None:
        raise AlreadyExistsError(f"snapshot {key!r}")
    parent_ids = (
        (str(parent_rec.id), *_parent_ids(txn, parent_rec.parent, parent))
        if parent_rec is not None
        else ()
    )

    sid = _next_id(txn)
    now = now_ns()
    _store(txn, _Record(sid, kind, key, parent, clean, now, now))
    if parent_rec is not None:
        txn._use(write=True).put(_LINK.pack(parent_rec.id, sid), raw, db=txn._parents)
    return Snapshot(str(sid), kind, parent_ids)


@_guard
def commit_active(
    txn: Txn,
    key: str,
    name: str,
    usage: Usage,
    labels: Mapping[str, str] | None = None,
    parent: str = "",
) -> str:
    """Turn the active ``key`` into the committed ``name``, keeping its id; returns the id.

    The committed snapshot's labels are ``labels`` only.  ``parent`` rebases an
    active snapshot prepared without a parent (containerd HEAD); "" keeps its own.
    Checks, in order: arguments (InvalidArgument), ``name`` taken (AlreadyExists),
    ``key`` missing (NotFound), not active (FailedPrecondition), a conflicting
    ``parent`` (InvalidArgument), parent missing (NotFound) or not committed
    (FailedPrecondition).
    """
    txn._use(write=True)
    raw_key = _key(key)
    raw_name = _key(name, "snapshot name")
    _text(parent, "parent")
    clean = _clean_labels(labels)
    _check_int64(usage.inodes, "usage inodes")
    _check_int64(usage.size, "usage size")

    if _load(txn, raw_name) is not None:
        raise AlreadyExistsError(f"committed snapshot {name!r}")
    rec = _load(txn, raw_key)
    if rec is None:
        raise NotFoundError(f"snapshot {key!r}")
    if rec.kind != Kind.ACTIVE:
        raise FailedPreconditionError(f"snapshot {key!r} is not active")
    new_parent = rec.parent
    if parent:
        if not rec.parent:
            new_parent = parent
        elif rec.parent != parent:
            raise InvalidArgumentError(
                f"cannot change parent of active snapshot {key!r} from {rec.parent!r} to {parent!r}"
            )
    parent_rec: _Record | None = None
    if new_parent:
        parent_rec = _load(txn, new_parent.encode())
        if parent_rec is None:
            raise NotFoundError(f"missing parent {new_parent!r} of snapshot {key!r}")
        if parent_rec.kind != Kind.COMMITTED:
            raise FailedPreconditionError(
                f"parent {new_parent!r} of snapshot {key!r} is not committed"
            )

    now = now_ns()
    committed = _Record(
        rec.id, Kind.COMMITTED, name, new_parent, clean, now, now, usage.inodes, usage.size
    )
    ltxn = txn._use(write=True)
    ltxn.delete(_record_key(raw_key), db=txn._snapshots)
    _store(txn, committed)
    if parent_rec is not None:
        # Rewrites the back link to the new name, or adds it on a rebase.
        ltxn.put(_LINK.pack(parent_rec.id, rec.id), raw_name, db=txn._parents)
    return str(rec.id)


@_guard
def remove(txn: Txn, key: str) -> tuple[str, Kind]:
    """Remove ``key``; returns its id and kind.

    NotFound if absent; FailedPrecondition if it is the parent of another snapshot.
    """
    txn._use(write=True)
    raw = _key(key)
    rec = _load(txn, raw)
    if rec is None:
        raise NotFoundError(f"snapshot {key!r}")
    if _has_children(txn, rec.id):
        raise FailedPreconditionError(f"cannot remove snapshot {key!r} with child")
    parent_rec: _Record | None = None
    if rec.parent:
        parent_rec = _load(txn, rec.parent.encode())
        if parent_rec is None:
            raise NotFoundError(f"missing parent {rec.parent!r} of snapshot {key!r}")
    ltxn = txn._use(write=True)
    if parent_rec is not None:
        ltxn.delete(_LINK.pack(parent_rec.id, rec.id), db=txn._parents)
    ltxn.delete(_record_key(raw), db=txn._snapshots)
    return str(rec.id), rec.kind


@_guard
def update_info(txn: Txn, info: Info, *fieldpaths: str) -> Info:
    """Update the labels of ``info.name`` (SPEC §1.4) and set Updated to now.

    No fieldpaths, or ``labels``: replace all labels with ``info.labels``;
    ``labels.<k>``: set label ``k`` to ``info.labels[k]`` (missing or empty
    deletes it).  Any other path is InvalidArgument; a missing snapshot
    NotFound.  Kind, parent and Created never change.
    """
    txn._use(write=True)
    name = info.name
    raw = _key(name)
    given = dict(info.labels) if info.labels else {}
    rec = _load(txn, raw)
    if rec is None:
        raise NotFoundError(f"snapshot {name!r}")

    labels = dict(rec.labels)
    if not fieldpaths:
        labels = given
    for path in fieldpaths:
        if path == "labels":
            labels = dict(given)
        elif path.startswith("labels."):
            label = path[len("labels.") :]
            value = given.get(label, "")
            if value:
                labels[label] = value
            else:
                labels.pop(label, None)
        else:
            raise InvalidArgumentError(f"cannot update {path!r} field on snapshot {name!r}")
    rec.labels = _clean_labels(labels)
    rec.updated_ns = now_ns()
    _store(txn, rec)
    return _info(rec)


@_guard
def walk_info(txn: Txn, fn: Callable[[Info], None], *filters: str) -> None:
    """Call ``fn`` for every snapshot matching any of ``filters`` (none = all), in key order.

    A bad filter is InvalidArgument (before ``fn`` is called); an exception from
    ``fn`` stops the walk and propagates.  An empty store calls nothing.  In a
    write transaction the matches are collected first, so ``fn`` may change
    the store through the same transaction.
    """
    flt = parse_filters(*filters)
    infos: Iterable[Info] = (info for _, info, _ in _iter_entries(txn))
    if flt is not ALWAYS:  # (no adaptor per snapshot when everything matches)
        match = flt.match
        infos = (info for info in infos if match(info_adaptor(info)))
    if txn.write:
        infos = list(infos)
    for info in infos:
        fn(info)


@_guard
def children(txn: Txn, parent: str) -> list[Info]:
    """The snapshots whose parent is ``parent``, found through the back links
    (no scan); ``""`` gives every snapshot without a parent (a scan).  An
    unknown parent has none."""
    if not parent:
        return [info for _, info, _ in _iter_entries(txn) if not info.parent]
    prec = _load(txn, _key(parent, "parent"))
    if prec is None:
        return []
    prefix = _U64.pack(prec.id)
    keys: list[bytes] = []
    with txn._use().cursor(db=txn._parents) as cur:
        if cur.set_range(prefix):
            for link, child in cur:
                if bytes(link[: len(prefix)]) != prefix:
                    break
                keys.append(bytes(child))
    out = []
    for raw in keys:
        entry = _get_entry(txn, raw)
        if entry is not None:
            out.append(entry[1])
    return out


@_guard
def id_map(txn: Txn) -> dict[str, str]:
    """Every snapshot's id mapped to its key (empty for an empty store)."""
    return {sid: info.name for sid, info, _ in _iter_entries(txn)}


@_guard
def stats(txn: Txn) -> StoreStats:
    """Space used by the store, as seen by ``txn``."""
    ltxn = txn._use()
    env = txn._env
    info = env.info()
    st = env.stat()
    return StoreStats(
        map_size=info["map_size"],
        used_bytes=(info["last_pgno"] + 1) * st["psize"],
        page_size=st["psize"],
        readers=info["num_readers"],
        max_readers=info["max_readers"],
        snapshots=ltxn.stat(txn._snapshots)["entries"],
    )


@_guard
def dump(txn: Txn) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every raw entry of every sub-database, in order (for diagnostics and tests)."""
    ltxn = txn._use()
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    for name, db in (
        (_DB_SNAPSHOTS, txn._snapshots),
        (_DB_PARENTS, txn._parents),
        (_DB_META, txn._meta),
    ):
        with ltxn.cursor(db=db) as cur:
            out[name.decode()] = [(bytes(k), bytes(v)) for k, v in cur]
    return out
