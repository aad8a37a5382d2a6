"""The LMDB metastore: containerd's storage test suite (SPEC §3.5) and our invariants.

Every test works on real LMDB files under its own ``tmp_path``.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from overlay import metastore as ms
from overlay.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OverlayError,
    UnavailableError,
)
from overlay.metastore import MetaStore, Snapshot, Txn
from overlay.snapshots import MAX_LABEL_BYTES, Info, Kind, Usage
from tests.helpers import Record, read_store

Dump = dict[str, list[tuple[bytes, bytes]]]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    s = MetaStore(tmp_path / "metadata.lmdb")
    try:
        yield s
    finally:
        s.close()


def dump_store(store: MetaStore) -> Dump:
    with store.transaction() as txn:
        return ms.dump(txn)


# --------------------------------------------------------------------------------------------
# containerd's fixture


BASE_INFO: dict[str, tuple[str, Kind]] = {
    "committed-1": ("", Kind.COMMITTED),
    "committed-2": ("committed-1", Kind.COMMITTED),
    "active-1": ("", Kind.ACTIVE),
    "active-2": ("committed-1", Kind.ACTIVE),
    "active-3": ("committed-2", Kind.ACTIVE),
    "view-1": ("", Kind.VIEW),
    "view-2": ("committed-2", Kind.VIEW),
}


def base_populate(txn: Txn) -> None:
    ms.create_snapshot(txn, Kind.ACTIVE, "committed-tmp-1")
    ms.commit_active(txn, "committed-tmp-1", "committed-1", Usage(size=1))
    ms.create_snapshot(txn, Kind.ACTIVE, "committed-tmp-2", "committed-1")
    ms.commit_active(txn, "committed-tmp-2", "committed-2", Usage(size=2))
    ms.create_snapshot(txn, Kind.ACTIVE, "active-1")
    ms.create_snapshot(txn, Kind.ACTIVE, "active-2", "committed-1")
    ms.create_snapshot(txn, Kind.ACTIVE, "active-3", "committed-2")
    ms.create_snapshot(txn, Kind.VIEW, "view-1")
    ms.create_snapshot(txn, Kind.VIEW, "view-2", "committed-2")


@pytest.fixture
def base(store: MetaStore) -> MetaStore:
    with store.transaction(write=True) as txn:
        base_populate(txn)
    return store


def assert_base_info(info: Info, key: str) -> None:
    parent, kind = BASE_INFO[key]
    assert info.name == key
    assert info.parent == parent
    assert info.kind == kind
    now = time.time_ns()
    assert abs(info.created_ns - now) < 30 * 10**9
    assert abs(info.updated_ns - now) < 30 * 10**9
    assert info.created_ns == info.updated_ns


# --------------------------------------------------------------------------------------------
# SPEC §3.5, one test per row


def test_get_info(base: MetaStore) -> None:
    with base.transaction() as txn:
        for key in BASE_INFO:
            sid, info, _usage = ms.get_info(txn, key)
            assert sid.isdigit() and int(sid) >= 1
            assert_base_info(info, key)
            assert info.labels == {}
        assert ms.get_info(txn, "committed-1")[2] == Usage(size=1)
        assert ms.get_info(txn, "committed-2")[2] == Usage(size=2)
        assert ms.get_info(txn, "active-1")[2] == Usage()


def test_get_info_not_exist(base: MetaStore) -> None:
    with base.transaction() as txn, pytest.raises(NotFoundError, match="'active-not-exist'"):
        ms.get_info(txn, "active-not-exist")


def test_get_info_empty_db(store: MetaStore) -> None:
    with store.transaction() as txn, pytest.raises(NotFoundError):
        ms.get_info(txn, "active-not-exist")


def test_walk(base: MetaStore) -> None:
    found: dict[str, Info] = {}

    def fn(info: Info) -> None:
        assert info.name not in found, f"{info.name} visited twice"
        found[info.name] = info

    with base.transaction() as txn:
        ms.walk_info(txn, fn)
    assert set(found) == set(BASE_INFO)
    for key, info in found.items():
        assert_base_info(info, key)


def _get_snapshot_populate(txn: Txn) -> dict[str, Snapshot]:
    ms.create_snapshot(txn, Kind.ACTIVE, "committed-tmp-1")
    ms.commit_active(txn, "committed-tmp-1", "committed-1", Usage())
    out = {}
    for kind, key, parent in [
        (Kind.ACTIVE, "active-1", ""),
        (Kind.ACTIVE, "active-2", "committed-1"),
        (Kind.VIEW, "view-1", ""),
        (Kind.VIEW, "view-2", "committed-1"),
    ]:
        out[key] = ms.create_snapshot(txn, kind, key, parent)
    return out


def test_get_snapshot(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        expected = _get_snapshot_populate(txn)
    with store.transaction() as txn:
        for key, snap in expected.items():
            assert ms.get_snapshot(txn, key) == snap
    assert expected["active-1"].parent_ids == ()
    assert expected["view-2"].kind is Kind.VIEW
    assert len(expected["active-2"].parent_ids) == 1


def test_get_snapshot_not_exist(base: MetaStore) -> None:
    with base.transaction() as txn, pytest.raises(NotFoundError):
        ms.get_snapshot(txn, "active-not-exist")


def test_get_snapshot_committed(base: MetaStore) -> None:
    with base.transaction() as txn, pytest.raises(FailedPreconditionError):
        ms.get_snapshot(txn, "committed-1")


def test_get_snapshot_empty_db(store: MetaStore) -> None:
    with store.transaction() as txn, pytest.raises(NotFoundError):
        ms.get_snapshot(txn, "active-not-exist")


def test_create_active(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        a1 = ms.create_snapshot(txn, Kind.ACTIVE, "active-1")
        assert a1.kind is Kind.ACTIVE
        a2 = ms.create_snapshot(txn, Kind.VIEW, "view-1")
        assert a2.id != a1.id
        assert a2.kind is Kind.VIEW
        commit_id = ms.commit_active(txn, "active-1", "committed-1", Usage())
        assert commit_id == a1.id
        a3 = ms.create_snapshot(txn, Kind.ACTIVE, "active-3", "committed-1")
        assert a3.id not in (a1.id, a2.id)
        assert a3.parent_ids == (commit_id,)
        a4 = ms.create_snapshot(txn, Kind.VIEW, "view-2", "committed-1")
        assert a4.id not in (a1.id, a2.id, a3.id)
        assert a4.parent_ids == (commit_id,)
        assert a4.kind is Kind.VIEW


def test_create_active_not_exist(store: MetaStore) -> None:
    with store.transaction(write=True) as txn, pytest.raises(NotFoundError, match="does-not"):
        ms.create_snapshot(txn, Kind.ACTIVE, "active-1", "does-not-exist")


def test_create_active_exist(base: MetaStore) -> None:
    with base.transaction(write=True) as txn:
        with pytest.raises(AlreadyExistsError, match="'active-1'"):
            ms.create_snapshot(txn, Kind.ACTIVE, "active-1")
        with pytest.raises(AlreadyExistsError, match="'committed-1'"):
            ms.create_snapshot(txn, Kind.ACTIVE, "committed-1")
        with pytest.raises(AlreadyExistsError):
            ms.create_snapshot(txn, Kind.VIEW, "view-1", "committed-2")


def test_create_active_from_active(base: MetaStore) -> None:
    with base.transaction(write=True) as txn, pytest.raises(InvalidArgumentError):
        ms.create_snapshot(txn, Kind.ACTIVE, "active-new", "active-1")


def test_commit(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        a1 = ms.create_snapshot(txn, Kind.ACTIVE, "active-1")
        assert ms.commit_active(txn, "active-1", "committed-1", Usage()) == a1.id
        with pytest.raises(NotFoundError):
            ms.get_snapshot(txn, "active-1")
        with pytest.raises(FailedPreconditionError):
            ms.get_snapshot(txn, "committed-1")


@pytest.mark.parametrize("case", ["CommitExist", "CommitNotExist"])
def test_commit_exist(base: MetaStore, case: str) -> None:
    # containerd runs the same body for both names.
    with base.transaction(write=True) as txn, pytest.raises(AlreadyExistsError):
        ms.commit_active(txn, "active-1", "committed-1", Usage())


def test_commit_missing_key(base: MetaStore) -> None:
    with base.transaction(write=True) as txn, pytest.raises(NotFoundError):
        ms.commit_active(txn, "active-not-exist", "committed-3", Usage())


def test_commit_existing_name_beats_missing_key(base: MetaStore) -> None:
    with base.transaction(write=True) as txn, pytest.raises(AlreadyExistsError):
        ms.commit_active(txn, "bogus", "committed-1", Usage())


def test_commit_committed(base: MetaStore) -> None:
    with base.transaction(write=True) as txn, pytest.raises(FailedPreconditionError):
        ms.commit_active(txn, "committed-1", "committed-3", Usage())


def test_commit_view_fails(base: MetaStore) -> None:
    with base.transaction(write=True) as txn, pytest.raises(FailedPreconditionError):
        ms.commit_active(txn, "view-1", "committed-3", Usage())


def test_remove(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        a1 = ms.create_snapshot(txn, Kind.ACTIVE, "active-1")
        commit_id = ms.commit_active(txn, "active-1", "committed-1", Usage())
        assert commit_id == a1.id
        a2 = ms.create_snapshot(txn, Kind.VIEW, "view-1", "committed-1")
        a3 = ms.create_snapshot(txn, Kind.VIEW, "view-2", "committed-1")
        with pytest.raises(NotFoundError):
            ms.remove(txn, "active-1")
        assert ms.remove(txn, "view-2") == (a3.id, Kind.VIEW)
        assert ms.remove(txn, "view-1") == (a2.id, Kind.VIEW)
        assert ms.remove(txn, "committed-1") == (commit_id, Kind.COMMITTED)
    assert dump_store(store)["snapshots"] == []
    assert dump_store(store)["parents"] == []


def test_remove_with_children(base: MetaStore) -> None:
    before = dump_store(base)
    with base.transaction(write=True) as txn:
        for _ in range(2):
            with pytest.raises(FailedPreconditionError, match="'committed-1'"):
                ms.remove(txn, "committed-1")
    assert dump_store(base) == before


def test_remove_not_exist(base: MetaStore) -> None:
    with base.transaction(write=True) as txn, pytest.raises(NotFoundError):
        ms.remove(txn, "does-not-exist")


def test_remove_empty_db(store: MetaStore) -> None:
    with store.transaction(write=True) as txn, pytest.raises(NotFoundError):
        ms.remove(txn, "does-not-exist")


@pytest.mark.parametrize(
    ("key", "depth"),
    [
        ("committed-1", 0),
        ("committed-2", 1),
        ("active-1", 0),
        ("active-2", 1),
        ("active-3", 2),
        ("view-1", 0),
        ("view-2", 2),
    ],
)
def test_parent_ids(base: MetaStore, key: str, depth: int) -> None:
    with base.transaction(write=True) as txn:
        name = key
        expected_id = ""
        for i in range(depth, -1, -1):
            sid, info, _ = ms.get_info(txn, name)
            if info.kind is Kind.COMMITTED:
                # Committed snapshots are resolved through a view on them.
                view = ms.create_snapshot(txn, Kind.VIEW, f"test-{key}-{i}", name)
                assert len(view.parent_ids) == i + 1
                sid_resolved, parents = view.parent_ids[0], view.parent_ids[1:]
            else:
                snap = ms.get_snapshot(txn, name)
                assert len(snap.parent_ids) == i
                sid_resolved, parents = snap.id, snap.parent_ids
            assert sid == sid_resolved
            if expected_id:
                assert sid == expected_id
            if i:
                assert info.parent
                expected_id = parents[0]
                assert ms.get_info(txn, info.parent)[0] == expected_id
            else:
                assert info.parent == "" and parents == ()
            name = info.parent


@pytest.mark.parametrize(
    ("original", "new", "error"),
    [
        ("", "committed-1", None),
        ("committed-1", "committed-1", None),
        ("", "nonexist", NotFoundError),
        ("committed-1", "", None),
        ("", "active-1", FailedPreconditionError),
        ("committed-1", "committed-2", InvalidArgumentError),
        ("", "lonely", None),
    ],
)
def test_rebase(base: MetaStore, original: str, new: str, error: type[OverlayError] | None) -> None:
    with base.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "lonely-tmp")
        ms.commit_active(txn, "lonely-tmp", "lonely", Usage())
    with base.transaction(write=True) as txn:
        snap = ms.create_snapshot(txn, Kind.ACTIVE, "rebase-key", original)
    before = dump_store(base)
    if error is not None:
        with base.transaction(write=True) as txn:
            with pytest.raises(error):
                ms.commit_active(txn, "rebase-key", "rebase-name", Usage(), parent=new)
            assert ms.dump(txn) == before
        assert dump_store(base) == before
        return
    with base.transaction(write=True) as txn:
        sid = ms.commit_active(txn, "rebase-key", "rebase-name", Usage(), parent=new)
        assert sid == snap.id
    assert dump_store(base) != before
    expected_parent = new or original
    with base.transaction(write=True) as txn:
        pid, _, _ = ms.get_info(txn, expected_parent)
        assert ms.get_info(txn, "rebase-name")[1].parent == expected_parent
        view = ms.create_snapshot(txn, Kind.VIEW, "rebase-view", "rebase-name")
        assert view.parent_ids[:2] == (sid, pid)
        ms.remove(txn, "rebase-view")
        with pytest.raises(FailedPreconditionError):
            ms.remove(txn, expected_parent)
        # Removing the child frees the parent: the back link points at the committed name.
        ms.remove(txn, "rebase-name")
        if expected_parent == "lonely":
            ms.remove(txn, "lonely")


# --------------------------------------------------------------------------------------------
# Ids


def test_ids_start_at_one_and_are_never_reused(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        assert ms.create_snapshot(txn, Kind.ACTIVE, "a").id == "1"
        assert ms.remove(txn, "a") == ("1", Kind.ACTIVE)
    with store.transaction(write=True) as txn:
        assert ms.create_snapshot(txn, Kind.ACTIVE, "a").id == "2"
        ms.remove(txn, "a")
    store.close()
    reopened = MetaStore(store.path)
    try:
        with reopened.transaction(write=True) as txn:
            assert ms.create_snapshot(txn, Kind.ACTIVE, "a").id == "3"
    finally:
        reopened.close()


def test_rolled_back_create_consumes_no_id(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        assert ms.create_snapshot(txn, Kind.ACTIVE, "a").id == "1"
    with pytest.raises(RuntimeError), store.transaction(write=True) as txn:
        assert ms.create_snapshot(txn, Kind.ACTIVE, "b").id == "2"
        raise RuntimeError("roll back")
    with store.transaction() as txn, pytest.raises(NotFoundError):
        ms.get_info(txn, "b")
    with store.transaction(write=True) as txn:
        assert ms.create_snapshot(txn, Kind.ACTIVE, "b").id == "2"


def test_failed_create_consumes_no_id(base: MetaStore) -> None:
    with base.transaction(write=True) as txn:
        with pytest.raises(AlreadyExistsError):
            ms.create_snapshot(txn, Kind.ACTIVE, "active-1")
        first = int(ms.create_snapshot(txn, Kind.ACTIVE, "x").id)
    assert first == len(BASE_INFO) + 1


def test_id_kept_across_commit_and_id_map(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        a = ms.create_snapshot(txn, Kind.ACTIVE, "a")
        b = ms.create_snapshot(txn, Kind.VIEW, "b")
        assert ms.id_map(txn) == {a.id: "a", b.id: "b"}
        assert ms.commit_active(txn, "a", "A", Usage(3, 4)) == a.id
    with store.transaction() as txn:
        assert ms.id_map(txn) == {a.id: "A", b.id: "b"}
        assert ms.get_info(txn, "A")[0] == a.id


def test_empty_store_walk_and_id_map(store: MetaStore) -> None:
    seen: list[Info] = []
    with store.transaction() as txn:
        ms.walk_info(txn, seen.append)
        assert ms.id_map(txn) == {}
    assert seen == []


# --------------------------------------------------------------------------------------------
# Keys


WEIRD_KEYS = [
    "a/b/c",
    "/leading/slash",
    "with space",
    "extract-1700000000-abcd sha256:0123",
    "new\nline",
    "tab\tand\x00nul",
    "ünïcödé-键-🙂",
    "..",
    "k" * 400,
    "k" * 401,
    "x" * 2000,
    "x" * 1999 + "y",
    "é" * 1000,
]


def test_weird_keys_round_trip(store: MetaStore) -> None:
    created: dict[str, Snapshot] = {}
    with store.transaction(write=True) as txn:
        for key in WEIRD_KEYS:
            created[key] = ms.create_snapshot(txn, Kind.ACTIVE, key, labels={"k": key})
        assert len({s.id for s in created.values()}) == len(WEIRD_KEYS)
    with store.transaction() as txn:
        for key in WEIRD_KEYS:
            sid, info, _ = ms.get_info(txn, key)
            assert sid == created[key].id
            assert info.name == key
            assert info.labels == {"k": key}
            assert ms.get_snapshot(txn, key) == created[key]
        seen: list[str] = []
        ms.walk_info(txn, lambda info: seen.append(info.name))
        assert sorted(seen) == sorted(WEIRD_KEYS)
        assert set(ms.id_map(txn).values()) == set(WEIRD_KEYS)
        with pytest.raises(NotFoundError):
            ms.get_info(txn, "x" * 1998 + "z")


def test_long_keys_commit_parent_and_remove(store: MetaStore) -> None:
    long_key, long_name, child = "a" * 2000, "b" * 2000 + "/committed", "c" * 1500
    with store.transaction(write=True) as txn:
        snap = ms.create_snapshot(txn, Kind.ACTIVE, long_key)
        assert ms.commit_active(txn, long_key, long_name, Usage(1, 2)) == snap.id
        kid = ms.create_snapshot(txn, Kind.VIEW, child, long_name)
        assert kid.parent_ids == (snap.id,)
        with pytest.raises(FailedPreconditionError):
            ms.remove(txn, long_name)
        assert ms.get_info(txn, child)[1].parent == long_name
        assert ms.remove(txn, child) == (kid.id, Kind.VIEW)
        assert ms.remove(txn, long_name) == (snap.id, Kind.COMMITTED)
        assert ms.dump(txn)["snapshots"] == []
        assert ms.dump(txn)["parents"] == []


def test_walk_order_is_key_byte_order(store: MetaStore) -> None:
    keys = ["b", "a/z", "a", "a b", "ä", "Z", "k" * 401, "k" * 399 + "l", "k" * 400]
    with store.transaction(write=True) as txn:
        for key in keys:
            ms.create_snapshot(txn, Kind.ACTIVE, key)
    seen: list[str] = []
    with store.transaction() as txn:
        ms.walk_info(txn, lambda info: seen.append(info.name))
    assert seen == sorted(keys, key=str.encode)


@pytest.mark.parametrize("bad", ["", "\udcff"])
def test_bad_keys_are_invalid_argument(store: MetaStore, bad: str) -> None:
    with store.transaction(write=True) as txn:
        with pytest.raises(InvalidArgumentError):
            ms.create_snapshot(txn, Kind.ACTIVE, bad)
        ms.create_snapshot(txn, Kind.ACTIVE, "ok")
        with pytest.raises(InvalidArgumentError):
            ms.commit_active(txn, "ok", bad, Usage())
        with pytest.raises(InvalidArgumentError):
            ms.commit_active(txn, bad, "name", Usage())
        with pytest.raises(InvalidArgumentError):
            ms.remove(txn, bad)
        with pytest.raises(InvalidArgumentError):
            ms.get_info(txn, bad)
        with pytest.raises(InvalidArgumentError):
            ms.get_snapshot(txn, bad)
        with pytest.raises(InvalidArgumentError):
            ms.update_info(txn, Info(Kind.ACTIVE, bad))


def test_create_rejects_bad_kind(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        for kind in (Kind.COMMITTED, Kind.UNKNOWN):
            with pytest.raises(InvalidArgumentError):
                ms.create_snapshot(txn, kind, "k")
        assert ms.dump(txn)["snapshots"] == []


# --------------------------------------------------------------------------------------------
# Labels, timestamps, usage


def test_labels_limit(store: MetaStore) -> None:
    ok = {"k": "v" * (MAX_LABEL_BYTES - 1)}
    too_big = {"k": "v" * MAX_LABEL_BYTES}
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a", labels=ok)
        assert ms.get_info(txn, "a")[1].labels == ok
    before = dump_store(store)
    with store.transaction(write=True) as txn:
        with pytest.raises(InvalidArgumentError):
            ms.create_snapshot(txn, Kind.ACTIVE, "b", labels=too_big)
        with pytest.raises(InvalidArgumentError):
            ms.commit_active(txn, "a", "c", Usage(), labels=too_big)
        with pytest.raises(InvalidArgumentError):
            ms.update_info(txn, Info(Kind.ACTIVE, "a", labels=too_big))
        with pytest.raises(InvalidArgumentError):
            ms.update_info(txn, Info(Kind.ACTIVE, "a", labels=too_big), "labels.k")
        with pytest.raises(InvalidArgumentError):
            ms.create_snapshot(txn, Kind.ACTIVE, "b", labels={"": "v"})
        with pytest.raises(InvalidArgumentError):
            ms.create_snapshot(txn, Kind.ACTIVE, "b", labels={"k": "\udcff"})
        assert ms.dump(txn) == before
    assert dump_store(store) == before
    # Multi-byte characters count in bytes.
    with store.transaction(write=True) as txn, pytest.raises(InvalidArgumentError):
        ms.create_snapshot(txn, Kind.ACTIVE, "b", labels={"k": "é" * 2048})


def test_empty_label_values_are_dropped(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a", labels={"keep": "1", "drop": ""})
        assert ms.get_info(txn, "a")[1].labels == {"keep": "1"}
        ms.create_snapshot(txn, Kind.ACTIVE, "b", labels={"drop": ""})
        assert ms.get_info(txn, "b")[1].labels == {}


def test_commit_labels_are_not_inherited_and_usage_is_stored(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a", labels={"from-active": "1"})
        ms.commit_active(txn, "a", "c", Usage(inodes=7, size=1 << 40), labels={"x": "y"})
        _sid, info, usage = ms.get_info(txn, "c")
        assert info.labels == {"x": "y"}
        assert info.kind is Kind.COMMITTED
        assert usage == Usage(7, 1 << 40)
        assert info.created_ns == info.updated_ns
        ms.create_snapshot(txn, Kind.ACTIVE, "b")
        with pytest.raises(InvalidArgumentError):
            ms.commit_active(txn, "b", "d", Usage(-1, 0))


def test_timestamps(store: MetaStore) -> None:
    t0 = time.time_ns()
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a")
    with store.transaction() as txn:
        info = ms.get_info(txn, "a")[1]
        walked: list[Info] = []
        ms.walk_info(txn, walked.append)
    assert info.created_ns == info.updated_ns >= t0
    assert walked == [info]
    with store.transaction(write=True) as txn:
        updated = ms.update_info(txn, Info(Kind.ACTIVE, "a", labels={"x": "1"}))
    assert updated.created_ns == info.created_ns
    assert updated.updated_ns >= info.updated_ns
    with store.transaction() as txn:
        assert ms.get_info(txn, "a")[1] == updated


UPDATE_CASES: list[tuple[dict[str, str], tuple[str, ...], dict[str, str]]] = [
    # (given labels, fieldpaths, resulting labels); the stored labels are {"a": "1", "b": "2"}.
    ({"c": "3"}, (), {"c": "3"}),
    ({}, (), {}),
    ({"c": "3", "d": ""}, ("labels",), {"c": "3"}),
    ({"a": "9", "c": "3"}, ("labels.a",), {"a": "9", "b": "2"}),
    ({}, ("labels.a",), {"b": "2"}),
    ({"a": ""}, ("labels.a",), {"b": "2"}),
    ({"x.y": "1"}, ("labels.x.y",), {"a": "1", "b": "2", "x.y": "1"}),
    ({"c": "3", "a": "0"}, ("labels.c", "labels.a"), {"a": "0", "b": "2", "c": "3"}),
    ({"c": "3"}, ("labels.missing",), {"a": "1", "b": "2"}),
    ({"c": "3"}, ("labels", "labels.b"), {"c": "3"}),
]


@pytest.mark.parametrize(("given", "paths", "result"), UPDATE_CASES)
def test_update_rules(
    store: MetaStore, given: dict[str, str], paths: tuple[str, ...], result: dict[str, str]
) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "c1")
        ms.commit_active(txn, "c1", "base", Usage())
        ms.create_snapshot(txn, Kind.ACTIVE, "k", "base", labels={"a": "1", "b": "2"})
        created = ms.get_info(txn, "k")[1]
    with store.transaction(write=True) as txn:
        # Kind, parent and timestamps in the argument are ignored.
        arg = Info(Kind.COMMITTED, "k", parent="other", labels=given, created_ns=1, updated_ns=2)
        out = ms.update_info(txn, arg, *paths)
    assert out.labels == result
    assert (out.kind, out.name, out.parent) == (Kind.ACTIVE, "k", "base")
    assert out.created_ns == created.created_ns
    assert out.updated_ns >= created.updated_ns
    with store.transaction() as txn:
        assert ms.get_info(txn, "k")[1] == out


@pytest.mark.parametrize("path", ["name", "parent", "kind", "created", "labelsx", "label.a", ""])
def test_update_rejects_other_paths(store: MetaStore, path: str) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "k", labels={"a": "1"})
    before = dump_store(store)
    with store.transaction(write=True) as txn:
        with pytest.raises(InvalidArgumentError, match=f"cannot update {path!r} field on snapshot"):
            ms.update_info(txn, Info(Kind.ACTIVE, "k", labels={"a": "2"}), "labels.a", path)
        assert ms.dump(txn) == before
    assert dump_store(store) == before


def test_update_sets_updated_and_keeps_created(
    store: MetaStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ms, "now_ns", lambda: 1_000)
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a")
        assert ms.get_info(txn, "a")[1].created_ns == 1_000
    monkeypatch.setattr(ms, "now_ns", lambda: 2_000)
    with store.transaction(write=True) as txn:
        out = ms.update_info(txn, Info(Kind.ACTIVE, "a", created_ns=5, updated_ns=6))
    assert (out.created_ns, out.updated_ns) == (1_000, 2_000)
    monkeypatch.setattr(ms, "now_ns", lambda: 3_000)
    with store.transaction(write=True) as txn:
        ms.commit_active(txn, "a", "c", Usage())
        info = ms.get_info(txn, "c")[1]
    assert (info.created_ns, info.updated_ns) == (3_000, 3_000)


def test_update_missing_is_not_found(base: MetaStore) -> None:
    with base.transaction(write=True) as txn, pytest.raises(NotFoundError):
        ms.update_info(txn, Info(Kind.ACTIVE, "nope", labels={"a": "1"}))


# --------------------------------------------------------------------------------------------
# A failing call changes nothing


FAILING: list[tuple[str, Callable[[Txn], object], type[OverlayError]]] = [
    ("create bad kind", lambda t: ms.create_snapshot(t, Kind.COMMITTED, "n"), InvalidArgumentError),
    ("create empty key", lambda t: ms.create_snapshot(t, Kind.ACTIVE, ""), InvalidArgumentError),
    (
        "create missing parent",
        lambda t: ms.create_snapshot(t, Kind.ACTIVE, "n", "nope"),
        NotFoundError,
    ),
    (
        "create active parent",
        lambda t: ms.create_snapshot(t, Kind.ACTIVE, "n", "active-1"),
        InvalidArgumentError,
    ),
    (
        "create existing",
        lambda t: ms.create_snapshot(t, Kind.VIEW, "view-2", "committed-1"),
        AlreadyExistsError,
    ),
    (
        "create bad label",
        lambda t: ms.create_snapshot(t, Kind.ACTIVE, "n", labels={"": "x"}),
        InvalidArgumentError,
    ),
    (
        "commit name taken",
        lambda t: ms.commit_active(t, "active-1", "view-1", Usage()),
        AlreadyExistsError,
    ),
    ("commit missing", lambda t: ms.commit_active(t, "nope", "n", Usage()), NotFoundError),
    ("commit view", lambda t: ms.commit_active(t, "view-1", "n", Usage()), FailedPreconditionError),
    (
        "commit committed",
        lambda t: ms.commit_active(t, "committed-2", "n", Usage()),
        FailedPreconditionError,
    ),
    (
        "commit change parent",
        lambda t: ms.commit_active(t, "active-2", "n", Usage(), parent="committed-2"),
        InvalidArgumentError,
    ),
    (
        "commit rebase missing",
        lambda t: ms.commit_active(t, "active-1", "n", Usage(), parent="nope"),
        NotFoundError,
    ),
    (
        "commit rebase on active",
        lambda t: ms.commit_active(t, "active-1", "n", Usage(), parent="active-2"),
        FailedPreconditionError,
    ),
    (
        "commit bad usage",
        lambda t: ms.commit_active(t, "active-1", "n", Usage(size=-1)),
        InvalidArgumentError,
    ),
    ("remove missing", lambda t: ms.remove(t, "nope"), NotFoundError),
    ("remove parent", lambda t: ms.remove(t, "committed-2"), FailedPreconditionError),
    ("update missing", lambda t: ms.update_info(t, Info(Kind.ACTIVE, "nope")), NotFoundError),
    (
        "update bad path",
        lambda t: ms.update_info(t, Info(Kind.ACTIVE, "active-1"), "labels", "parent"),
        InvalidArgumentError,
    ),
    ("walk bad filter", lambda t: ms.walk_info(t, lambda _: None, "name=="), InvalidArgumentError),
]


@pytest.mark.parametrize(
    ("op", "error"), [(f, e) for _, f, e in FAILING], ids=[name for name, _, _ in FAILING]
)
def test_failing_call_changes_nothing(
    base: MetaStore, op: Callable[[Txn], object], error: type[OverlayError]
) -> None:
    before = dump_store(base)
    assert before["snapshots"] and before["parents"] and before["meta"]
    with base.transaction(write=True) as txn:
        with pytest.raises(error) as info:
            op(txn)
        assert info.value.message.endswith(": " + error.kind_text)
        # Nothing written even inside the transaction: committing it is harmless.
        assert ms.dump(txn) == before
    assert dump_store(base) == before


def test_dump_detects_changes(base: MetaStore) -> None:
    # The no-change tests above would be vacuous if dump missed a sub-database.
    before = dump_store(base)
    with base.transaction(write=True) as txn:
        ms.update_info(txn, Info(Kind.ACTIVE, "active-1", labels={"a": "b"}))
    after_update = dump_store(base)
    assert after_update["snapshots"] != before["snapshots"]
    with base.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.VIEW, "v", "committed-1")
    after_create = dump_store(base)
    assert after_create["parents"] != after_update["parents"]
    assert after_create["meta"] != after_update["meta"]


def test_record_format(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a", labels={"l": "v"})
        ms.create_snapshot(txn, Kind.VIEW, "b" * 1000)
        raw = ms.dump(txn)
    records = dict(raw["snapshots"])
    assert all(v[0] == 1 for v in records.values())  # record version
    assert records[b"a"][1] == int(Kind.ACTIVE)
    assert records[b"a"].endswith(b'{"l":"v"}')
    long_rkey = next(k for k in records if k != b"a")
    assert len(long_rkey) <= 511 and b"\xff" in long_rkey
    assert ("b" * 1000).encode() in records[long_rkey]
    assert dict(raw["meta"])[b"sequence"] == (2).to_bytes(8, "big")


# --------------------------------------------------------------------------------------------
# Filters


def test_walk_filters(base: MetaStore) -> None:
    with base.transaction(write=True) as txn:
        ms.update_info(txn, Info(Kind.VIEW, "view-2", labels={"l": "x"}))

    def names(*filters: str) -> list[str]:
        out: list[str] = []
        with base.transaction() as txn:
            ms.walk_info(txn, lambda info: out.append(info.name), *filters)
        return sorted(out)

    assert names("kind==view") == ["view-1", "view-2"]
    assert names("parent==committed-2") == ["active-3", "view-2"]
    assert names("name==active-1", "name==view-1") == ["active-1", "view-1"]
    assert names("kind==view,labels.l") == ["view-2"]
    assert names("kind==committed,parent==committed-2") == []
    assert names() == sorted(BASE_INFO)
    with base.transaction() as txn, pytest.raises(InvalidArgumentError):
        ms.walk_info(txn, lambda info: None, "name==")


def test_walk_callback_error_aborts_walk(base: MetaStore) -> None:
    seen: list[str] = []

    def fn(info: Info) -> None:
        seen.append(info.name)
        if len(seen) == 2:
            raise KeyError("stop")

    with base.transaction() as txn, pytest.raises(KeyError):
        ms.walk_info(txn, fn)
    assert len(seen) == 2


def test_walk_in_write_txn_may_remove(base: MetaStore) -> None:
    with base.transaction(write=True) as txn:

        def drop(info: Info) -> None:
            ms.remove(txn, info.name)

        ms.walk_info(txn, drop, "kind==view")
        assert sorted(ms.id_map(txn).values()) == sorted(
            k for k, (_, kind) in BASE_INFO.items() if kind is not Kind.VIEW
        )


# --------------------------------------------------------------------------------------------
# Transactions, threads, processes


def test_stat_in_walk(base: MetaStore) -> None:
    stats: dict[str, str] = {}

    def fn(info: Info) -> None:
        with base.transaction() as inner:
            stats[info.name] = ms.get_info(inner, info.name)[0]

    with base.transaction() as txn:
        ms.walk_info(txn, fn)
    assert set(stats) == set(BASE_INFO)


def test_stat_in_walk_of_write_txn(base: MetaStore) -> None:
    names: list[str] = []

    def fn(info: Info) -> None:
        with base.transaction() as inner:
            names.append(ms.get_info(inner, info.name)[1].name)

    with base.transaction(write=True) as txn:
        ms.walk_info(txn, fn)
    assert sorted(names) == sorted(BASE_INFO)


def test_read_txn_is_a_snapshot(base: MetaStore) -> None:
    with base.transaction() as reader:
        with base.transaction(write=True) as writer:
            ms.create_snapshot(writer, Kind.ACTIVE, "new")
        with pytest.raises(NotFoundError):
            ms.get_info(reader, "new")
    with base.transaction() as reader:
        ms.get_info(reader, "new")


def test_write_txn_aborts_on_error_and_commits_on_success(store: MetaStore) -> None:
    with pytest.raises(ValueError, match="boom"), store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a")
        raise ValueError("boom")
    with store.transaction() as txn:
        assert ms.id_map(txn) == {}
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a")
    with store.transaction() as txn:
        assert ms.id_map(txn) == {"1": "a"}


def test_read_txn_cannot_write(store: MetaStore) -> None:
    with store.transaction() as txn:
        with pytest.raises(FailedPreconditionError, match="write transaction"):
            ms.create_snapshot(txn, Kind.ACTIVE, "a")
        with pytest.raises(FailedPreconditionError):
            ms.remove(txn, "a")
        with pytest.raises(FailedPreconditionError):
            ms.update_info(txn, Info(Kind.ACTIVE, "a"))
        with pytest.raises(FailedPreconditionError):
            ms.commit_active(txn, "a", "b", Usage())


def test_txn_unusable_after_block(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a")
    with pytest.raises(FailedPreconditionError):
        ms.get_info(txn, "a")
    with store.transaction() as rtxn:
        pass
    with pytest.raises(FailedPreconditionError):
        ms.id_map(rtxn)


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError("deadlocked")


def test_nested_write_txn_on_one_thread_raises(store: MetaStore) -> None:
    # A deadlock would hang the suite: let SIGALRM turn it into a failure.
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        with store.transaction(write=True) as txn:
            ms.create_snapshot(txn, Kind.ACTIVE, "a")
            with pytest.raises(FailedPreconditionError), store.transaction(write=True):
                pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    with store.transaction() as txn:
        assert ms.id_map(txn) == {"1": "a"}


def test_write_txn_never_spans_threads(store: MetaStore) -> None:
    errors: list[BaseException] = []
    with store.transaction(write=True) as txn:

        def other() -> None:
            try:
                ms.create_snapshot(txn, Kind.ACTIVE, "from-thread")
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], FailedPreconditionError)


def test_writers_are_serialized_and_readers_never_block(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "seed")
    entered = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def first_writer() -> None:
        with store.transaction(write=True) as txn:
            entered.set()
            release.wait(10)
            ms.create_snapshot(txn, Kind.ACTIVE, "w1")
            order.append("w1")

    def second_writer() -> None:
        with store.transaction(write=True) as txn:
            ms.create_snapshot(txn, Kind.ACTIVE, "w2")
            order.append("w2")

    t1 = threading.Thread(target=first_writer)
    t2 = threading.Thread(target=second_writer)
    t1.start()
    try:
        assert entered.wait(10)
        t2.start()
        time.sleep(0.2)
        assert order == []  # the second writer waits for the first
        with store.transaction() as txn:  # a reader does not
            assert ms.id_map(txn) == {"1": "seed"}
    finally:
        release.set()
        t1.join(10)
        if t2.ident is not None:
            t2.join(10)
    assert order == ["w1", "w2"]


def _close_while_writing(path: str) -> None:
    store = MetaStore(path)
    entered = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            with store.transaction(write=True) as txn:
                entered.set()
                time.sleep(0.3)
                ms.create_snapshot(txn, Kind.ACTIVE, "late")
        except BaseException as exc:
            failures.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    assert entered.wait(10)
    store.close()
    t.join()
    assert failures == [], failures


def test_close_waits_for_a_writer_on_another_thread(tmp_path: Path) -> None:
    # In a child: closing under a live write txn used to deadlock in LMDB, GIL held.
    path = str(tmp_path / "metadata.lmdb")
    proc = _spawn().Process(target=_close_while_writing, args=(path,))
    proc.start()
    proc.join(60)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail("close() deadlocked with a write transaction in flight")
    assert proc.exitcode == 0
    reopened = MetaStore(path)
    try:
        with reopened.transaction() as txn:
            assert ms.id_map(txn) == {"1": "late"}
    finally:
        reopened.close()


def test_close_inside_own_write_txn_is_refused(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a")
        with pytest.raises(FailedPreconditionError):
            store.close()
    with store.transaction() as txn:
        assert ms.id_map(txn) == {"1": "a"}


def test_concurrent_writer_thread_while_readers_iterate(store: MetaStore) -> None:
    total = 200
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(total):
                with store.transaction(write=True) as txn:
                    ms.create_snapshot(txn, Kind.ACTIVE, f"tmp-{i:04d}")
                    ms.commit_active(txn, f"tmp-{i:04d}", f"c-{i:04d}", Usage(size=i))
        except BaseException as exc:
            failures.append(exc)
        finally:
            stop.set()

    t = threading.Thread(target=writer)
    t.start()
    counts: list[int] = []
    while not stop.is_set() or not counts:
        with store.transaction() as txn:
            first: list[Info] = []
            ms.walk_info(txn, first.append)
            time.sleep(0.001)
            second: list[Info] = []
            ms.walk_info(txn, second.append)
            assert first == second  # one read txn sees one state
            # Every record is committed and consistent; names are a prefix of the sequence.
            assert [i.name for i in first] == [f"c-{n:04d}" for n in range(len(first))]
            assert all(i.kind is Kind.COMMITTED for i in first)
            counts.append(len(first))
    t.join()
    assert not failures
    assert counts == sorted(counts)
    with store.transaction() as txn:
        assert len(ms.id_map(txn)) == total


def _child_writer(path: str, start: int, count: int) -> None:
    child = MetaStore(path)
    try:
        for i in range(start, start + count):
            with child.transaction(write=True) as txn:
                ms.create_snapshot(txn, Kind.ACTIVE, f"child-{i:04d}", labels={"pid": "child"})
    finally:
        child.close()


def _spawn() -> Any:
    return multiprocessing.get_context("spawn")


def test_child_process_writes_while_parent_reads(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "parent-0")
    proc = _spawn().Process(target=_child_writer, args=(store.path, 0, 100))
    proc.start()
    counts: list[int] = []
    while proc.is_alive():
        with store.transaction() as txn:
            names = list(ms.id_map(txn).values())
        counts.append(len(names))
        time.sleep(0.005)
    proc.join(60)
    assert proc.exitcode == 0
    with store.transaction(write=True) as txn:  # the parent still writes after the child
        ms.create_snapshot(txn, Kind.ACTIVE, "parent-1")
    with store.transaction() as txn:
        ids = ms.id_map(txn)
    assert len(ids) == 102
    assert sorted(int(i) for i in ids) == list(range(1, 103))
    assert counts == sorted(counts)


def _commit_then_die(path: str) -> None:
    child = MetaStore(path)
    with child.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "tmp")
        ms.commit_active(txn, "tmp", "survivor", Usage(1, 2), labels={"x": "y"})
    os.kill(os.getpid(), signal.SIGKILL)


def _die_inside_write_txn(path: str) -> None:
    child = MetaStore(path)
    with child.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "lost")
        os.kill(os.getpid(), signal.SIGKILL)


def test_commit_survives_sigkill(tmp_path: Path) -> None:
    path = str(tmp_path / "metadata.lmdb")
    proc = _spawn().Process(target=_commit_then_die, args=(path,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    store = MetaStore(path)
    try:
        with store.transaction() as txn:
            sid, info, usage = ms.get_info(txn, "survivor")
        assert (sid, info.kind, info.labels, usage) == (
            "1",
            Kind.COMMITTED,
            {"x": "y"},
            Usage(1, 2),
        )
    finally:
        store.close()


def test_writer_killed_inside_txn_loses_only_that_txn(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "kept")
    proc = _spawn().Process(target=_die_inside_write_txn, args=(store.path,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    done = threading.Event()

    def write() -> None:
        # LMDB's writer lock is a robust mutex: the dead child's lock is recovered.
        with store.transaction(write=True) as txn:
            assert ms.create_snapshot(txn, Kind.ACTIVE, "after").id == "2"
        done.set()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    assert done.wait(30), "the writer lock of a killed process was not recovered"
    with store.transaction() as txn:
        assert sorted(ms.id_map(txn).values()) == ["after", "kept"]


# --------------------------------------------------------------------------------------------
# Environment


def test_lazy_open_and_close_twice(tmp_path: Path) -> None:
    path = tmp_path / "metadata.lmdb"
    never = MetaStore(path)
    never.close()
    never.close()
    assert not path.exists()

    store = MetaStore(path)
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a")
    assert path.is_file()
    assert (path.stat().st_mode & 0o777) == 0o600
    assert Path(f"{path}-lock").is_file()
    store.close()
    store.close()
    with pytest.raises(UnavailableError, match="closed"), store.transaction():
        pass

    again = MetaStore(path)
    try:
        with again.transaction() as txn:
            assert ms.id_map(txn) == {"1": "a"}
    finally:
        again.close()


def test_second_store_on_same_file_in_one_process(store: MetaStore) -> None:
    with store.transaction():
        pass
    other = MetaStore(store.path)
    try:
        with pytest.raises(UnavailableError), other.transaction():
            pass
    finally:
        other.close()


def test_open_errors_are_domain_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an lmdb file" * 1000)
    for path in (junk, tmp_path / "missing-dir" / "metadata.lmdb"):
        s = MetaStore(path)
        with pytest.raises(UnavailableError), s.transaction():
            pass
        s.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    import lmdb

    path = tmp_path / "metadata.lmdb"
    store = MetaStore(path)
    with store.transaction():
        pass
    store.close()
    env = lmdb.open(str(path), subdir=False, max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"version", (99).to_bytes(4, "big"), db=env.open_db(b"meta", txn=txn))
    env.close()
    newer = MetaStore(path)
    try:
        with pytest.raises(FailedPreconditionError, match="schema version 99"), newer.transaction():
            pass
    finally:
        newer.close()


def test_stats(base: MetaStore) -> None:
    with base.transaction() as txn:
        st = ms.stats(txn)
    assert st.map_size == ms.DEFAULT_MAP_SIZE
    assert st.snapshots == len(BASE_INFO)
    assert st.page_size > 0
    assert 0 < st.used_bytes <= Path(base.path).stat().st_size
    assert 1 <= st.readers <= st.max_readers


def test_children_follow_the_back_links(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "base-a")
        ms.commit_active(txn, "base-a", "A", Usage())
        ms.create_snapshot(txn, Kind.ACTIVE, "base-b")
        ms.create_snapshot(txn, Kind.ACTIVE, "c1", "A")
        ms.commit_active(txn, "c1", "C1", Usage(), {"l": "1"})
        ms.create_snapshot(txn, Kind.VIEW, "v", "A")
        ms.create_snapshot(txn, Kind.ACTIVE, "deeper", "C1")
    with store.transaction() as txn:
        assert sorted((i.name, i.kind) for i in ms.children(txn, "A")) == [
            ("C1", Kind.COMMITTED), ("v", Kind.VIEW)]
        assert [i.labels for i in ms.children(txn, "A") if i.name == "C1"] == [
            {"l": "1"}]
        assert sorted(i.name for i in ms.children(txn, "")) == ["A", "base-b"]
        assert [i.name for i in ms.children(txn, "C1")] == ["deeper"]
        assert ms.children(txn, "deeper") == []
        assert ms.children(txn, "missing") == []


# --------------------------------------------------------------------------------------------
# Reading through the memo: never stale, never mutable


@pytest.fixture(scope="module")
def fresh_reader() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """A process of its own (spawned once) to read a store with a cold memo."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=_spawn()) as pool:
        yield pool


