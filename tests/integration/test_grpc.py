"""The snapshots gRPC service end to end, in-process over a unix socket.

A real ``OverlaySnapshotter`` is served by ``make_server`` and driven through
``RemoteSnapshotter`` and through the raw generated stub (what a Go client
puts on the wire).  Bad input of every sort gets its exact status code, the
server keeps serving, and the store is unchanged (a full walk and the
snapshot directories compared before and after).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import empty_pb2

from overlay._proto.services.snapshots.v1 import snapshots_pb2 as pb
from overlay._proto.services.snapshots.v1 import snapshots_pb2_grpc
from overlay.client import RemoteSnapshotter
from overlay.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OverlayError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from overlay.mount import Mount
from overlay.overlayfs import OverlaySnapshotter
from overlay.server.errors import MAX_MESSAGE_BYTES, class_for, to_status
from overlay.server.snapshots import (
    LEASE_HEADER,
    NAMESPACE_HEADER,
    current_lease,
    current_namespace,
    info_from_proto,
    make_server,
    method_path,
    mount_from_proto,
    ns_from_timestamp,
    socket_path,
)
from overlay.snapshots import CleanupReport, Info, Kind, Snapshotter, Usage, WalkFunc
from tests.integration.grpc_backend import remote_overlay, serve

C = grpc.StatusCode


class Recorder(OverlaySnapshotter):
    """An overlay snapshotter that notes the namespace and lease headers each
    call was served with."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.seen: list[tuple[str, str | None, str | None]] = []

    def _note(self, what: str) -> None:
        self.seen.append((what, current_namespace(), current_lease()))

    def stat(self, key: str) -> Info:
        self._note("stat")
        return super().stat(key)

    def walk(self, fn: WalkFunc, *filters: str) -> None:
        self._note("walk")
        super().walk(fn, *filters)

    def prepare(
        self, key: str, parent: str = "", labels: Any = None
    ) -> list[Mount]:
        self._note("prepare")
        return super().prepare(key, parent, labels)


@dataclass
class Env:
    backend: Recorder
    address: str
    client: RemoteSnapshotter
    channel: Any
    stub: Any

    def infos(self) -> list[Info]:
        found: list[Info] = []
        OverlaySnapshotter.walk(self.backend, found.append)
        return found

    def state(self) -> tuple[list[Info], list[str]]:
        """Everything a failed call must leave alone."""
        return self.infos(), sorted(os.listdir(Path(self.backend.root) / "snapshots"))

    def list_sizes(self, *filters: str, metadata: Any = ()) -> list[int]:
        call = self.stub.List(pb.ListSnapshotsRequest(filters=filters), metadata=metadata)
        return [len(r.info) for r in call]

    def serving(self) -> bool:
        """The server still answers (a full List goes through)."""
        self.list_sizes()
        return True


def make_stub(channel: Any) -> Any:
    return snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
def env(tmp_path: Path, privileged: None) -> Iterator[Env]:
    backend = Recorder(tmp_path / "root")
    try:
        with serve(backend) as address:
            client = RemoteSnapshotter(address, timeout=60)
            channel = grpc.insecure_channel(address)
            try:
                yield Env(backend, address, client, channel, make_stub(channel))
            finally:
                client.close()
                channel.close()
    finally:
        backend.close()


def rpc_error(call: Callable[[], object]) -> Any:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes):
            list(cast(Any, result))
    return info.value


def fill(env: Env, key: str, size: int) -> None:
    """Write a file of ``size`` bytes into a parentless active snapshot."""
    (mount,) = env.backend.mounts(key)
    assert mount.type == "bind"
    Path(mount.source, "data").write_bytes(b"x" * size)


