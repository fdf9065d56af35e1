"""Missed filesystem events: the periodic reconcile, and a real inotify queue overflow.

First the `Service` itself, on a real filesystem with a real (in-process) strip, but with a `Hints`
that drops every event: runs that appear are found only by the reconcile, as soon as the fake clock
passes --rescan-interval, and each is stripped exactly once. Then the daemon: it is stopped
(SIGSTOP) while more events than `fs.inotify.max_queued_events` and a batch of finished runs
arrive, so the kernel queue overflows for certain; after SIGCONT every run is still stripped,
though the full rescan is an hour away.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_watchd.outcome import Outcome
from ckpt_watchd.records.audit import Auditor
from ckpt_watchd.records.state import StateStore
from ckpt_watchd.service import Service
from ckpt_watchd.settings import Settings
from ckpt_watchd.watch import watcher
from ckpt_watchd.worker import StripJob, run_job
from reliability.conftest import Daemon, is_valid_stripped, set_age, temp_files


class DroppingHints(watcher.Hints):
    """Every event the observer reports is lost, as after an inotify queue overflow."""

    def __init__(self) -> None:
        super().__init__(threading.Event())
        self.dropped = 0

    def add_folder(self, folder: Path) -> None:
        self.dropped += 1

    def add_subtree(self, folder: Path) -> None:
        self.dropped += 1


class InlinePool:
    """Runs each strip at once, in this process, through the real worker boundary."""

    restarts = 0

    def __init__(self, on_done: Callable[[StripJob, Outcome], None]) -> None:
        self.on_done = on_done

    def submit(self, job: StripJob) -> None:
        self.on_done(job, run_job(job))

    def pending(self) -> int:
        return 0

    def queue_depth(self) -> int:
        return 0

    def alive(self) -> bool:
        return True

    def prewarm(self) -> None:
        pass

    def shutdown(self, drain_timeout: float) -> list[StripJob]:
        return []


def make_run(root: Path, name: str, template: Path, age_s: float = 3600) -> Path:
    path = root / "train" / name / "weights" / "last.pt"
    path.parent.mkdir(parents=True)
    shutil.copyfile(template, path)
    path.chmod(0o644)
    set_age(path, age_s)
    return path


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def service(root: Path, tmp_path: Path) -> Iterator[tuple[Service, DroppingHints, list[float]]]:
    """A Service on `root` with a fake clock, dropped events and in-process strips."""
    clock = [0.0]
    wall0 = time.time()
    s = Settings(root=root, settle=60, rescan_interval=300, state_dir=tmp_path / "state",
                 audit_log=tmp_path / "audit.jsonl")
    store, auditor = StateStore.open(s.state_db), Auditor.open(s.audit_log)
    hints = DroppingHints()
    svc = Service(s, store=store, auditor=auditor,
                  pool_factory=InlinePool,  # type: ignore[arg-type]
                  hints=hints, clock=lambda: clock[0], wall=lambda: wall0 + clock[0])
    yield svc, hints, clock
    if svc.watcher is not None:
        svc.watcher.stop()
    auditor.close()
    store.close()


# watchdog 7's observer warns when folders appear faster than it adds watches ("Callback with id
# ... already exists"); under `-W error` that warning would kill the observer thread mid-test
@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
@pytest.mark.timeout(120)
def test_reconcile_strips_every_run_whose_events_were_lost(
        ckpts: Path, root: Path, tmp_path: Path,
        service: tuple[Service, DroppingHints, list[float]]) -> None:
    """With every event dropped, the next reconcile finds and strips each finished run once."""
    svc, hints, clock = service
    audit = tmp_path / "audit.jsonl"
    svc.start()  # the start-up scan: an empty root; the real observer starts watching it
    assert svc.watcher is not None
    # 300 s (--rescan-interval), or 30 s if inotify was unavailable and the daemon polls instead
    due = svc.next_reconcile
    runs = [make_run(root, f"run{i}", ckpts / ("yolov5.pt" if i % 2 else "ultralytics.pt"))
            for i in range(6)]

    def step(at: float) -> list[str]:
        clock[0] = at
        svc.step(at, svc.wall())
        return [e["path"] for e in audit_lines(audit) if e["event"] == "ckpt.stripped"]

    def why() -> str:
        return (f"watcher: {svc.watcher and svc.watcher.mode}, dropped: {hints.dropped}, "
                f"audit: {audit_lines(audit)[-8:]}")

    if svc.watcher.mode == "inotify":
        # the observer did report the new runs, and every report was lost
        deadline = time.monotonic() + 30
        while hints.dropped == 0 and time.monotonic() < deadline:
            svc.wake.wait(0.05)  # the observer thread reports on its own schedule
        assert hints.dropped > 0, why()
    assert step(1.0) == [] and step(due - 1) == [], why()
    assert not any(e["event"] == "run.discovered" for e in audit_lines(audit)), why()

    step(due)  # the reconcile is due: finds the runs, all quiet for an hour, strips them
    stripped = step(due + 1)
    assert sorted(stripped) == sorted(map(str, runs)), why()
    assert all(is_valid_stripped(p) for p in runs)
    assert step(due + 700) == stripped  # later reconciles find nothing new to do
    finished = [e["run"] for e in audit_lines(audit) if e["event"] == "run.finished"]
    assert sorted(finished) == sorted(str(p.parent.parent) for p in runs)
    assert temp_files(root) == []


def _max_queued_events() -> int:
    try:
        return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    except (OSError, ValueError):
        return 16384


@pytest.mark.timeout(240)
def test_runs_created_during_an_inotify_overflow_are_stripped(
        ckpts: Path, root: Path, tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    """Past the kernel's event queue, runs whose events were lost are still all stripped."""
    canary = make_run(root, "canary", ckpts / "yolov5.pt")
    d = daemons(root, "--settle", "1", "--rescan-interval", "3600", "--workers", "2")
    d.wait_events("ckpt.stripped", 1, timeout=90, path=str(canary))
    scratch = [canary.parent.parent / "a.log", canary.parent.parent / "b.log"]
    for p in scratch:
        p.touch()

    assert d.proc is not None
    # Nothing reads the daemon's inotify queue while it is stopped, so more distinct events than
    # the queue holds overflow it for certain; the runs moved in after that have no events at all.
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        # alternate two files: the kernel merges an event identical to the one queued last
        for i in range(_max_queued_events() + 4000):
            os.utime(scratch[i % 2])
        staging = tmp_path / "staging"
        runs = []
        for i in range(5):
            staged = make_run(staging, f"late{i}", ckpts / "yolov5.pt")
            os.rename(staged.parent.parent, root / "train" / f"late{i}")
            runs.append(root / "train" / f"late{i}" / "weights" / "last.pt")
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)

    for p in runs:
        d.wait_events("ckpt.stripped", 1, timeout=120, path=str(p))
    assert all(is_valid_stripped(p) for p in runs)
    for p in runs:
        assert len(d.events("run.finished", run=str(p.parent.parent))) == 1
    assert d.terminate() == 0
    assert temp_files(root) == []
