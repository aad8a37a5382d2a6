"""Bad input (SPEC §3.4, DESIGN invariant 8): every call gets its typed
error, exactly, and changes nothing: neither any Info, usage or mount, nor
anything under the backend's root directory."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from overlay.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OverlayError,
)
from overlay.snapshots import Info, Kind, Snapshotter
from tests.conformance._support import OPT, assert_rejected, mounted, walk_all
from tests.conformance.conftest import Env

pytestmark = pytest.mark.privileged


def _populate(env: Env) -> None:
    """c1 <- c2 <- {a1, v1}; a2, v2 without parent; some content in a2."""
    sn = env.sn
    with mounted(sn.prepare("c1-a", "", OPT), env.work / "mnt") as mp:
        (mp / "c1-file").write_bytes(b"c1")
    sn.commit("c1", "c1-a", OPT)
    sn.prepare("c2-a", "c1", OPT)
    sn.commit("c2", "c2-a", OPT)
    sn.prepare("a1", "c2", OPT)
    with mounted(sn.prepare("a2", "", {"l": "1"}), env.work / "mnt") as mp:
        (mp / "a2-file").write_bytes(b"a2")
    sn.view("v1", "c2", OPT)
    sn.view("v2", "", OPT)


Call = Callable[[Snapshotter], object]

CASES: list[tuple[str, type[OverlayError], Call]] = [
    # stat / usage / mounts
    ("stat missing", NotFoundError, lambda sn: sn.stat("nope")),
    ("stat consumed active key", NotFoundError, lambda sn: sn.stat("c1-a")),
    ("usage missing", NotFoundError, lambda sn: sn.usage("nope")),
    ("mounts missing", NotFoundError, lambda sn: sn.mounts("nope")),
    ("mounts committed", FailedPreconditionError, lambda sn: sn.mounts("c1")),
    # prepare / view: parent missing, parent not committed, key taken; in that order
    ("prepare parent missing", NotFoundError, lambda sn: sn.prepare("k", "nope", OPT)),
    ("view parent missing", NotFoundError, lambda sn: sn.view("k", "nope", OPT)),
    ("prepare parent active", InvalidArgumentError, lambda sn: sn.prepare("k", "a1", OPT)),
    ("prepare parent view", InvalidArgumentError, lambda sn: sn.prepare("k", "v1", OPT)),
    ("view parent active", InvalidArgumentError, lambda sn: sn.view("k", "a2", OPT)),
    ("view parent view", InvalidArgumentError, lambda sn: sn.view("k", "v2", OPT)),
    ("prepare active key", AlreadyExistsError, lambda sn: sn.prepare("a1", "", OPT)),
    ("prepare view key", AlreadyExistsError, lambda sn: sn.prepare("v1", "c2", OPT)),
    ("prepare committed name", AlreadyExistsError, lambda sn: sn.prepare("c1", "", OPT)),
    ("view active key", AlreadyExistsError, lambda sn: sn.view("a2", "c1", OPT)),
    ("view committed name", AlreadyExistsError, lambda sn: sn.view("c2", "c2", OPT)),
    ("prepare taken key, parent missing", NotFoundError,
     lambda sn: sn.prepare("a1", "nope", OPT)),
    ("prepare taken key, parent active", InvalidArgumentError,
     lambda sn: sn.prepare("a1", "a2", OPT)),
    ("prepare empty key", InvalidArgumentError, lambda sn: sn.prepare("", "", OPT)),
    ("view empty key", InvalidArgumentError, lambda sn: sn.view("", "c1", OPT)),
    ("prepare empty label key", InvalidArgumentError, lambda sn: sn.prepare("k", "", {"": "v"})),
    ("prepare oversize label", InvalidArgumentError,
     lambda sn: sn.prepare("k", "c1", {"k": "v" * 4096})),
    # commit: name taken, key missing, key not active, labels
    ("commit onto committed name", AlreadyExistsError, lambda sn: sn.commit("c1", "a2", OPT)),
    ("commit onto committed name, bogus key", AlreadyExistsError,
     lambda sn: sn.commit("c1", "nope", OPT)),
    ("commit onto active key", AlreadyExistsError, lambda sn: sn.commit("a1", "a2", OPT)),
    ("commit onto view key", AlreadyExistsError, lambda sn: sn.commit("v2", "a2", OPT)),
    ("commit onto its own key", AlreadyExistsError, lambda sn: sn.commit("a2", "a2", OPT)),
    ("commit missing key", NotFoundError, lambda sn: sn.commit("new", "nope", OPT)),
    ("commit consumed key", NotFoundError, lambda sn: sn.commit("new", "c1-a", OPT)),
    ("commit view", FailedPreconditionError, lambda sn: sn.commit("new", "v1", OPT)),
    ("commit view without parent", FailedPreconditionError,
     lambda sn: sn.commit("new", "v2", OPT)),
    ("commit committed", FailedPreconditionError, lambda sn: sn.commit("new", "c2", OPT)),
    ("commit empty name", InvalidArgumentError, lambda sn: sn.commit("", "a2", OPT)),
    ("commit empty label key", InvalidArgumentError, lambda sn: sn.commit("new", "a2", {"": "v"})),
    ("commit oversize label", InvalidArgumentError,
     lambda sn: sn.commit("new", "a2", {"k" * 4097: ""})),
    # commit with a parent (containerd HEAD's rebase)
    ("commit changing the parent", InvalidArgumentError,
     lambda sn: sn.commit("new", "a1", OPT, parent="c1")),
    ("commit rebase onto missing", NotFoundError,
     lambda sn: sn.commit("new", "a2", OPT, parent="nope")),
    ("commit rebase onto active", FailedPreconditionError,
     lambda sn: sn.commit("new", "a2", OPT, parent="a1")),
    ("commit rebase onto view", FailedPreconditionError,
     lambda sn: sn.commit("new", "a2", OPT, parent="v1")),
    # remove
    ("remove missing", NotFoundError, lambda sn: sn.remove("nope")),
    ("remove consumed key", NotFoundError, lambda sn: sn.remove("c2-a")),
    ("remove parent of committed", FailedPreconditionError, lambda sn: sn.remove("c1")),
    ("remove parent of active and view", FailedPreconditionError, lambda sn: sn.remove("c2")),
    # update
    ("update missing", NotFoundError, lambda sn: sn.update(Info(Kind.ACTIVE, "nope"))),
    ("update bad path", InvalidArgumentError,
     lambda sn: sn.update(Info(Kind.ACTIVE, "a2", labels={"l": "2"}), "labels.l", "parent")),
    ("update oversize label", InvalidArgumentError,
     lambda sn: sn.update(Info(Kind.ACTIVE, "a2", labels={"l": "v" * 4096}))),
    # walk
    ("walk bad filter", InvalidArgumentError, lambda sn: sn.walk(lambda i: None, "kind=active")),
]


@pytest.mark.parametrize(("error", "call"), [(e, c) for _, e, c in CASES],
                         ids=[name for name, _, _ in CASES])
def test_bad_input_changes_nothing(env: Env, error: type[OverlayError], call: Call) -> None:
    _populate(env)
    assert_rejected(env, error, call, env.sn)


def test_remove_parent_message_says_remove(env: Env) -> None:
    """containerd's clients look for "remove" in the child-exists error."""
    _populate(env)
    err = assert_rejected(env, FailedPreconditionError, env.sn.remove, "c1")
    assert "remove" in str(err)
    assert str(err).endswith("failed precondition")


