"""The audit trail: whole JSON lines, the stderr echo, logrotate reopen, outcome mapping."""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ckpt_watchd.errors import StartupError
from ckpt_watchd.outcome import FAILED, SKIPPED, STRIPPED, WOULD_STRIP, Outcome
from ckpt_watchd.records import audit

UTC = datetime.timezone.utc


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    # configure_logging binds to the sys.stderr of the test that called it (capsys): undo it
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def parse_utc(ts: str) -> datetime.datetime:
    t = datetime.datetime.fromisoformat(ts)
    assert t.utcoffset() == datetime.timedelta(0), ts
    return t


def test_emit_writes_one_whole_json_line(tmp_path: Path) -> None:
    """Each event is one JSON object: event first, a UTC timestamp, then the flat fields."""
    path = tmp_path / "state" / "audit.jsonl"
    a = audit.Auditor.open(path)
    before = datetime.datetime.now(UTC)
    a.emit(audit.RUN_FINISHED, run="/runs/train/exp", quiet_s=600.0, cadence_s=12.5)
    a.emit(audit.DAEMON_STOPPED, stripped=3, failed=0, root=Path("/runs"))
    after = datetime.datetime.now(UTC)
    a.close()
    lines = read_lines(path)
    stamps = [parse_utc(line.pop("timestamp")) for line in lines]
    assert lines == [
        {"event": "run.finished", "run": "/runs/train/exp", "quiet_s": 600.0, "cadence_s": 12.5},
        {"event": "daemon.stopped", "stripped": 3, "failed": 0, "root": "/runs"},
    ]
    assert all(before <= t <= after for t in stamps)
    assert list(json.loads(path.read_text().splitlines()[0]))[:2] == ["event", "timestamp"]


def test_emit_appends_to_an_existing_file(tmp_path: Path) -> None:
    """A restart appends; earlier audit lines are kept."""
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event": "daemon.stopped"}\n')
    a = audit.Auditor.open(path)
    a.emit(audit.DAEMON_STARTED, root="/runs")
    a.close()
    assert [line["event"] for line in read_lines(path)] == ["daemon.stopped", "daemon.started"]


def test_each_line_is_flushed_before_emit_returns(tmp_path: Path) -> None:
    """Another reader sees the line as soon as emit returns (a kill -9 then loses nothing)."""
    path = tmp_path / "audit.jsonl"
    a = audit.Auditor.open(path)
    a.emit(audit.RUN_DISCOVERED, run="/r")
    assert read_lines(path)[0]["event"] == "run.discovered"
    a.close()


def test_emit_echoes_to_the_stderr_logger(tmp_path: Path) -> None:
    """The same event reaches the structlog logger; failures and warnings at warning level."""
    audit.configure_logging("console", "info")
    a = audit.Auditor.open(tmp_path / "audit.jsonl")
    with capture_logs() as logs:
        a.emit(audit.CKPT_SKIPPED, path="/r/last.pt", run="/r", reason="already stripped")
        a.emit(audit.CKPT_FAILED, path="/r/best.pt", run="/r", error_type="torn", error="x",
               attempt=2)
    a.close()
    assert logs == [
        {"event": "ckpt.skipped", "log_level": "info", "path": "/r/last.pt", "run": "/r",
         "reason": "already stripped"},
        {"event": "ckpt.failed", "log_level": "warning", "path": "/r/best.pt", "run": "/r",
         "error_type": "torn", "error": "x", "attempt": 2},
    ]


def test_reopen_after_logrotate_writes_to_the_new_file(tmp_path: Path) -> None:
    """After the file is renamed away, reopen() sends later events to a fresh file at the path."""
    path = tmp_path / "audit.jsonl"
    a = audit.Auditor.open(path)
    a.emit(audit.RUN_DISCOVERED, run="/r/1")
    rotated = tmp_path / "audit.jsonl.1"
    path.rename(rotated)
    a.emit(audit.RUN_DISCOVERED, run="/r/2")  # still the old file until reopened
    a.reopen()
    a.emit(audit.RUN_DISCOVERED, run="/r/3")
    a.close()
    assert [line["run"] for line in read_lines(rotated)] == ["/r/1", "/r/2"]
    assert [line["run"] for line in read_lines(path)] == ["/r/3"]


