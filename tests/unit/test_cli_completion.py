"""``ovl completion bash``: a script bash accepts, offering the real commands."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from overlay.cli import main


@pytest.fixture
def script(tmp_path: Path) -> Path:
    out = io.StringIO()
    assert main(["completion", "bash"], stdout=out) == 0
    path = tmp_path / "ovl.bash"
    path.write_text(out.getvalue())
    return path


def complete(script: Path, line: str) -> list[str]:
    probe = (f'source "{script}"; COMP_WORDS=({line}); '
             + ('COMP_WORDS+=(""); ' if line.endswith(" ") else "")
             + 'COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _ovl; printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    return [w for w in result.stdout.splitlines() if w]


def test_bash_accepts_it(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("ovl s", ["serve", "snapshots", "snapshot", "sn"]),
        ("ovl snapshots co", ["commit"]),
        ("ovl sn rm --a", ["--address"]),
        ("ovl snapshots ls --root /some/dir --fo", ["--format"]),
        ("ovl snapshots info some-key --ti", ["--timeout"]),
        ("ovl serve --metrics", ["--metrics-address"]),
        ("ovl completion ", ["--help", "-h", "bash"]),
        ("ovl completion b", ["bash"]),
    ],
)
def test_offers(script: Path, line: str, expected: list[str]) -> None:
    assert complete(script, line) == expected