def _read_warm(store: MetaStore) -> list[Record]:
    """What ``store`` reads now, through its memo: the walk, then each snapshot by key."""
    with store.transaction() as txn:
        walked: list[Info] = []
        ms.walk_info(txn, walked.append)
        out: list[Record] = []
        for w in walked:
            sid, i, usage = ms.get_info(txn, w.name)
            assert i == w
            out.append((sid, int(i.kind), i.name, i.parent, dict(i.labels), i.created_ns,
                        i.updated_ns, usage.inodes, usage.size))
        assert ms.id_map(txn) == {r[0]: r[2] for r in out}
        assert sorted(i.name for i in ms.children(txn, "")) == sorted(
            r[2] for r in out if not r[3])
        for r in out:
            assert sorted(i.name for i in ms.children(txn, r[2])) == sorted(
                c[2] for c in out if c[3] == r[2])
        return out


def test_reads_after_changes_equal_a_fresh_decode(
    store: MetaStore, fresh_reader: concurrent.futures.ProcessPoolExecutor
) -> None:
    long_key = "long/" + "k" * 600  # stored under a hashed record key, full key inside
    big = {f"big.{i}": "v" * 4000 for i in range(6)}  # a record past MEMO_RECORD_MAX
    assert sum(len(k) + len(v) for k, v in big.items()) > ms.MEMO_RECORD_MAX

    def check() -> None:
        warm = _read_warm(store)
        assert warm == _read_warm(store)  # read twice: the second from the memo
        assert warm == fresh_reader.submit(read_store, store.path).result(timeout=120)

    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "base", labels={"a": "1", "b": "2"})
        ms.commit_active(txn, "base", "base@", Usage(3, 4096), {"a": "1", "b": "2"})
        for i in range(20):
            ms.create_snapshot(txn, Kind.ACTIVE, f"k{i}", "base@", labels={"n": str(i % 3)})
        ms.create_snapshot(txn, Kind.VIEW, "view", "base@", labels={"a": "1"})
        ms.create_snapshot(txn, Kind.ACTIVE, long_key, labels={"n": "0"})
        ms.create_snapshot(txn, Kind.ACTIVE, "big", labels=big)
    check()
    # labels: replaced, one set, one deleted; Updated moves
    with store.transaction(write=True) as txn:
        ms.update_info(txn, Info(Kind.ACTIVE, "k0", labels={"x": "y"}))
        ms.update_info(txn, Info(Kind.ACTIVE, "k1", labels={"n": "9"}), "labels.n")
        ms.update_info(txn, Info(Kind.ACTIVE, "k2"), "labels.n")
        ms.update_info(txn, Info(Kind.ACTIVE, long_key, labels={"n": "1"}))
        ms.update_info(txn, Info(Kind.ACTIVE, "big", labels={**big, "big.0": "w" * 4000}))
    check()
    # commits: the key goes, the name comes with the id kept and new labels
    with store.transaction(write=True) as txn:
        for i in range(0, 20, 2):
            ms.commit_active(txn, f"k{i}", f"k{i}@", Usage(i, i * 10), {"c": str(i)})
        ms.commit_active(txn, long_key, long_key + "@", Usage(1, 1), {"n": "0"})
    check()
    # removes, then the same keys again with the same labels: new ids and times
    with store.transaction(write=True) as txn:
        for i in range(1, 20, 2):
            ms.remove(txn, f"k{i}")
        ms.remove(txn, "view")
    check()
    with store.transaction(write=True) as txn:
        for i in range(1, 20, 2):
            ms.create_snapshot(txn, Kind.ACTIVE, f"k{i}", "base@", labels={"n": str(i % 3)})
        ms.create_snapshot(txn, Kind.VIEW, "view", "base@", labels={"a": "1"})
    check()


