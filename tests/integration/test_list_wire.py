"""What List, Stat and Update put on the wire, byte for byte, after changes.

The server answers from two memos (decoded records in the metastore,
serialized Infos in the servicer).  Here a served overlay backend is changed
through its client (label updates, commits, removes, the same keys made
again) and after every step the raw response bodies are compared with what
a fresh decode of the store gives, in another process, encoded field by
field the way the server encoded every Info before the memos (with map
entries sorted, as gogo writes them): a stale memo would show.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from overlay._proto.services.snapshots.v1 import snapshots_pb2 as pb
from overlay.client import RemoteSnapshotter
from overlay.overlayfs import OverlaySnapshotter
from overlay.server.cleaner import DeferredCleanup
from overlay.server.snapshots import LIST_BATCH, info_to_proto, method_path
from overlay.snapshots import LABEL_UPPERDIR, Info, Kind
from tests.helpers import read_store, require_privileges
from tests.integration.grpc_backend import serve

COUNT = 230  # three List messages: two full, one not


@pytest.fixture(scope="module")
def fresh_reader() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        yield pool


class Raw:
    """Calls of the snapshots service that return the response bytes as sent."""

    def __init__(self, address: str) -> None:
        self.channel: Any = grpc.insecure_channel(address)
        self._list = self.channel.unary_stream(method_path("List"))
        self._stat = self.channel.unary_unary(method_path("Stat"))
        self._update = self.channel.unary_unary(method_path("Update"))

    def list(self, *filters: str) -> list[bytes]:
        req = pb.ListSnapshotsRequest(filters=filters).SerializeToString()
        return list(self._list(req, timeout=60))

    def stat(self, key: str) -> bytes:
        data: bytes = self._stat(pb.StatSnapshotRequest(key=key).SerializeToString(), timeout=60)
        return data

    def update(self, info: Info, *paths: str) -> bytes:
        req = pb.UpdateSnapshotRequest(info=info_to_proto(info))
        req.update_mask.paths.extend(paths)
        data: bytes = self._update(req.SerializeToString(), timeout=60)
        return data


def fresh_infos(pool: concurrent.futures.ProcessPoolExecutor, root: Path,
                upperdir: bool) -> list[Info]:
    """The store's snapshots as a fresh decode gives them, as the backend reports them."""
    out = []
    for sid, kind, name, parent, labels, created, updated, _, _ in pool.submit(
            read_store, str(root / "metadata.db")).result(timeout=120):
        if upperdir:
            labels[LABEL_UPPERDIR] = str(root / "snapshots" / sid / "fs")
        out.append(Info(Kind(kind), name, parent, labels, created, updated))
    return out


def encode_list(infos: list[Info]) -> list[bytes]:
    out = []
    for start in range(0, len(infos), LIST_BATCH):
        msg = pb.ListSnapshotsResponse()
        for info in infos[start : start + LIST_BATCH]:
            info_to_proto(info, msg.info.add())
        out.append(msg.SerializeToString(deterministic=True))
    return out


def encode_stat(info: Info) -> bytes:
    return pb.StatSnapshotResponse(info=info_to_proto(info)).SerializeToString(
        deterministic=True)


def encode_update(info: Info) -> bytes:
    return pb.UpdateSnapshotResponse(info=info_to_proto(info)).SerializeToString(
        deterministic=True)


@pytest.mark.parametrize("upperdir", [False, True], ids=["plain", "upperdir-label"])
def test_list_and_stat_bytes_equal_a_fresh_decode(
    tmp_path: Path, fresh_reader: concurrent.futures.ProcessPoolExecutor, upperdir: bool
) -> None:
    require_privileges()
    root = tmp_path / "root"
    backend = DeferredCleanup(OverlaySnapshotter(root, upperdir_label=upperdir))
    try:
        with serve(backend) as address:
            raw = Raw(address)
            client = RemoteSnapshotter(address, timeout=60)
            try:
                run_steps(raw, client, lambda: fresh_infos(fresh_reader, root, upperdir))
            finally:
                client.close()
                raw.channel.close()
    finally:
        backend.close()


def run_steps(raw: Raw, client: RemoteSnapshotter, fresh: Any) -> None:
    def check() -> list[Info]:
        infos: list[Info] = fresh()
        expected = encode_list(infos)
        assert raw.list() == expected
        assert raw.list() == expected  # again: from the memos
        # a filter: the matches only, batched anew
        matching = [i for i in infos if i.labels.get("n") == "1"]
        assert raw.list('labels.n==1') == encode_list(matching)
        assert raw.list("name~=^k1[0-9]*@?$") == encode_list(
            [i for i in infos if re.search(r"^k1[0-9]*@?$", i.name)])
        for info in infos:
            assert raw.stat(info.name) == encode_stat(info)
        return infos

    client.prepare("base", "", {"a": "1", "b": "2"})
    client.commit("base@", "base", {"a": "1", "b": "2", "containerd.io/gc.root": "x"})
    for i in range(COUNT):
        client.prepare(f"k{i}", "base@", {"n": str(i % 3), "z": "last", "a": "first"})
    client.view("view", "base@", {"a": "1"})
    before = check()

    # labels: replaced, one set, one deleted (Update's own answer too)
    got = raw.update(Info(Kind.ACTIVE, "k0", labels={"x": "y"}))
    after = {i.name: i for i in fresh()}
    assert got == encode_update(after["k0"])
    assert raw.update(Info(Kind.ACTIVE, "k1", labels={"n": "7"}), "labels.n") == encode_update(
        {i.name: i for i in fresh()}["k1"])
    client.update(Info(Kind.ACTIVE, "k2"), "labels.n")
    client.update(Info(Kind.ACTIVE, "k3", labels={"n": "0", "z": "last", "a": "first"}))
    changed = check()
    assert changed != before

    # commits: the key goes, the name comes with new labels
    for i in range(0, COUNT, 2):
        client.commit(f"k{i}@", f"k{i}", {"c": str(i), "n": "1"})
    check()

    # removes, then the same keys again with the same labels
    for i in range(1, COUNT, 2):
        client.remove(f"k{i}")
    client.remove("view")
    check()
    for i in range(1, COUNT, 2):
        client.prepare(f"k{i}", "base@", {"n": str(i % 3), "z": "last", "a": "first"})
    client.view("view", "base@", {"a": "1"})
    check()
