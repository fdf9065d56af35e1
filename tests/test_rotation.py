"""A checkpoint the trainer deletes while it is being stripped (a rotation: save_total_limit,
max_history, save_top_k): no error, no temp file left, the file not brought back, `ckpt.vanished`.

The deletion is made deterministic by doing it from inside the strip, at one named step (the temp
file created, the copy written, verified, hashed), in this process; the service tests feed such
real outcomes to a real `Service` over real files. The daemon-level version (a simulated trainer,
a stopped job process) is `tests/e2e/test_save_period_e2e.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_watchd.engine import atomic, checkpoint, zipwrite
from ckpt_watchd.outcome import FAILED, Outcome
from ckpt_watchd.records.audit import Auditor
from ckpt_watchd.records.state import StateStore
from ckpt_watchd.service import Service
from ckpt_watchd.settings import Settings
from ckpt_watchd.worker import StripJob, run_job
from fixtures.fake_pool import FakePool
from fixtures.harness import temp_files

Rotate = Callable[[], None]


def _after_temp_created(monkeypatch: pytest.MonkeyPatch, rotate: Rotate) -> None:
    real = atomic.temp_writer

    @contextlib.contextmanager
    def temp_writer(dest: Path) -> Iterator[Any]:
        with real(dest) as opened:
            rotate()
            yield opened

    monkeypatch.setattr(atomic, "temp_writer", temp_writer)


def _while_written(monkeypatch: pytest.MonkeyPatch, rotate: Rotate) -> None:
    real = zipwrite.save

    def save(*args: Any, **kw: Any) -> Any:
        rotate()  # the source is open already: the copy is written from the deleted inode
        return real(*args, **kw)

    monkeypatch.setattr(zipwrite, "save", save)


def _while_verified(monkeypatch: pytest.MonkeyPatch, rotate: Rotate) -> None:
    real = checkpoint.verify

    def verify(*args: Any, **kw: Any) -> Any:
        rotate()
        return real(*args, **kw)

    monkeypatch.setattr(checkpoint, "verify", verify)


def _while_hashed(monkeypatch: pytest.MonkeyPatch, rotate: Rotate) -> None:
    real = atomic.sha256_path

    def sha256_path(path: Path) -> str:
        if atomic.is_temp_name(Path(path).name):  # the copy's hash: seconds for a big one
            rotate()
        return real(path)

    monkeypatch.setattr(atomic, "sha256_path", sha256_path)


# each step of a strip at which the trainer deletes the file, and what the worker then says
POINTS: dict[str, tuple[Callable[[pytest.MonkeyPatch, Rotate], None], str]] = {
    "temp file created": (_after_temp_created, "not_a_file"),  # the source's reopen finds nothing
    "copy written": (_while_written, "changed"),
    "copy verified": (_while_verified, "changed"),
    "copy hashed": (_while_hashed, "changed"),
}


def rotate_at(monkeypatch: pytest.MonkeyPatch, point: str, victim: Path) -> list[Path]:
    """Make the strip delete `victim` at `point`, once; the list it returns says it happened."""
    done: list[Path] = []

    def rotate() -> None:
        if not done:
            victim.unlink()
            done.append(victim)

    POINTS[point][0](monkeypatch, rotate)
    return done


@pytest.mark.parametrize("point", list(POINTS))
def test_a_file_deleted_mid_strip_fails_changed_leaves_no_temp_and_stays_deleted(
        checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Deleted at any step of its strip: a failed 'changed'/'not_a_file', no temp, not recreated."""
    path = checkpoint("yolov5", "weights/epoch0.pt")
    rotated = rotate_at(monkeypatch, point, path)
    outcome = run_job(StripJob(path=str(path), hashes=True))
    assert rotated == [path], f"the strip never reached {point!r}"
    assert (outcome.status, outcome.error_type) == (FAILED, POINTS[point][1]), outcome
    assert "no such file" in (outcome.error or "") or "removed" in (outcome.error or "")
    # os.replace would have created the name again: the trainer's rotation undone
    assert not path.exists(), "the deleted checkpoint came back as the stripped copy"
    assert temp_files(path.parent) == []


# ------------------------------------------------------------------------------ the service


