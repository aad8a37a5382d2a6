"""The metastore's map: it grows on demand, stops at its maximum, follows
another process that grew it, and a read-only store refuses writes.

Real LMDB files under each test's ``tmp_path`` (see test_metastore.py for
the record operations).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay import metastore as ms
from overlay.errors import InvalidArgumentError, ReadOnlyError, ResourceExhaustedError
from overlay.metastore import MetaStore, Txn
from overlay.snapshots import Kind

Dump = dict[str, list[tuple[bytes, bytes]]]
KIB = 1024
LABEL = "x" * 1000  # a record of about a kilobyte: 64 KiB holds a few dozen


def dump_store(store: MetaStore) -> Dump:
    with store.transaction() as txn:
        return ms.dump(txn)


def map_size(store: MetaStore) -> int:
    with store.transaction() as txn:
        return ms.stats(txn).map_size


def create(store: MetaStore, key: str) -> str:
    def fn(txn: Txn) -> str:
        return ms.create_snapshot(txn, Kind.ACTIVE, key, labels={"v": LABEL}).id

    return store.write(fn)


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[MetaStore]:
    s = MetaStore(tmp_path / "metadata.lmdb", map_size=64 * KIB)
    try:
        yield s
    finally:
        s.close()


def test_a_tiny_map_grows_as_the_workload_needs(tiny: MetaStore) -> None:
    assert map_size(tiny) == 64 * KIB
    ids = [create(tiny, f"k{i}") for i in range(2000)]
    assert ids == [str(i) for i in range(1, 2001)]  # no create lost, no id skipped
    grown = map_size(tiny)
    assert grown >= 2 << 20  # 2000 records of a kilobyte
    assert grown & (grown - 1) == 0  # doubled from 64 KiB, never more at once
    with tiny.transaction() as txn:
        assert len(ms.id_map(txn)) == 2000
    # a new process (here: a new store) opens the grown file as it is
    tiny.close()
    again = MetaStore(tiny.path, map_size=64 * KIB)
    try:
        with again.transaction() as txn:
            assert len(ms.id_map(txn)) == 2000
        create(again, "after")
    finally:
        again.close()


def test_a_map_at_its_maximum_is_resource_exhausted_and_writes_nothing(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "metadata.lmdb", map_size=64 * KIB, map_size_max=256 * KIB)
    try:
        created = 0
        with pytest.raises(ResourceExhaustedError) as info:
            for i in range(10_000):
                before = dump_store(store)
                create(store, f"k{i}")
                created += 1
        assert 100 < created < 300
        assert dump_store(store) == before
        assert map_size(store) == 256 * KIB
        assert str(info.value) == (
            f"metastore {store.path!r}: the metadata map is full at 256.0 KiB, its maximum: "
            "raise metadata_map_size_max in the daemon's config, or remove snapshots: "
            "resource exhausted")
        # what fits still goes in: a removal frees room for the next create
        store.write(lambda txn: ms.remove(txn, "k0"))
        create(store, "k-after-remove")
    finally:
        store.close()


def test_a_plain_write_transaction_grows_the_map_and_asks_for_a_retry(tiny: MetaStore) -> None:
    n = 0
    with pytest.raises(ResourceExhaustedError, match=r"full at 64\.0 KiB; grown to 128\.0 KiB"):
        for n in range(1000):
            with tiny.transaction(write=True) as txn:
                ms.create_snapshot(txn, Kind.ACTIVE, f"k{n}", labels={"v": LABEL})
    assert map_size(tiny) == 128 * KIB
    before = dump_store(tiny)
    assert len(before["snapshots"]) == n  # the one that did not fit is not there
    with tiny.transaction(write=True) as txn:  # the retry fits
        ms.create_snapshot(txn, Kind.ACTIVE, f"k{n}", labels={"v": LABEL})


def test_growing_waits_for_reads_in_flight_which_stay_valid(tiny: MetaStore) -> None:
    for i in range(10):
        create(tiny, f"base{i}")
    done: list[object] = []

    def writer() -> None:
        try:
            for i in range(200):
                create(tiny, f"k{i}")
            done.append("ok")
        except Exception as exc:  # reported below
            done.append(exc)

    with tiny.transaction() as txn:
        seen = ms.id_map(txn)
        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 60
        while not tiny._resizing and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tiny._resizing, "the writer never needed to grow the map"
        # the resize waits for this read: it still reads what it saw
        assert ms.id_map(txn) == seen
        assert not done
    t.join(60)
    assert done == ["ok"]
    with tiny.transaction() as txn:
        assert len(ms.id_map(txn)) == 210


def test_a_thread_holding_a_read_cannot_grow_the_map(tiny: MetaStore) -> None:
    with tiny.transaction() as txn:
        with pytest.raises(ResourceExhaustedError, match="holds a read transaction"):
            for i in range(1000):
                create(tiny, f"k{i}")
        assert ms.id_map(txn) == {}
    create(tiny, "afterwards")  # grows now


SCRIPT = """
import sys
from overlay import metastore as ms
from overlay.snapshots import Kind
store = ms.MetaStore(sys.argv[1], map_size=64 * 1024)
for i in range(int(sys.argv[2])):
    store.write(lambda txn: ms.create_snapshot(txn, Kind.ACTIVE, f"other{i}",
                                               labels={"v": "y" * 1000}))
store.close()
"""


def test_a_map_grown_by_another_process_is_adopted(tiny: MetaStore) -> None:
    create(tiny, "mine")
    assert map_size(tiny) == 64 * KIB
    subprocess.run([sys.executable, "-c", SCRIPT, tiny.path, "3000"], check=True)
    # reading first: the other process's data lies beyond this process's map
    with tiny.transaction() as txn:
        assert len(ms.id_map(txn)) == 3001
    assert map_size(tiny) >= 2 << 20
    create(tiny, "mine-again")
    subprocess.run([sys.executable, "-c", SCRIPT.replace("other", "third"), tiny.path, "3000"],
                   check=True)
    create(tiny, "a-write-first")  # a write transaction adopts it too
    with tiny.transaction() as txn:
        assert len(ms.id_map(txn)) == 6003


def test_map_size_bounds(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="at least 65536"):
        MetaStore(tmp_path / "m", map_size=4096)
    with pytest.raises(InvalidArgumentError, match="at most the maximum"):
        MetaStore(tmp_path / "m", map_size=1 << 30, map_size_max=1 << 20)
    assert not (tmp_path / "m").exists()


def test_a_read_only_store_reads_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "metadata.lmdb"
    rw = MetaStore(path)
    create(rw, "k")
    rw.close()
    before = path.read_bytes()
    ro = MetaStore(path, read_only=True)
    try:
        ro.open()
        assert ro.read_only
        with ro.transaction() as txn:
            assert ms.id_map(txn) == {"1": "k"}
        with pytest.raises(ReadOnlyError, match="the filesystem is read-only"), \
                ro.transaction(write=True):
            pass
        with pytest.raises(ReadOnlyError):
            create(ro, "other")
    finally:
        ro.close()
    assert path.read_bytes() == before


def test_a_read_only_store_that_was_never_created(tmp_path: Path) -> None:
    ro = MetaStore(tmp_path / "metadata.lmdb", read_only=True)
    with pytest.raises(Exception, match="cannot open metastore"):
        ro.open()
    ro.close()
    assert list(tmp_path.iterdir()) == []