def test_concurrent_emits_never_interleave(tmp_path: Path) -> None:
    """Events from several threads each land as one intact line."""
    path = tmp_path / "audit.jsonl"
    a = audit.Auditor.open(path)

    def emit_many(n: int) -> None:
        for i in range(200):
            a.emit(audit.CKPT_SKIPPED, path=f"/r/{n}/{i}.pt", run="/r", reason="x" * 500)

    threads = [threading.Thread(target=emit_many, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.close()
    paths = [line["path"] for line in read_lines(path)]
    assert sorted(paths) == sorted(f"/r/{n}/{i}.pt" for n in range(8) for i in range(200))


def test_open_refuses_an_unwritable_location(tmp_path: Path) -> None:
    """An audit path whose folder cannot exist is a StartupError naming the path."""
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(StartupError, match=r"audit log .*blocker.* cannot be opened"):
        audit.Auditor.open(tmp_path / "blocker" / "audit.jsonl")


def test_json_console_log_has_utc_timestamps(capsys: pytest.CaptureFixture[str]) -> None:
    """--log-format json prints one JSON object per event with level and a UTC timestamp."""
    audit.configure_logging("json", "info")
    structlog.get_logger().info("run.discovered", run="/r")
    structlog.get_logger().debug("hidden")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    parse_utc(entry.pop("timestamp"))
    assert entry == {"event": "run.discovered", "level": "info", "run": "/r"}


def test_console_log_has_no_colours_off_a_tty(capsys: pytest.CaptureFixture[str]) -> None:
    """The console format writes plain text when stderr is not a terminal."""
    audit.configure_logging("console", "debug")
    structlog.get_logger().debug("ckpt.stripped", path="/r/last.pt")
    err = capsys.readouterr().err
    assert "ckpt.stripped" in err and "path=/r/last.pt" in err
    assert "\x1b[" not in err


def test_unknown_log_format_is_refused() -> None:
    """configure_logging rejects a format it does not know."""
    with pytest.raises(ValueError, match="unknown log format"):
        audit.configure_logging("xml", "info")


@pytest.mark.parametrize(
    ("outcome", "event", "fields"),
    [
        (Outcome(path="/r/last.pt", status=STRIPPED, profile="yolov5", bytes_before=4000,
                 bytes_after=1000, sha256_before="aa", sha256_after="bb", duration_s=1.23456,
                 fingerprint=(1, 2, 3)),
         "ckpt.stripped",
         {"path": "/r/last.pt", "run": "/r", "profile": "yolov5", "bytes_before": 4000,
          "bytes_after": 1000, "sha256_before": "aa", "sha256_after": "bb", "duration_s": 1.235}),
        (Outcome(path="/r/last.pt", status=SKIPPED, reason="already stripped", bytes_after=5),
         "ckpt.skipped", {"path": "/r/last.pt", "run": "/r", "reason": "already stripped"}),
        (Outcome(path="/r/last.pt", status=FAILED, error_type="unsafe", error="refused"),
         "ckpt.failed",
         {"path": "/r/last.pt", "run": "/r", "error_type": "unsafe", "error": "refused",
          "attempt": 3}),
        (Outcome(path="/r/last.pt", status=WOULD_STRIP, profile="generic", bytes_before=9,
                 bytes_after=4),
         "ckpt.would_strip",
         {"path": "/r/last.pt", "run": "/r", "profile": "generic", "bytes_before": 9,
          "bytes_after": 4}),
        (Outcome(path="/r/state_3", status=STRIPPED, profile="accelerate", bytes_before=9,
                 bytes_after=4, reason="kept, of unknown purpose: custom_checkpoint_0.pkl"),
         "ckpt.stripped",
         {"path": "/r/state_3", "run": "/r", "profile": "accelerate", "bytes_before": 9,
          "bytes_after": 4, "sha256_before": None, "sha256_after": None, "duration_s": 0.0,
          "note": "kept, of unknown purpose: custom_checkpoint_0.pkl"}),
    ],
)
def test_outcome_event(outcome: Outcome, event: str, fields: dict[str, Any]) -> None:
    """Each Outcome status maps to its event name and exactly these flat fields."""
    assert audit.outcome_event(outcome, run="/r", attempt=3) == (event, fields)


def test_outcome_event_rejects_unknown_status() -> None:
    """An Outcome with a status nobody defined is a bug, not a silent audit line."""
    with pytest.raises(ValueError, match="unknown outcome status"):
        audit.outcome_event(Outcome(path="/x", status="exploded"), run="/r", attempt=1)


def test_outcome_event_round_trips_through_the_file(tmp_path: Path) -> None:
    """What outcome_event returns is exactly what the audit line holds."""
    path = tmp_path / "audit.jsonl"
    a = audit.Auditor.open(path)
    event, fields = audit.outcome_event(
        Outcome(path="/r/best.pt", status=STRIPPED, profile="ultralytics", bytes_before=10,
                bytes_after=5, duration_s=0.5), run="/r", attempt=1)
    a.emit(event, **fields)
    a.close()
    line = read_lines(path)[0]
    del line["timestamp"]
    assert line == {"event": event, **fields}
