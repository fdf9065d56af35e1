"""Audit trail and logging: the event names, the Auditor (one JSON object per line) and the one
place structlog is configured.

It renders and writes; it decides nothing. Callers emit an event only after what it reports has
happened. No torch, no clock of its own beyond the timestamp structlog stamps on each line.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

import structlog

from ckpt_watchd.errors import StartupError
from ckpt_watchd.outcome import FAILED, INCOMPLETE, SKIPPED, STRIPPED, WOULD_STRIP, Outcome

DAEMON_STARTED = "daemon.started"
DAEMON_STOPPED = "daemon.stopped"
RUN_DISCOVERED = "run.discovered"
RUN_FINISHED = "run.finished"
RUN_KEPT = "run.kept"
RUN_FORGOTTEN = "run.forgotten"
RUN_BUSY = "run.busy"
CKPT_STRIPPED = "ckpt.stripped"
CKPT_SKIPPED = "ckpt.skipped"
CKPT_FAILED = "ckpt.failed"
CKPT_WOULD_STRIP = "ckpt.would_strip"
CKPT_INCOMPLETE = "ckpt.incomplete"
CKPT_VANISHED = "ckpt.vanished"
CKPT_SUPERSEDED = "ckpt.superseded"
WARNING = "daemon.warning"

_WARNING_EVENTS = frozenset({CKPT_FAILED, WARNING})
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure_logging(log_format: str, level: str, stream: TextIO | None = None) -> None:
    """Set up the stderr log: `console` (colours only on a tty) or `json`; UTC ISO timestamps.

    `stream`: where the lines go instead of stderr itself (`--once`'s progress bar hands a
    stream that keeps them out of the bar)."""
    out = stream if stream is not None else sys.stderr
    if log_format not in ("console", "json"):
        raise ValueError(f"unknown log format {log_format!r}")
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer(default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        # caching would pin loggers to this configuration and defeat capture_logs in tests
        cache_logger_on_first_use=False,
    )


def _event_first(_logger: Any, _name: str, event_dict: Any) -> Any:
    # readers scan the first key; structlog itself puts `event` last
    return {"event": event_dict.pop("event"), "timestamp": event_dict.pop("timestamp"),
            **event_dict}


class Auditor:
    """Appends audit events to one file (flushed per line) and echoes them to the stderr log."""

    def __init__(self, path: Path, file: TextIO) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = file
        self._logger = self._wrap(file)
        self._stderr = structlog.get_logger("ckpt_watchd")

    @classmethod
    def open(cls, path: Path) -> Auditor:
        path = Path(path).absolute()
        return cls(path, cls._open_file(path))

    @staticmethod
    def _open_file(path: Path) -> TextIO:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # never block on a FIFO or write through a symlink someone put in our place
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StartupError(f"audit log {path} cannot be opened for writing: "
                               f"{e.strerror or e}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StartupError(f"audit log {path} is not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "a", encoding="utf-8")

    @staticmethod
    def _wrap(file: TextIO) -> Any:
        return structlog.wrap_logger(
            structlog.WriteLogger(file),
            processors=[structlog.processors.TimeStamper(fmt="iso", utc=True), _event_first,
                        structlog.processors.JSONRenderer(default=str)],
            wrapper_class=structlog.BoundLogger,
        )

    def emit(self, event: str, **fields: Any) -> None:
        with self._lock:
            self._logger.info(event, **fields)
        log = self._stderr.warning if event in _WARNING_EVENTS else self._stderr.info
        log(event, **fields)

    def reopen(self) -> None:
        """Close and reopen the path (SIGHUP after logrotate moved the file away)."""
        with self._lock:
            new = self._open_file(self.path)
            old, self._file = self._file, new
            self._logger = self._wrap(new)
            old.close()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def outcome_event(outcome: Outcome, *, run: str, attempt: int) -> tuple[str, dict[str, Any]]:
    """The audit event name and flat fields for one job's Outcome."""
    o = outcome
    if o.status == STRIPPED:
        fields: dict[str, Any] = {
            "path": o.path, "run": run, "profile": o.profile, "bytes_before": o.bytes_before,
            "bytes_after": o.bytes_after, "sha256_before": o.sha256_before,
            "sha256_after": o.sha256_after, "duration_s": round(o.duration_s, 3)}
        if o.output is not None:
            fields["output"] = o.output
        if o.reason is not None:  # a folder's files of unknown purpose, kept
            fields["note"] = o.reason
        return CKPT_STRIPPED, fields
    if o.status == WOULD_STRIP:
        fields = {"path": o.path, "run": run, "profile": o.profile,
                  "bytes_before": o.bytes_before, "bytes_after": o.bytes_after}
        if o.reason is not None:
            fields["note"] = o.reason
        return CKPT_WOULD_STRIP, fields
    if o.status == SKIPPED:
        return CKPT_SKIPPED, {"path": o.path, "run": run, "reason": o.reason}
    if o.status == INCOMPLETE:
        return CKPT_INCOMPLETE, {"path": o.path, "run": run, "reason": o.reason}
    if o.status == FAILED:
        return CKPT_FAILED, {"path": o.path, "run": run, "error_type": o.error_type,
                             "error": o.error, "attempt": attempt}
    raise ValueError(f"unknown outcome status {o.status!r}")
