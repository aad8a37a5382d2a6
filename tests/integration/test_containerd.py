"""Real containerd 1.6 driving ``ovl serve`` as its proxy snapshotter "ovl", end to end.

Each test starts our daemon (``python -m overlay.cli serve``) and a private
containerd whose ``proxy_plugins.ovl`` points at it (``containerd_env``), then
works with ``ctr`` on an offline 3-layer OCI image around busybox
(``oci_image``: hard links, symlinks, a whiteout, an opaque directory, and
``/check.sh`` that checks every layer's effect and writes to the rootfs).

* import → run → GC: ``ctr images import`` unpacks into our backend, the
  container prints CHECK-OK, and removing the image makes containerd's GC
  remove the backend snapshots and call Cleanup, which reclaims the disk.
* two namespaces unpack once: containerd's unpacker labels layers with their
  target reference (``containerd.io/snapshot.ref``), which ``ctr`` 1.6 does
  not do, so ``unpacker`` does it through containerd's own Snapshots and Diff
  services; the second namespace's Prepare gets ALREADY_EXISTS from us and
  containerd records our existing layer (SPEC §8.3), so the backend holds one
  copy, which outlives the first namespace's image and goes with the last.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.snapshots import Info, Kind
from tests.integration.containerd_env import (
    PLUGIN,
    Stack,
    containerd_stack,
    require_containerd,
    wait_until,
)
from tests.integration.oci_image import build_archive, example_layers
from tests.integration.unpacker import (
    LABEL_SNAPSHOT_REF,
    ImageLayers,
    gc_ref_label,
    read_oci_archive,
    unpack,
)

pytestmark = [pytest.mark.slow, pytest.mark.privileged]

IMAGE = "example.com/overlay/check:1"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ImageLayers]:
    require_containerd()  # and busybox-static, which the image is built around
    path = tmp_path_factory.mktemp("image") / "check.tar"
    digests = build_archive(path, IMAGE, example_layers(), cmd=("/check.sh",))
    image = read_oci_archive(path)
    assert image.config == digests["config"]
    assert image.chain_ids == [digests[f"chain{i}"] for i in range(3)]
    return path, image


@pytest.fixture
def stack(tmpfs: Path) -> Iterator[Stack]:
    with containerd_stack(tmpfs) as s:
        yield s


# ------------------------------------------------------------------ helpers


def run_check(stack: Stack, namespace: str) -> None:
    cid = f"check-{secrets.token_hex(4)}"
    out = stack.ctr(namespace, "run", "--rm", "--snapshotter", PLUGIN,
                    "--runc-root", str(stack.runc_root), IMAGE, cid, "/check.sh")
    assert out.strip().splitlines()[-1:] == ["CHECK-OK"], out
    assert stack.ctr(namespace, "containers", "ls", "-q").split() == []


def assert_layers(infos: list[Info], image: ImageLayers, namespace: str,
                  labelled: bool) -> list[str]:
    """``infos`` are exactly the image's layers, committed by ``namespace``,
    each the child of the one below; their backend names."""
    assert len(infos) == len(image.layers), infos
    by_chain = {i.name.split("/", 2)[2]: i for i in infos}
    assert sorted(by_chain) == sorted(image.chain_ids), infos
    names, parent = [], ""
    for chain in image.chain_ids:
        info = by_chain[chain]
        assert info.kind is Kind.COMMITTED, info
        assert info.name.split("/", 2)[0] == namespace, info
        assert info.parent == parent, info
        assert info.labels == ({LABEL_SNAPSHOT_REF: chain} if labelled else {}), info
        names.append(info.name)
        parent = info.name
    return names


def wait_for_layers_only(stack: Stack, image: ImageLayers) -> list[Info]:
    """Until the backend holds the image's layers and nothing else, on disk
    too: containerd's GC removes the containers' snapshots (and calls
    Cleanup) asynchronously after ``ctr run --rm``.  The backend's infos."""
    infos: list[Info] = []
    dirs: list[str] = []

    def only_layers() -> bool:
        infos[:] = stack.backend()
        dirs[:] = stack.snapshot_dirs()
        return len(infos) == len(dirs) == len(image.layers)

    wait_until(only_layers, lambda: f"backend holds {infos}, snapshots/ holds {dirs}")
    return infos


def wait_for_reclaim(stack: Stack) -> None:
    """GC removed everything from the backend (Remove RPCs) and called Cleanup,
    whose background deletion empties snapshots/ and trash/.  (Our Remove
    never touches the disk and nothing but Cleanup moves orphans to the
    trash, so empty directories prove that Cleanup was called.)"""
    state: tuple[object, ...] = ()

    def empty() -> bool:
        nonlocal state
        state = (stack.backend(), stack.snapshot_dirs(), stack.trash())
        return state == ([], [], [])

    wait_until(empty, lambda: f"(backend, snapshots/, trash/) = {state}")


