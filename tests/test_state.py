"""The SQLite state store (restarts, exactly-once, retries, corruption) and `status`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt_watchd import cli
from ckpt_watchd.errors import StartupError
from ckpt_watchd.ops.status import print_status
from ckpt_watchd.outcome import FAILED, SKIPPED, STRIPPED, WOULD_STRIP, Outcome
from ckpt_watchd.records.state import GIVEN_UP, SCHEMA_VERSION, StateStore

RUN = "/runs/train/exp"
LAST = "/runs/train/exp/weights/last.pt"
BEST = "/runs/train/exp/weights/best.pt"
FP = (11, 1000, 123456789)


def stripped(path: str = LAST, fp: tuple[int, int, int] = FP) -> Outcome:
    return Outcome(path=path, status=STRIPPED, profile="yolov5", bytes_before=4000,
                   bytes_after=1000, duration_s=1.5, fingerprint=fp)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.sqlite3"


@pytest.fixture
def store(db: Path) -> Iterator[StateStore]:
    s = StateStore.open(db)
    yield s
    s.close()


def test_open_creates_dir_and_uses_wal(db: Path) -> None:
    """Opening creates the state dir, the schema at the current version and WAL journaling."""
    StateStore.open(db).close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_reopen_keeps_runs_checkpoints_and_failures(db: Path) -> None:
    """Everything written before close is there, unchanged, after reopening."""
    s = StateStore.open(db)
    s.upsert_run(RUN, state="stripped", now=10.0, cadence_s=60.0)
    s.record_outcome(stripped(), run=RUN, now=11.0, attempt=1)
    s.schedule_retry(BEST, run=RUN, at=500.0, attempt=2, error_type="torn", error="mid-write",
                     now=12.0)
    before = (s.runs(), s.checkpoint(LAST), s.checkpoint(BEST), s.totals())
    s.close()
    s2 = StateStore.open(db)
    assert (s2.runs(), s2.checkpoint(LAST), s2.checkpoint(BEST), s2.totals()) == before
    assert s2.already_done(LAST, FP)
    assert [r.path for r in s2.retries_due(500.0)] == [BEST]
    s2.close()


def test_writes_survive_kill_9(db: Path) -> None:
    """A process killed with SIGKILL right after a write, without close, loses nothing."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from ckpt_watchd.records.state import StateStore\n"
        "from ckpt_watchd.outcome import Outcome\n"
        "s = StateStore.open(Path(sys.argv[1]))\n"
        f"s.upsert_run({RUN!r}, state='stripped', now=5.0)\n"
        f"s.record_outcome(Outcome(path={LAST!r}, status='stripped', fingerprint={FP!r}),"
        f" run={RUN!r}, now=6.0, attempt=1)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(db)], timeout=60, check=False)
    assert proc.returncode == -9
    s = StateStore.open(db)
    run = s.get_run(RUN)
    assert run is not None and run.state == "stripped"
    assert s.already_done(LAST, FP)
    s.close()


def test_checkpoint_row_holds_what_the_outcome_said(store: StateStore) -> None:
    """record_outcome stores status, fingerprint, sizes, profile, attempt and time."""
    store.record_outcome(stripped(), run=RUN, now=7.5, attempt=2)
    row = store.checkpoint(LAST)
    assert row is not None
    assert (row.run, row.status, row.fingerprint, row.profile, row.bytes_before, row.bytes_after,
            row.attempts, row.error, row.next_retry_at, row.updated_at) == (
        RUN, STRIPPED, FP, "yolov5", 4000, 1000, 2, None, None, 7.5)
    assert store.checkpoint(BEST) is None


