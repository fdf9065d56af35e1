"""The one frozen Settings object for the daemon, and the table of its options.

`OPTIONS` is the single description of every daemon option (name, type, default, help); the CLI
builds argparse, the TOML config file and the CKPT_WATCHD_* environment mapping from it, and
`Settings.__post_init__` validates the merged values once. Nothing else defines an option.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_watchd.errors import StartupError

DEFAULT_PATTERNS = ("train/*/weights", "*/*/weights")
# last.pt and best.pt, and the --save-period snapshots epoch<N>.pt of both YOLO trainers
DEFAULT_FILES = ("last.pt", "best.pt", "epoch*.pt")
DEFAULT_CONFIG = Path("/etc/ckpt-watchd/config.toml")
KEEP_MARKER = ".ckpt-watchd-keep"
STATE_DIRNAME = ".ckpt-watchd"


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # settings field; the flag is --name-with-dashes
    kind: type  # str, int, float, bool, Path, or list (repeatable str)
    default: Any
    help: str
    metavar: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option("root", Path, None, "runs folder to watch (required)", "DIR"),
    Option("pattern", list, list(DEFAULT_PATTERNS),
           "glob, relative to the root, of run weights folders (repeatable)", "GLOB"),
    Option("files", list, list(DEFAULT_FILES), "checkpoint file names (globs) to strip in YOLO "
           "weights folders (repeatable)", "GLOB"),
    Option("exclude", list, [], "glob of run folders (relative to the root) never touched "
           "(repeatable)", "GLOB"),
    Option("max_depth", int, 6, "how many folders deep below the root runs are looked for", "N"),
    Option("settle", float, 600.0, "seconds last.pt must stay unchanged before a run counts as "
           "finished; the quiet period is max(settle, 3 x the longest gap seen between writes)",
           "SECONDS"),
    Option("poll", float, None, "poll the tree every SECONDS instead of inotify (NFS, CIFS, some "
           "bind mounts)", "SECONDS"),
    Option("rescan_interval", float, 300.0, "seconds between full reconcile scans (catches missed "
           "events)", "SECONDS"),
    Option("workers", int, min(2, os.cpu_count() or 1), "worker processes that load and strip", "N"),
    Option("job_timeout", float, 1800.0, "seconds one strip may take before its worker is killed",
           "SECONDS"),
    Option("max_attempts", int, 5, "tries per checkpoint before it is given up as failed", "N"),
    Option("retry_backoff", float, 60.0, "seconds before the first retry; doubles each try",
           "SECONDS"),
    Option("state_dir", Path, None, "state store and audit folder (default: ROOT/.ckpt-watchd)", "DIR"),
    Option("audit_log", Path, None, "audit trail, one JSON object per line (default: "
           "STATE_DIR/audit.jsonl)", "FILE"),
    Option("log_format", str, "console", "stderr log format: console or json", "FORMAT"),
    Option("log_level", str, "info", "stderr log level: debug, info, warning, error", "LEVEL"),
    Option("archive_dir", Path, None, "keep each original here before replacing it (restorable "
           "with `ckpt-watchd restore`)", "DIR"),
    Option("once", bool, False, "scan, strip every run that is already quiet, then exit"),
    Option("dry_run", bool, False, "decide and audit what would happen; modify nothing"),
    Option("strip_superseded", bool, False, "while a run trains, strip each checkpoint a newer one "
           "of the same series replaced (epoch2.pt after epoch3.pt), once it is quiet"),
    Option("keep_resumable", int, 1, "with --strip-superseded: the newest N of each series stay "
           "untouched", "N"),
    Option("drain_timeout", float, 30.0, "seconds in-flight strips may finish after SIGTERM", "SECONDS"),
    Option("nice", int, 10, "CPU niceness of the worker processes (0-19)", "N"),
    Option("io_idle", bool, True, "run workers in the idle I/O scheduling class"),
    Option("follow_writers", bool, True, "keep a quiet run unfinished while the process that last "
           "wrote its checkpoints runs (fanotify: needs CAP_SYS_ADMIN, else off by itself)"),
    Option("metrics_addr", str, None, "serve Prometheus /metrics and /healthz on HOST:PORT", "HOST:PORT"),
    Option("on_stripped", str, None, "command run after each stripped run (argv split, no shell)",
           "CMD"),
    Option("on_stripped_shell", bool, False, "run --on-stripped through /bin/sh -c"),
    Option("hook_timeout", float, 60.0, "seconds before an --on-stripped command is killed", "SECONDS"),
    Option("claim_timeout", float, 3600.0, "seconds after which another host's claim on a "
           "checkpoint counts as stale", "SECONDS"),
)
OPTION_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True, slots=True)
class Settings:
    root: Path
    pattern: tuple[str, ...] = DEFAULT_PATTERNS
    files: tuple[str, ...] = DEFAULT_FILES
    exclude: tuple[str, ...] = ()
    max_depth: int = 6
    settle: float = 600.0
    poll: float | None = None
    rescan_interval: float = 300.0
    workers: int = 2
    job_timeout: float = 1800.0
    max_attempts: int = 5
    retry_backoff: float = 60.0
    state_dir: Path = field(default=Path())
    audit_log: Path = field(default=Path())
    log_format: str = "console"
    log_level: str = "info"
    archive_dir: Path | None = None
    once: bool = False
    dry_run: bool = False
    strip_superseded: bool = False
    keep_resumable: int = 1
    drain_timeout: float = 30.0
    nice: int = 10
    io_idle: bool = True
    follow_writers: bool = True
    metrics_addr: str | None = None
    on_stripped: str | None = None
    on_stripped_shell: bool = False
    hook_timeout: float = 60.0
    claim_timeout: float = 3600.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        root = Path(self.root).absolute()
        set_(self, "root", root)
        set_(self, "pattern", tuple(self.pattern))
        set_(self, "files", tuple(self.files))
        set_(self, "exclude", tuple(self.exclude))
        if self.state_dir == Path():
            set_(self, "state_dir", root / STATE_DIRNAME)
        set_(self, "state_dir", Path(self.state_dir).absolute())
        if self.audit_log == Path():
            set_(self, "audit_log", self.state_dir / "audit.jsonl")
        if self.archive_dir is not None:
            set_(self, "archive_dir", Path(self.archive_dir).absolute())
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> StartupError:
            return StartupError(f"--{name.replace('_', '-')}: {why}")

        for name in ("settle", "rescan_interval", "job_timeout", "retry_backoff", "drain_timeout",
                     "hook_timeout", "claim_timeout"):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be > 0 (got {getattr(self, name)})")
        if self.poll is not None and not self.poll > 0:
            raise bad("poll", f"must be > 0 (got {self.poll})")
        if self.workers < 1:
            raise bad("workers", f"must be >= 1 (got {self.workers})")
        if not 1 <= self.max_depth <= 32:
            raise bad("max_depth", f"must be 1..32 (got {self.max_depth})")
        if self.keep_resumable < 0:
            raise bad("keep_resumable", f"must be >= 0 (got {self.keep_resumable})")
        if self.max_attempts < 1:
            raise bad("max_attempts", f"must be >= 1 (got {self.max_attempts})")
        if not 0 <= self.nice <= 19:
            raise bad("nice", f"must be 0..19 (got {self.nice})")
        if self.log_format not in ("console", "json"):
            raise bad("log_format", f"must be console or json (got {self.log_format!r})")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise bad("log_level", f"must be debug, info, warning or error (got {self.log_level!r})")
        if not self.pattern:
            raise bad("pattern", "at least one pattern is needed")
        for p in self.pattern:
            if p.startswith("/") or ".." in Path(p).parts:
                raise bad("pattern", f"must be relative to the root, without '..' (got {p!r})")
        for f in self.files:
            if not f or "/" in f:
                raise bad("files", f"must be a file name or a glob of one, without '/' (got {f!r})")
        if self.metrics_addr is not None:
            _host, sep, port = self.metrics_addr.rpartition(":")
            if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise bad("metrics_addr", f"must be HOST:PORT (got {self.metrics_addr!r})")

    @property
    def state_db(self) -> Path:
        return self.state_dir / "state.sqlite3"

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        return out