def ctr_snapshots(stack: Stack, namespace: str) -> dict[str, str]:
    """``ctr snapshots ls`` in ``namespace``: key → parent, committed only."""
    out = stack.ctr(namespace, "snapshots", "--snapshotter", PLUGIN, "ls")
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    assert all(r[-1] == "Committed" for r in rows), out
    return {r[0]: (r[1] if len(r) == 3 else "") for r in rows}


def unpack_in(stack: Stack, namespace: str, archive: Path, image: ImageLayers) -> list[str]:
    """Import without unpacking, then unpack like containerd's unpacker under
    a lease, and root the layers on the image config as it does; the chain
    ids that were shared (not extracted)."""
    stack.ctr(namespace, "images", "import", "--no-unpack", str(archive))
    lease = f"unpack-{secrets.token_hex(4)}"
    stack.ctr(namespace, "leases", "create", "--id", lease)
    try:
        result = unpack(str(stack.ctd_sock), namespace, image, snapshotter=PLUGIN, lease=lease)
        stack.ctr(namespace, "content", "label", image.config,
                  f"{gc_ref_label(PLUGIN)}={image.chain_ids[-1]}")
    finally:
        stack.ctr(namespace, "leases", "rm", "--sync", lease)
    assert sorted(result.applied + result.shared) == sorted(image.chain_ids), result
    return result.shared


def stop(stack: Stack) -> None:
    stack.stop_containerd()
    assert stack.stop_daemon() == 0


# -------------------------------------------------------------------- tests


def chain_of(image: ImageLayers) -> dict[str, str]:
    """chain id → parent chain id, as ``ctr snapshots ls`` shows an unpacked image."""
    chains = image.chain_ids
    return dict(zip(chains, ["", *chains[:-1]], strict=True))


def test_import_run_and_gc(stack: Stack, archive: tuple[Path, ImageLayers]) -> None:
    path, image = archive
    with stack.logs_on_failure():
        out = stack.ctr("ns1", "images", "import", "--snapshotter", PLUGIN, str(path))
        assert IMAGE in out, out
        assert ctr_snapshots(stack, "ns1") == chain_of(image)
        run_check(stack, "ns1")

        # exactly the image's 3 layers, as ns1's backend names, in a chain;
        # ctr 1.6 unpacks through image.Unpack, which labels nothing
        assert_layers(wait_for_layers_only(stack, image), image, "ns1", labelled=False)

        stack.ctr("ns1", "images", "rm", "--sync", IMAGE)
        assert ctr_snapshots(stack, "ns1") == {}
        wait_for_reclaim(stack)
        stop(stack)


def test_two_namespaces_unpack_once(stack: Stack, archive: tuple[Path, ImageLayers]) -> None:
    path, image = archive
    chains = image.chain_ids
    with stack.logs_on_failure():
        assert unpack_in(stack, "ns-a", path, image) == []
        names = assert_layers(stack.backend(), image, "ns-a", labelled=True)
        dirs = stack.snapshot_dirs()
        assert len(dirs) == 3

        # ns-b: every Prepare answers ALREADY_EXISTS; nothing new on disk
        assert unpack_in(stack, "ns-b", path, image) == chains
        assert assert_layers(stack.backend(), image, "ns-a", labelled=True) == names
        assert stack.snapshot_dirs() == dirs
        assert ctr_snapshots(stack, "ns-a") == ctr_snapshots(stack, "ns-b") == chain_of(image)
        top = json.loads(stack.ctr("ns-b", "snapshots", "--snapshotter", PLUGIN, "info",
                                   chains[-1]))
        assert (top["Name"], top["Parent"], top["Kind"]) == (chains[2], chains[1], "Committed")
        assert top["Labels"][LABEL_SNAPSHOT_REF] == chains[2]

        run_check(stack, "ns-a")
        run_check(stack, "ns-b")
        wait_for_layers_only(stack, image)

        # ns-a's image goes: GC drops ns-a's records, but ns-b's point at the
        # same backend snapshots, which stay
        stack.ctr("ns-a", "images", "rm", "--sync", IMAGE)
        assert ctr_snapshots(stack, "ns-a") == {}
        assert ctr_snapshots(stack, "ns-b") == chain_of(image)
        run_check(stack, "ns-b")
        assert [i.name for i in wait_for_layers_only(stack, image)] == names
        assert stack.snapshot_dirs() == dirs

        stack.ctr("ns-b", "images", "rm", "--sync", IMAGE)
        assert ctr_snapshots(stack, "ns-b") == {}
        wait_for_reclaim(stack)
        stop(stack)