@pytest.mark.parametrize(
    ("status", "fingerprint", "asked", "done", "done_dry"),
    [
        (STRIPPED, FP, FP, True, True),
        (SKIPPED, FP, FP, True, True),
        (STRIPPED, FP, (11, 1000, 999), False, False),  # rewritten in place: same inode, new mtime
        (STRIPPED, FP, (12, 1000, 123456789), False, False),  # replaced by a new file
        (WOULD_STRIP, FP, FP, False, True),
        (FAILED, None, FP, False, False),
    ],
)
def test_already_done(store: StateStore, status: str, fingerprint: tuple[int, int, int] | None,
                      asked: tuple[int, int, int], done: bool, done_dry: bool) -> None:
    """Only a stripped/skipped file that still has the fingerprint we left counts as done."""
    store.record_outcome(Outcome(path=LAST, status=status, fingerprint=fingerprint), run=RUN,
                         now=1.0, attempt=1)
    assert store.already_done(LAST, asked) is done
    assert store.already_done(LAST, asked, dry_run=True) is done_dry


def test_unknown_file_is_not_done(store: StateStore) -> None:
    """A path never recorded is not done."""
    assert not store.already_done(LAST, FP)


def test_retry_bookkeeping(store: StateStore) -> None:
    """Retries come due at their time, in order; success or giving up removes them."""
    store.record_outcome(Outcome(path=LAST, status=FAILED, error_type="torn", error="x"),
                         run=RUN, now=1.0, attempt=1)
    assert store.retries_due(1e9) == []  # a failure without a retry time is not due
    store.schedule_retry(LAST, run=RUN, at=200.0, attempt=1, error_type="torn", error="mid-write")
    store.schedule_retry(BEST, run=RUN, at=100.0, attempt=3, error_type="os", error="EIO")
    assert store.next_retry_at() == 100.0
    assert store.retries_due(99.0) == []
    assert [r.path for r in store.retries_due(150.0)] == [BEST]
    due = store.retries_due(200.0)
    assert [(r.path, r.attempts, r.error_type, r.error) for r in due] == [
        (BEST, 3, "os", "EIO"), (LAST, 1, "torn", "mid-write")]
    store.record_outcome(stripped(), run=RUN, now=201.0, attempt=2)
    store.give_up(BEST, run=RUN, now=202.0, attempt=4, error_type="os", error="EIO")
    assert store.retries_due(1e9) == []
    assert store.next_retry_at() is None
    row = store.checkpoint(BEST)
    assert row is not None and (row.status, row.attempts, row.updated_at) == (GIVEN_UP, 4, 202.0)


def test_retry_keeps_profile_and_sizes(store: StateStore) -> None:
    """Scheduling a retry keeps what an earlier outcome learned but replaces the fingerprint."""
    store.record_outcome(stripped(), run=RUN, now=1.0, attempt=1)
    store.schedule_retry(LAST, run=RUN, at=50.0, attempt=1, error_type="verify", error="bad",
                         now=2.0)
    row = store.checkpoint(LAST)
    assert row is not None
    assert (row.status, row.profile, row.bytes_before, row.fingerprint, row.updated_at) == (
        FAILED, "yolov5", 4000, None, 2.0)
    assert not store.already_done(LAST, FP)


def test_given_up_until_the_file_changes(store: StateStore) -> None:
    """A given-up file stays given up for its fingerprint; a rewrite makes it eligible again."""
    store.give_up(LAST, run=RUN, now=1.0, attempt=5, error_type="unsafe", error="os.system",
                  fingerprint=FP)
    assert store.given_up_on(LAST, FP)
    assert not store.given_up_on(LAST, (11, 2000, 5))
    store.give_up(BEST, run=RUN, now=1.0, attempt=5, error_type="os", error="EIO")
    assert store.given_up_on(BEST, FP)  # no fingerprint known: any version counts as given up
    assert not store.already_done(LAST, FP)