def expect_error(
    env: Env,
    cls: type[OverlayError],
    code: grpc.StatusCode,
    op: Callable[[Snapshotter], object],
    raw: Callable[[], object] | None = None,
) -> str:
    """``op`` fails in-process and over the wire with the same class and
    message; the raw call gets ``code`` with that message; nothing changes."""
    before = env.state()
    with pytest.raises(cls) as local:
        op(env.backend)
    with pytest.raises(cls) as remote:
        op(env.client)
    assert type(remote.value) is class_for(code)
    assert str(remote.value) == to_status(local.value)[1]
    if raw is not None:
        err = rpc_error(raw)
        assert err.code() is code
        assert err.details() == str(remote.value)
    assert env.state() == before
    assert env.serving()
    return str(remote.value)


# --------------------------------------------------------------------------- every RPC


def test_every_method_through_the_client(env: Env) -> None:
    c, b = env.client, env.backend
    mounts = c.prepare("a/b c", labels={"l": "1"})
    assert mounts == b.mounts("a/b c")
    fill(env, "a/b c", 10_000)
    usage = c.usage("a/b c")
    assert usage == b.usage("a/b c")
    assert usage.size >= 10_000 and usage.inodes >= 1
    c.commit("base", "a/b c", labels={"c": "2"})
    info = c.stat("base")
    assert info == b.stat("base")
    assert (info.kind, info.name, info.parent, dict(info.labels)) == (
        Kind.COMMITTED, "base", "", {"c": "2"}
    )
    assert c.usage("base") == b.usage("base") == usage

    active = c.prepare("act", "base")
    assert active == b.mounts("act") == c.mounts("act")
    assert active[0].type == "overlay"
    view = c.view("v", "base", labels={"v": "1"})
    assert view == b.mounts("v") == c.mounts("v")
    assert c.stat("v").kind is Kind.VIEW

    updated = c.update(Info(Kind.ACTIVE, "act", labels={"x": "1"}), "labels.x")
    assert dict(updated.labels) == {"x": "1"}
    assert updated == b.stat("act") == c.stat("act")

    got: list[Info] = []
    c.walk(got.append)
    assert got == env.infos()
    assert [i.name for i in got] == ["act", "base", "v"]
    views: list[Info] = []
    c.walk(views.append, "kind==view")
    assert [i.name for i in views] == ["v"]
    either: list[Info] = []
    c.walk(either.append, "name==act", "labels.c==2")
    assert [i.name for i in either] == ["act", "base"]

    c.remove("v")
    c.remove("act")
    with pytest.raises(NotFoundError):
        c.stat("act")
    assert c.cleanup() == CleanupReport()
    base_id = sorted(os.listdir(Path(b.root) / "snapshots"))
    assert len(base_id) == 1  # the orphans of act and v were reclaimed

    c.close()
    c.close()
    with pytest.raises(UnavailableError, match="closed"):
        c.stat("base")
    with pytest.raises(UnavailableError, match="closed"):
        c.walk(got.append)


def test_every_rpc_through_the_raw_stub(env: Env) -> None:
    s, b = env.stub, env.backend
    resp = s.Prepare(pb.PrepareSnapshotRequest(snapshotter="overlay", key="k", labels={"a": "1"}))
    assert [mount_from_proto(m) for m in resp.mounts] == b.mounts("k")
    fill(env, "k", 4096)
    assert isinstance(
        s.Commit(pb.CommitSnapshotRequest(snapshotter="overlay", name="c", key="k")),
        empty_pb2.Empty,
    )
    view = s.View(pb.ViewSnapshotRequest(key="v", parent="c"))
    assert [mount_from_proto(m) for m in view.mounts] == b.mounts("v")
    mounts = s.Mounts(pb.MountsRequest(key="v"))
    assert [mount_from_proto(m) for m in mounts.mounts] == b.mounts("v")
    stat = s.Stat(pb.StatSnapshotRequest(key="c"))
    assert stat.HasField("info")
    assert stat.info.HasField("created_at") and stat.info.HasField("updated_at")
    assert (stat.info.name, stat.info.parent, stat.info.kind) == ("c", "", pb.COMMITTED)
    assert dict(stat.info.labels) == {}
    assert info_from_proto(stat.info) == b.stat("c")
    assert s.Stat(pb.StatSnapshotRequest(key="v")).info.kind == pb.VIEW
    upd = s.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="c", labels={"n": "1"}), update_mask={"paths": ["labels"]},
    ))
    assert upd.HasField("info") and dict(upd.info.labels) == {"n": "1"}
    listed = list(s.List(pb.ListSnapshotsRequest(snapshotter="overlay")))
    assert len(listed) == 1
    assert [info_from_proto(i) for i in listed[0].info] == env.infos()
    usage = s.Usage(pb.UsageRequest(key="c"))
    assert Usage(inodes=usage.inodes, size=usage.size) == b.usage("c")
    assert usage.size >= 4096
    assert isinstance(s.Remove(pb.RemoveSnapshotRequest(key="v")), empty_pb2.Empty)
    assert isinstance(s.Cleanup(pb.CleanupRequest(snapshotter="overlay")), empty_pb2.Empty)
    assert [i.name for i in env.infos()] == ["c"]


