"""The benchmarks run (tiny trees, timing disabled): they must not rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_smoke() -> None:
    env = {**os.environ, "BENCH_SCALE": "0.01"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--benchmark-disable", "-q", "-p",
         "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
