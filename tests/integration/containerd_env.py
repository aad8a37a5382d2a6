"""A private containerd driving our daemon (``ovl serve``) as proxy snapshotter "ovl".

``containerd_stack(workdir)`` starts ``python -m overlay.cli serve`` and a
containerd with its own root, state and socket (the CRI plugin disabled), whose
``proxy_plugins.ovl`` points at our socket, and yields a :class:`Stack`.  At
exit, whatever happened: tasks and containers are force-deleted, containerd is
stopped (and any runc shim it left is killed, by pid), every mount under
``workdir`` (rootfs mounts in containerd's state dir, Diff temp mounts in its
root) is detached, and our daemon is stopped.  ``ctr run`` is given
``--runc-root`` in the work directory, so runc's state stays there too.
:meth:`Stack.logs_on_failure` attaches both daemons' logs to a failure.

The sockets live in a short private directory under /tmp (a unix socket path
is limited to 107 bytes); everything else lives in ``workdir``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from overlay.client import RemoteSnapshotter
from overlay.snapshots import Info
from tests.helpers import unmount_all_under, wait_for_socket
from tests.integration.oci_image import BUSYBOX

__all__ = [
    "PLUGIN",
    "REQUIRED_BINARIES",
    "Stack",
    "containerd_stack",
    "require_containerd",
    "wait_until",
]

#: the proxy plugin name containerd knows our daemon by
PLUGIN = "ovl"
REQUIRED_BINARIES = ("containerd", "ctr", "runc", "containerd-shim-runc-v2")
LOG_TAIL_LINES = 150
PT_INTERP = 3


def _static_elf(path: Path) -> bool:
    """An ELF executable without a program interpreter (PT_INTERP)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit little-endian only
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != PT_INTERP
               for i in range(phnum))


def require_containerd() -> None:
    """containerd, ctr, runc and a static busybox (the image's only binary);
    skips locally, fails under CI=true."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if not _static_elf(BUSYBOX):
        missing.append(f"a static {BUSYBOX} (busybox-static)")
    if missing:
        message = f"containerd end-to-end test: missing {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: this must not skip; see .ci/setup)")
        pytest.skip(message)


def wait_until(predicate: Callable[[], bool], what: Callable[[], str], timeout: float = 30.0,
               interval: float = 0.1) -> None:
    """Poll ``predicate`` until true; after ``timeout`` seconds fail with ``what()``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what()}")
        time.sleep(interval)


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -signal.SIGKILL
    return proc.returncode


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return [f"<{exc}>"]


def _log_excerpt(name: str, path: Path) -> str:
    """A log's warnings and errors, then its tail: enough to explain a failure
    even when debug chatter pushed the cause out of the tail."""
    lines = _read_lines(path)
    bad = [line for line in lines
           if any(w in line for w in ("level=error", "level=warning", "level=fatal",
                                      " ERROR ", " WARNING ", "Traceback"))]
    return (f"--- {name}: warnings and errors ({path}) ---\n" + "\n".join(bad[-50:]) +
            f"\n--- {name}: last {LOG_TAIL_LINES} lines ---\n" +
            "\n".join(lines[-LOG_TAIL_LINES:]))