def test_list_sends_batches_of_exactly_100(env: Env) -> None:
    expected = {0: [], 1: [1], 100: [100], 101: [100, 1], 200: [100, 100], 250: [100, 100, 50]}
    made = 0
    for count, sizes in expected.items():
        for i in range(made, count):
            env.client.prepare(f"snap/{i:04d}", labels={"i": str(i)})
        made = count
        assert env.list_sizes() == sizes, count
    names = [i.name for r in env.stub.List(pb.ListSnapshotsRequest()) for i in r.info]
    assert names == [i.name for i in env.infos()] == [f"snap/{i:04d}" for i in range(250)]
    walked: list[Info] = []
    env.client.walk(walked.append)
    assert walked == env.infos()
    # filters: no match gives no message at all; a partial match one short message
    assert env.list_sizes("name==nothing") == []
    assert env.list_sizes('labels.i~="^1[0-9]$"') == [10]
    assert env.list_sizes("labels.i==7", "labels.i==8", "labels.i==300") == [2]


def test_usage_is_size_then_inodes_on_the_wire(env: Env) -> None:
    env.client.prepare("k")
    fill(env, "k", 300_000)
    raw_usage = env.channel.unary_unary(
        method_path("Usage"),
        request_serializer=pb.UsageRequest.SerializeToString,
        response_deserializer=None,
    )

    def varint(n: int) -> bytes:
        out = bytearray()
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes([*out, n])

    for key in ("k", "c"):
        if key == "c":
            env.client.commit("c", "k")
        usage = env.backend.usage(key)
        assert usage.size >= 300_000 and usage.inodes >= 2
        data = raw_usage(pb.UsageRequest(key=key))
        assert data == b"\x08" + varint(usage.size) + b"\x10" + varint(usage.inodes)


def test_timestamps_are_exact_and_equal_in_stat_and_list(env: Env) -> None:
    env.client.prepare("k")
    env.client.commit("c", "k")
    env.client.prepare("k2", "c")
    time.sleep(0.01)
    env.client.update(Info(Kind.ACTIVE, "k2", labels={"a": "b"}))

    listed = {i.name: i for r in env.stub.List(pb.ListSnapshotsRequest()) for i in r.info}
    for name in ("c", "k2"):
        stat = env.stub.Stat(pb.StatSnapshotRequest(key=name)).info
        local = env.backend.stat(name)
        for msg in (stat, listed[name]):
            assert msg.HasField("created_at") and msg.HasField("updated_at")
            assert ns_from_timestamp(msg.created_at) == local.created_ns
            assert ns_from_timestamp(msg.updated_at) == local.updated_ns
        assert stat.created_at == listed[name].created_at
        assert stat.updated_at == listed[name].updated_at
        assert env.client.stat(name) == local
    fresh = env.stub.Stat(pb.StatSnapshotRequest(key="c")).info
    assert fresh.created_at == fresh.updated_at
    changed = env.client.stat("k2")
    assert changed.updated_ns > changed.created_ns


