"""The systemd notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ckpt_watchd.ops.notify import Notifier
from fixtures.daemon_io import read_audit


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket, as systemd's notify socket, and its path."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_each_message_is_one_exact_datagram(systemd: tuple[socket.socket, str]) -> None:
    """ready/status/watchdog/stopping send exactly the datagrams systemd parses."""
    sock, path = systemd
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    n.ready()
    n.status("watching 3 runs, 1 queued, 5 stripped")
    n.watchdog()
    n.stopping()
    n.close()
    assert [received(sock) for _ in range(4)] == [
        b"READY=1", b"STATUS=watching 3 runs, 1 queued, 5 stripped", b"WATCHDOG=1", b"STOPPING=1"]


def test_status_with_a_newline_cannot_forge_another_assignment(
        systemd: tuple[socket.socket, str]) -> None:
    """A newline in a status text is folded, so it cannot smuggle READY=1 into the datagram."""
    sock, path = systemd
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    n.status("scan done\nREADY=1")
    n.close()
    assert received(sock) == b"STATUS=scan done READY=1"


def test_extend_timeout_sends_microseconds(systemd: tuple[socket.socket, str]) -> None:
    """extend_timeout(seconds) asks systemd for that many microseconds more."""
    sock, path = systemd
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    n.extend_timeout(2.5)
    n.close()
    assert received(sock) == b"EXTEND_TIMEOUT_USEC=2500000"


def test_abstract_namespace_socket() -> None:
    """An address starting with '@' is sent to the abstract socket of that name."""
    name = f"ckpt-watchd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        n.ready()
        n.close()
        assert received(sock) == b"READY=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    """No NOTIFY_SOCKET: the notifier is disabled and sends nothing (and does not fail)."""
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.send("READY=1") is False
    n.ready()
    n.watchdog()
    n.stopping()
    n.close()
    assert n.watchdog_interval() is None


def test_send_failure_never_raises_and_is_logged_once(tmp_path: Path) -> None:
    """A socket nobody listens on: sends return False, never raise, and log one warning."""
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with capture_logs() as logs:
        assert n.send("READY=1") is False
        n.status("still here")
        n.stopping()
    n.close()
    assert [e["event"] for e in logs] == ["notify.send_failed"]
    assert logs[0]["log_level"] == "warning"


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "2000000"}, 1.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """Half of WATCHDOG_USEC, in seconds, only when WATCHDOG_PID is unset or is us."""
    assert Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent", **env}).watchdog_interval() == \
        expected


# ---------------------------------------------------------------------------- the real daemon


class Collector:
    """systemd's side: drains the socket on a thread (a full queue would block the daemon)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.messages: list[tuple[float, str]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


@pytest.mark.e2e
def test_daemon_ready_after_scan_watchdog_in_time_stopping_on_sigterm(
        tmp_path: Path, systemd: tuple[socket.socket, str]) -> None:
    """The daemon: READY=1 once every run is scanned, WATCHDOG=1 within WatchdogSec, STOPPING=1."""
    sock, address = systemd
    root = tmp_path / "runs"
    for i in range(40):
        weights = root / "train" / f"exp{i}" / "weights"
        weights.mkdir(parents=True)
        (weights / "last.pt").write_bytes(b"training")  # never quiet long enough to be touched
    config = tmp_path / "empty.toml"
    config.touch()
    watchdog_usec = 4_000_000  # WatchdogSec=4: pings every 2 s, each within 4 s of the last
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPT_WATCHD_", "WATCHDOG_"))}
    env.update(NOTIFY_SOCKET=address, WATCHDOG_USEC=str(watchdog_usec))
    audit = root / ".ckpt-watchd" / "audit.jsonl"
    collector = Collector(sock)
    with open(tmp_path / "stderr.log", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ckpt_watchd", "--root", str(root), "--config", str(config),
             "--settle", "3600", "--log-format", "json"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        discovered_at_ready = None
        while discovered_at_ready is None:
            if any(m == "READY=1" for _, m in collector.snapshot()):
                discovered_at_ready = len(read_audit(audit, "run.discovered"))
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no READY=1"
            time.sleep(0.02)  # the poll period of this wait
        assert discovered_at_ready == 40  # the start-up scan was complete before READY=1

        def pings() -> list[float]:
            return [t for t, m in collector.snapshot() if m == "WATCHDOG=1"]

        while len(pings()) < 4:
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"only {len(pings())} WATCHDOG=1"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        collector.close()
    assert returncode == 0
    messages = [m for _, m in collector.snapshot()]
    assert messages.count("READY=1") == 1
    assert messages[-1] == "STOPPING=1"
    assert any(m.startswith("STATUS=") for m in messages)
    ready_at = next(t for t, m in collector.snapshot() if m == "READY=1")
    times = [ready_at, *pings()]
    # systemd kills a service that misses WatchdogSec; pinging at half of it keeps a margin.
    assert max(b - a for a, b in itertools.pairwise(times)) < watchdog_usec / 1e6
    # ... and it is half, not every loop round: a delay can only make pings fewer, never more.
    interval = watchdog_usec / 2 / 1e6
    assert len(times) - 1 <= (times[-1] - ready_at) / interval + 2
