"""The service loop, driven purely: a fake clock, a fake pool, fake file facts, no threads."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from ckpt_watchd.engine.profiles import yolov5
from ckpt_watchd.engine.profiles.common import Look
from ckpt_watchd.outcome import FAILED, SKIPPED, STRIPPED, Outcome
from ckpt_watchd.records.audit import Auditor
from ckpt_watchd.records.state import StateStore
from ckpt_watchd.service import Service
from ckpt_watchd.settings import DEFAULT_FILES, DEFAULT_PATTERNS, Settings
from ckpt_watchd.watch.discover import Probe, UnitState
from ckpt_watchd.worker import StripJob
from fixtures.fake_pool import FakePool


class World:
    """Fake file facts: each weights folder's checkpoint files and their (ino, size, mtime)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[Path, dict[str, tuple[int, int, int]]] = {}
        self.kept: set[Path] = set()
        self.busy: set[Path] = set()
        self.ino = 100
        self.closers: list[Callable[[], None]] = []

    def add_run(self, rel: str) -> Path:
        wdir = self.root / rel / "weights"
        wdir.mkdir(parents=True)
        self.files[wdir] = {}
        return wdir

    def write(self, wdir: Path, name: str, wall: float, size: int = 1000) -> None:
        self.ino += 1
        self.files[wdir][name] = (self.ino, size, int(wall * 1e9))

    def probe(self, run: Path) -> Probe:
        """A run's files and units: its weights folder's checkpoints, found by YOLOv5's own rule."""
        wdir = run / "weights"
        ckpts = self.files.get(wdir, {})
        files = tuple((f"weights/{n}", "f", *fp) for n, fp in ckpts.items())
        newest = max((fp[2] for fp in ckpts.values()), default=0)
        look = Look(PurePosixPath(wdir.relative_to(self.root).as_posix()),
                    dict.fromkeys(ckpts, False), DEFAULT_PATTERNS, DEFAULT_FILES)
        found = yolov5.discover(look)
        units = tuple(UnitState(u, self.root / u.rel, ckpts[Path(u.rel).name])
                      for u in (found.units if found else ()))
        return Probe(files, newest, wdir in self.kept, units,  # type: ignore[arg-type]
                     folders=(run, wdir))

    def find(self, below: Path | None = None, depth: int | None = None) -> list[Path]:
        """The runs, as discovery would find them: every run folder with a weights folder."""
        return [w.parent for w in self.files
                if below is None or below in (w, w.parent) or below in w.parent.parents]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "runs")
    yield w
    for close in w.closers:
        close()


def make(world: World, tmp_path: Path, clock: list[float], claimer: Any = None,
         writers: Any = None, **opts: Any) -> tuple[Service, FakePool, Path]:
    world.root.mkdir(exist_ok=True)
    base: dict[str, Any] = {"settle": 60, "rescan_interval": 300, "retry_backoff": 10,
                            "max_attempts": 3}
    s = Settings(root=world.root, state_dir=tmp_path / "state", audit_log=tmp_path / "audit.jsonl",
                 **{**base, **opts})
    pools: list[FakePool] = []

    def factory(on_done: Callable[[StripJob, Outcome], None]) -> FakePool:
        pools.append(FakePool(on_done))
        return pools[0]

    store, auditor = StateStore.open(s.state_db), Auditor.open(s.audit_log)
    world.closers += [store.close, auditor.close]
    svc = Service(s, store=store, auditor=auditor,
                  pool_factory=factory,  # type: ignore[arg-type]
                  clock=lambda: clock[0], wall=lambda: 1_000_000 + clock[0],
                  probe=world.probe, find=world.find, cadence=lambda run, newest: None,
                  in_use=lambda run: 4242 if run in {w.parent for w in world.busy} else None,
                  claimer=claimer, writers=writers)
    return svc, pools[0], s.audit_log


def step(svc: Service, clock: list[float], at: float) -> None:
    clock[0] = at
    svc.step(at, 1_000_000 + at)