def test_commit_with_parent_rebases(env: Env) -> None:
    env.client.prepare("b0")
    env.client.commit("base", "b0")
    env.client.prepare("loose")
    env.stub.Commit(pb.CommitSnapshotRequest(name="rebased", key="loose", parent="base"))
    assert env.client.stat("rebased").parent == "base"
    env.client.prepare("loose2")
    env.client.commit("rebased2", "loose2", labels={"l": "1"}, parent="base")
    info = env.client.stat("rebased2")
    assert (info.parent, dict(info.labels)) == ("base", {"l": "1"})
    # the same parent again is fine; another one is not
    env.client.prepare("child", "base")
    env.client.commit("child-c", "child", parent="base")
    env.client.prepare("child2", "base")
    expect_error(
        env, InvalidArgumentError, C.INVALID_ARGUMENT,
        lambda s: s.commit("x", "child2", parent="rebased"),
        lambda: env.stub.Commit(pb.CommitSnapshotRequest(name="x", key="child2",
                                                         parent="rebased")),
    )
    env.client.prepare("loose3")
    expect_error(
        env, NotFoundError, C.NOT_FOUND,
        lambda s: s.commit("x", "loose3", parent="nope"),
        lambda: env.stub.Commit(pb.CommitSnapshotRequest(name="x", key="loose3", parent="nope")),
    )


def test_update_masks(env: Env) -> None:
    env.client.prepare("k", labels={"a": "1", "b": "2"})
    created = env.client.stat("k").created_ns

    def update(labels: dict[str, str], mask: list[str] | None, **info: Any) -> dict[str, str]:
        req = pb.UpdateSnapshotRequest(info=pb.Info(name="k", labels=labels, **info))
        if mask is not None:
            req.update_mask.SetInParent()
            req.update_mask.paths.extend(mask)
        resp = env.stub.Update(req)
        assert resp.info.name == "k"
        assert dict(resp.info.labels) == env.backend.stat("k").labels
        return dict(resp.info.labels)

    assert update({"a": "9", "b": "x"}, ["labels.a"]) == {"a": "9", "b": "2"}
    assert update({}, ["labels.b"]) == {"a": "9"}
    assert update({"c": "3"}, ["labels"]) == {"c": "3"}
    assert update({"d": "4"}, None) == {"d": "4"}  # no mask at all: replace
    assert update({"e": "5"}, []) == {"e": "5"}  # an empty mask: replace
    assert update({"f": "6", "g": "7"}, ["labels.f", "labels.g"]) == {"e": "5", "f": "6", "g": "7"}
    # name, kind, parent and created are never changed
    update({}, [], kind=pb.VIEW, parent="zzz", created_at={"seconds": 5})
    info = env.client.stat("k")
    assert (info.kind, info.parent, info.created_ns, dict(info.labels)) == (
        Kind.ACTIVE, "", created, {}
    )
    assert info.updated_ns > created
    expect_error(
        env, InvalidArgumentError, C.INVALID_ARGUMENT,
        lambda s: s.update(Info(Kind.ACTIVE, "k", labels={"a": "1"}), "kind"),
        lambda: env.stub.Update(pb.UpdateSnapshotRequest(
            info=pb.Info(name="k"), update_mask={"paths": ["labels.a", "kind"]})),
    )


def test_namespace_header_present_or_absent(env: Env) -> None:
    env.client.prepare("k")
    env.backend.seen.clear()
    with RemoteSnapshotter(env.address, namespace="k8s.io") as namespaced:
        for _ in range(5):
            env.client.stat("k")  # containerd's GC: no header
            namespaced.stat("k")
        namespaced.walk(lambda info: None)
        namespaced.prepare("k2")
    env.stub.Stat(pb.StatSnapshotRequest(key="k"), metadata=(
        (NAMESPACE_HEADER, "default"), (NAMESPACE_HEADER, "second"), (LEASE_HEADER, "lease-1"),
    ))
    env.list_sizes(metadata=((LEASE_HEADER, "lease-2"),))
    assert env.backend.seen == [
        *[("stat", None, None), ("stat", "k8s.io", None)] * 5,
        ("walk", "k8s.io", None),
        ("prepare", "k8s.io", None),
        ("stat", "default", "lease-1"),
        ("walk", None, "lease-2"),
    ]
    assert current_namespace() is None


