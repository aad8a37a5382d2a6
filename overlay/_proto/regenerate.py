"""Regenerate the protobuf/gRPC modules beside the ``.proto`` sources.

    python -m overlay._proto.regenerate           # rewrite the generated files
    python -m overlay._proto.regenerate --check   # exit 1 if they are stale

Every ``*.proto`` below this directory is compiled with ``grpc_tools.protoc``
(``--python_out``, ``--pyi_out``, ``--grpc_python_out``; the ``_pb2_grpc.py``
of a file without a service is dropped), with this directory as the import
root, so ``types/mount.proto`` is imported as containerd spells it.

protoc writes absolute imports for the root-relative modules
(``from types import mount_pb2``, which would even pick up the standard
library's ``types``); they are rewritten here to ``overlay._proto.…``, as is the
module name the messages are registered under.  The rewrite is a pure
function of protoc's output, so the result is byte-for-byte reproducible for
one ``grpcio-tools`` version (:data:`GRPCIO_TOOLS_VERSION`, which the project
pins): the freshness test compares the committed files with :func:`generate`.

The generated code checks at import time that the protobuf runtime is not
older than its gencode and that grpcio is not older than the grpcio-tools
that generated it: keep the dependency ranges in pyproject.toml in step.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "GRPCIO_TOOLS_VERSION",
    "PACKAGE",
    "PROTO_ROOT",
    "generate",
    "main",
    "proto_sources",
    "stale",
    "write",
]

#: The directory holding the .proto sources and the generated modules.
PROTO_ROOT = Path(__file__).resolve().parent
#: The Python package PROTO_ROOT is.
PACKAGE = "overlay._proto"
#: The grpcio-tools the committed files were generated with.
GRPCIO_TOOLS_VERSION = "1.85.1"

_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
# Generated code is neither linted nor type-checked (only its stubs are used),
# also when a tool is pointed at this directory explicitly.
_HEADER = (
    "# Written by `python -m overlay._proto.regenerate` with grpcio-tools {}: do not edit.\n"
    "# ruff: noqa\n"
    "# mypy: ignore-errors\n"
)


def proto_sources() -> list[str]:
    """Every .proto below PROTO_ROOT, as root-relative POSIX paths, sorted."""
    return sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))


def _installed_tools_version() -> str:
    from grpc_tools import grpc_version

    return str(grpc_version.VERSION)


def _rewrite(text: str, modules: set[str]) -> str:
    """Make protoc's absolute imports of our own modules package-qualified."""

    def from_import(m: re.Match[str]) -> str:
        pkg, mod, rest = m.group(1), m.group(2), m.group(3)
        if f"{pkg}.{mod}" not in modules:
            return m.group(0)
        return f"from {PACKAGE}.{pkg} import {mod}{rest}"

    def plain_import(m: re.Match[str]) -> str:
        mod, rest = m.group(1), m.group(2)
        if mod not in modules:
            return m.group(0)
        return f"from {PACKAGE} import {mod}{rest}"

    text = re.sub(r"^from ([\w.]+) import (\w+)(.*)$", from_import, text, flags=re.M)
    text = re.sub(r"^import (\w+)(.*)$", plain_import, text, flags=re.M)

    def registered(m: re.Match[str]) -> str:
        name = m.group(2)
        return f"{m.group(1)}'{PACKAGE}.{name}'" if name in modules else m.group(0)

    return re.sub(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'([\w.]+)'", registered, text)


def generate() -> dict[str, bytes]:
    """What the generated files must contain now: root-relative path → bytes.

    Also lists the ``__init__.py`` every generated subpackage needs.
    """
    sources = proto_sources()
    if not sources:
        return {}
    modules = {s.removesuffix(".proto").replace("/", ".") + "_pb2" for s in sources}
    version = _installed_tools_version()
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="overlay-proto-") as tmp:
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
            *sources,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"protoc failed ({result.returncode}): {result.stderr.strip()}")
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(tmp).as_posix()
            text = path.read_text(encoding="utf-8")
            if rel.endswith("_pb2_grpc.py") and "\nclass " not in text:
                continue  # a file without a service
            text = _HEADER.format(version) + _rewrite(text, modules)
            out[rel] = text.encode()
    for rel in list(out):
        parent = Path(rel).parent
        while parent != Path("."):
            out.setdefault((parent / "__init__.py").as_posix(), b"")
            parent = parent.parent
    return out


def _generated_on_disk() -> set[str]:
    return {
        p.relative_to(PROTO_ROOT).as_posix()
        for p in PROTO_ROOT.rglob("*")
        if p.is_file() and p.name.endswith(_SUFFIXES)
    }


def stale(expected: dict[str, bytes] | None = None) -> list[str]:
    """Root-relative paths that differ from what :func:`generate` produces
    (missing, changed, or generated files whose .proto is gone)."""
    if expected is None:
        expected = generate()
    bad = []
    for rel, data in expected.items():
        path = PROTO_ROOT / rel
        if not path.is_file() or path.read_bytes() != data:
            bad.append(rel)
    bad.extend(_generated_on_disk() - set(expected))
    return sorted(bad)


def write() -> list[str]:
    """Bring the generated files up to date; returns the paths changed."""
    expected = generate()
    changed = stale(expected)
    for rel in changed:
        path = PROTO_ROOT / rel
        if rel in expected:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(expected[rel])
        else:
            path.unlink()
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m overlay._proto.regenerate",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if the generated files are stale")
    args = parser.parse_args(argv)
    version = _installed_tools_version()
    if args.check:
        bad = stale()
        for rel in bad:
            print(f"stale: {PROTO_ROOT / rel}", file=sys.stderr)
        if bad:
            hint = "run `python -m overlay._proto.regenerate`"
            if version != GRPCIO_TOOLS_VERSION:
                hint += (f" (note: grpcio-tools {version} is installed, the files are pinned "
                         f"to {GRPCIO_TOOLS_VERSION})")
            print(hint, file=sys.stderr)
            return 1
        return 0
    if version != GRPCIO_TOOLS_VERSION:
        print(f"warning: grpcio-tools {version} is installed, not {GRPCIO_TOOLS_VERSION}: "
              "update GRPCIO_TOOLS_VERSION and the pins in pyproject.toml with it",
              file=sys.stderr)
    for rel in write():
        print(f"wrote {PROTO_ROOT / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