def events(audit: Path, name: str | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    return [r for r in rows if name is None or r["event"] == name]


def test_finished_run_is_stripped_once_across_restarts(world: World, tmp_path: Path) -> None:
    """A quiet run gets one run.finished and two jobs (last.pt first); a restart submits nothing."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "best.pt", 1_000_000 - 3600)
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    svc, pool, audit = make(world, tmp_path, clock)
    step(svc, clock, 0.0)
    assert [Path(j.path).name for j in pool.jobs] == ["last.pt", "best.pt"]
    assert all(j.hashes and j.attempt == 1 and not j.dry_run for j in pool.jobs)
    assert len(events(audit, "run.finished")) == 1
    for _ in range(2):
        pool.finish(STRIPPED, fingerprint=None)
    step(svc, clock, 1.0)
    assert [e["path"] for e in events(audit, "ckpt.stripped")] == [str(wdir / "last.pt"),
                                                                  str(wdir / "best.pt")]
    step(svc, clock, 10_000.0)
    assert pool.jobs == []

    # a new daemon on the same state: the files still have the fingerprints the outcomes recorded
    svc2, pool2, audit2 = make(world, tmp_path, clock)
    for name in ("last.pt", "best.pt"):
        ino, size, mtime = world.files[wdir][name]
        svc2.store.record_outcome(
            Outcome(path=str(wdir / name), status=STRIPPED, fingerprint=(ino, size, mtime)),
            run=str(wdir.parent), now=0.0, attempt=1)
    step(svc2, clock, 20_000.0)
    assert pool2.jobs == []
    assert len(events(audit2, "run.finished")) == 1  # only the first daemon's


def test_live_run_is_not_touched_while_it_writes(world: World, tmp_path: Path) -> None:
    """A trainer writing every 30 s for 20 minutes never gets a job; after it stops, one arrives."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    svc, pool, audit = make(world, tmp_path, clock)
    t = 0.0
    for _ in range(40):
        world.write(wdir, "last.pt", 1_000_000 + t)
        svc.hints.add_folder(wdir)
        step(svc, clock, t)
        step(svc, clock, t + 29.9)
        assert pool.jobs == []
        t += 30.0
    assert events(audit, "run.finished") == []
    step(svc, clock, t - 30 + 89.9)  # quiet period is 3 x 30 s
    assert pool.jobs == []
    step(svc, clock, t - 30 + 90.0)
    assert len(pool.jobs) == 1
    assert events(audit, "run.finished")[0]["cadence_s"] == 30.0


def test_failure_is_retried_with_backoff_then_given_up(world: World, tmp_path: Path) -> None:
    """A failing file is retried after 10 s, 20 s, then given up; nothing is tried after that."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    svc, pool, audit = make(world, tmp_path, clock)
    step(svc, clock, 0.0)
    pool.finish(FAILED, error_type="write", error="disk full (no space left on device)")
    step(svc, clock, 0.1)
    step(svc, clock, 9.9)
    assert pool.jobs == []
    step(svc, clock, 10.2)
    assert [j.attempt for j in pool.jobs] == [2]
    pool.finish(FAILED)
    step(svc, clock, 10.3)
    step(svc, clock, 30.4)
    assert [j.attempt for j in pool.jobs] == [3]
    pool.finish(FAILED)
    step(svc, clock, 30.5)
    step(svc, clock, 10_000.0)
    assert pool.jobs == []
    failed = events(audit, "ckpt.failed")
    assert [(e["attempt"], e["final"]) for e in failed] == [(1, False), (2, False), (3, True)]
    assert failed[0]["error"] == "disk full (no space left on device)"


def test_torn_file_is_looked_at_again_not_failed(world: World, tmp_path: Path) -> None:
    """A torn write is skipped without an error and tried again after another quiet period."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    svc, pool, audit = make(world, tmp_path, clock)
    step(svc, clock, 0.0)
    pool.finish(FAILED, error_type="torn", error="incomplete or torn write: ...")
    step(svc, clock, 1.0)
    assert events(audit, "ckpt.failed") == []
    assert "will look again" in events(audit, "ckpt.skipped")[0]["reason"]
    step(svc, clock, 60.9)
    assert pool.jobs == []
    step(svc, clock, 61.0)
    assert len(pool.jobs) == 1


def test_kept_and_excluded_runs_are_never_touched(world: World, tmp_path: Path) -> None:
    """A keep marker gives run.kept and no job; an --exclude match is not even discovered."""
    clock = [0.0]
    kept = world.add_run("train/keepme")
    skipped = world.add_run("train/private-1")
    for w in (kept, skipped):
        world.write(w, "last.pt", 1_000_000 - 3600)
    world.kept.add(kept)
    svc, pool, audit = make(world, tmp_path, clock, exclude=("train/private-*",))
    step(svc, clock, 0.0)
    assert pool.jobs == []
    assert [e["run"] for e in events(audit, "run.kept")] == [str(kept.parent)]
    assert [e["run"] for e in events(audit, "run.discovered")] == [str(kept.parent)]


def test_run_with_a_writer_process_waits(world: World, tmp_path: Path) -> None:
    """Quiet files but a process writing in the run (a very slow epoch): no job until it is gone."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    world.busy.add(wdir)
    svc, pool, audit = make(world, tmp_path, clock)
    step(svc, clock, 0.0)
    step(svc, clock, 60.0)
    assert pool.jobs == []
    assert [e["pid"] for e in events(audit, "run.busy")] == [4242]  # reported once
    world.busy.clear()
    step(svc, clock, 120.0)
    assert len(pool.jobs) == 1


class FakeWriters:
    """Who last wrote each folder, as the fanotify listener would say; a pid in `alive` runs."""

    def __init__(self, error: str | None = None) -> None:
        self.last: dict[Path, int] = {}
        self.alive: set[int] = set()
        self.watched: list[tuple[Path, Path | None]] = []
        self.forgotten: list[Path] = []
        self.drains = 0
        self.error = error

    def watch(self, folder: Path, run: Path | None = None) -> None:
        self.watched.append((folder, run))

    def drain(self) -> None:
        self.drains += 1

    def live(self, run: Path) -> int | None:
        pid = self.last.get(run)
        return pid if pid in self.alive else None

    def forget(self, run: Path) -> None:
        self.forgotten.append(run)


def test_run_whose_last_writer_still_runs_waits(world: World, tmp_path: Path) -> None:
    """No file open, files quiet past the quiet period, but the trainer that wrote them lives on
    (a very slow epoch): run.busy once, no job, until that process is gone."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    writers = FakeWriters()
    writers.last[wdir.parent], writers.alive = 777, {777}
    svc, pool, audit = make(world, tmp_path, clock, writers=writers)
    step(svc, clock, 0.0)
    # every folder of the run is followed from discovery on, as the run's
    assert writers.watched == [(wdir.parent, wdir.parent), (wdir, wdir.parent)]
    step(svc, clock, 60.0)
    assert pool.jobs == []
    busy = events(audit, "run.busy")
    assert [(e["pid"], e["reason"]) for e in busy] == [
        (777, "quiet, but the process that last wrote its checkpoints still runs")]
    assert writers.drains >= 2  # the kernel's queue is read every round
    writers.alive.clear()
    step(svc, clock, 120.0)
    assert len(pool.jobs) == 1


def test_a_run_that_vanishes_is_no_longer_followed(world: World, tmp_path: Path) -> None:
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000)
    writers = FakeWriters()
    svc, _pool, _audit = make(world, tmp_path, clock, writers=writers)
    step(svc, clock, 0.0)
    del world.files[wdir]
    wdir.rmdir()
    svc.next_reconcile = 0.0
    step(svc, clock, 1.0)
    assert writers.forgotten == [wdir.parent]