# --------------------------------------------------------------------------- bad input


def test_unknown_keys_are_not_found(env: Env) -> None:
    env.client.prepare("k")
    s = env.stub
    message = expect_error(env, NotFoundError, C.NOT_FOUND, lambda sn: sn.stat("nope"),
                           lambda: s.Stat(pb.StatSnapshotRequest(key="nope")))
    assert message == "snapshot 'nope': not found"
    odd = "ключ/with space\u2028and\ttab"
    message = expect_error(env, NotFoundError, C.NOT_FOUND, lambda sn: sn.stat(odd),
                           lambda: s.Stat(pb.StatSnapshotRequest(key=odd)))
    assert message == f"snapshot {odd!r}: not found"
    expect_error(env, NotFoundError, C.NOT_FOUND, lambda sn: sn.mounts("nope"),
                 lambda: s.Mounts(pb.MountsRequest(key="nope")))
    expect_error(env, NotFoundError, C.NOT_FOUND, lambda sn: sn.usage("nope"),
                 lambda: s.Usage(pb.UsageRequest(key="nope")))
    expect_error(env, NotFoundError, C.NOT_FOUND, lambda sn: sn.remove("nope"),
                 lambda: s.Remove(pb.RemoveSnapshotRequest(key="nope")))
    expect_error(env, NotFoundError, C.NOT_FOUND, lambda sn: sn.commit("n", "nope"),
                 lambda: s.Commit(pb.CommitSnapshotRequest(name="n", key="nope")))
    expect_error(env, NotFoundError, C.NOT_FOUND,
                 lambda sn: sn.update(Info(Kind.ACTIVE, "nope", labels={"a": "b"})),
                 lambda: s.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="nope"))))
    expect_error(env, NotFoundError, C.NOT_FOUND, lambda sn: sn.prepare("new", "nope"),
                 lambda: s.Prepare(pb.PrepareSnapshotRequest(key="new", parent="nope")))
    expect_error(env, NotFoundError, C.NOT_FOUND, lambda sn: sn.view("new", "nope"),
                 lambda: s.View(pb.ViewSnapshotRequest(key="new", parent="nope")))
    # a key far longer than a status message may be
    huge = "k" * 50_000
    message = expect_error(env, NotFoundError, C.NOT_FOUND, lambda sn: sn.stat(huge),
                           lambda: s.Stat(pb.StatSnapshotRequest(key=huge)))
    assert len(message.encode()) <= MAX_MESSAGE_BYTES
    assert message.endswith(": not found")


def test_oversized_labels_are_invalid(env: Env) -> None:
    env.client.prepare("k")
    env.client.prepare("k2")
    big = {"big": "v" * 5000}
    s = env.stub
    expect_error(env, InvalidArgumentError, C.INVALID_ARGUMENT,
                 lambda sn: sn.prepare("new", labels=big),
                 lambda: s.Prepare(pb.PrepareSnapshotRequest(key="new", labels=big)))
    expect_error(env, InvalidArgumentError, C.INVALID_ARGUMENT,
                 lambda sn: sn.view("new", labels=big),
                 lambda: s.View(pb.ViewSnapshotRequest(key="new", labels=big)))
    expect_error(env, InvalidArgumentError, C.INVALID_ARGUMENT,
                 lambda sn: sn.commit("c", "k", labels=big),
                 lambda: s.Commit(pb.CommitSnapshotRequest(name="c", key="k", labels=big)))
    expect_error(env, InvalidArgumentError, C.INVALID_ARGUMENT,
                 lambda sn: sn.update(Info(Kind.ACTIVE, "k2", labels=big)),
                 lambda: s.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="k2", labels=big))))
    expect_error(env, InvalidArgumentError, C.INVALID_ARGUMENT,
                 lambda sn: sn.prepare("new", labels={"": "x"}),
                 lambda: s.Prepare(pb.PrepareSnapshotRequest(key="new", labels={"": "x"})))