@dataclass
class Stack:
    workdir: Path
    sockdir: Path
    root: Path
    """our snapshotter's root"""
    ovl_sock: Path
    ctd_sock: Path
    ctd_root: Path
    ctd_state: Path
    ovl_log: Path
    ctd_log: Path
    runc_root: Path
    """for ``ctr run --runc-root``: keeps runc's state out of /run/containerd/runc"""
    daemon: subprocess.Popen[bytes] | None = None
    containerd: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ containerd

    def ctr(self, namespace: str, *args: str, timeout: float = 60.0) -> str:
        """Run ``ctr -a <sock> -n <namespace> args…``; its stdout, or AssertionError."""
        cmd = ["ctr", "-a", str(self.ctd_sock), "-n", namespace, *args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{' '.join(cmd)}: no answer within {timeout:g}s") from exc
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}\n"
                                 f"stdout: {done.stdout}\nstderr: {done.stderr}")
        return done.stdout

    def stop_containerd(self) -> None:
        """Delete every task and container, stop containerd, kill any shim it
        left (by pid), detach every mount under the work directory."""
        if self.containerd is not None and self.containerd.poll() is None:
            with contextlib.suppress(AssertionError):
                self._delete_tasks()
        if self.containerd is not None:
            _stop(self.containerd, timeout=20)
        self._kill_shims()
        unmount_all_under(self.workdir)

    def _delete_tasks(self) -> None:
        for ns in self.ctr("default", "namespaces", "ls", "-q", timeout=10).split():
            for task in self.ctr(ns, "tasks", "ls", "-q", timeout=10).split():
                with contextlib.suppress(AssertionError):
                    self.ctr(ns, "tasks", "kill", "-s", "SIGKILL", task, timeout=10)
                with contextlib.suppress(AssertionError):
                    self.ctr(ns, "tasks", "rm", "-f", task, timeout=10)
            for container in self.ctr(ns, "containers", "ls", "-q", timeout=10).split():
                with contextlib.suppress(AssertionError):
                    self.ctr(ns, "containers", "rm", container, timeout=10)

    def _kill_shims(self) -> None:
        # shims outlive containerd by design; ours carry `-address <our socket>`
        mine = [b"-address", os.fsencode(self.ctd_sock)]
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(argv[i:i + 2] == mine for i in range(len(argv) - 1)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)

    # ------------------------------------------------------------ our daemon

    def backend(self) -> list[Info]:
        """Every snapshot our daemon holds, asked on our socket (no namespace)."""
        infos: list[Info] = []
        with RemoteSnapshotter(str(self.ovl_sock), timeout=30) as remote:
            remote.walk(infos.append)
        return sorted(infos, key=lambda i: i.name)

    def snapshot_dirs(self) -> list[str]:
        return sorted(os.listdir(self.root / "snapshots"))

    def trash(self) -> list[str]:
        return sorted(os.listdir(self.root / "trash"))

    def stop_daemon(self) -> int:
        """SIGTERM our daemon; its exit status."""
        assert self.daemon is not None
        return _stop(self.daemon, timeout=60)

    # ------------------------------------------------------------ diagnostics

    def logs(self) -> str:
        return (_log_excerpt("containerd log", self.ctd_log) + "\n" +
                _log_excerpt("ovl serve log", self.ovl_log))

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Attach both daemons' logs to any exception raised inside."""
        try:
            yield
        except BaseException as exc:
            exc.add_note(self.logs())
            raise


def _config(stack: Stack, proxies: Mapping[str, Path]) -> str:
    more = "".join(f'\n[proxy_plugins.{name}]\n  type = "snapshot"\n  address = "{sock}"\n'
                   for name, sock in proxies.items())
    return f"""\
version = 2
root = "{stack.ctd_root}"
state = "{stack.ctd_state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{stack.ctd_sock}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{stack.workdir / 'opt'}"

[proxy_plugins.{PLUGIN}]
  type = "snapshot"
  address = "{stack.ovl_sock}"
""" + more


@contextlib.contextmanager
def containerd_stack(workdir: Path, *, log_level: str = "debug",
                     snapshotters: Sequence[str] = (PLUGIN,),
                     proxies: Mapping[str, Path] | None = None) -> Iterator[Stack]:
    """Our daemon and a private containerd using it; both always stopped.

    Both log at ``log_level``; containerd must report every one of
    ``snapshotters`` working.  ``proxies`` adds more proxy snapshotters
    (name -> socket of a service the caller runs) beside ours."""
    require_containerd()
    sockdir = Path(tempfile.mkdtemp(prefix="ovl-ctd-", dir="/tmp"))
    stack = Stack(
        workdir=workdir, sockdir=sockdir, root=workdir / "ovl",
        ovl_sock=sockdir / "ovl.sock", ctd_sock=sockdir / "ctd.sock",
        ctd_root=workdir / "containerd" / "root", ctd_state=workdir / "containerd" / "state",
        ovl_log=workdir / "ovl.log", ctd_log=workdir / "containerd.log",
        runc_root=workdir / "containerd" / "runc",
    )
    assert len(str(stack.ctd_sock)) + len(".ttrpc") < 108
    try:
        with open(stack.ovl_log, "wb") as log:
            stack.daemon = subprocess.Popen(
                [sys.executable, "-m", "overlay.cli", "serve", "--root", str(stack.root),
                 "--address", str(stack.ovl_sock), "--log-level", log_level],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        with stack.logs_on_failure():
            wait_for_socket(stack.ovl_sock, stack.daemon, "ovl serve")
        config = workdir / "containerd.toml"
        config.write_text(_config(stack, proxies or {}))
        with open(stack.ctd_log, "wb") as log:
            stack.containerd = subprocess.Popen(
                ["containerd", "--config", str(config), "--log-level", log_level],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        with stack.logs_on_failure():
            wait_for_socket(stack.ctd_sock, stack.containerd, "containerd")
            plugins = stack.ctr("default", "plugins", "ls")
            for name in snapshotters:
                if not any(line.split()[:2] == ["io.containerd.snapshotter.v1", name]
                           and line.split()[-1] == "ok" for line in plugins.splitlines()):
                    raise AssertionError(f"containerd has no working snapshotter {name}:\n"
                                         + plugins)
        yield stack
    finally:
        try:
            stack.stop_containerd()
        finally:
            if stack.daemon is not None:
                _stop(stack.daemon, timeout=60)
            shutil.rmtree(sockdir, ignore_errors=True)