def test_when_writers_cannot_be_followed_the_daemon_says_so_once(world: World,
                                                                tmp_path: Path) -> None:
    clock = [0.0]
    for name in ("a", "b"):
        world.write(world.add_run(f"train/{name}"), "last.pt", 1_000_000)
    svc, _pool, audit = make(world, tmp_path, clock,
                             writers=FakeWriters(error="fanotify_mark: No space left on device"))
    step(svc, clock, 0.0)
    warnings = [e["message"] for e in events(audit, "daemon.warning")]
    assert len(warnings) == 1 and "fanotify_mark: No space left on device" in warnings[0]


def test_dry_run_jobs_change_nothing_and_report_once(world: World, tmp_path: Path) -> None:
    """--dry-run submits dry-run jobs and records would_strip so a rescan does not repeat them."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    svc, pool, audit = make(world, tmp_path, clock, dry_run=True)
    step(svc, clock, 0.0)
    assert [j.dry_run for j in pool.jobs] == [True]
    ino, size, mtime = world.files[wdir]["last.pt"]
    pool.finish("would_strip", fingerprint=(ino, size, mtime))
    step(svc, clock, 1.0)
    assert len(events(audit, "ckpt.would_strip")) == 1
    svc.tracker.forget(str(wdir.parent))
    step(svc, clock, 10_000.0)
    assert pool.jobs == []


def test_resumed_run_is_tracked_again(world: World, tmp_path: Path) -> None:
    """After a strip, new writes make the run settle again and be stripped again."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    svc, pool, _audit = make(world, tmp_path, clock)
    step(svc, clock, 0.0)
    pool.finish(STRIPPED)
    step(svc, clock, 1.0)
    world.write(wdir, "last.pt", 1_000_000 + 100)
    svc.hints.add_folder(wdir)
    step(svc, clock, 100.0)
    assert pool.jobs == []
    step(svc, clock, 160.0)
    assert len(pool.jobs) == 1