@pytest.mark.parametrize(
    "bad", ['labels."unterminated', "name~=(", "==x", "name==a,", "a b", 'name=="\\q"']
)
def test_malformed_filters_are_invalid(env: Env, bad: str) -> None:
    env.client.prepare("k")
    message = expect_error(
        env, InvalidArgumentError, C.INVALID_ARGUMENT,
        lambda sn: sn.walk(lambda info: None, "name==k", bad),
        lambda: env.stub.List(pb.ListSnapshotsRequest(filters=["name==k", bad])),
    )
    assert message.startswith(f"filter {bad!r}")


def test_wrong_kinds(env: Env) -> None:
    c, s = env.client, env.stub
    c.prepare("a")
    c.commit("base", "a")
    c.prepare("act", "base")
    c.view("v", "base")
    expect_error(env, FailedPreconditionError, C.FAILED_PRECONDITION,
                 lambda sn: sn.commit("c", "v"),
                 lambda: s.Commit(pb.CommitSnapshotRequest(name="c", key="v")))
    expect_error(env, FailedPreconditionError, C.FAILED_PRECONDITION,
                 lambda sn: sn.commit("c", "base"),
                 lambda: s.Commit(pb.CommitSnapshotRequest(name="c", key="base")))
    expect_error(env, FailedPreconditionError, C.FAILED_PRECONDITION,
                 lambda sn: sn.mounts("base"),
                 lambda: s.Mounts(pb.MountsRequest(key="base")))
    expect_error(env, FailedPreconditionError, C.FAILED_PRECONDITION,
                 lambda sn: sn.remove("base"),
                 lambda: s.Remove(pb.RemoveSnapshotRequest(key="base")))
    expect_error(env, InvalidArgumentError, C.INVALID_ARGUMENT,
                 lambda sn: sn.prepare("new", "act"),
                 lambda: s.Prepare(pb.PrepareSnapshotRequest(key="new", parent="act")))
    expect_error(env, InvalidArgumentError, C.INVALID_ARGUMENT,
                 lambda sn: sn.view("new", "v"),
                 lambda: s.View(pb.ViewSnapshotRequest(key="new", parent="v")))
    for taken in ("act", "v", "base"):
        expect_error(env, AlreadyExistsError, C.ALREADY_EXISTS,
                     operator.methodcaller("prepare", taken),
                     functools.partial(s.Prepare, pb.PrepareSnapshotRequest(key=taken)))
    expect_error(env, AlreadyExistsError, C.ALREADY_EXISTS,
                 lambda sn: sn.commit("v", "act"),
                 lambda: s.Commit(pb.CommitSnapshotRequest(name="v", key="act")))
    expect_error(env, InvalidArgumentError, C.INVALID_ARGUMENT,
                 lambda sn: sn.prepare(""),
                 lambda: s.Prepare(pb.PrepareSnapshotRequest()))
    expect_error(env, InvalidArgumentError, C.INVALID_ARGUMENT,
                 lambda sn: sn.stat(""),
                 lambda: s.Stat(pb.StatSnapshotRequest()))


def test_malformed_request_bytes_are_invalid(env: Env) -> None:
    env.client.prepare("k")
    before = env.state()
    for method in ("Stat", "Prepare", "Commit", "Update", "Usage", "Cleanup"):
        raw = env.channel.unary_unary(method_path(method))  # bytes in, bytes out
        # corrupt, truncated, and field 1 (snapshotter, a string) not UTF-8
        for data in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe"):
            err = rpc_error(functools.partial(raw, data))
            assert err.code() is C.INVALID_ARGUMENT, (method, data)
            assert err.details().startswith("malformed ")
            assert err.details().endswith(": invalid argument")
    raw_list = env.channel.unary_stream(method_path("List"))
    err = rpc_error(lambda: list(raw_list(b"\x12\x03a")))
    assert err.code() is C.INVALID_ARGUMENT
    # a method the service does not have
    err = rpc_error(lambda: env.channel.unary_unary(method_path("Rename"))(b""))
    assert err.code() is C.UNIMPLEMENTED
    assert env.state() == before
    assert env.serving()


