"""Wire compatibility with containerd 1.6's gogo-generated snapshots API.

The schema is pinned field by field (SPEC §6.2), and known messages are
compared byte for byte with encodings built by hand from the protobuf wire
rules, as gogo's marshaller writes them: fields in number order, proto3
defaults omitted, map entries as (key=1, value=2) with both always written,
non-nullable timestamps always present.
"""

from __future__ import annotations

from google.protobuf import descriptor as d
from google.protobuf import empty_pb2

from overlay._proto.services.snapshots.v1 import snapshots_pb2 as pb
from overlay._proto.types import mount_pb2
from overlay.mount import Mount
from overlay.server.snapshots import (
    info_from_proto,
    info_to_proto,
    kind_from_proto,
    kind_to_proto,
    mount_from_proto,
    mount_to_proto,
)
from overlay.snapshots import Info, Kind

STRING = d.FieldDescriptor.TYPE_STRING
INT64 = d.FieldDescriptor.TYPE_INT64
ENUM = d.FieldDescriptor.TYPE_ENUM
MESSAGE = d.FieldDescriptor.TYPE_MESSAGE
REPEATED = "repeated"
MAP = "map"

# message -> field -> (number, type, label or type name)
SCHEMA: dict[str, dict[str, tuple[int, int, str]]] = {
    "PrepareSnapshotRequest": {
        "snapshotter": (1, STRING, ""), "key": (2, STRING, ""), "parent": (3, STRING, ""),
        "labels": (4, MESSAGE, MAP),
    },
    "PrepareSnapshotResponse": {"mounts": (1, MESSAGE, "containerd.types.Mount")},
    "ViewSnapshotRequest": {
        "snapshotter": (1, STRING, ""), "key": (2, STRING, ""), "parent": (3, STRING, ""),
        "labels": (4, MESSAGE, MAP),
    },
    "ViewSnapshotResponse": {"mounts": (1, MESSAGE, "containerd.types.Mount")},
    "MountsRequest": {"snapshotter": (1, STRING, ""), "key": (2, STRING, "")},
    "MountsResponse": {"mounts": (1, MESSAGE, "containerd.types.Mount")},
    "RemoveSnapshotRequest": {"snapshotter": (1, STRING, ""), "key": (2, STRING, "")},
    "CommitSnapshotRequest": {
        "snapshotter": (1, STRING, ""), "name": (2, STRING, ""), "key": (3, STRING, ""),
        "labels": (4, MESSAGE, MAP), "parent": (5, STRING, ""),
    },
    "StatSnapshotRequest": {"snapshotter": (1, STRING, ""), "key": (2, STRING, "")},
    "StatSnapshotResponse": {"info": (1, MESSAGE, "containerd.services.snapshots.v1.Info")},
    "Info": {
        "name": (1, STRING, ""), "parent": (2, STRING, ""),
        "kind": (3, ENUM, "containerd.services.snapshots.v1.Kind"),
        "created_at": (4, MESSAGE, "google.protobuf.Timestamp"),
        "updated_at": (5, MESSAGE, "google.protobuf.Timestamp"),
        "labels": (6, MESSAGE, MAP),
    },
    "UpdateSnapshotRequest": {
        "snapshotter": (1, STRING, ""),
        "info": (2, MESSAGE, "containerd.services.snapshots.v1.Info"),
        "update_mask": (3, MESSAGE, "google.protobuf.FieldMask"),
    },
    "UpdateSnapshotResponse": {"info": (1, MESSAGE, "containerd.services.snapshots.v1.Info")},
    "ListSnapshotsRequest": {"snapshotter": (1, STRING, ""), "filters": (2, STRING, REPEATED)},
    "ListSnapshotsResponse": {"info": (1, MESSAGE, "containerd.services.snapshots.v1.Info")},
    "UsageRequest": {"snapshotter": (1, STRING, ""), "key": (2, STRING, "")},
    "UsageResponse": {"size": (1, INT64, ""), "inodes": (2, INT64, "")},
    "CleanupRequest": {"snapshotter": (1, STRING, "")},
}


def describe(field: d.FieldDescriptor) -> tuple[int, int, str]:
    extra = ""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        extra = MAP
    elif field.message_type is not None:
        extra = field.message_type.full_name
    elif field.enum_type is not None:
        extra = field.enum_type.full_name
    elif field.is_repeated:
        extra = REPEATED
    return field.number, field.type, extra


def test_package_and_messages_match_containerd() -> None:
    file = pb.DESCRIPTOR
    assert file.package == "containerd.services.snapshots.v1"
    assert set(file.message_types_by_name) == set(SCHEMA)
    for name, fields in SCHEMA.items():
        msg = file.message_types_by_name[name]
        assert {f.name: describe(f) for f in msg.fields} == fields, name
    for name in ("PrepareSnapshotResponse", "ViewSnapshotResponse", "MountsResponse",
                 "ListSnapshotsResponse"):
        field = file.message_types_by_name[name].fields[0]
        assert field.is_repeated, name
    for name in ("Info", "PrepareSnapshotRequest", "ViewSnapshotRequest", "CommitSnapshotRequest"):
        entry = file.message_types_by_name[name].fields_by_name["labels"].message_type
        assert entry is not None
        assert [(f.name, f.number, f.type) for f in entry.fields] == [
            ("key", 1, STRING), ("value", 2, STRING)
        ]


