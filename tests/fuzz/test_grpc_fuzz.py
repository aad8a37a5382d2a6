"""The libFuzzer target of the gRPC transport (native/fuzz/grpc_fuzz.c), in CI.

Every past finding's input is replayed; the seed corpus is replayed; then
the target fuzzes for a bounded time (``OVL_FUZZ_SECONDS``, 30 s by default)
and any crash, sanitizer report, leak or timeout fails the test with the
input's path.  Without clang and its runtimes the tests skip locally and
fail under ``CI=true``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz import native

SECONDS = int(os.environ.get("OVL_FUZZ_SECONDS", "30"))


@pytest.fixture(scope="module")
def built() -> Iterator[Path]:
    try:
        yield native.build("grpc")
    except native.ToolchainMissingError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the fuzz toolchain is missing (CI=true: this must not skip): {exc}")
        pytest.skip(str(exc))


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


@pytest.mark.parametrize("kind", ["regressions", "corpus"])
def test_replay(built: Path, kind: str) -> None:
    """Each kept input runs clean (the regressions failed before their fix)."""
    d = native.regressions("grpc") if kind == "regressions" else native.corpus("grpc")
    inputs = _files(d)
    assert inputs, f"no inputs in {d}"
    proc = native.replay("grpc", inputs)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stderr.count("Executed ") == len(inputs)


@pytest.mark.slow
def test_fuzz_for_a_bounded_time(built: Path, tmp_path: Path) -> None:
    result = native.fuzz("grpc", tmp_path, SECONDS)
    print(result.summary())
    found = [f"{p}: {base64.b64encode(p.read_bytes()[:4096]).decode()}"
             for p in result.artifacts]
    assert not result.found, (
        f"the grpc fuzz target found something (exit {result.returncode}); keep the input in "
        f"{native.regressions('grpc')} with its fix:\n" + "\n".join(found)
        + "\n" + result.log[-6000:])
    assert result.executions > 0, result.log[-3000:]
