"""``ovl serve`` as a real process: socket, systemd protocol, signals, metrics."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.client import RemoteSnapshotter
from overlay.errors import NotFoundError, UnavailableError
from overlay.overlayfs import OverlaySnapshotter
from overlay.snapshots import Info
from tests.helpers import wait_for_socket

SERVE = [sys.executable, "-m", "overlay.cli", "serve"]


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([*SERVE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


@pytest.fixture
def daemon(tmpfs: Path, sockdir: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[str]]]:
    root, sock = tmpfs / "root", sockdir / "ovl.sock"
    proc = start(["--root", str(root), "--address", str(sock)])
    try:
        wait_for_socket(sock, proc, "ovl serve")
        yield root, sock, proc
    finally:
        stop(proc)


def test_socket_is_0660_root_and_serves(daemon: tuple[Path, Path, subprocess.Popen[str]]
                                        ) -> None:
    root, sock, proc = daemon
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, 0)
    with RemoteSnapshotter(str(sock)) as client:
        client.prepare("k")
        client.commit("K", "k")
        assert client.stat("K").parent == ""
    code, err = stop(proc)
    assert code == 0, err
    assert not sock.exists()
    # the store was closed cleanly and keeps the data
    s = OverlaySnapshotter(root)
    try:
        assert [i.name for i in _walk(s)] == ["K"]
    finally:
        s.close()


def _walk(s: OverlaySnapshotter | RemoteSnapshotter) -> list[Info]:
    out: list[Info] = []
    s.walk(out.append)
    return out


def test_stale_socket_is_replaced_live_one_refused(tmpfs: Path, sockdir: Path) -> None:
    sock = sockdir / "ovl.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # a socket file nobody listens on
    first = start(["--root", str(tmpfs / "a"), "--address", str(sock)])
    try:
        wait_for_socket(sock, first, "ovl serve")
        second = start(["--root", str(tmpfs / "b"), "--address", str(sock)])
        second.wait(timeout=60)
        code, err = stop(second)
        assert code == 4, err  # already exists
        assert "already listening" in err
        with RemoteSnapshotter(str(sock)) as client:
            client.prepare("still-first")
        assert (tmpfs / "a" / "snapshots" / "1").is_dir()
    finally:
        code, err = stop(first)
    assert code == 0, err


def test_sigterm_drains_in_flight_calls(daemon: tuple[Path, Path, subprocess.Popen[str]]
                                        ) -> None:
    root, sock, proc = daemon
    with RemoteSnapshotter(str(sock)) as client:
        client.prepare("big")
        fs = root / "snapshots" / "1" / "fs"
        fd = os.open(fs, os.O_RDONLY | os.O_DIRECTORY)
        for d in range(200):
            os.mkdir(f"d{d}", dir_fd=fd)
            for i in range(1000):
                os.close(os.open(f"d{d}/f{i}", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        os.close(fd)
        results: list[object] = []

        def slow() -> None:
            try:
                results.append(client.usage("big"))
            except Exception as exc:
                results.append(exc)

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        code, err = stop(proc)
        assert code == 0, err
        assert len(results) == 1
        usage = results[0]
        # either it finished before the signal or it was drained: never cut off
        assert not isinstance(usage, Exception), usage
        assert getattr(usage, "inodes", 0) == 200 * 1000 + 200 + 1
        with pytest.raises(UnavailableError):
            client.stat("big")


def test_signals_until_exit_never_kill_it(daemon: tuple[Path, Path, subprocess.Popen[str]]
                                         ) -> None:
    """SIGTERM after SIGTERM, through the drain, the close and the exit: the
    daemon still ends with status 0 (a signal landing while the interpreter
    finalizes would otherwise kill it)."""
    _root, sock, proc = daemon
    with RemoteSnapshotter(str(sock)) as client:
        client.prepare("k")
    sent = 0
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM if sent % 2 == 0 else signal.SIGINT)
            sent += 1
        time.sleep(0.001)
    code, err = stop(proc)
    assert sent >= 2
    assert code == 0, err


def test_systemd_notify_and_socket_activation(tmpfs: Path, sockdir: Path) -> None:
    notify_path = sockdir / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    activated = sockdir / "activated.sock"
    listener.bind(str(activated))
    listener.listen(16)
    fd = listener.fileno()

    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "LISTEN_FDS": "1"}
    # LISTEN_PID must name the daemon itself, and the socket must be fd 3: a
    # small launcher sets both, then execs the daemon in its place (as systemd)
    launcher = (
        "import os, sys\n"
        f"if {fd} != 3:\n    os.dup2({fd}, 3)\n    os.close({fd})\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    cmd = [sys.executable, "-c", launcher, *SERVE, "--root",
           str(tmpfs / "root"), "--address", str(sockdir / "unused.sock")]
    proc = subprocess.Popen(cmd, env=env, pass_fds=(fd,),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listener.close()
    try:
        try:
            first = notify.recv(4096)
        except TimeoutError:
            first = b"(nothing)"
        if first != b"READY=1":
            raise AssertionError(f"{first!r}: {stop(proc)}")
        assert not (sockdir / "unused.sock").exists()
        with RemoteSnapshotter(str(activated)) as client:
            client.prepare("via-activation")
            assert client.stat("via-activation").name == "via-activation"
            for i in range(20):
                client.prepare(f"k{i}")
            assert len(_walk(client)) == 21
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
    finally:
        code, err = stop(proc)
        notify.close()
    assert code == 0, err


def test_metrics(tmpfs: Path, sockdir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock = sockdir / "ovl.sock"
    proc = start(["--root", str(tmpfs / "root"), "--address", str(sock),
                  "--metrics-address", f"127.0.0.1:{port}"])
    try:
        wait_for_socket(sock, proc, "ovl serve")
        with RemoteSnapshotter(str(sock)) as client:
            client.prepare("a")
            client.prepare("b")
            client.commit("B", "b")
            client.remove("a")
            with pytest.raises(NotFoundError):
                client.stat("missing")
            client.cleanup()
        deadline = time.monotonic() + 20
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            settled = ("overlay_cleanup_backlog_directories 0.0" in text
                       and "overlay_grpc_connections 0.0" in text)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert 'overlay_rpc_duration_seconds_count{method="Prepare"} 2.0' in text
        assert 'overlay_rpc_requests_total{code="NOT_FOUND",method="Stat"} 1.0' in text
        assert 'overlay_rpc_requests_total{code="OK",method="Cleanup"} 1.0' in text
        assert 'overlay_snapshots{kind="committed"} 1.0' in text
        assert 'overlay_snapshots{kind="active"} 0.0' in text
        assert "overlay_cleanup_backlog_directories 0.0" in text
        assert 'overlay_metadata_bytes{what="used"}' in text
        # the client above closed its one connection
        assert "overlay_grpc_connections 0.0" in text
        # ours, and wait_for_socket's probes if the server took them
        accepted = re.search(r"^overlay_grpc_connections_accepted_total (\S+)$", text, re.M)
        assert accepted is not None and float(accepted.group(1)) >= 1
        assert "overlay_grpc_pending_calls 0.0" in text
        assert "overlay_grpc_rejected_requests_total 0.0" in text
        assert "overlay_grpc_shed_connections_total 0.0" in text
        assert "overlay_grpc_buffered_bytes 0.0" in text
    finally:
        code, err = stop(proc)
    assert code == 0, err


def test_config_file_and_flags(tmpfs: Path, sockdir: Path) -> None:
    config = tmpfs / "config.toml"
    sock = sockdir / "ovl.sock"
    config.write_text(f'root = "{tmpfs / "from-file"}"\naddress = "{sock}"\n'
                      'upperdir_label = true\nlog_level = "debug"\n')
    proc = start(["--config", str(config), "--root", str(tmpfs / "from-flag")])
    try:
        wait_for_socket(sock, proc, "ovl serve")
        with RemoteSnapshotter(str(sock)) as client:
            client.prepare("k")
            labels = client.stat("k").labels
        assert labels["containerd.io/snapshot/overlay.upperdir"] == str(
            tmpfs / "from-flag" / "snapshots" / "1" / "fs")
        assert not (tmpfs / "from-file").exists()
    finally:
        code, err = stop(proc)
    assert code == 0, err

    config.write_text('root = "/x"\nsync_remove = "yes"\n')
    bad = subprocess.run([*SERVE, "--config", str(config)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 6
    assert "sync_remove must be a bool" in bad.stderr
    config.write_text('rooot = "/x"\n')
    bad = subprocess.run([*SERVE, "--config", str(config)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 6
    assert "unknown key 'rooot'" in bad.stderr
    missing = subprocess.run([*SERVE, "--config", str(tmpfs / "nope.toml")],
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 6
    assert "does not exist" in missing.stderr
