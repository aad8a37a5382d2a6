"""A tiny stand-in for containerd's unpacker, driving containerd over its own socket.

containerd 1.6's ``ctr images import``/``pull`` unpack through ``image.Unpack``,
which does not label snapshots with their target reference; only the
"unpacker" (``client.Pull(WithPullUnpack)``: CRI, and the transfer service in
later releases) does.  To exercise the target-reference flow of SPEC §8.3,
this module does what that unpacker does, through containerd's public APIs:

for each layer, under a lease: ``Snapshots.Prepare(key="extract-<nanos>-<rand>
<chainID>", parent=<previous chainID>, labels={containerd.io/snapshot.ref:
chainID})``; ALREADY_EXISTS means the snapshotter already holds that layer
(containerd then records it under the name chainID, so ``Stat(chainID)``
works); otherwise ``Diff.Apply`` the layer blob onto the returned mounts and
``Snapshots.Commit(name=chainID, labels={ref})``.  The caller then labels the
image config blob ``containerd.io/gc.ref.snapshot.<snapshotter>=<top chainID>``
(:func:`gc_ref_label`: what keeps the layers from containerd's GC) and
deletes the lease.

containerd's Diff service messages are not among our committed protos, so
they are built here at import time from a hand-written descriptor in a
private descriptor pool (only ``containerd.types.Mount`` and
``google.protobuf.Any`` are borrowed).  Field numbers as in containerd's
``api/services/diff/v1/diff.proto`` (ApplyRequest: diff=1, mounts=2,
payloads=3; ApplyResponse: applied=1) and ``api/types/descriptor.proto``
(media_type=1, digest=2, size=3, annotations=5), identical in 1.6 and HEAD.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, empty_pb2, message_factory
from google.protobuf.message import Message

from overlay._proto.services.snapshots.v1 import snapshots_pb2 as spb
from overlay._proto.types import mount_pb2
from overlay.snapshots import LABEL_SNAPSHOT_REF

__all__ = [
    "LABEL_SNAPSHOT_REF",
    "ApplyRequest",
    "ApplyResponse",
    "Descriptor",
    "ImageLayers",
    "Mount",
    "UnpackResult",
    "gc_ref_label",
    "read_oci_archive",
    "unpack",
]

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"

_F = descriptor_pb2.FieldDescriptorProto


def gc_ref_label(snapshotter: str) -> str:
    """The content label that makes GC keep a snapshot (set on the image config)."""
    return f"containerd.io/gc.ref.snapshot.{snapshotter}"


# ------------------------------------------------------------- diff messages


def _field(msg: descriptor_pb2.DescriptorProto, name: str, number: int, ftype: int,
           type_name: str = "", repeated: bool = False) -> None:
    f = msg.field.add(name=name, number=number, type=ftype,
                      label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
    if type_name:
        f.type_name = type_name
    f.json_name = "".join(p if i == 0 else p.title() for i, p in enumerate(name.split("_")))


def _map_field(package: str, msg: descriptor_pb2.DescriptorProto, name: str, number: int,
               value_type: int, value_type_name: str = "") -> None:
    # a map<string, V> is a repeated nested "<Name>Entry" message with map_entry set
    entry_name = "".join(p.title() for p in name.split("_")) + "Entry"
    entry = msg.nested_type.add(name=entry_name)
    entry.options.map_entry = True
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, value_type, value_type_name)
    _field(msg, name, number, _F.TYPE_MESSAGE, f".{package}.{msg.name}.{entry_name}",
           repeated=True)


def _build_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for dep in (any_pb2.DESCRIPTOR, mount_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        dep.CopyToProto(proto)
        pool.Add(proto)

    # containerd api/types/descriptor.proto
    types = descriptor_pb2.FileDescriptorProto(
        name="test-only/types/descriptor.proto", package="containerd.types", syntax="proto3")
    desc = types.message_type.add(name="Descriptor")
    _field(desc, "media_type", 1, _F.TYPE_STRING)
    _field(desc, "digest", 2, _F.TYPE_STRING)
    _field(desc, "size", 3, _F.TYPE_INT64)
    _map_field(types.package, desc, "annotations", 5, _F.TYPE_STRING)
    pool.Add(types)

    # containerd api/services/diff/v1/diff.proto (the Apply half)
    diff = descriptor_pb2.FileDescriptorProto(
        name="test-only/services/diff/v1/diff.proto", package="containerd.services.diff.v1",
        syntax="proto3",
        dependency=[any_pb2.DESCRIPTOR.name, mount_pb2.DESCRIPTOR.name, types.name])
    req = diff.message_type.add(name="ApplyRequest")
    _field(req, "diff", 1, _F.TYPE_MESSAGE, ".containerd.types.Descriptor")
    _field(req, "mounts", 2, _F.TYPE_MESSAGE, ".containerd.types.Mount", repeated=True)
    _map_field(diff.package, req, "payloads", 3, _F.TYPE_MESSAGE, ".google.protobuf.Any")
    resp = diff.message_type.add(name="ApplyResponse")
    _field(resp, "applied", 1, _F.TYPE_MESSAGE, ".containerd.types.Descriptor")
    pool.Add(diff)
    return pool


_POOL = _build_pool()


def _message(full_name: str) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(
        _POOL.FindMessageTypeByName(full_name))
    return cls


Descriptor = _message("containerd.types.Descriptor")
Mount = _message("containerd.types.Mount")  # this pool's twin of mount_pb2.Mount
ApplyRequest = _message("containerd.services.diff.v1.ApplyRequest")
ApplyResponse = _message("containerd.services.diff.v1.ApplyResponse")

DIFF_APPLY = "/containerd.services.diff.v1.Diff/Apply"
_SNAPSHOTS = "/containerd.services.snapshots.v1.Snapshots/"


# ------------------------------------------------------------------ the image


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int
    diff_id: str
    chain_id: str


@dataclass(frozen=True)
class ImageLayers:
    """What an unpacker needs from an image: its config and layers."""

    config: str
    layers: tuple[Layer, ...]

    @property
    def chain_ids(self) -> list[str]:
        return [layer.chain_id for layer in self.layers]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_oci_archive(archive: Path) -> ImageLayers:
    """The (single, single-platform) image of an OCI archive."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> Any:
            f = tar.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
            assert f is not None
            return json.loads(f.read())

        f = tar.extractfile("index.json")
        assert f is not None
        (entry,) = json.loads(f.read())["manifests"]
        manifest = blob(entry["digest"])
        config_digest = manifest["config"]["digest"]
        diff_ids = blob(config_digest)["rootfs"]["diff_ids"]
    layers = []
    chain = ""
    for desc, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        chain = diff_id if not chain else _sha(f"{chain} {diff_id}".encode())
        layers.append(Layer(desc["mediaType"], desc["digest"], desc["size"], diff_id, chain))
    return ImageLayers(config_digest, tuple(layers))


