"""Fuzzing the request decoding of the ten snapshot RPCs with hypothesis.

``SnapshotsService`` is what a worker calls with each request the transport
assembled: a path, metadata and the message bytes, all the client's.  Over
a real overlay snapshotter (a fresh root that the examples share, so calls
meet existing snapshots, chains and views), every call must be answered OK
or with a typed status (never INTERNAL or UNKNOWN: those mean an exception
nobody mapped), an OK body must be the method's responses, and a call that
fails must leave the store exactly as it was: every snapshot's info and
mounts, and the directories under ``snapshots/``.

The messages are valid requests built from random fields (keys from a small
pool, so calls hit each other's snapshots, and any text), the same
serialized and then cut or with bytes changed, or any bytes at all.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from overlay._native import GrpcCall
from overlay._proto.services.snapshots.v1 import snapshots_pb2 as pb
from overlay.overlayfs import OverlaySnapshotter
from overlay.server.snapshots import LEASE_HEADER, NAMESPACE_HEADER, SnapshotsService, method_path
from overlay.snapshots import Info
from tests.fuzz._settings import SCALE

KEYS = ["a", "b", "c", "a/b", "k 1", "view", "c1", "c2"]
# mostly the pool (calls meet each other's snapshots), sometimes any text
keys = st.sampled_from(KEYS) | st.sampled_from(KEYS) | st.sampled_from(KEYS) | st.text(max_size=6)
parents = st.just("") | keys
labels = st.dictionaries(st.sampled_from(["l", "containerd.io/gc.root", "x.y"]) | st.text(
    max_size=4), st.text(max_size=4), max_size=3)

REQUESTS: dict[str, tuple[type[Message], type[Message]]] = {
    "Prepare": (pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse),
    "View": (pb.ViewSnapshotRequest, pb.ViewSnapshotResponse),
    "Mounts": (pb.MountsRequest, pb.MountsResponse),
    "Commit": (pb.CommitSnapshotRequest, empty_pb2.Empty),
    "Remove": (pb.RemoveSnapshotRequest, empty_pb2.Empty),
    "Stat": (pb.StatSnapshotRequest, pb.StatSnapshotResponse),
    "Update": (pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse),
    "List": (pb.ListSnapshotsRequest, pb.ListSnapshotsResponse),
    "Usage": (pb.UsageRequest, pb.UsageResponse),
    "Cleanup": (pb.CleanupRequest, empty_pb2.Empty),
}
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.UNIMPLEMENTED}


def request(method: str) -> st.SearchStrategy[Message]:
    snap = st.text(max_size=4)
    if method in ("Prepare", "View"):
        return st.builds(REQUESTS[method][0], snapshotter=snap, key=keys, parent=parents,
                         labels=labels)
    if method in ("Mounts", "Remove", "Stat", "Usage"):
        return st.builds(REQUESTS[method][0], snapshotter=snap, key=keys)
    if method == "Commit":
        return st.builds(pb.CommitSnapshotRequest, snapshotter=snap, name=keys, key=keys,
                         labels=labels, parent=st.just("") | st.just("") | keys)
    if method == "Update":
        paths = st.lists(st.sampled_from(["labels", "labels.l", "labels.", "name", "kind",
                                          "labels.containerd.io/gc.root"]) | st.text(
            max_size=6), max_size=3)

        @st.composite
        def update(draw: st.DrawFn) -> Message:
            req = pb.UpdateSnapshotRequest(snapshotter=draw(snap))
            info = req.info
            info.name = draw(keys)
            info.parent = draw(parents)
            info.kind = draw(st.integers(-1, 5))  # type: ignore[assignment]
            info.labels.update(draw(labels))
            info.created_at.seconds = draw(st.integers(-(2**40), 2**40))
            info.updated_at.nanos = draw(st.integers(-(2**31), 2**31 - 1))
            req.update_mask.paths.extend(draw(paths))
            return req
        return update()
    if method == "List":
        flts = st.lists(st.sampled_from(["", "name==a", 'parent==""', "kind==committed",
                                         "labels.l", "name~=^a", "name~=("]) | st.text(
            max_size=10), max_size=3)
        return st.builds(pb.ListSnapshotsRequest, snapshotter=snap, filters=flts)
    return st.builds(pb.CleanupRequest, snapshotter=snap)


@st.composite
def messages(draw: st.DrawFn, method: str) -> bytes:
    kind = draw(st.sampled_from(["valid", "valid", "valid", "cut", "changed", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    data = draw(request(method)).SerializeToString()
    if kind == "cut" and data:
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "changed" and data:
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        return bytes(buf)
    return data


@st.composite
def calls(draw: st.DrawFn) -> GrpcCall:
    method = draw(st.sampled_from(sorted(REQUESTS)))
    path = method_path(method) if draw(st.integers(0, 19)) else draw(st.sampled_from([
        "/", "", "/x/y", method_path("Nope"), "/containerd.services.snapshots.v1.Snapshots",
    ]) | st.text(max_size=20))
    latin1 = st.text(st.characters(max_codepoint=255), max_size=8)
    metadata = draw(st.lists(st.tuples(st.sampled_from([NAMESPACE_HEADER, LEASE_HEADER,
                                                        "user-agent"]) | latin1, latin1),
                             max_size=3))
    return GrpcCall(path=path, metadata=tuple(metadata), message=draw(messages(method)),
                    handle=None)


def store_state(backend: OverlaySnapshotter, root: Path) -> tuple[Any, ...]:
    infos: list[Info] = []
    backend.walk(infos.append)
    mounts = {}
    for info in infos:
        if info.kind.name != "COMMITTED":
            mounts[info.name] = backend.mounts(info.name)
    dirs = sorted(os.listdir(root / "snapshots"))
    return sorted(infos, key=lambda i: i.name), mounts, dirs


def responses(method: str, body: bytes) -> list[Message]:
    out = []
    while body:
        flag, length = struct.unpack(">BI", body[:5])
        assert flag == 0 and len(body) >= 5 + length
        out.append(REQUESTS[method][1].FromString(body[5:5 + length]))
        body = body[5 + length:]
    return out


@pytest.fixture
def service(tmp_path: Path, privileged: None) -> Iterator[tuple[SnapshotsService, Any, Path]]:
    root = tmp_path / "root"
    backend = OverlaySnapshotter(root)
    try:
        yield SnapshotsService(backend), backend, root
    finally:
        backend.close()


@settings(max_examples=1500 * SCALE, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(calls(), min_size=1, max_size=6))
@example([GrpcCall(method_path("Prepare"), (), pb.PrepareSnapshotRequest(
    key="a").SerializeToString(), None), GrpcCall(method_path("Commit"), (),
    pb.CommitSnapshotRequest(name="c", key="a").SerializeToString(), None)])
def test_every_call_is_answered_with_a_typed_status_and_bad_ones_change_nothing(
        service: tuple[SnapshotsService, Any, Path], batch: list[GrpcCall]) -> None:
    svc, backend, root = service
    for call in batch:
        before = store_state(backend, root)
        code, message, body = svc(call)
        assert code in ALLOWED, (call, code, message)
        event(f"{call.path.rsplit('/', 1)[-1]}: {code.name}")
        if code is grpc.StatusCode.OK:
            method = call.path.rsplit("/", 1)[1]
            responses(method, body)
        else:
            assert message
            assert body == b""
            assert store_state(backend, root) == before, (call, code, message)