def test_upsert_run_keeps_cadence_and_tracks_state_changes(store: StateStore) -> None:
    """cadence_s=None keeps the stored cadence; changed_at moves only when the state changes."""
    store.upsert_run(RUN, state="watching", now=1.0, cadence_s=30.0)
    store.upsert_run(RUN, state="watching", now=2.0)
    store.upsert_run(RUN, state="settling", now=3.0, due_at=93.0)
    row = store.get_run(RUN)
    assert row is not None
    assert (row.state, row.first_seen, row.changed_at, row.updated_at, row.cadence_s,
            row.due_at) == ("settling", 1.0, 3.0, 3.0, 30.0, 93.0)
    store.upsert_run(RUN, state="failed", now=4.0, reason="best.pt: unsafe pickle")
    row = store.get_run(RUN)
    assert row is not None and (row.due_at, row.reason) == (None, "best.pt: unsafe pickle")
    with pytest.raises(ValueError, match="unknown run state"):
        store.upsert_run(RUN, state="sleeping", now=5.0)


def test_forget_run_drops_its_checkpoints(store: StateStore) -> None:
    """A forgotten run and its checkpoints are gone; other runs are untouched."""
    other = "/runs/train/exp2"
    store.upsert_run(RUN, state="stripped", now=1.0)
    store.upsert_run(other, state="watching", now=1.0)
    store.record_outcome(stripped(), run=RUN, now=1.0, attempt=1)
    store.record_outcome(stripped(other + "/weights/last.pt"), run=other, now=1.0, attempt=1)
    store.forget_run(RUN)
    assert [r.run for r in store.runs()] == [other]
    assert store.checkpoint(LAST) is None
    assert store.checkpoints_of(other) != []


def test_totals(store: StateStore) -> None:
    """totals counts runs, checkpoints by status (zeros included) and the bytes saved."""
    store.upsert_run(RUN, state="stripped", now=1.0)
    store.record_outcome(stripped(LAST), run=RUN, now=1.0, attempt=1)
    store.record_outcome(stripped(BEST), run=RUN, now=1.0, attempt=1)
    store.record_outcome(Outcome(path="/x.pt", status=SKIPPED, reason="already stripped"),
                         run=RUN, now=1.0, attempt=1)
    assert store.totals() == {"runs": 1, STRIPPED: 2, SKIPPED: 1, WOULD_STRIP: 0, FAILED: 0,
                              GIVEN_UP: 0, "bytes_saved": 6000}


def test_corrupt_db_is_a_clear_startup_error(db: Path) -> None:
    """A state file that is not SQLite stops start-up with a message naming it and the way out."""
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database, just some garbage bytes " * 100)
    with pytest.raises(StartupError, match=r"is corrupt or not a ckpt-watchd database.*move it"):
        StateStore.open(db)


def test_foreign_sqlite_db_is_refused(db: Path) -> None:
    """An SQLite file with someone else's tables is not silently adopted."""
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StartupError, match="not a ckpt-watchd database"):
        StateStore.open(db)


def test_newer_schema_is_refused(db: Path) -> None:
    """A store written by a newer version is refused instead of being misread."""
    StateStore.open(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StartupError, match="newer ckpt-watchd"):
        StateStore.open(db)


def test_state_dir_that_cannot_be_created(tmp_path: Path) -> None:
    """A state dir path blocked by a file is a StartupError naming the dir."""
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(StartupError, match=r"blocker.*cannot be created"):
        StateStore.open(tmp_path / "blocker" / "state.sqlite3")


def test_readonly_open_of_missing_store(db: Path) -> None:
    """Read-only opening never creates a store."""
    with pytest.raises(StartupError, match="does not exist"):
        StateStore.open(db, readonly=True)
    assert not db.exists()


# ---------------------------------------------------------------------------- status


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    """A root with a state store holding one run in each interesting state."""
    root = tmp_path / "runs"
    s = StateStore.open(root / ".ckpt-watchd" / "state.sqlite3")
    a, b, c, d = (str(root / "train" / n) for n in ("a", "b", "c", "d"))
    s.upsert_run(a, state="settling", now=1000.0, cadence_s=20.0, due_at=1090.0)
    s.upsert_run(b, state="stripped", now=1000.0)
    s.record_outcome(stripped(b + "/weights/last.pt"), run=b, now=1000.0, attempt=1)
    s.record_outcome(stripped(b + "/weights/best.pt"), run=b, now=1000.0, attempt=1)
    s.upsert_run(c, state="failed", now=1000.0)
    s.give_up(c + "/weights/last.pt", run=c, now=1000.0, attempt=5, error_type="unsafe",
              error="refused unsafe global 'os.system'")
    s.upsert_run(d, state="kept", now=1000.0, reason=".ckpt-watchd-keep")
    s.close()
    return root