def test_reads_inside_a_write_transaction_see_its_changes(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a", labels={"x": "1"})
    with store.transaction() as txn:
        ms.get_info(txn, "a")  # in the memo now
    with pytest.raises(RuntimeError), store.transaction(write=True) as txn:
        updated = ms.update_info(txn, Info(Kind.ACTIVE, "a", labels={"x": "2"}))
        assert ms.get_info(txn, "a")[1] == updated
        walked: list[Info] = []
        ms.walk_info(txn, walked.append)
        assert walked == [updated]
        assert updated.labels == {"x": "2"}
        raise RuntimeError("abort")
    with store.transaction() as txn:
        assert ms.get_info(txn, "a")[1].labels == {"x": "1"}


def test_infos_handed_out_cannot_be_changed(store: MetaStore) -> None:
    with store.transaction(write=True) as txn:
        ms.create_snapshot(txn, Kind.ACTIVE, "a", labels={"x": "1"})
        ms.create_snapshot(txn, Kind.ACTIVE, "b")
    with store.transaction() as txn:
        walked: list[Info] = []
        ms.walk_info(txn, walked.append)
        infos = [*walked, ms.get_info(txn, "a")[1], *ms.children(txn, "")]
    for info in infos:
        with pytest.raises(TypeError):
            info.labels["x"] = "changed"  # type: ignore[index]
        with pytest.raises(AttributeError):
            info.labels.clear()  # type: ignore[attr-defined]
        copy = dict(info.labels)  # what a caller that wants to change them does
        copy["x"] = "changed"
    with store.transaction() as txn:
        assert ms.get_info(txn, "a")[1].labels == {"x": "1"}
        assert ms.get_info(txn, "b")[1].labels == {}