def test_vanished_run_is_forgotten(world: World, tmp_path: Path) -> None:
    """A deleted run folder is dropped from tracking at the next reconcile."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000)
    svc, _pool, audit = make(world, tmp_path, clock)
    step(svc, clock, 0.0)
    del world.files[wdir]
    wdir.rmdir()
    step(svc, clock, 301.0)
    assert svc.tracker.runs() == []
    assert [e["run"] for e in events(audit, "run.forgotten")] == [str(wdir.parent)]


def test_stop_submits_nothing_new_and_writes_daemon_stopped(world: World, tmp_path: Path) -> None:
    """After SIGTERM no new run is started; shutdown drains the pool and audits the counts."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    svc, pool, audit = make(world, tmp_path, clock)
    svc.request_stop()
    step(svc, clock, 0.0)
    assert pool.jobs == []
    assert svc.shutdown() == 0
    assert pool.stopped
    assert events(audit, "daemon.stopped")[0]["stripped"] == 0


def test_skipped_outcome_marks_run_done(world: World, tmp_path: Path) -> None:
    """A file its trainer already stripped is skipped and the run counts as finished."""
    clock = [0.0]
    wdir = world.add_run("detect/train")
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    svc, pool, audit = make(world, tmp_path, clock)
    step(svc, clock, 0.0)
    pool.finish(SKIPPED, reason="already stripped")
    step(svc, clock, 1.0)
    assert events(audit, "ckpt.skipped")[0]["reason"] == "already stripped"
    assert svc.tracker.view(str(wdir.parent), 1.0).phase == "done"  # type: ignore[union-attr]


def test_worker_is_prewarmed_before_a_run_is_due(world: World, tmp_path: Path) -> None:
    """A minute before the first settling run is due the loop wakes and asks for a warm worker."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    svc, pool, _audit = make(world, tmp_path, clock, settle=600, rescan_interval=10_000)
    world.write(wdir, "last.pt", 1_000_000)
    svc.hints.add_folder(wdir)
    clock[0] = 0.0
    wake_at = svc.step(0.0, 1_000_000)
    assert pool.warmed == 0
    assert wake_at == 540.0
    step(svc, clock, 540.0)
    assert pool.warmed == 1
    assert pool.jobs == []


class Claims:
    """Claims as another daemon on the same NFS root would see them: some paths are taken."""

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.released: list[str] = []

    def __call__(self, path: Path, wall: float) -> Any:
        if str(path) in self.taken:
            return None
        claims = self

        class Claim:
            def release(self) -> bool:
                claims.released.append(str(path))
                return True

        return Claim()


def test_file_claimed_by_another_daemon_is_left_to_it(world: World, tmp_path: Path) -> None:
    """No run.finished and no job while another host holds the claim; ours are released after."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    claims = Claims()
    claims.taken.add(str(wdir / "last.pt"))
    svc, pool, audit = make(world, tmp_path, clock, claimer=claims)
    step(svc, clock, 0.0)
    assert pool.jobs == [] and events(audit, "run.finished") == []
    claims.taken.clear()
    step(svc, clock, 59.9)
    assert pool.jobs == []
    step(svc, clock, 60.0)
    assert len(pool.jobs) == 1 and len(events(audit, "run.finished")) == 1
    pool.finish(STRIPPED)
    step(svc, clock, 61.0)
    assert claims.released == [str(wdir / "last.pt")]