def test_status_table(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A row per run (relative to the root) with its trainer, time left, bytes saved or reason;
    totals; then each failing checkpoint with its reason and when it is tried again."""
    s = StateStore.open(runs_root / ".ckpt-watchd" / "state.sqlite3")
    s.schedule_retry(str(runs_root / "train/b/weights/epoch3.pt"), run=str(runs_root / "train/b"),
                     at=1330.0, attempt=2, error_type="write", error="No space left on device")
    s.close()
    assert print_status(runs_root, None, False, clock=lambda: 1030.0) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "run      trainer  state     ckpts  stripped   saved  detail",
        "train/a           settling      0         0     0 B  60s left",
        "train/b  yolov5   stripped      3         2  6.0 kB  1 failing, retried later",
        "train/c           failed        1         0     0 B  refused unsafe global 'os.system'",
        "train/d           kept          0         0     0 B  .ckpt-watchd-keep",
        "-" * 86,
        "total             4 runs        4         2  6.0 kB  1 waiting, 2 failing",
        "",
        "failures:",
        "  train/b/weights/epoch3.pt: write: No space left on device (attempt 2, retried in 5m)",
        "  train/c/weights/last.pt: unsafe: refused unsafe global 'os.system' "
        "(given up after 5 attempt(s))",
    ]


def test_status_json(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints a list of objects scripts can rely on."""
    assert print_status(runs_root, None, True, clock=lambda: 1030.0) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["state"], r["seconds_left"], r["bytes_saved"]) for r in reports] == [
        ("train/a", "settling", 60.0, 0), ("train/b", "stripped", None, 6000),
        ("train/c", "failed", None, 0), ("train/d", "kept", None, 0)]
    assert reports[0]["path"] == str(runs_root / "train" / "a")
    assert reports[2]["checkpoints"][0]["error_type"] == "unsafe"
    assert {c["profile"] for c in reports[1]["checkpoints"]} == {"yolov5"}  # per checkpoint
    assert reports[1]["trainer"] == "yolov5"
    assert reports[1]["since"] == "1970-01-01T00:16:40+00:00"


def test_status_reads_while_the_daemon_holds_the_store(
        runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """status sees committed writes of a store another connection keeps open."""
    daemon = StateStore.open(runs_root / ".ckpt-watchd" / "state.sqlite3")
    try:
        daemon.upsert_run(str(runs_root / "train" / "e"), state="watching", now=1000.0)
        assert print_status(runs_root, None, False, clock=lambda: 1030.0) == 0
    finally:
        daemon.close()
    rows = capsys.readouterr().out.splitlines()
    assert rows[5].split() == ["train/e", "watching", "0", "0", "0", "B"]


def test_status_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store without runs says so (text) or prints [] (JSON)."""
    StateStore.open(tmp_path / "st" / "state.sqlite3").close()
    assert print_status(tmp_path, tmp_path / "st", False) == 0
    assert "no runs recorded yet" in capsys.readouterr().out
    assert print_status(tmp_path, tmp_path / "st", True) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_status_missing_state_dir_exits_2(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`status` on a root the daemon never saw: one clear message and exit code 2."""
    assert cli.main(["status", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no state in" in err and ".ckpt-watchd" in err
    with pytest.raises(StartupError):
        print_status(tmp_path, None, False)


def test_cli_status_json(runs_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ckpt-watchd status --root DIR --json` prints every run and exits 0."""
    assert cli.main(["status", "--root", str(runs_root), "--json"]) == 0
    assert [r["run"] for r in json.loads(capsys.readouterr().out)] == [
        "train/a", "train/b", "train/c", "train/d"]
