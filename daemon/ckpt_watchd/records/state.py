"""The embedded state store (SQLite): every run and checkpoint seen, what we did to it, what failed.

It owns the schema and its version, and the exactly-once rule (`already_done`): a file we stripped
or skipped is never touched again while it keeps the fingerprint we left it with. It never reads a
clock (times come in as arguments), is used from one thread only, and commits every write at once.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ckpt_watchd.errors import StartupError
from ckpt_watchd.outcome import FAILED, SKIPPED, STRIPPED, WOULD_STRIP, Outcome

SCHEMA_VERSION = 1
RUN_STATES = ("watching", "settling", "finished", "stripped", "failed", "kept", "excluded")
GIVEN_UP = "given_up"
CKPT_STATUSES = (STRIPPED, SKIPPED, WOULD_STRIP, FAILED, GIVEN_UP)

_SCHEMA = """
CREATE TABLE runs (
    run TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    first_seen REAL NOT NULL,
    changed_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    cadence_s REAL,
    due_at REAL,
    reason TEXT
);
CREATE TABLE checkpoints (
    path TEXT PRIMARY KEY,
    run TEXT NOT NULL,
    status TEXT NOT NULL,
    ino INTEGER, size INTEGER, mtime_ns INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    error_type TEXT,
    error TEXT,
    next_retry_at REAL,
    profile TEXT,
    bytes_before INTEGER,
    bytes_after INTEGER,
    updated_at REAL NOT NULL
);
CREATE INDEX checkpoints_by_run ON checkpoints(run);
CREATE INDEX checkpoints_retry ON checkpoints(next_retry_at) WHERE next_retry_at IS NOT NULL;
"""

Fingerprint = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class RunRow:
    run: str
    state: str
    first_seen: float
    changed_at: float  # when `state` last changed
    updated_at: float
    cadence_s: float | None  # longest gap seen between two writes of last.pt
    due_at: float | None  # while settling: when the quiet period ends
    reason: str | None


@dataclass(frozen=True, slots=True)
class CkptRow:
    path: str
    run: str
    status: str
    fingerprint: Fingerprint | None  # (ino, size, mtime_ns) as the file stood after our action
    attempts: int
    error_type: str | None
    error: str | None
    next_retry_at: float | None
    profile: str | None
    bytes_before: int | None
    bytes_after: int | None
    updated_at: float


def _run_row(r: sqlite3.Row) -> RunRow:
    return RunRow(r["run"], r["state"], r["first_seen"], r["changed_at"], r["updated_at"],
                  r["cadence_s"], r["due_at"], r["reason"])


def _ckpt_row(r: sqlite3.Row) -> CkptRow:
    fp = None if r["ino"] is None else (r["ino"], r["size"], r["mtime_ns"])
    return CkptRow(r["path"], r["run"], r["status"], fp, r["attempts"], r["error_type"], r["error"],
                   r["next_retry_at"], r["profile"], r["bytes_before"], r["bytes_after"],
                   r["updated_at"])


class StateStore:
    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> StateStore:
        """Open (creating dir and schema unless `readonly`); a StartupError says what is wrong."""
        path = Path(path).absolute()
        with contextlib.suppress(OSError):  # missing: created below; unreachable: said below
            if not stat.S_ISREG(os.lstat(path).st_mode):  # a FIFO there would hang SQLite
                raise StartupError(f"state store {path} is not a regular file")
        if readonly:
            if not path.is_file():
                raise StartupError(f"state store {path} does not exist")
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StartupError(f"state dir {path.parent} cannot be created: "
                                   f"{e.strerror or e}") from None
        try:
            uri = path.as_uri() + ("?mode=ro" if readonly else "")
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10.0)
        except sqlite3.Error as e:
            raise StartupError(f"state store {path} cannot be opened ({e}); is {path.parent} "
                               "writable?") from None
        conn.row_factory = sqlite3.Row
        try:
            cls._prepare(conn, path, readonly)
        except sqlite3.DatabaseError as e:
            conn.close()
            if isinstance(e, sqlite3.OperationalError) and "unable to open" in str(e):
                how = "read" if readonly else "written"
                raise StartupError(f"state store {path} cannot be {how} ({e}); check the "
                                   f"permissions of {path.parent}") from None
            raise StartupError(f"state store {path} is corrupt or not a ckpt-watchd database "
                               f"({e}); move it aside to start with an empty state") from None
        except StartupError:
            conn.close()
            raise
        return cls(conn, path)

    @staticmethod
    def _prepare(conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
        if not readonly:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process kill; only a power cut may lose the last writes
            conn.execute("PRAGMA synchronous=NORMAL")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StartupError(f"state store {path} has schema version {version}, written by a "
                               f"newer ckpt-watchd (this one knows {SCHEMA_VERSION})")
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise sqlite3.DatabaseError("it holds tables but no ckpt-watchd schema version")
            if readonly:
                raise StartupError(f"state store {path} is empty (the daemon never ran here)")
            conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        self._conn.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # ------------------------------------------------------------------------------ runs

    def upsert_run(self, run: str, *, state: str, now: float, cadence_s: float | None = None,
                   reason: str | None = None, due_at: float | None = None) -> None:
        """Set a run's state; a None `cadence_s` keeps the one stored, `reason`/`due_at` replace."""
        if state not in RUN_STATES:
            raise ValueError(f"unknown run state {state!r}")
        self._conn.execute(
            """INSERT INTO runs (run, state, first_seen, changed_at, updated_at, cadence_s,
                                 due_at, reason)
               VALUES (:run, :state, :now, :now, :now, :cadence, :due, :reason)
               ON CONFLICT(run) DO UPDATE SET
                 changed_at = CASE WHEN state = excluded.state THEN changed_at ELSE :now END,
                 state = excluded.state, updated_at = :now,
                 cadence_s = COALESCE(excluded.cadence_s, cadence_s),
                 due_at = excluded.due_at, reason = excluded.reason""",
            {"run": run, "state": state, "now": now, "cadence": cadence_s, "due": due_at,
             "reason": reason})

    def get_run(self, run: str) -> RunRow | None:
        r = self._conn.execute("SELECT * FROM runs WHERE run = ?", (run,)).fetchone()
        return None if r is None else _run_row(r)

    def runs(self) -> list[RunRow]:
        return [_run_row(r) for r in self._conn.execute("SELECT * FROM runs ORDER BY run")]

    def forget_run(self, run: str) -> None:
        """Drop a deleted run and its checkpoints, so a new run in that folder starts afresh."""
        with self._tx() as c:
            c.execute("DELETE FROM checkpoints WHERE run = ?", (run,))
            c.execute("DELETE FROM runs WHERE run = ?", (run,))

    # ------------------------------------------------------------------------------ checkpoints

    def record_outcome(self, outcome: Outcome, *, run: str, now: float, attempt: int) -> None:
        """Remember what one job did; a failure here has no retry time until `schedule_retry`."""
        o = outcome
        ino, size, mtime_ns = o.fingerprint if o.fingerprint is not None else (None, None, None)
        self._conn.execute(
            """INSERT OR REPLACE INTO checkpoints (path, run, status, ino, size, mtime_ns,
                 attempts, error_type, error, next_retry_at, profile, bytes_before, bytes_after,
                 updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)""",
            (o.path, run, o.status, ino, size, mtime_ns, attempt, o.error_type, o.error,
             o.profile, o.bytes_before, o.bytes_after, now))

    def schedule_retry(self, path: str, *, run: str, at: float, attempt: int, error_type: str,
                       error: str, now: float | None = None,
                       fingerprint: Fingerprint | None = None) -> None:
        """Mark a failed file to be tried again at `at`; `attempt` is the try that just failed."""
        self._fail(path, run=run, status=FAILED, fingerprint=fingerprint, attempt=attempt,
                   error_type=error_type, error=error, next_retry_at=at, now=now)

    def give_up(self, path: str, *, run: str, now: float, attempt: int, error_type: str,
                error: str, fingerprint: Fingerprint | None = None) -> None:
        """Stop retrying a file; `given_up_on` stays True until the file changes."""
        self._fail(path, run=run, status=GIVEN_UP, fingerprint=fingerprint, attempt=attempt,
                   error_type=error_type, error=error, next_retry_at=None, now=now)

    def _fail(self, path: str, *, run: str, status: str, fingerprint: Fingerprint | None,
              attempt: int, error_type: str, error: str, next_retry_at: float | None,
              now: float | None) -> None:
        # keeps the profile and sizes a previous record_outcome stored; the fingerprint is
        # replaced even by None, so a stale one never makes given_up_on wrong
        ino, size, mtime_ns = fingerprint if fingerprint is not None else (None, None, None)
        self._conn.execute(
            """INSERT INTO checkpoints (path, run, status, ino, size, mtime_ns, attempts,
                 error_type, error, next_retry_at, updated_at)
               VALUES (:path, :run, :status, :ino, :size, :mtime_ns, :attempt, :etype, :error,
                       :retry, COALESCE(:now, :retry, 0))
               ON CONFLICT(path) DO UPDATE SET
                 run = excluded.run, status = excluded.status, ino = excluded.ino,
                 size = excluded.size, mtime_ns = excluded.mtime_ns, attempts = excluded.attempts,
                 error_type = excluded.error_type, error = excluded.error,
                 next_retry_at = excluded.next_retry_at, updated_at = COALESCE(:now, updated_at)""",
            {"path": path, "run": run, "status": status, "ino": ino, "size": size,
             "mtime_ns": mtime_ns, "attempt": attempt, "etype": error_type, "error": error,
             "retry": next_retry_at, "now": now})

    def checkpoint(self, path: str) -> CkptRow | None:
        r = self._conn.execute("SELECT * FROM checkpoints WHERE path = ?", (path,)).fetchone()
        return None if r is None else _ckpt_row(r)

    def checkpoints_of(self, run: str) -> list[CkptRow]:
        rows = self._conn.execute("SELECT * FROM checkpoints WHERE run = ? ORDER BY path", (run,))
        return [_ckpt_row(r) for r in rows]

    def already_done(self, path: str, fingerprint: Fingerprint, *,
                     dry_run: bool = False) -> bool:
        """True if we stripped or skipped this file and it still has the fingerprint we left.

        With `dry_run`, a recorded would-strip also counts, so a dry-run daemon reports each
        file once instead of at every rescan.
        """
        done = (STRIPPED, SKIPPED, WOULD_STRIP) if dry_run else (STRIPPED, SKIPPED)
        row = self.checkpoint(path)
        return row is not None and row.status in done and row.fingerprint == tuple(fingerprint)

    def given_up_on(self, path: str, fingerprint: Fingerprint) -> bool:
        """True if we gave up on this file and it has not changed since (or we never knew how it
        stood)."""
        row = self.checkpoint(path)
        return (row is not None and row.status == GIVEN_UP
                and row.fingerprint in (None, tuple(fingerprint)))

    def retries_due(self, now: float) -> list[CkptRow]:
        rows = self._conn.execute(
            "SELECT * FROM checkpoints WHERE status = ? AND next_retry_at <= ? "
            "ORDER BY next_retry_at, path", (FAILED, now))
        return [_ckpt_row(r) for r in rows]

    def next_retry_at(self) -> float | None:
        """The earliest pending retry time, for the service's next wake-up."""
        r = self._conn.execute("SELECT min(next_retry_at) FROM checkpoints WHERE status = ?",
                               (FAILED,)).fetchone()
        return None if r[0] is None else float(r[0])

    def totals(self) -> dict[str, int]:
        """Counts of runs and of checkpoints by status, plus the bytes stripping saved."""
        out = {"runs": self._conn.execute("SELECT count(*) FROM runs").fetchone()[0]}
        out.update(dict.fromkeys(CKPT_STATUSES, 0))
        for r in self._conn.execute("SELECT status, count(*) FROM checkpoints GROUP BY status"):
            out[r[0]] = r[1]
        saved = self._conn.execute(
            "SELECT COALESCE(sum(bytes_before - bytes_after), 0) FROM checkpoints "
            "WHERE status = ? AND bytes_before IS NOT NULL AND bytes_after IS NOT NULL",
            (STRIPPED,)).fetchone()[0]
        out["bytes_saved"] = int(saved)
        return out