class InlinePool(FakePool):
    """Collects jobs; `run_all` strips them with `run_job` in this process, as a worker would."""

    def run_all(self) -> list[str]:
        names = []
        while self.jobs:
            job = self.jobs.pop(0)
            names.append(Path(job.path).name)
            self.on_done(job, run_job(job))
        return names


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[..., tuple[Service, InlinePool, Path]]]:
    """`service(**settings)`: a Service over `tmp_path/runs` with the real discovery, an
    InlinePool, a fake monotonic clock (each step passes `now`) and the real wall clock."""
    closers: list[Callable[[], None]] = []

    def make(**opts: Any) -> tuple[Service, InlinePool, Path]:
        root = tmp_path / "runs"
        root.mkdir(exist_ok=True)
        s = Settings(root=root, state_dir=tmp_path / "state", audit_log=tmp_path / "audit.jsonl",
                     **{"settle": 60, "rescan_interval": 300, **opts})
        pools: list[InlinePool] = []

        def factory(on_done: Callable[[StripJob, Outcome], None]) -> InlinePool:
            pools.append(InlinePool(on_done))
            return pools[0]

        store, auditor = StateStore.open(s.state_db), Auditor.open(s.audit_log)
        closers.extend([store.close, auditor.close])
        svc = Service(s, store=store, auditor=auditor,
                      pool_factory=factory,
                      clock=lambda: 0.0, cadence=lambda run, newest: None,
                      in_use=lambda run: None)
        return svc, pools[0], s.audit_log

    yield make
    for close in closers:
        close()


def events(audit: Path, name: str | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    return [r for r in rows if name is None or r["event"] == name]


def aged(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_a_superseded_epoch_rotated_away_mid_strip_is_vanished_in_the_live_run(
        service: Callable[..., tuple[Service, InlinePool, Path]],
        checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """--strip-superseded: epoch0.pt deleted while it is stripped is ckpt.vanished, not retried."""
    svc, pool, audit = service(strip_superseded=True)
    weights = svc.s.root / "train" / "exp" / "weights"
    for name in ("epoch0.pt", "epoch1.pt", "last.pt"):
        checkpoint("yolov5", name, weights)
    aged(weights / "epoch0.pt", 3600)  # superseded by epoch1.pt and quiet; last.pt is fresh
    svc.step(0.0, time.time())
    assert [Path(j.path).name for j in pool.jobs] == ["epoch0.pt"]
    rotate_at(monkeypatch, "copy hashed", weights / "epoch0.pt")
    pool.run_all()
    svc.step(1.0, time.time())
    victim = str(weights / "epoch0.pt")
    assert [e["path"] for e in events(audit, "ckpt.superseded")] == [victim]
    vanished = events(audit, "ckpt.vanished")
    assert [(e["path"], e["run"]) for e in vanished] == [(victim, str(weights.parent))]
    assert "removed" in vanished[0]["reason"]
    assert not [e for e in events(audit) if e["event"] in ("ckpt.failed", "ckpt.skipped",
                                                           "ckpt.stripped")]
    assert svc.store.retries_due(time.time() + 10**9) == []
    assert sorted(p.name for p in weights.iterdir()) == ["epoch1.pt", "last.pt"]
    svc.step(2.0, time.time())
    assert pool.jobs == [] and not events(audit, "run.finished")  # still live: nothing else


def test_files_rotated_away_from_a_finished_run_leave_it_stripped_not_failed(
        service: Callable[..., tuple[Service, InlinePool, Path]],
        checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished run whose best.pt the trainer deletes mid-strip: vanished; the run is stripped."""
    svc, pool, audit = service()
    weights = svc.s.root / "train" / "exp" / "weights"
    for name in ("last.pt", "best.pt"):
        aged(checkpoint("yolov5", name, weights), 3600)
    svc.step(0.0, time.time())
    assert [Path(j.path).name for j in pool.jobs] == ["last.pt", "best.pt"]
    rotate_at(monkeypatch, "temp file created", weights / "best.pt")
    pool.jobs.reverse()  # best.pt first: the hook deletes the file of the first strip it sees
    pool.run_all()
    svc.step(1.0, time.time())
    assert [e["path"] for e in events(audit, "ckpt.vanished")] == [str(weights / "best.pt")]
    assert [e["path"] for e in events(audit, "ckpt.stripped")] == [str(weights / "last.pt")]
    assert not events(audit, "ckpt.failed")
    row = svc.store.get_run(str(weights.parent))
    assert row is not None and (row.state, row.reason) == ("stripped", None)
    assert temp_files(weights) == [] and not (weights / "best.pt").exists()