# ------------------------------------------------------------------- unpack


@dataclass
class UnpackResult:
    applied: list[str] = field(default_factory=list)
    """chain ids extracted by Diff.Apply and committed"""
    shared: list[str] = field(default_factory=list)
    """chain ids the snapshotter already had (Prepare answered ALREADY_EXISTS)"""


class _Client:
    """containerd's snapshots and diff services, with the namespace and lease headers."""

    def __init__(self, channel: grpc.Channel, namespace: str, lease: str) -> None:
        self._channel = channel
        self.metadata = [(NAMESPACE_HEADER, namespace)]
        if lease:
            self.metadata.append((LEASE_HEADER, lease))

    def call(self, path: str, request: Message, response: type[Message]) -> Any:
        method = self._channel.unary_unary(
            path, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString)
        return method(request, metadata=self.metadata, timeout=60)

    def snapshots(self, method: str, request: Message, response: type[Message]) -> Any:
        return self.call(_SNAPSHOTS + method, request, response)


def _unique() -> str:
    # as containerd's uniquePart(): the clock's nanoseconds, 3 random bytes in base64
    return f"{time.time_ns() % 1_000_000_000}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


def unpack(address: str, namespace: str, image: ImageLayers, *, snapshotter: str,
           lease: str = "") -> UnpackResult:
    """Unpack ``image`` (whose blobs containerd at ``address`` already holds in
    ``namespace``) into ``snapshotter`` the way containerd's unpacker does;
    ``lease`` (an existing lease id) keeps the work from the GC meanwhile."""
    result = UnpackResult()
    with grpc.insecure_channel(f"unix://{address}") as channel:
        client = _Client(channel, namespace, lease)
        parent = ""
        for layer in image.layers:
            labels = {LABEL_SNAPSHOT_REF: layer.chain_id}
            key = f"extract-{_unique()} {layer.chain_id}"
            try:
                prepared = client.snapshots("Prepare", spb.PrepareSnapshotRequest(
                    snapshotter=snapshotter, key=key, parent=parent, labels=labels),
                    spb.PrepareSnapshotResponse)
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.ALREADY_EXISTS:
                    raise
                # The snapshotter has the layer: containerd recorded it under
                # the name chainID, so Stat(chainID) must now work.
                client.snapshots("Stat", spb.StatSnapshotRequest(
                    snapshotter=snapshotter, key=layer.chain_id), spb.StatSnapshotResponse)
                result.shared.append(layer.chain_id)
                parent = layer.chain_id
                continue
            try:
                request = ApplyRequest()
                diff: Any = request.diff  # type: ignore[attr-defined]  # a dynamic message
                diff.media_type, diff.digest, diff.size = (
                    layer.media_type, layer.digest, layer.size)
                for m in prepared.mounts:
                    request.mounts.add().MergeFromString(  # type: ignore[attr-defined]
                        m.SerializeToString())
                applied = client.call(DIFF_APPLY, request, ApplyResponse).applied
                if applied.digest != layer.diff_id:
                    raise AssertionError(
                        f"Diff.Apply applied {applied.digest}, expected {layer.diff_id}")
                client.snapshots("Commit", spb.CommitSnapshotRequest(
                    snapshotter=snapshotter, name=layer.chain_id, key=key, labels=labels),
                    empty_pb2.Empty)
            except BaseException:
                with contextlib.suppress(grpc.RpcError):
                    client.snapshots("Remove", spb.RemoveSnapshotRequest(
                        snapshotter=snapshotter, key=key), empty_pb2.Empty)
                raise
            result.applied.append(layer.chain_id)
            parent = layer.chain_id
    return result
