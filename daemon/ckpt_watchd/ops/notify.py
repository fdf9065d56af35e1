"""The systemd notify protocol (sd_notify) over $NOTIFY_SOCKET, without python-systemd.

It owns the datagram socket, the message format (READY=1, STATUS=, WATCHDOG=1, STOPPING=1) and
the reading of WATCHDOG_USEC/WATCHDOG_PID. It decides nothing about *when* to send: the service
does. It never raises on a failed send, because a missing supervisor must not stop the daemon.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("ckpt_watchd.ops.notify")


class Notifier:
    """Sends notify datagrams to one socket; a Notifier without a socket does nothing."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None,
                 watchdog_pid: int | None = None) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._failed_once = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """A Notifier for $NOTIFY_SOCKET, or a no-op one when the variable is unset or empty."""
        address = environ.get("NOTIFY_SOCKET") or None
        return cls(address, watchdog_usec=_positive_int(environ.get("WATCHDOG_USEC")),
                   watchdog_pid=_positive_int(environ.get("WATCHDOG_PID")))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self) -> None:
        self.send("READY=1")

    def status(self, text: str) -> None:
        # A newline would start a new assignment in the datagram and could forge READY=1 etc.
        self.send("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more start-up or stop time (a slow first scan, a long drain)."""
        self.send(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when not asked for."""
        if self._watchdog_usec is None:
            return None
        # systemd sets WATCHDOG_PID so that a child that inherited the environment does not ping.
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def send(self, *assignments: str) -> bool:
        """Send one datagram of newline-separated VAR=value lines; False if it was not delivered."""
        if self.address is None:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, _sockaddr(self.address))
        except OSError as e:
            if not self._failed_once:
                self._failed_once = True
                log.warning("notify.send_failed", socket=self.address, error=str(e))
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _sockaddr(address: str) -> str | bytes:
    # '@name' is the abstract namespace, spelled with a leading NUL byte on the wire.
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n > 0 else None
