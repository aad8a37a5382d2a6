"""Stat, walk, update, usage, labels and keys: the metadata side of the
contract (SPEC §1.2-§1.5, §3), beyond containerd's own suite."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from overlay.errors import InvalidArgumentError, NotFoundError
from overlay.snapshots import MAX_LABEL_BYTES, Info, Kind, Usage
from tests.conformance._support import (
    GC_ROOT,
    OPT,
    assert_rejected,
    mounted,
    walk_all,
    walk_names,
)
from tests.conformance.conftest import Env

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def _populate(env: Env) -> None:
    """c1 <- c2 <- {a1, v1}; a2, v2 without parent; labels on some."""
    sn = env.sn
    sn.prepare("c1-a", "", {"team": "x"})
    sn.commit("c1", "c1-a", {"team": "x", "tier": "base"})
    sn.prepare("c2-a", "c1")
    sn.commit("c2", "c2-a", {"tier": "mid", "containerd.io/snapshot/k": "v"})
    sn.prepare("a1", "c2", {"team": "y"})
    sn.prepare("a2", "")
    sn.view("v1", "c2", {"team": "x", "tier": "view"})
    sn.view("v2", "")


ALL = ["a1", "a2", "c1", "c2", "v1", "v2"]


# --------------------------------------------------------------------------------------------
# stat and walk


def test_fresh_snapshot_infos(env: Env) -> None:
    """Every field of a fresh snapshot's Info; Created == Updated, taken at
    creation; Stat and Walk return equal Infos to the nanosecond."""
    t1 = time.time_ns()
    _populate(env)
    t2 = time.time_ns()
    expected = {
        "c1": (Kind.COMMITTED, "", {"team": "x", "tier": "base"}),
        "c2": (Kind.COMMITTED, "c1", {"tier": "mid", "containerd.io/snapshot/k": "v"}),
        "a1": (Kind.ACTIVE, "c2", {"team": "y"}),
        "a2": (Kind.ACTIVE, "", {}),
        "v1": (Kind.VIEW, "c2", {"team": "x", "tier": "view"}),
        "v2": (Kind.VIEW, "", {}),
    }
    walked = {i.name: i for i in walk_all(env.sn)}
    assert sorted(walked) == ALL
    for name, (kind, parent, labels) in expected.items():
        info = env.sn.stat(name)
        assert (info.name, info.kind, info.parent, dict(info.labels)) == (
            name, kind, parent, labels,
        )
        assert t1 <= info.created_ns <= t2
        assert info.created_ns == info.updated_ns
        assert walked[name] == info
        assert (walked[name].created_ns, walked[name].updated_ns) == (
            info.created_ns, info.updated_ns,
        )


def test_commit_labels_come_from_commit_only(env: Env) -> None:
    """The committed snapshot's labels are the Commit labels, not the
    active's; its Created/Updated are those of the commit."""
    sn = env.sn
    sn.prepare("a", "", {"from-prepare": "1", "shared": "prepare"})
    active = sn.stat("a")
    sn.commit("c", "a", {"shared": "commit"})
    c = sn.stat("c")
    assert dict(c.labels) == {"shared": "commit"}
    assert c.created_ns == c.updated_ns >= active.created_ns
    sn.prepare("b", "")
    sn.commit("d", "b")
    assert dict(sn.stat("d").labels) == {}


def test_empty_label_values_are_not_stored(env: Env) -> None:
    env.sn.prepare("a", "", {"kept": "v", "dropped": ""})
    assert dict(env.sn.stat("a").labels) == {"kept": "v"}
    assert walk_names(env.sn, "labels.dropped") == []