def test_run_left_finished_by_a_kill_is_marked_stripped_on_restart(world: World, tmp_path: Path) -> None:
    """Killed after the strips were recorded but before the run's state was: the restart fixes it."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    svc, _pool, _audit = make(world, tmp_path, clock)
    run = str(wdir.parent)
    ino, size, mtime = world.files[wdir]["last.pt"]
    svc.store.upsert_run(run, state="finished", now=0.0)
    svc.store.record_outcome(Outcome(path=str(wdir / "last.pt"), status=STRIPPED,
                                     fingerprint=(ino, size, mtime)), run=run, now=0.0, attempt=1)
    step(svc, clock, 0.0)
    row = svc.store.get_run(run)
    assert row is not None and row.state == "stripped"


# the modules that import torch at top level: only worker processes and one-shot commands load them
TORCH_SIDE = ("torch", "ckpt_watchd.engine.safeload", "ckpt_watchd.engine.strip",
              "ckpt_watchd.engine.checkpoint", "ckpt_watchd.engine.zipwrite")
MAIN_PROCESS = ("cli", "service", "pool", "worker", "watch.watcher", "watch.tracker", "records.state",
                "records.audit", "ops.notify", "ops.metrics", "ops.hooks", "records.claim", "ops.status",
                "records.archive", "settings", "watch.paths", "watch.writers", "engine.atomic")


def test_the_daemons_main_process_modules_never_import_torch() -> None:
    """Importing everything the daemon's main process uses loads none of the torch-side modules."""
    code = (f"import sys\nfor m in {MAIN_PROCESS!r}:\n    __import__('ckpt_watchd.' + m)\n"
            f"print([m for m in {TORCH_SIDE!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_superseded_epochs_are_stripped_while_the_run_trains(world: World, tmp_path: Path) -> None:
    """--strip-superseded: an epochN.pt a newer one replaced is stripped once quiet for --settle;
    the newest one and last/best wait for the end of the run."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    svc, pool, audit = make(world, tmp_path, clock, strip_superseded=True)
    for epoch in range(3):  # an epoch every 20 s; each save writes last, best and epochN
        for name in ("last.pt", "best.pt", f"epoch{epoch}.pt"):
            world.write(wdir, name, 1_000_000 + 20 * epoch)
        svc.hints.add_folder(wdir)
        step(svc, clock, 20.0 * epoch)
    assert pool.jobs == []  # epoch0/1 superseded, but not quiet for --settle (60 s) yet
    world.write(wdir, "last.pt", 1_000_000 + 100)  # the run goes on writing last.pt
    svc.hints.add_folder(wdir)
    step(svc, clock, 100.0)  # epoch0 quiet for 100 s, epoch1 for 80 s
    assert sorted(Path(j.path).name for j in pool.jobs) == ["epoch0.pt", "epoch1.pt"]
    assert [e["path"] for e in events(audit, "ckpt.superseded")] == [
        str(wdir / "epoch0.pt"), str(wdir / "epoch1.pt")]
    assert events(audit, "run.finished") == []  # the run itself is still live
    for _ in range(2):
        name = Path(pool.jobs[0].path).name
        world.write(wdir, name, 1_000_000 + 101)  # what the strip wrote
        pool.finish(STRIPPED, fingerprint=world.files[wdir][name])
    svc.hints.add_folder(wdir)
    step(svc, clock, 101.0)
    assert pool.jobs == [] and events(audit, "run.finished") == []  # ours was no activity
    step(svc, clock, 100.0 + 181)  # quiet for 3 x the longest gap (60 s): the run is finished
    names = sorted(Path(j.path).name for j in pool.jobs)
    assert names == ["best.pt", "epoch2.pt", "last.pt"]  # the rest, once, at the end


def test_without_the_option_nothing_is_stripped_while_the_run_trains(world: World,
                                                                    tmp_path: Path) -> None:
    """By default a live run is never touched: its superseded epochs wait for the end too."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    svc, pool, _audit = make(world, tmp_path, clock)
    for epoch in range(4):
        for name in ("last.pt", f"epoch{epoch}.pt"):
            world.write(wdir, name, 1_000_000 + 50 * epoch)
        svc.hints.add_folder(wdir)
        step(svc, clock, 50.0 * epoch)
    assert pool.jobs == []
    step(svc, clock, 150.0 + 151)  # the quiet period: 3 x the 50 s between saves
    assert sorted(Path(j.path).name for j in pool.jobs) == [
        "epoch0.pt", "epoch1.pt", "epoch2.pt", "epoch3.pt", "last.pt"]


def test_a_checkpoint_rotated_away_mid_strip_is_vanished_not_failed(world: World,
                                                                    tmp_path: Path) -> None:
    """The trainer deleting a checkpoint while it is stripped is no error: ckpt.vanished, no retry."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.write(wdir, "last.pt", 1_000_000 - 3600)
    svc, pool, audit = make(world, tmp_path, clock)
    step(svc, clock, 0.0)
    assert len(pool.jobs) == 1
    del world.files[wdir]["last.pt"]  # rotated away (it was never a real file here)
    pool.finish(FAILED, error_type="changed", error="changed while stripping (the file was removed)")
    step(svc, clock, 1.0)
    assert [e["path"] for e in events(audit, "ckpt.vanished")] == [str(wdir / "last.pt")]
    assert events(audit, "ckpt.failed") == []
    assert svc.store.retries_due(10**9) == []


def test_a_run_that_finishes_while_a_superseded_epoch_is_stripped_submits_it_once(
        world: World, tmp_path: Path) -> None:
    """The run's own strip leaves out a superseded checkpoint still out: no file in two jobs."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    svc, pool, audit = make(world, tmp_path, clock, strip_superseded=True)
    for epoch in range(3):
        for name in ("last.pt", "best.pt", f"epoch{epoch}.pt"):
            world.write(wdir, name, 1_000_000 + 20 * epoch)
        svc.hints.add_folder(wdir)
        step(svc, clock, 20.0 * epoch)
    world.write(wdir, "last.pt", 1_000_000 + 100)
    svc.hints.add_folder(wdir)
    step(svc, clock, 100.0)
    assert sorted(Path(j.path).name for j in pool.jobs) == ["epoch0.pt", "epoch1.pt"]
    step(svc, clock, 100.0 + 181)  # quiet for 3 x 60 s, both superseded strips still out
    names = [Path(j.path).name for j in pool.jobs]
    assert sorted(names) == ["best.pt", "epoch0.pt", "epoch1.pt", "epoch2.pt", "last.pt"]
    assert events(audit, "run.finished")[0]["files"] == [
        str(wdir / n) for n in ("best.pt", "epoch2.pt", "last.pt")]
    while pool.jobs:
        name = Path(pool.jobs[0].path).name
        world.write(wdir, name, 1_000_000 + 290)  # what the strip wrote
        pool.finish(STRIPPED, fingerprint=world.files[wdir][name])
    step(svc, clock, 300.0)
    stripped = sorted(Path(e["path"]).name for e in events(audit, "ckpt.stripped"))
    assert stripped == ["best.pt", "epoch0.pt", "epoch1.pt", "epoch2.pt", "last.pt"]
    row = svc.store.get_run(str(wdir.parent))
    assert row is not None and row.state == "stripped"


def test_a_kept_run_keeps_its_superseded_checkpoints_too(world: World, tmp_path: Path) -> None:
    """--strip-superseded never touches a run with the keep marker, however old its epochs."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    world.kept.add(wdir)
    svc, pool, audit = make(world, tmp_path, clock, strip_superseded=True)
    for epoch in range(3):
        for name in ("last.pt", f"epoch{epoch}.pt"):
            world.write(wdir, name, 1_000_000 + 20 * epoch)
        svc.hints.add_folder(wdir)
        step(svc, clock, 20.0 * epoch)
    world.write(wdir, "last.pt", 1_000_000 + 100)
    svc.hints.add_folder(wdir)
    step(svc, clock, 100.0)
    assert pool.jobs == [] and events(audit, "ckpt.superseded") == []


def test_a_keep_marker_added_while_a_superseded_epoch_settles_stops_its_strip(
        world: World, tmp_path: Path) -> None:
    """The marker is looked for again when a superseded checkpoint comes due, not only when seen."""
    clock = [0.0]
    wdir = world.add_run("train/exp")
    svc, pool, audit = make(world, tmp_path, clock, strip_superseded=True)
    for epoch in range(2):
        for name in ("last.pt", f"epoch{epoch}.pt"):
            world.write(wdir, name, 1_000_000 + 20 * epoch)
        svc.hints.add_folder(wdir)
        step(svc, clock, 20.0 * epoch)
    world.kept.add(wdir)  # touched between two of the trainer's saves: no event of its own
    step(svc, clock, 61.0)  # epoch0 has been quiet for --settle
    assert pool.jobs == [] and events(audit, "ckpt.superseded") == []