@pytest.mark.parametrize("error", [NotFoundError, AlreadyExistsError, InvalidArgumentError,
                                   FailedPreconditionError])
def test_error_messages_end_in_kind_text(env: Env, error: type[OverlayError]) -> None:
    """Messages end in containerd's kind text so Go clients map them back."""
    _populate(env)
    for _, e, call in CASES:
        if e is not error:
            continue
        with pytest.raises(error) as info:
            call(env.sn)
        assert str(info.value).endswith(error.kind_text), str(info.value)


def test_rejected_calls_leave_snapshots_usable(env: Env) -> None:
    """After every rejected call, the whole fixture still works end to end."""
    _populate(env)
    for _, error, call in CASES:
        with pytest.raises(error):
            call(env.sn)
    sn = env.sn
    sn.commit("a2-committed", "a2", OPT)
    with mounted(sn.view("check", "a2-committed"), env.work / "mnt") as mp:
        assert sorted(p.name for p in mp.iterdir()) == ["a2-file"]
    with mounted(sn.mounts("a1"), env.work / "mnt") as mp:
        assert sorted(p.name for p in mp.iterdir()) == ["c1-file"]
    assert sorted(i.name for i in walk_all(sn)) == [
        "a1", "a2-committed", "c1", "c2", "check", "v1", "v2",
    ]


def test_rebase(env: Env) -> None:
    """containerd HEAD: Commit with a parent adopts it for an active prepared
    without one; the same parent or "" keeps the parent."""
    _populate(env)
    sn = env.sn
    sn.commit("rebased", "a2", OPT, parent="c2")
    assert (sn.stat("rebased").parent, sn.stat("rebased").kind) == ("c2", Kind.COMMITTED)
    # the new parent now has one more child
    sn.remove("a1")
    sn.remove("v1")
    err = assert_rejected(env, FailedPreconditionError, sn.remove, "c2")
    assert "remove" in str(err)
    sn.prepare("same", "c1", OPT)
    sn.commit("same-committed", "same", OPT, parent="c1")
    assert sn.stat("same-committed").parent == "c1"
    sn.prepare("keep", "c1", OPT)
    sn.commit("keep-committed", "keep", OPT, parent="")
    assert sn.stat("keep-committed").parent == "c1"
    sn.remove("rebased")
    sn.remove("c2")