def _read_until_closed(sock: socket.socket, limit: float = 20.0) -> bytes:
    deadline = time.monotonic() + limit
    data = b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError("the server kept a garbage connection open")


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00" * 64,
        b"GET / HTTP/1.1\r\nHost: snapshots\r\n\r\n",
        bytes(range(256)) * 16,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x08\x00\xff\xff\xff\xff" * 8
        + bytes(range(256)) * 4,
    ],
    ids=["zeros", "http1", "binary", "h2-preface-then-junk"],
)
def test_garbage_on_the_socket(env: Env, payload: bytes) -> None:
    env.client.prepare("k")
    before = env.state()
    path = socket_path(env.address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        sock.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        _read_until_closed(sock)
    # half a preface, then a hang-up
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(b"PRI * HTTP/2")
    assert env.serving()
    assert env.client.stat("k").name == "k"
    assert env.state() == before


def test_client_disconnects_mid_list(env: Env) -> None:
    for i in range(250):
        env.backend.prepare(f"s{i:03d}")
    before = env.state()
    # cancel after the first message
    call = env.stub.List(pb.ListSnapshotsRequest())
    assert len(next(call).info) == 100
    call.cancel()
    err = rpc_error(lambda: list(call))
    assert err.code() is C.CANCELLED
    # a client whose connection goes away mid-stream
    for _ in range(3):
        channel = grpc.insecure_channel(env.address)
        it = make_stub(channel).List(pb.ListSnapshotsRequest())
        next(it)
        channel.close()
    # a walk whose callback fails cancels the stream
    seen: list[str] = []

    def stop_at_150(info: Info) -> None:
        seen.append(info.name)
        if len(seen) == 150:
            raise RuntimeError("enough")

    with pytest.raises(RuntimeError, match="enough"):
        env.client.walk(stop_at_150)
    assert env.list_sizes() == [100, 100, 50]
    assert env.state() == before
    walked: list[Info] = []
    env.client.walk(walked.append)
    assert len(walked) == 250


def test_concurrent_calls(env: Env) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                env.client.prepare(f"t{n}/{i}")
                env.client.stat(f"t{n}/{i}")
                env.client.remove(f"t{n}/{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert env.infos() == []
    env.client.cleanup()
    assert os.listdir(Path(env.backend.root) / "snapshots") == []


# --------------------------------------------------------------------------- other backends


class FakeBackend:
    """Just enough of a snapshotter: stat fails unexpectedly, no cleanup."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def stat(self, key: str) -> Info:
        raise self.exc

    def walk(self, fn: WalkFunc, *filters: str) -> None:
        fn(Info(Kind.UNKNOWN, "u"))


def test_cleanup_unimplemented_without_a_backend_cleanup() -> None:
    backend = cast(Snapshotter, FakeBackend(RuntimeError("boom")))
    with serve(backend) as address, grpc.insecure_channel(address) as channel:
        err = rpc_error(lambda: make_stub(channel).Cleanup(pb.CleanupRequest()))
        assert err.code() is C.UNIMPLEMENTED
        message = "snapshotter does not implement Cleanup method: not implemented"
        assert err.details() == message
        with RemoteSnapshotter(address) as client, pytest.raises(UnimplementedError) as exc:
            client.cleanup()
        assert str(exc.value) == message


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (RuntimeError("boom"), "RuntimeError: boom: unknown"),
        (KeyError("k"), "KeyError: 'k': unknown"),
        (OSError(5, "Input/output error"), "OSError: [Errno 5] Input/output error: unknown"),
        (AttributeError(), "AttributeError: unknown"),
    ],
)
def test_unexpected_exceptions_are_unknown_with_a_message(exc: Exception, message: str) -> None:
    backend = cast(Snapshotter, FakeBackend(exc))
    with serve(backend) as address, grpc.insecure_channel(address) as channel:
        stub = make_stub(channel)
        err = rpc_error(lambda: stub.Stat(pb.StatSnapshotRequest(key="k")))
        assert err.code() is C.UNKNOWN
        assert err.details() == message
        with RemoteSnapshotter(address) as client:
            with pytest.raises(UnknownError) as raised:
                client.stat("k")
            assert str(raised.value) == message
            # still serving; an UNKNOWN kind goes on the wire as COMMITTED
            listed = [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]
            assert [(i.name, i.kind) for i in listed] == [("u", pb.COMMITTED)]


def test_make_server_guards_its_socket(tmp_path: Path) -> None:
    backend = cast(Snapshotter, FakeBackend(RuntimeError()))
    path = Path(f"/tmp/ovl-sock-{os.getpid()}-{threading.get_ident()}.sock")
    try:
        server = make_server(backend, str(path))
        server.start()
        try:
            with pytest.raises(AlreadyExistsError, match="already listening"):
                make_server(backend, f"unix://{path}")
        finally:
            server.stop()
        # a stale socket file (its server is gone) is replaced
        if not path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(str(path))
        assert path.exists()
        server = make_server(backend, str(path))
        server.start()
        try:
            with RemoteSnapshotter(str(path)) as client, pytest.raises(UnknownError):
                client.stat("x")
        finally:
            server.stop()
    finally:
        path.unlink(missing_ok=True)
    regular = tmp_path / "file"
    regular.write_text("")
    with pytest.raises(FailedPreconditionError, match="not a socket"):
        make_server(backend, str(regular))
    with pytest.raises(InvalidArgumentError, match="longer than"):
        make_server(backend, "/tmp/" + "x" * 200)
    with pytest.raises(InvalidArgumentError, match="not a unix socket"):
        make_server(backend, "dns:///localhost:1234")


def test_client_without_a_server_is_unavailable(tmp_path: Path) -> None:
    with RemoteSnapshotter(str(tmp_path / "none.sock"), timeout=10) as client:
        assert client.target == f"unix://{tmp_path}/none.sock"
        with pytest.raises(UnavailableError):
            client.stat("k")
        with pytest.raises(UnavailableError):
            client.walk(lambda info: None)


def test_remote_overlay_hook(tmp_path: Path, privileged: None) -> None:
    with remote_overlay(tmp_path / "root", namespace="default") as sn:
        sn.prepare("k")
        sn.commit("c", "k")
        assert sn.stat("c").kind is Kind.COMMITTED
        assert sn.namespace == "default"
    with pytest.raises(UnavailableError):
        sn.stat("c")


def test_make_server_abstract_socket_and_observer() -> None:
    backend = cast(Snapshotter, FakeBackend(RuntimeError("boom")))
    seen: list[tuple[str, str]] = []
    address = f"unix-abstract:ovl-test-{os.getpid()}-{threading.get_ident()}"
    server = make_server(backend, address, observe=lambda m, code, secs: seen.append((m, code)))
    server.start()
    try:
        with RemoteSnapshotter(address) as client:
            assert client.target == address
            with pytest.raises(UnknownError, match="RuntimeError: boom"):
                client.stat("k")
            got: list[Info] = []
            client.walk(got.append)
            assert [i.kind for i in got] == [Kind.COMMITTED]
    finally:
        server.stop()
    assert seen == [("Stat", "UNKNOWN"), ("List", "OK")]


def test_make_server_creates_socket_directories_whatever_the_umask(tmp_path: Path) -> None:
    backend = cast(Snapshotter, FakeBackend(RuntimeError()))
    sock = tmp_path / "run" / "ovl" / "s.sock"
    old = os.umask(0o117)
    try:
        server = make_server(backend, f"unix://{sock}")
    finally:
        os.umask(old)
    server.start()
    try:
        for d in (sock.parent, sock.parent.parent):
            assert d.stat().st_mode & 0o777 == 0o711
        assert sock.is_socket()
    finally:
        server.stop()
