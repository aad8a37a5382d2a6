"""Build small OCI image archives offline, for containerd end-to-end tests.

Layers are real tar streams (hard links, symlinks, whiteouts, opaque
directories) around Debian's static busybox, so a container can run them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")


@dataclass
class Entry:
    """One tar member: kind is file, dir, symlink, hardlink or whiteout."""

    path: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass
class Layer:
    entries: list[Entry] = field(default_factory=list)

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for e in self.entries:
                info = tarfile.TarInfo(e.path)
                info.mtime = 1_700_000_000
                info.uid, info.gid, info.mode = e.uid, e.gid, e.mode
                if e.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    info.mode = e.mode if e.mode != 0o644 else 0o755
                    tar.addfile(info)
                elif e.kind == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = e.target
                    info.mode = 0o777
                    tar.addfile(info)
                elif e.kind == "hardlink":
                    info.type = tarfile.LNKTYPE
                    info.linkname = e.target
                    tar.addfile(info)
                elif e.kind == "whiteout":
                    # OCI whiteout: an empty file named .wh.<name>
                    parent, _, name = e.path.rpartition("/")
                    info.name = f"{parent}/.wh.{name}" if parent else f".wh.{name}"
                    info.size = 0
                    tar.addfile(info, io.BytesIO(b""))
                elif e.kind == "opaque":
                    info.name = f"{e.path.rstrip('/')}/.wh..wh..opq"
                    info.size = 0
                    tar.addfile(info, io.BytesIO(b""))
                else:
                    info.size = len(e.data)
                    tar.addfile(info, io.BytesIO(e.data))
        return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_archive(out: Path, name: str, layers: Sequence[Layer],
                  cmd: Sequence[str] = ("/bin/sh",)) -> dict[str, str]:
    """Write an OCI archive ``out`` for image ``name``; returns digests
    (``manifest``, ``config``, and ``chain<i>``: the chain ids)."""
    blobs: dict[str, bytes] = {}
    diff_ids: list[str] = []
    layer_descs = []
    for layer in layers:
        raw = layer.tar()
        diff_ids.append(_sha(raw))
        gz = gzip.compress(raw, mtime=0)
        blobs[_sha(gz)] = gz
        layer_descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": _sha(gz), "size": len(gz)})
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_700_000_000)),
    }, sort_keys=True).encode()
    blobs[_sha(config)] = config
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _sha(config), "size": len(config)},
        "layers": layer_descs,
    }, sort_keys=True).encode()
    blobs[_sha(manifest)] = manifest
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": _sha(manifest), "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
        }],
    }).encode()
    with tarfile.open(out, "w") as tar:
        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.removeprefix("sha256:"), data)
    chains = {}
    chain = ""
    for i, diff in enumerate(diff_ids):
        chain = diff if i == 0 else _sha(f"{chain} {diff}".encode())
        chains[f"chain{i}"] = chain
    return {"manifest": _sha(manifest), "config": _sha(config), **chains}


def example_layers() -> list[Layer]:
    """Three layers: busybox + files; hard links, symlinks, a whiteout; an
    opaque directory recreated on top."""
    busybox = BUSYBOX.read_bytes()
    base = Layer([
        Entry("bin", "dir"),
        Entry("bin/busybox", data=busybox, mode=0o755),
        Entry("bin/sh", "hardlink", target="bin/busybox", mode=0o755),
        Entry("etc", "dir"),
        Entry("etc/motd", data=b"layer0\n"),
        Entry("data", "dir"),
        Entry("data/keep", data=b"keep\n"),
        Entry("data/gone", data=b"to be deleted\n"),
        Entry("opaque", "dir"),
        Entry("opaque/old", data=b"old\n"),
        Entry("tmp", "dir", mode=0o1777),
    ])
    middle = Layer([
        Entry("bin", "dir"),
        *(Entry(f"bin/{tool}", "symlink", target="busybox")
          for tool in ("ls", "cat", "test", "echo", "stat", "readlink", "grep", "wc", "mkdir",
                       "touch", "rm")),
        Entry("etc", "dir"),
        Entry("etc/motd", data=b"layer1\n"),
        Entry("etc/motd-link", "hardlink", target="etc/motd"),
        Entry("data", "dir"),
        Entry("data/gone", "whiteout"),
    ])
    top = Layer([
        Entry("opaque", "dir"),
        Entry("opaque", "opaque"),
        Entry("opaque/new", data=b"new\n"),
        Entry("etc", "dir"),
        Entry("etc/hostname-link", "symlink", target="/etc/motd"),
        Entry("check.sh", data=CHECK_SCRIPT, mode=0o755),
    ])
    return [base, middle, top]


#: Run inside the container: checks every layer's effect, writes to the rootfs.
CHECK_SCRIPT = b"""#!/bin/sh
set -e
test "$(cat /etc/motd)" = layer1
test "$(cat /etc/motd-link)" = layer1
test "$(readlink /etc/hostname-link)" = /etc/motd
test "$(cat /data/keep)" = keep
test ! -e /data/gone
test ! -e /opaque/old
test "$(cat /opaque/new)" = new
test "$(stat -c %h /etc/motd)" = 2
echo written > /written
test "$(cat /written)" = written
echo CHECK-OK
"""
