"""The committed protobuf/gRPC modules are exactly what the regenerate script
produces now, and they load with the installed runtimes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import __version__ as protobuf_version

from overlay._proto import regenerate

ROOT = Path(__file__).resolve().parents[2]


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def test_grpcio_tools_is_the_pinned_version() -> None:
    from grpc_tools import grpc_version

    assert grpc_version.VERSION == regenerate.GRPCIO_TOOLS_VERSION, (
        "the generated files are pinned to grpcio-tools "
        f"{regenerate.GRPCIO_TOOLS_VERSION}; install it, or regenerate and update the pin"
    )


def test_generated_modules_are_fresh() -> None:
    stale = regenerate.stale()
    assert not stale, (
        f"stale generated files {stale}: run `python -m overlay._proto.regenerate`"
    )


def test_check_mode_passes_on_the_committed_tree() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "overlay._proto.regenerate", "--check"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_check_mode_detects_stale_files_and_write_fixes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = regenerate.PROTO_ROOT
    copy = tmp_path / "_proto"
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(regenerate, "PROTO_ROOT", copy)
    assert regenerate.stale() == []
    mount_py = copy / "types" / "mount_pb2.py"
    mount_py.write_text(mount_py.read_text() + "# edited\n")
    (copy / "services" / "snapshots" / "v1" / "snapshots_pb2.pyi").unlink()
    (copy / "types" / "gone_pb2.py").write_text("# a module whose .proto was deleted\n")
    assert regenerate.main(["--check"]) == 1
    assert regenerate.stale() == [
        "services/snapshots/v1/snapshots_pb2.pyi",
        "types/gone_pb2.py",
        "types/mount_pb2.py",
    ]
    assert regenerate.main([]) == 0
    assert regenerate.stale() == []
    assert not (copy / "types" / "gone_pb2.py").exists()
    for rel in ("types/mount_pb2.py", "services/snapshots/v1/snapshots_pb2.pyi"):
        assert (copy / rel).read_bytes() == (original / rel).read_bytes()
    # changing a .proto makes the tree stale
    proto = copy / "types" / "mount.proto"
    proto.write_text(proto.read_text().replace("string target = 3;", "string target = 3;\n"
                                               "\tstring extra = 5;"))
    assert "types/mount_pb2.py" in regenerate.stale()


def test_generation_is_deterministic() -> None:
    assert regenerate.generate() == regenerate.generate()


def test_generated_imports_are_package_relative() -> None:
    generated = regenerate.generate()
    for rel, data in generated.items():
        text = data.decode()
        assert not re.search(r"^from (types|services)\b", text, re.M), rel
        assert not re.search(r"^import \w+_pb2", text, re.M), rel
    snapshots = generated["services/snapshots/v1/snapshots_pb2.py"].decode()
    assert "from overlay._proto.types import mount_pb2 as types_dot_mount__pb2" in snapshots
    assert "'overlay._proto.services.snapshots.v1.snapshots_pb2'" in snapshots
    assert "services/snapshots/v1/snapshots_pb2_grpc.py" in generated
    assert "types/mount_pb2_grpc.py" not in generated  # no service in mount.proto

    from overlay._proto.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
    from overlay._proto.types import mount_pb2

    assert snapshots_pb2.Info.__module__ == "overlay._proto.services.snapshots.v1.snapshots_pb2"
    assert mount_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"
    assert mount_pb2.DESCRIPTOR.name == "types/mount.proto"
    assert hasattr(snapshots_pb2_grpc, "SnapshotsStub")


def test_installed_runtimes_are_not_older_than_the_gencode() -> None:
    text = (regenerate.PROTO_ROOT / "types" / "mount_pb2.py").read_text()
    m = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", text)
    assert m, "no protobuf runtime version check in the gencode"
    gencode = tuple(int(g) for g in m.groups())
    assert version_tuple(protobuf_version) >= gencode
    grpc_text = (
        regenerate.PROTO_ROOT / "services" / "snapshots" / "v1" / "snapshots_pb2_grpc.py"
    ).read_text()
    g = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_text)
    assert g
    assert version_tuple(grpc.__version__) >= version_tuple(g.group(1))