def test_label_size_limit(env: Env) -> None:
    """len(key) + len(value) <= 4096 bytes is fine; one byte more is not."""
    fits = {"k": "v" * (MAX_LABEL_BYTES - 1)}
    env.sn.prepare("fits", "", fits)
    assert dict(env.sn.stat("fits").labels) == fits
    too_big = {"k": "v" * MAX_LABEL_BYTES}
    assert_rejected(env, InvalidArgumentError, env.sn.prepare, "big", "", too_big)
    multibyte = {"k": "é" * (MAX_LABEL_BYTES // 2)}  # 4097 bytes, 2049 characters
    assert_rejected(env, InvalidArgumentError, env.sn.view, "big", "", multibyte)


def test_walk_empty_store(env: Env) -> None:
    assert walk_all(env.sn) == []
    assert walk_all(env.sn, "kind==active") == []


WALK_FILTERS: list[tuple[list[str], list[str]]] = [
    ([], ALL),
    ([""], ALL),
    (["kind==active"], ["a1", "a2"]),
    (["kind==view"], ["v1", "v2"]),
    (["kind==committed"], ["c1", "c2"]),
    (["kind!=committed"], ["a1", "a2", "v1", "v2"]),
    (["kind==active", "kind==view"], ["a1", "a2", "v1", "v2"]),  # OR of filters
    (["name==c1"], ["c1"]),
    (["name==nope"], []),
    (["name~=^[av]1$"], ["a1", "v1"]),
    (["parent==c2"], ["a1", "v1"]),
    (['parent==""'], ["a2", "c1", "v2"]),
    (['parent!=""'], ["a1", "c2", "v1"]),
    (["parent"], ALL),  # parent is always present
    (["labels.team"], ["a1", "c1", "v1"]),
    (["labels.team==x"], ["c1", "v1"]),
    (["labels.team!=x"], ["a1", "a2", "c2", "v2"]),  # absent counts as ""
    (["labels.team==x,kind==view"], ["v1"]),  # AND inside one filter
    (["labels.team==x,kind==view", "name==a2"], ["a2", "v1"]),
    (['labels."containerd.io/snapshot/k"==v'], ["c2"]),
    (["labels.tier~=^(base|mid)$"], ["c1", "c2"]),
    (["labels.nope"], []),
    (["labels"], []),
    (["kind==unknown"], []),
    (["nosuchfield==x"], []),
    (["nosuchfield!=x"], ALL),
]


@pytest.mark.parametrize(("filters", "matches"), WALK_FILTERS, ids=repr)
def test_walk_filters(env: Env, filters: list[str], matches: list[str]) -> None:
    _populate(env)
    assert walk_names(env.sn, *filters) == sorted(matches)


BAD_FILTERS = [
    "name==",
    "==x",
    "kind==active,",
    ",kind==active",
    'labels."unterminated==x',
    "name==a b",
    "labels.l~=(",
    "name=x",
    "name!x",
    "name ==",
    "labels.containerd.io/snapshot/k",  # unquoted: "/" opens a quoted string
    'name=="\\q"',  # an unknown escape
]


@pytest.mark.parametrize("bad", BAD_FILTERS)
def test_walk_invalid_filter(env: Env, bad: str) -> None:
    """A filter that does not parse is InvalidArgument, alone or in a list
    with good ones, and the callback never runs."""
    _populate(env)
    called: list[Info] = []
    assert_rejected(env, InvalidArgumentError, env.sn.walk, called.append, bad)
    assert_rejected(env, InvalidArgumentError, env.sn.walk, called.append, "kind==active", bad)
    assert called == []


def test_walk_many(env: Env) -> None:
    """More snapshots than one List message carries (containerd batches 100):
    every one is visited exactly once, filtered or not."""
    sn = env.sn
    sn.prepare("base-a", "")
    sn.commit("base", "base-a")
    for i in range(250):
        sn.view(f"v{i:03d}", "base", {"parity": str(i % 2)})
    infos = walk_all(sn)
    assert len(infos) == 251
    assert sorted(i.name for i in infos) == ["base"] + [f"v{i:03d}" for i in range(250)]
    assert walk_names(sn, "labels.parity==1") == [f"v{i:03d}" for i in range(1, 250, 2)]
    assert len(walk_all(sn, "parent==base")) == 250


def test_walk_callback_error_stops_the_walk(env: Env) -> None:
    _populate(env)
    seen: list[str] = []

    class StopWalkError(Exception):
        pass

    def fn(info: Info) -> None:
        seen.append(info.name)
        raise StopWalkError

    with pytest.raises(StopWalkError):
        env.sn.walk(fn)
    assert len(seen) == 1


# --------------------------------------------------------------------------------------------
# update


def test_update_label_rules(env: Env) -> None:
    sn = env.sn
    sn.prepare("a", "", {"x": "1", "y": "2"})
    info = sn.stat("a")

    # no paths: replace all labels
    info = sn.update(replace(info, labels={"z": "3"}))
    assert dict(info.labels) == {"z": "3"}
    # "labels": replace all labels, empty values dropped
    info = sn.update(replace(info, labels={"p": "1", "q": "2", "r": ""}), "labels")
    assert dict(info.labels) == {"p": "1", "q": "2"}
    # "labels.<k>": set one, the others untouched
    info = sn.update(replace(info, labels={"p": "new", "q": "ignored"}), "labels.p")
    assert dict(info.labels) == {"p": "new", "q": "2"}
    # "labels.<k>" missing from info, or empty: deleted
    info = sn.update(replace(info, labels={"q": ""}), "labels.p", "labels.q")
    assert dict(info.labels) == {}
    # a label key with dots and slashes, as a path
    key = "containerd.io/snapshot/cri.image-ref"
    info = sn.update(replace(info, labels={key: "img"}), f"labels.{key}")
    assert dict(info.labels) == {key: "img"}
    # no paths and no labels: all gone
    info = sn.update(replace(info, labels={}))
    assert dict(info.labels) == {}
    assert sn.stat("a") == info


@pytest.mark.parametrize("kind", [Kind.ACTIVE, Kind.VIEW, Kind.COMMITTED])
def test_update_never_changes_identity(env: Env, kind: Kind) -> None:
    """Kind, Parent, Name and Created are never changed (silently, with no
    paths); Updated becomes the time of the update; Stat agrees."""
    sn = env.sn
    sn.prepare("base-a", "")
    sn.commit("base", "base-a")
    if kind is Kind.ACTIVE:
        sn.prepare("s", "base", {"l": "1"})
    elif kind is Kind.VIEW:
        sn.view("s", "base", {"l": "1"})
    else:
        sn.prepare("s-a", "base")
        sn.commit("s", "s-a", {"l": "1"})
    before = sn.stat("s")
    forged = Info(
        kind=Kind.VIEW if kind is not Kind.VIEW else Kind.COMMITTED,
        name="s",
        parent="doesnotexist",
        labels={"l": "2"},
        created_ns=1,
        updated_ns=2,
    )
    u1 = time.time_ns()
    after = sn.update(forged)
    u2 = time.time_ns()
    assert (after.name, after.kind, after.parent, after.created_ns) == (
        "s", kind, "base", before.created_ns,
    )
    assert dict(after.labels) == {"l": "2"}
    assert u1 <= after.updated_ns <= u2
    assert after.updated_ns != before.updated_ns
    assert sn.stat("s") == after
    assert {i.name: i for i in walk_all(sn)}["s"] == after


BAD_PATHS = ["parent", "kind", "name", "created", "updated", "", "labelsx", "Labels", "label.x"]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_update_other_paths_invalid(env: Env, path: str) -> None:
    env.sn.prepare("a", "", {"l": "1"})
    info = replace(env.sn.stat("a"), labels={"l": "2"}, parent="x")
    assert_rejected(env, InvalidArgumentError, env.sn.update, info, path)
    # also after a valid path: nothing of the valid part is applied
    assert_rejected(env, InvalidArgumentError, env.sn.update, info, "labels.l", path)
    assert_rejected(env, InvalidArgumentError, env.sn.update, info, "labels", path)


def test_update_missing(env: Env) -> None:
    env.sn.prepare("a", "")
    assert_rejected(env, NotFoundError, env.sn.update, Info(Kind.ACTIVE, "b", labels={"l": "1"}))
    assert_rejected(env, NotFoundError, env.sn.update, Info(Kind.ACTIVE, "b"), "labels")


def test_update_invalid_labels(env: Env) -> None:
    env.sn.prepare("a", "", {"l": "1"})
    info = env.sn.stat("a")
    big = replace(info, labels={"l": "v" * MAX_LABEL_BYTES})
    assert_rejected(env, InvalidArgumentError, env.sn.update, big)
    assert_rejected(env, InvalidArgumentError, env.sn.update, big, "labels.l")
    assert_rejected(env, InvalidArgumentError, env.sn.update, replace(info, labels={"": "v"}))


# --------------------------------------------------------------------------------------------
# usage


def test_usage(env: Env) -> None:
    """Active usage is live and grows with what is written; committed usage
    is what it was at commit; a view uses nothing; parents never count."""
    sn = env.sn
    mp = env.work / "mnt"
    with mounted(sn.prepare("a", ""), mp):
        empty = sn.usage("a")
        assert empty.inodes == 1  # the layer's root directory
        assert 0 <= empty.size < MiB
        (mp / "big").write_bytes(b"\xa5" * MiB)
        grown = sn.usage("a")
        assert grown.inodes == empty.inodes + 1
        assert MiB <= grown.size - empty.size <= MiB + 64 * 1024
        (mp / "alias").hardlink_to(mp / "big")  # hard links count once
        (mp / "dir").mkdir()
        (mp / "dir" / "small").write_bytes(b"x")
        final = sn.usage("a")
        assert final.inodes == grown.inodes + 2
        assert final.size >= grown.size
    sn.commit("c", "a")
    assert sn.usage("c") == final

    with mounted(sn.prepare("child", "c"), mp):
        child = sn.usage("child")
        assert child == Usage(1, empty.size)  # its own empty layer only
        (mp / "new").write_bytes(b"abc")
        assert sn.usage("child").inodes == 2
    sn.view("v", "c")
    assert sn.usage("v") == Usage(0, 0)
    assert sn.usage("c") == final
    assert_rejected(env, NotFoundError, sn.usage, "a")


# --------------------------------------------------------------------------------------------
# keys


WEIRD_KEYS = [
    "/abs/path/key",
    "../../../escape",
    "a/b/../c",
    " spaced key ",
    "extract-1700000000000000000-AbC= sha256:0123abcd",
    "default/12/sha256:" + "a" * 64,
    "ключ/键/🔑",
    "tab\tnewline\nkey",
    ".",
    "..",
    "k" * 1000,
    "k" * 399 + "é",  # crosses a 400-byte boundary inside a character
]


def test_keys_are_opaque(env: Env) -> None:
    """Keys and names with slashes, dots, spaces, control characters,
    non-ASCII and 1000 characters work everywhere and never become paths."""
    sn = env.sn
    outside = sorted(p.name for p in env.root.parent.iterdir())
    parent = ""
    for i, key in enumerate(WEIRD_KEYS):
        name = key + " committed"
        with mounted(sn.prepare(key, parent, {"i": str(i)}), env.work / "mnt") as mp:
            (mp / f"file-{i}").write_bytes(key.encode())
        assert sn.stat(key).name == key
        sn.commit(name, key, {"i": str(i)})
        assert sn.stat(name).parent == parent
        parent = name
    assert sorted(p.name for p in env.root.parent.iterdir()) == outside
    names = {i.name for i in walk_all(sn)}
    assert names == {k + " committed" for k in WEIRD_KEYS}
    # two long keys that share their first 1000 characters stay distinct
    sn.prepare("k" * 1000 + "-one", "")
    sn.prepare("k" * 1000 + "-two", "")
    assert sn.stat("k" * 1000 + "-one").name != sn.stat("k" * 1000 + "-two").name
    with mounted(sn.view("view", parent), env.work / "mnt") as mp:
        for i, key in enumerate(WEIRD_KEYS):
            assert (mp / f"file-{i}").read_bytes() == key.encode()
    for key in ("view", "k" * 1000 + "-one", "k" * 1000 + "-two"):
        sn.remove(key)
    for key in reversed(WEIRD_KEYS):
        sn.remove(key + " committed")
    assert walk_all(sn) == []


def test_gc_root_label_is_just_a_label(env: Env) -> None:
    env.sn.prepare("a", "", OPT)
    assert dict(env.sn.stat("a").labels) == {GC_ROOT: OPT[GC_ROOT]}