def test_kind_enum() -> None:
    kind = pb.DESCRIPTOR.enum_types_by_name["Kind"]
    assert {v.name: v.number for v in kind.values} == {
        "UNKNOWN": 0, "VIEW": 1, "ACTIVE": 2, "COMMITTED": 3
    }


def test_mount_message() -> None:
    msg = mount_pb2.DESCRIPTOR.message_types_by_name["Mount"]
    assert mount_pb2.DESCRIPTOR.package == "containerd.types"
    assert mount_pb2.DESCRIPTOR.name == "types/mount.proto"
    assert {f.name: describe(f) for f in msg.fields} == {
        "type": (1, STRING, ""), "source": (2, STRING, ""), "target": (3, STRING, ""),
        "options": (4, STRING, REPEATED),
    }


def test_service_methods() -> None:
    service = pb.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    empty = empty_pb2.Empty.DESCRIPTOR.full_name
    methods = {
        m.name: (m.input_type.name, m.output_type.full_name, m.server_streaming,
                 m.client_streaming)
        for m in service.methods
    }
    p = "containerd.services.snapshots.v1."
    assert methods == {
        "Prepare": ("PrepareSnapshotRequest", p + "PrepareSnapshotResponse", False, False),
        "View": ("ViewSnapshotRequest", p + "ViewSnapshotResponse", False, False),
        "Mounts": ("MountsRequest", p + "MountsResponse", False, False),
        "Commit": ("CommitSnapshotRequest", empty, False, False),
        "Remove": ("RemoveSnapshotRequest", empty, False, False),
        "Stat": ("StatSnapshotRequest", p + "StatSnapshotResponse", False, False),
        "Update": ("UpdateSnapshotRequest", p + "UpdateSnapshotResponse", False, False),
        "List": ("ListSnapshotsRequest", p + "ListSnapshotsResponse", True, False),
        "Usage": ("UsageRequest", p + "UsageResponse", False, False),
        "Cleanup": ("CleanupRequest", empty, False, False),
    }
    assert list(methods) == [
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
        "Cleanup",
    ]


# ------------------------------------------------------------------ hand-built encodings


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values take ten bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def vfield(number: int, value: int) -> bytes:
    return tag(number, 0) + varint(value)


