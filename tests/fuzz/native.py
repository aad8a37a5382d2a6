"""Build and run the libFuzzer targets under ``native/fuzz`` (clang 14).

The targets compile with ``-fsanitize=fuzzer,address,undefined`` (Debian 12:
``clang-14`` with the sanitizer and libFuzzer runtimes of
``libclang-rt-14-dev``) and link the system libnghttp2, which is not
instrumented: coverage guidance and sanitizer checks cover our code and the
harness; ASan still checks every buffer nghttp2 hands us or takes from us
through its interceptors (memcpy, malloc, free).  Binaries go to
``build/fuzz/`` and are rebuilt when a source changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "native"
HERE = Path(__file__).resolve().parent
BUILD = ROOT / "build" / "fuzz"

#: target name -> (harness source, the sources it includes)
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "grpc": ("fuzz/grpc_fuzz.c", ("ovl_grpc.c", "ovl_grpc.h")),
}

SANITIZE = "-fsanitize=fuzzer,address,undefined"
CFLAGS = ("-g", "-O1", "-std=gnu11", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined",
          "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror")
LIBS = ("-lnghttp2", "-lpthread")
#: libFuzzer flags of every run: inputs up to 64 KiB, 10 s at most per input
RUN_FLAGS = ("-max_len=65536", "-timeout=10", "-rss_limit_mb=4096", "-use_value_profile=1",
             "-print_final_stats=1")


class ToolchainMissingError(RuntimeError):
    """clang or its fuzzer/sanitizer runtimes are not installed."""


def clang() -> str:
    for name in ("clang-14", "clang"):
        path = shutil.which(name)
        if path:
            return path
    raise ToolchainMissingError("clang is not installed (Debian 12: apt-get install clang-14 "
                           "libclang-rt-14-dev; .ci/setup installs them)")


def corpus(target: str) -> Path:
    """The committed seed corpus."""
    return HERE / "corpus" / target


def regressions(target: str) -> Path:
    """The committed inputs of past findings, replayed by the tests."""
    return HERE / "regressions" / target


def dictionary(target: str) -> Path | None:
    path = HERE / f"{target}.dict"
    return path if path.exists() else None


def _digest(target: str, flags: tuple[str, ...]) -> str:
    source, includes = TARGETS[target]
    h = hashlib.sha256(" ".join(flags).encode())
    for name in (source, *includes):
        h.update((NATIVE / name).read_bytes())
    return h.hexdigest()[:16]


def build(target: str, *, coverage: bool = False) -> Path:
    """The target's binary, compiled unless an up-to-date one exists.

    ``coverage``: a plain binary with clang's source-based coverage
    (``-fprofile-instr-generate -fcoverage-mapping``) and libFuzzer's driver
    only, for ``llvm-cov`` reports over a corpus."""
    source, _ = TARGETS[target]
    if coverage:
        flags: tuple[str, ...] = ("-fsanitize=fuzzer", "-fprofile-instr-generate",
                                  "-fcoverage-mapping", *CFLAGS)
    else:
        flags = (SANITIZE, *CFLAGS)
    out = BUILD / f"{target}{'-cov' if coverage else ''}"
    stamp = out.with_suffix(".sha")
    digest = _digest(target, flags)
    if out.exists() and stamp.exists() and stamp.read_text() == digest:
        return out
    BUILD.mkdir(parents=True, exist_ok=True)
    cmd = [clang(), *flags, f"-I{NATIVE}", str(NATIVE / source), *LIBS, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        missing = re.search(r"cannot find .*(fuzzer|asan|ubsan)|libclang_rt", proc.stderr)
        err = ToolchainMissingError if missing else RuntimeError
        raise err(f"building the {target} fuzz target failed: {' '.join(cmd)}\n{proc.stderr}")
    stamp.write_text(digest)
    return out


@dataclass
class Result:
    """What one libFuzzer run did."""

    target: str
    returncode: int
    executions: int = 0
    exec_per_sec: int = 0
    cov: int = 0
    ft: int = 0
    corpus_units: int = 0
    new_units: int = 0
    seconds: float = 0.0
    artifacts: list[Path] = field(default_factory=list)
    log: str = ""

    @property
    def found(self) -> bool:
        return self.returncode != 0 or bool(self.artifacts)

    def summary(self) -> str:
        return (f"{self.target}: {self.executions} executions in {self.seconds:.0f} s "
                f"({self.exec_per_sec}/s), cov {self.cov}, ft {self.ft}, "
                f"corpus {self.corpus_units} ({self.new_units} new)")


def _parse(result: Result, log: str) -> None:
    result.log = log
    for m in re.finditer(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", log):
        result.executions = int(m.group(1))
        result.cov, result.ft, result.corpus_units = map(int, m.group(2, 3, 4))
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    result.executions = int(stats.get("number_of_executed_units", result.executions))
    result.exec_per_sec = int(stats.get("average_exec_per_sec", 0))
    result.new_units = int(stats.get("new_units_added", 0))


def fuzz(target: str, work: Path, seconds: int, *, jobs: int = 1,
         extra: tuple[str, ...] = ()) -> Result:
    """Fuzz ``target`` for ``seconds``: new inputs go to ``work/corpus`` (the
    committed corpus is read, never written), findings to ``work/artifacts``."""
    binary = build(target)
    new = work / "corpus"
    artifacts = work / "artifacts"
    new.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    args = [str(binary), *RUN_FLAGS, f"-max_total_time={seconds}",
            f"-artifact_prefix={artifacts}/"]
    d = dictionary(target)
    if d:
        args.append(f"-dict={d}")
    if jobs > 1:
        args += [f"-fork={jobs}", "-ignore_crashes=0"]
    args += [*extra, str(new), str(corpus(target))]
    if regressions(target).exists():
        args.append(str(regressions(target)))
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace",
                          check=False, env={**os.environ, "ASAN_OPTIONS": _asan_options()})
    result = Result(target, proc.returncode, seconds=seconds)
    _parse(result, proc.stderr + proc.stdout)
    result.artifacts = sorted(p for p in artifacts.iterdir() if p.is_file())
    return result


def replay(target: str, inputs: list[Path]) -> subprocess.CompletedProcess[str]:
    """Run the target once over each input (no fuzzing): the regression check."""
    binary = build(target)
    return subprocess.run([str(binary), "-runs=1", *map(str, inputs)], capture_output=True,
                          text=True, errors="replace", check=False,
                          env={**os.environ, "ASAN_OPTIONS": _asan_options()})


def merge(target: str, work: Path) -> subprocess.CompletedProcess[str]:
    """Fold ``work/corpus`` into the committed corpus, keeping only inputs that
    add coverage (libFuzzer's -merge=1)."""
    binary = build(target)
    return subprocess.run([str(binary), "-merge=1", *RUN_FLAGS, str(corpus(target)),
                           str(work / "corpus")], capture_output=True, text=True,
                          errors="replace", check=False)


def coverage_report(target: str, inputs: list[Path], work: Path) -> str:
    """llvm-cov's line and branch report of the target's sources over ``inputs``."""
    binary = build(target, coverage=True)
    profraw = work / f"{target}.profraw"
    profdata = work / f"{target}.profdata"
    files = [str(p) for d in inputs for p in sorted(d.iterdir()) if p.is_file()]
    subprocess.run([str(binary), "-runs=1", *files], capture_output=True, check=True,
                   env={**os.environ, "LLVM_PROFILE_FILE": str(profraw)})
    subprocess.run([_tool("llvm-profdata"), "merge", "-sparse", str(profraw), "-o",
                    str(profdata)], check=True)
    _, includes = TARGETS[target]
    sources = [str(NATIVE / n) for n in includes if n.endswith(".c")]
    proc = subprocess.run([_tool("llvm-cov"), "report", str(binary),
                           f"-instr-profile={profdata}", *sources],
                          capture_output=True, text=True, check=True)
    return proc.stdout


def _tool(name: str) -> str:
    for candidate in (f"{name}-14", name):
        path = shutil.which(candidate)
        if path:
            return path
    raise ToolchainMissingError(f"{name} is not installed (Debian 12: apt-get install llvm-14)")


def _asan_options() -> str:
    # leaks are findings; an abort gives libFuzzer the crash and the input
    return ":".join(("detect_leaks=1", "abort_on_error=1", "allocator_may_return_null=1",
                     os.environ.get("ASAN_OPTIONS", "")))
