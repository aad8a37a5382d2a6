"""Build the Go programs under ``tests/integration/go/`` offline, once per source.

They are built from Debian 12's packages only (``golang-go``,
``golang-google-grpc-dev``, ``golang-github-containerd-containerd-dev``: the
lock's ``# apt:`` lines), in GOPATH mode against the sources Debian installs
under ``/usr/share/gocode/src``, with modules, the module proxy and toolchain
downloads switched off: nothing is fetched.

``build(program)`` returns the path of the program's binary in the cache
(``$OVERLAY_GO_CACHE``, else ``~/.cache/overlay/go``), keyed by a hash of the
program's sources, the Go version and the Debian packages' versions: a
machine builds each version of a program once, whoever asks (the tests, the
benchmarks, several runs at once: a file lock serialises the builds), and a
change to any of them builds anew.  Go's own build cache lives there too, so
a rebuild compiles only what changed.  Old versions are left in place (a
binary another run is about to start must not vanish): the directory can be
deleted at any time.  Binaries are never committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["GO_DIR", "PACKAGES", "build", "cache_dir", "go", "missing", "require_go"]

GO_DIR = Path(__file__).resolve().parent / "go"
GOPATH = Path("/usr/share/gocode")
#: the Debian packages the programs are built from, and a source each installs
PACKAGES = {
    "golang-go": None,
    "golang-google-grpc-dev": GOPATH / "src/google.golang.org/grpc",
    "golang-github-containerd-containerd-dev": GOPATH / "src/github.com/containerd/containerd",
}
CACHE_ENV = "OVERLAY_GO_CACHE"
BUILD_TIMEOUT = 900.0


def cache_dir() -> Path:
    raw = os.environ.get(CACHE_ENV)
    if raw:
        return Path(raw)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "overlay" / "go"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "GO111MODULE": "off",  # GOPATH mode: imports resolve in Debian's tree
        "GOPATH": str(GOPATH),
        "GOFLAGS": "",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",  # a newer go would otherwise fetch toolchains
        "GOENV": "off",  # no user go.env may change any of this
        "GOCACHE": str(cache_dir() / "gocache"),
    }


def missing() -> list[str]:
    """What the builds need and this machine lacks (empty when all is there)."""
    out = []
    if shutil.which("go") is None:
        out.append("the go command (golang-go)")
    out += [f"{source} ({package})" for package, source in PACKAGES.items()
            if source is not None and not source.is_dir()]
    return out


def require_go() -> None:
    """Go and the Debian Go packages; skips locally, fails under CI=true."""
    lacking = missing()
    if lacking:
        message = f"Go programs: missing {', '.join(lacking)}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: this must not skip; see .ci/setup)")
        pytest.skip(message)


def go(*args: str, cwd: Path = GO_DIR, timeout: float = BUILD_TIMEOUT
       ) -> subprocess.CompletedProcess[str]:
    """``go args...`` offline in GOPATH mode (see the module doc); not checked."""
    return subprocess.run(["go", *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def _key(program: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in program.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(program)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    versions = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", *PACKAGES],
        capture_output=True, text=True, check=False)
    digest.update(versions.stdout.encode() + versions.stderr.encode())
    digest.update(go("version").stdout.encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(program: str) -> Path:
    """The binary of ``tests/integration/go/<program>``, built if its key is new.

    Raises AssertionError with go's output when the build fails."""
    source = GO_DIR / program
    if not source.is_dir():
        raise ValueError(f"no Go program {program!r} in {GO_DIR}")
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / f"{program}-{_key(source)}"
    with _locked(directory):
        if binary.exists():
            return binary
        partial = binary.with_name(binary.name + ".partial")
        done = go("build", "-trimpath", "-o", str(partial), ".", cwd=source)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise AssertionError(f"go build of {source} failed ({done.returncode}):\n"
                                 f"{done.stdout}{done.stderr}")
        os.replace(partial, binary)
    return binary