def lfield(number: int, data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return tag(number, 2) + varint(len(raw)) + raw


def timestamp(seconds: int, nanos: int) -> bytes:
    return (vfield(1, seconds) if seconds else b"") + (vfield(2, nanos) if nanos else b"")


def label(number: int, key: str, value: str) -> bytes:
    return lfield(number, lfield(1, key) + lfield(2, value))


CREATED = 1_700_000_000_123_456_789
UPDATED = 1_700_000_005_000_000_001


def info_bytes(name: str, parent: str, kind: int, labels: dict[str, str]) -> bytes:
    out = lfield(1, name)
    if parent:
        out += lfield(2, parent)
    if kind:
        out += vfield(3, kind)
    out += lfield(4, timestamp(1_700_000_000, 123_456_789))
    out += lfield(5, timestamp(1_700_000_005, 1))
    for k, v in sorted(labels.items()):
        out += label(6, k, v)
    return out


def test_info_bytes() -> None:
    info = Info(Kind.ACTIVE, "default/3/k y", "default/2/sha256:abc",
                {"containerd.io/gc.root": "2024", "b": ""}, CREATED, UPDATED)
    msg = info_to_proto(info)
    expected = info_bytes("default/3/k y", "default/2/sha256:abc", 2,
                          {"containerd.io/gc.root": "2024", "b": ""})
    assert msg.SerializeToString(deterministic=True) == expected
    assert info_from_proto(pb.Info.FromString(expected)) == info


def test_info_zero_timestamps_are_still_sent() -> None:
    msg = info_to_proto(Info(Kind.COMMITTED, "c"))
    assert msg.SerializeToString() == lfield(1, "c") + vfield(3, 3) + lfield(4, b"") + lfield(
        5, b""
    )


def test_info_from_go_zero_time() -> None:
    # gogo encodes Go's zero time.Time as seconds -62135596800
    data = lfield(1, "x") + lfield(4, vfield(1, -62135596800)) + lfield(5, vfield(1, -62135596800))
    info = info_from_proto(pb.Info.FromString(data))
    assert info.created_ns == info.updated_ns == -62135596800 * 10**9
    assert info.kind is Kind.COMMITTED  # UNKNOWN (absent) reads as committed
    assert info_to_proto(info).SerializeToString() == (
        lfield(1, "x") + vfield(3, 3) + lfield(4, vfield(1, -62135596800))
        + lfield(5, vfield(1, -62135596800))
    )


def test_kind_conversions() -> None:
    assert kind_to_proto(Kind.ACTIVE) == pb.ACTIVE
    assert kind_to_proto(Kind.VIEW) == pb.VIEW
    assert kind_to_proto(Kind.COMMITTED) == pb.COMMITTED
    assert kind_to_proto(Kind.UNKNOWN) == pb.COMMITTED
    assert kind_from_proto(pb.ACTIVE) is Kind.ACTIVE
    assert kind_from_proto(pb.VIEW) is Kind.VIEW
    assert kind_from_proto(pb.COMMITTED) is Kind.COMMITTED
    assert kind_from_proto(pb.UNKNOWN) is Kind.COMMITTED
    assert kind_from_proto(77) is Kind.COMMITTED  # an unknown enum value


def test_usage_response_bytes_size_first() -> None:
    msg = pb.UsageResponse(size=1 << 40, inodes=3)
    assert msg.SerializeToString() == vfield(1, 1 << 40) + vfield(2, 3)
    assert bytes.fromhex("08 80 20 10 03".replace(" ", "")) == pb.UsageResponse(
        size=4096, inodes=3
    ).SerializeToString()
    assert pb.UsageResponse().SerializeToString() == b""


def test_mount_bytes() -> None:
    m = Mount("overlay", "overlay", "", ("workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"))
    expected = (
        lfield(1, "overlay") + lfield(2, "overlay")
        + lfield(4, "workdir=/w") + lfield(4, "upperdir=/u") + lfield(4, "lowerdir=/l1:/l2")
    )
    assert mount_to_proto(m).SerializeToString() == expected
    assert mount_from_proto(mount_pb2.Mount.FromString(expected)) == m
    bind = Mount("bind", "/s/1/fs", "sub", ("ro", "rbind"))
    expected = lfield(1, "bind") + lfield(2, "/s/1/fs") + lfield(3, "sub") + lfield(
        4, "ro") + lfield(4, "rbind")
    assert mount_to_proto(bind).SerializeToString() == expected
    resp = pb.PrepareSnapshotResponse(mounts=[mount_to_proto(bind)])
    assert resp.SerializeToString() == lfield(1, expected)


def test_list_snapshots_response_bytes() -> None:
    a = Info(Kind.COMMITTED, "a", "", {}, CREATED, UPDATED)
    b = Info(Kind.VIEW, "b", "a", {"l": "v"}, CREATED, UPDATED)
    msg = pb.ListSnapshotsResponse(info=[info_to_proto(a), info_to_proto(b)])
    expected = lfield(1, info_bytes("a", "", 3, {}))
    expected += lfield(1, info_bytes("b", "a", 1, {"l": "v"}))
    assert msg.SerializeToString(deterministic=True) == expected
    back = pb.ListSnapshotsResponse.FromString(expected)
    assert [info_from_proto(i) for i in back.info] == [a, b]


def test_requests_decode_as_a_go_client_encodes_them() -> None:
    # containerd 1.6 proxy: Prepare with labels, Commit without parent, Update with a mask
    prep = lfield(1, "overlay") + lfield(2, "default/4/k") + lfield(3, "default/3/p") + label(
        4, "containerd.io/snapshot.ref", "sha256:x")
    req = pb.PrepareSnapshotRequest.FromString(prep)
    assert (req.snapshotter, req.key, req.parent) == ("overlay", "default/4/k", "default/3/p")
    assert dict(req.labels) == {"containerd.io/snapshot.ref": "sha256:x"}
    commit = lfield(1, "overlay") + lfield(2, "n") + lfield(3, "k")
    creq = pb.CommitSnapshotRequest.FromString(commit)
    assert (creq.name, creq.key, creq.parent, dict(creq.labels)) == ("n", "k", "", {})
    head = commit + lfield(5, "base")  # containerd 2.x rebase
    assert pb.CommitSnapshotRequest.FromString(head).parent == "base"
    upd = lfield(1, "overlay") + lfield(2, lfield(1, "n") + label(6, "a", "1")) + lfield(
        3, lfield(1, "labels.a"))
    ureq = pb.UpdateSnapshotRequest.FromString(upd)
    assert list(ureq.update_mask.paths) == ["labels.a"]
    assert ureq.info.name == "n" and dict(ureq.info.labels) == {"a": "1"}
    lst = lfield(1, "overlay") + lfield(2, "kind==view") + lfield(2, 'labels."x"')
    assert list(pb.ListSnapshotsRequest.FromString(lst).filters) == ["kind==view", 'labels."x"']
    usage = lfield(1, "overlay") + lfield(2, "k")
    assert pb.UsageRequest.FromString(usage).key == "k"
    assert pb.CleanupRequest.FromString(lfield(1, "overlay")).snapshotter == "overlay"
