"""The daemon's one stateful loop: hints -> tracker -> pool -> outcomes -> state + audit.

It owns the clock, the stop flag, signal handling and the lifecycle (start-up scan, READY, reconcile,
drain, daemon.stopped). `step(now, wall)` does one round of work and returns the next deadline, so
tests drive it with a fake clock, a fake pool and no threads; `run()` only sleeps until that deadline
or a wake-up. Everything it learns from other threads arrives through `Hints` and the outcome queue;
who wrote which run it reads itself, from the fanotify listener (`writers`), in each round.

A run is the trainer's output folder (`discover`): it is finished when nothing in it changed for
its quiet period and no process still writes it; then each of its units (a checkpoint file, or a
checkpoint folder) is stripped in a worker.
"""

from __future__ import annotations

import fnmatch
import os
import queue
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import structlog

from ckpt_watchd.engine import atomic
from ckpt_watchd.engine.profiles import common
from ckpt_watchd.errors import FINAL_KINDS, StartupError
from ckpt_watchd.ops.progress import Progress
from ckpt_watchd.outcome import FAILED, INCOMPLETE, STRIPPED, WOULD_STRIP, Outcome
from ckpt_watchd.records import audit
from ckpt_watchd.records.state import GIVEN_UP, StateStore
from ckpt_watchd.settings import Settings
from ckpt_watchd.watch import discover, paths, series, watcher
from ckpt_watchd.watch.tracker import DONE, SETTLING, Observation, Tracker
from ckpt_watchd.watch.writers import WriterWatch
from ckpt_watchd.worker import StripJob

log = structlog.get_logger("ckpt_watchd.service")

# Outcomes that mean "a trainer is (or was just) writing": not an error, look again later.
_ACTIVE_KINDS = frozenset({"torn", "changed"})
# ... and those that, with the file gone, mean the trainer deleted it (a rotation)
_VANISH_KINDS = frozenset({"changed", "not_a_file", "torn", "unreadable"})
_POLL_FALLBACK = 30.0
# Start a worker this long before the first settling run is due (less than the pool's idle exit).
_PREWARM_S = 60.0
# At most one round per this many seconds when only file events woke the loop.
_COALESCE_S = 0.5


class WriterSource(Protocol):
    """Who last wrote each weights folder (`writers.WriterWatch`, or a fake in tests)."""

    error: str | None

    def watch(self, folder: Path, run: Path | None = None) -> None: ...
    def drain(self) -> None: ...
    def live(self, folder: Path) -> int | None: ...
    def forget(self, folder: Path) -> None: ...


class Pool(Protocol):
    def submit(self, job: StripJob) -> None: ...
    def pending(self) -> int: ...
    def queue_depth(self) -> int: ...
    def alive(self) -> bool: ...
    def prewarm(self) -> None: ...
    def shutdown(self, drain_timeout: float) -> list[StripJob]: ...

    restarts: int


@dataclass(slots=True)
class _RunWork:
    """One finished run being stripped: which units are still out, and how they went."""

    files: dict[str, tuple[int, int, int]]  # unit path -> fingerprint when submitted
    outcomes: list[Outcome] = field(default_factory=list)
    claims: dict[str, Any] = field(default_factory=dict)
    again: bool = False


class Service:
    def __init__(self, settings: Settings, *, store: StateStore, auditor: audit.Auditor,
                 pool_factory: Callable[[Callable[[StripJob, Outcome], None]], Pool],
                 hints: watcher.Hints | None = None, wake: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 probe: Callable[[Path], discover.Probe] | None = None,
                 find: Callable[..., Iterable[Path]] | None = None,
                 cadence: Callable[[Path, float | None], float | None] = watcher.cadence_hint,
                 in_use: Callable[[Path], int | None] = watcher.run_in_use,
                 claimer: Any = None, notifier: Any = None, metrics: Any = None,
                 writers: WriterSource | None = None, writers_how: str = "off",
                 progress: Progress | None = None) -> None:
        self.s = settings
        self.progress = progress  # --once on a terminal: jobs done out of jobs handed out
        self.store = store
        self.auditor = auditor
        self.clock, self.wall = clock, wall
        self.wake = wake or threading.Event()
        self.hints = hints or watcher.Hints(self.wake)
        self.outcomes: queue.SimpleQueue[tuple[StripJob, Outcome]] = queue.SimpleQueue()
        self.pool = pool_factory(self._on_done)
        self.tracker = Tracker(settle=settings.settle)
        # --strip-superseded: each superseded checkpoint of a live run settles on its own, for
        # --settle (no cadence rule: the trainer will never write it again)
        self.units = Tracker(settle=settings.settle, factor=0.0)
        self._unit_run: dict[str, Path] = {}  # a superseded unit -> its run
        self._unit_work: dict[str, tuple[tuple[int, int, int], Any]] = {}  # out: fp, claim
        self._skip = [p for p in (settings.state_dir, settings.archive_dir) if p is not None]
        self.where = discover.Where(settings.root, settings.pattern, settings.files,
                                    skip=tuple(self._skip), max_depth=settings.max_depth)
        self._probe = probe or (lambda run: discover.probe(run, self.where))
        self._find = find or self._find_runs
        self._cadence = cadence
        self._in_use = in_use
        self.writers = writers
        self._writers_how = writers_how
        self._writers_warned = False
        self._busy_reported: set[str] = set()
        self.claimer = claimer
        self.notifier = notifier
        self.metrics = metrics
        self.stop_event = threading.Event()
        self.urgent = threading.Event()  # outcomes and stop requests end a coalescing pause
        self.reopen_requested = False
        self.work: dict[Path, _RunWork] = {}  # run -> its units out for stripping
        self._run_of: dict[Path, Path] = {}  # a folder of a known run -> that run
        self._marked: dict[Path, set[Path]] = {}  # run -> its folders the writer watch follows
        self.counts = {"stripped": 0, "skipped": 0, "failed": 0, "would_strip": 0,
                       "bytes_saved": 0, "runs_finished": 0}
        self.watcher: watcher.Watcher | None = None
        self.next_reconcile = 0.0
        self.last_reconcile_wall: float | None = None
        self._sigints = 0
        self._restarts_seen = 0
        self._status_sent = ""
        self._unwatched_warned = False
        self._torn_seen: set[tuple[str, tuple[int, int, int]]] = set()

    # ------------------------------------------------------------------ threads -> loop

    def _on_done(self, job: StripJob, outcome: Outcome) -> None:
        """Called on a pool thread: hand the outcome to the loop."""
        self.outcomes.put((job, outcome))
        self.urgent.set()
        self.wake.set()

    # ------------------------------------------------------------------ one round

    def step(self, now: float, wall: float) -> float | None:
        """Do everything that is due at `now`; return when to be called again (None: on events)."""
        if self.reopen_requested:
            self.reopen_requested = False
            self.auditor.reopen()
        self._drain_outcomes(now, wall)
        if self.writers is not None:
            self.writers.drain()  # keep the kernel's queue short; live() drains again
            self._check_writers()
        folders, subtrees = self.hints.drain()
        runs: set[Path] = set()
        for sub in subtrees:
            runs.update(self._runs_under(sub))
        for folder in folders:
            runs.update(self._runs_of(folder))
        if now >= self.next_reconcile:
            runs.update(self.reconcile(now, wall))
        for run in runs:
            self._observe(run, now, wall)
        if not self.stop_event.is_set():
            for key in self.tracker.due(now):
                self._start_run(Path(key), now, wall)
            for key in self.units.due(now):
                self._start_unit(key, now, wall)
            self._retry_due(now, wall)
        first_due = min((d for d in (self.tracker.next_deadline(), self.units.next_deadline())
                         if d is not None), default=None)
        warm_at = None
        if first_due is not None:
            warm_at = first_due - _PREWARM_S
            if warm_at <= now:
                self.pool.prewarm()
                warm_at = None
        self._report()
        deadlines = [d for d in (first_due, warm_at, self.next_reconcile,
                                 self._wall_to_mono(self.store.next_retry_at(), now, wall))
                     if d is not None]
        return min(deadlines) if deadlines else None

    def _drain_outcomes(self, now: float, wall: float) -> None:
        while True:
            try:
                job, outcome = self.outcomes.get_nowait()
            except queue.Empty:
                return
            self._handle(job, outcome, now, wall)

    @staticmethod
    def _wall_to_mono(at: float | None, now: float, wall: float) -> float | None:
        return None if at is None else now + (at - wall)

    def _find_runs(self, below: Path | None = None, depth: int | None = None) -> Iterable[Path]:
        return discover.find_runs(self.where, below=below, depth=depth).keys()

    def _runs_under(self, folder: Path) -> set[Path]:
        return set(self._find(below=folder))

    def _runs_of(self, folder: Path) -> set[Path]:
        """The run a changed folder belongs to: a known run above it, or what it holds itself."""
        run = self._run_of.get(folder)
        if run is not None:
            return {run}
        known = self.tracker.runs()
        for above in (folder, *folder.parents):
            if str(above) in known:
                self._run_of[folder] = above
                return {above}
            if above == self.s.root:
                break
        # not (yet) inside a run we follow: a new unit folder says which run it belongs to
        return set(self._find(below=folder, depth=0))

    def reconcile(self, now: float, wall: float) -> set[Path]:
        """Every run on disk now; runs we track that vanished are forgotten."""
        found = set(self._find())
        interval = self.s.rescan_interval
        if self.s.poll is not None:
            interval = self.s.poll
        elif self.watcher is not None and (
                self.watcher.mode == "polling" or self._partly_unwatched(found)):
            # no inotify at all, or not for every folder: poll (cheaply: one stat per file)
            interval = min(interval, _POLL_FALLBACK)
        self.next_reconcile = now + interval
        for run in self.tracker.runs():
            if Path(run) not in found:  # deleted, or nothing of a trainer's left in it
                self._forget(Path(run), wall)
        self.last_reconcile_wall = wall
        if self.metrics is not None:
            self.metrics.scan_completed(wall)
        return found

    def _partly_unwatched(self, found: set[Path]) -> bool:
        """Folders inotify could not watch (its limit) are polled instead; say so once."""
        watched = watcher.watched_inodes()
        if watched is None:
            return False
        missing = watcher.unwatched(found, watched)
        if missing and not self._unwatched_warned:
            self._unwatched_warned = True
            self.warn(f"inotify watches {len(found) - len(missing)} of {len(found)} run folders "
                      f"(e.g. not {missing[0]}): fs.inotify.max_user_watches is too low; polling "
                      f"the unwatched ones every {_POLL_FALLBACK:g}s")
        return bool(missing)

    def _forget(self, run: Path, wall: float) -> None:
        self.tracker.forget(str(run))
        for path in [p for p, r in self._unit_run.items() if r == run]:
            self.units.forget(path)
            if path not in self._unit_work:
                del self._unit_run[path]
        if self.writers is not None:
            self.writers.forget(run)
        self._marked.pop(run, None)
        for folder in [f for f, r in self._run_of.items() if r == run]:
            del self._run_of[folder]
        self.store.forget_run(str(run))
        self.auditor.emit(audit.RUN_FORGOTTEN, run=str(run))

    def _observe(self, run: Path, now: float, wall: float) -> None:
        key = str(run)
        if not os.path.lexists(run):
            if key in self.tracker.runs():
                self._forget(run, wall)
            return
        rel = paths.relative_to(run, self.s.root)
        if rel is None or paths.is_excluded(rel, self.s.exclude):
            return
        p = self._probe(run)
        self._follow(run, p)
        known = self.tracker.view(key, now)
        if known is None:
            row = self.store.get_run(key)
            if row is None:
                self.auditor.emit(audit.RUN_DISCOVERED, run=key)
                if not self.s.dry_run:
                    self.store.upsert_run(key, state="watching", now=wall)
            hint = self._cadence(run, p.newest_mtime)
            stored = row.cadence_s if row is not None else None
            hints = [h for h in (hint, stored) if h is not None]
            age = None if p.newest_mtime is None else wall - p.newest_mtime
            self.tracker.observe(key, p.obs, now, age=age,
                                 cadence_hint=max(hints) if hints else None)
        else:
            self.tracker.observe(key, p.obs, now)
        if self.s.strip_superseded:
            self._observe_superseded(run, p, now, wall)

    def _follow(self, run: Path, p: discover.Probe) -> None:
        """Remember the run's folders (events there are the run's) and follow their writers."""
        marked = self._marked.setdefault(run, set())
        for folder in p.folders:
            self._run_of[folder] = run
            if folder not in marked:
                marked.add(folder)
                if self.writers is not None:
                    self.writers.watch(folder, run)
        if self.writers is not None:
            self._check_writers()

    # ------------------------------------------------------------------ superseded units

    def _observe_superseded(self, run: Path, p: discover.Probe, now: float, wall: float) -> None:
        """Let each superseded checkpoint of a run that still trains settle on its own."""
        view = self.tracker.view(str(run), now)
        if p.kept or view is None or view.phase != SETTLING or run in self.work:
            return  # kept, not training (finished runs are stripped whole), or not watched
        rel = {str(u.path): str(u.path.relative_to(self.s.root)) for u in p.units}
        members = [series.Member(rel[str(u.path)], u.unit.series, u.unit.index,
                                 u.unit.rewritten,
                                 tuple(str(a.relative_to(self.s.root)) for a in u.also))
                   for u in p.units if u.fingerprint is not None]
        old = series.superseded(members, self.s.keep_resumable)
        wanted = {str(u.path): u for u in p.units if rel[str(u.path)] in old}
        for path, run_of in list(self._unit_run.items()):
            if run_of == run and path not in wanted and path not in self._unit_work:
                self.units.forget(path)  # gone (rotated away) or no longer superseded
                del self._unit_run[path]
        for path, u in wanted.items():
            fp = u.fingerprint
            assert fp is not None
            if path in self._unit_work or self.store.already_done(path, fp, dry_run=self.s.dry_run) \
                    or self.store.given_up_on(path, fp):
                continue
            self._unit_run[path] = run
            # quiet since its last write (a daemon started mid-training need not wait again)
            self.units.observe(path, Observation((fp,), fp[2]), now,
                               age=max(0.0, wall - fp[2] / 1e9))

    def _start_unit(self, path: str, now: float, wall: float) -> None:
        run = self._unit_run.get(path)
        if run is None or run in self.work:
            self.units.forget(path)
            return
        p = self._probe(run)
        # a kept run is never touched (its marker may have appeared since the unit was seen)
        u = None if p.kept else next((u for u in p.units if str(u.path) == path), None)
        if u is None or u.fingerprint is None:
            self.units.forget(path)
            self._unit_run.pop(path, None)
            return
        view = self.units.view(path, now)
        if view is None or (u.fingerprint,) != self.units.observed_key(path):
            self.units.observe(path, Observation((u.fingerprint,), u.fingerprint[2]), now)
            return  # changed since it was seen: it settles again
        claims, elsewhere = self._claim([path], wall)
        if elsewhere:
            self.units.look_again(path, now)
            return
        self._unit_work[path] = (u.fingerprint, claims.get(path))
        self.auditor.emit(audit.CKPT_SUPERSEDED, path=path, run=str(run),
                          keep_resumable=self.s.keep_resumable)
        self._submit(run, u, 1)

    def _handle_unit(self, job: StripJob, outcome: Outcome, now: float, wall: float) -> None:
        fp, claim = self._unit_work.pop(job.path)
        if claim is not None:
            claim.release()
        run = self._unit_run.pop(job.path, Path(job.run or "."))
        self._record(job, outcome, run, fp, now, wall, active=self._is_activity(job.path, fp,
                                                                                 outcome))
        p = self._probe(run)
        self.tracker.own_write(str(run), p.obs.key)  # our rewrite is no sign of training
        done = next((u for u in p.units if str(u.path) == job.path), None)
        if outcome.status == STRIPPED and done is not None and done.fingerprint is not None:
            self.units.finished(job.path, (done.fingerprint,))
        else:
            self.units.forget(job.path)

    # ------------------------------------------------------------------ a finished run

    def _start_run(self, run: Path, now: float, wall: float) -> None:
        key = str(run)
        view = self.tracker.view(key, now)
        p = self._probe(run)
        if p.kept:
            self.tracker.finished(key, p.obs.key)
            if not self.s.dry_run:
                self.store.upsert_run(key, state="kept", now=wall, reason=paths.KEEP_MARKER)
            self.auditor.emit(audit.RUN_KEPT, run=key, reason=f"{paths.KEEP_MARKER} present")
            return
        self._report_leftovers(key, p, wall)
        todo: dict[str, discover.UnitState] = {}
        attempts: dict[str, int] = {}
        for u in self._units_to_strip(p):
            path, fp = str(u.path), u.fingerprint
            assert fp is not None
            if path in self._unit_work:
                continue  # being stripped as superseded right now: its own outcome records it
            if self.store.already_done(path, fp, dry_run=self.s.dry_run) or \
                    self.store.given_up_on(path, fp):
                continue
            row = self.store.checkpoint(path)
            attempts[path] = (row.attempts + 1 if row is not None and row.status == FAILED
                              and row.fingerprint in (None, fp) else 1)
            todo[path] = u
        if not todo:
            self.tracker.finished(key, p.obs.key)
            self._record_done(key, wall)
            return
        # only now, with work to do, look for a live writer (a /proc scan, ~ms)
        busy = self._live_writer(run)
        if busy is not None:
            # quiet files, but the trainer is still there: a slow epoch
            if key not in self._busy_reported:
                self._busy_reported.add(key)
                self.auditor.emit(audit.RUN_BUSY, run=key, pid=busy[0], reason=busy[1])
            self.tracker.look_again(key, now)
            return
        self._busy_reported.discard(key)
        claims, elsewhere = self._claim(todo, wall)
        todo = {k: v for k, v in todo.items() if k not in elsewhere}
        if not todo:  # another daemon on this shared root has them all: look again later
            self.tracker.look_again(key, now)
            return
        quiet = view.quiet_s if view else self.s.settle
        cadence = view.cadence_s if view else 0.0
        self.auditor.emit(audit.RUN_FINISHED, run=key, quiet_s=round(quiet, 3),
                          cadence_s=round(cadence, 3), files=sorted(todo))
        if not self.s.dry_run:
            self.store.upsert_run(key, state="finished", now=wall, cadence_s=cadence)
        self.counts["runs_finished"] += 1
        fps = {path: u.fingerprint for path, u in todo.items() if u.fingerprint is not None}
        self.work[run] = _RunWork(files=fps, claims=claims, again=bool(elsewhere))
        # what a resume would start from (last.pt, last.ckpt) first, then what is written again
        for path, u in sorted(todo.items(), key=lambda kv: (
                not kv[1].path.name.startswith("last"), not kv[1].unit.rewritten, kv[0])):
            self._submit(run, u, attempts[path])

    @staticmethod
    def _units_to_strip(p: discover.Probe) -> list[discover.UnitState]:
        """The run's units that are there, one per file: hard-linked names go with their first."""
        out, inodes = [], set()
        for u in sorted(p.units, key=lambda u: str(u.path)):
            if u.fingerprint is None:
                continue
            if u.kind == common.FILE:
                if u.fingerprint[0] in inodes:
                    continue
                inodes.add(u.fingerprint[0])
            out.append(u)
        return out

    def _report_leftovers(self, run: str, p: discover.Probe, wall: float) -> None:
        """A kill mid-save leaves files that are no checkpoint (tmp.pth.tar): say so, once."""
        for rel in p.incomplete:
            path = self.s.root / rel
            try:
                st = os.lstat(path)
            except OSError:
                continue
            fp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self.store.given_up_on(str(path), fp):
                continue
            why = "a leftover of a save that did not finish (the trainer was killed mid-save?)"
            self.auditor.emit(audit.CKPT_INCOMPLETE, path=str(path), run=run, reason=why)
            if not self.s.dry_run:
                self.store.give_up(str(path), run=run, now=wall, attempt=1,
                                   error_type="incomplete", error=why, fingerprint=fp)

    def _live_writer(self, run: Path) -> tuple[int, str] | None:
        """(pid, why) of a process that shows the run is still training, else None."""
        if self.writers is not None:  # a dict lookup and one /proc read: before the /proc scan
            pid = self.writers.live(run)
            if pid is not None:
                return pid, "quiet, but the process that last wrote its checkpoints still runs"
        pid = self._in_use(run)
        if pid is not None:
            return pid, "quiet, but a process still has files in the run open"
        return None

    def _check_writers(self) -> None:
        assert self.writers is not None
        if self.writers.error is not None and not self._writers_warned:
            self._writers_warned = True
            self.warn(f"cannot follow (all) checkpoint writers: {self.writers.error}; those runs "
                      f"rely on the quiet period and the open-file check alone")

    def _record_done(self, run: str, wall: float) -> None:
        """Every file was already dealt with (a restart after a kill): make the run's state say so."""
        row = self.store.get_run(run)
        if self.s.dry_run or row is None or row.state in ("stripped", "failed", "kept"):
            return
        failed = [c for c in self.store.checkpoints_of(run)
                  if c.status == GIVEN_UP and c.error_type != "incomplete"]
        self.store.upsert_run(run, state="failed" if failed else "stripped", now=wall,
                              reason=failed[0].error if failed else None)

    def _claim(self, paths: Iterable[str], wall: float) -> tuple[dict[str, Any], set[str]]:
        """NFS-safe claims, so that of several daemons on one shared root only one strips a file."""
        claims: dict[str, Any] = {}
        elsewhere: set[str] = set()
        if self.claimer is None or self.s.dry_run:
            return claims, elsewhere
        for path in paths:
            claim = self.claimer(Path(path), wall)
            if claim is None:
                elsewhere.add(path)
            else:
                claims[path] = claim
        return claims, elsewhere

    def _submit(self, run: Path, u: discover.UnitState, attempt: int) -> None:
        if self.progress is not None:
            self.progress.grow()
        self.pool.submit(StripJob(
            path=str(u.path), run=str(run), kind=u.kind, profile=u.unit.profile,
            also=tuple(str(a) for a in u.also), dry_run=self.s.dry_run, hashes=True,
            attempt=attempt, root=str(self.s.root),
            archive_dir=str(self.s.archive_dir) if self.s.archive_dir else None))

    def _handle(self, job: StripJob, outcome: Outcome, now: float, wall: float) -> None:
        if self.progress is not None:
            self.progress.advance()
        if job.path in self._unit_work:
            self._handle_unit(job, outcome, now, wall)
            return
        run = Path(job.run) if job.run else Path(job.path).parent
        work = self.work.get(run)
        fp = work.files.get(job.path) if work else None
        claim = work.claims.pop(job.path, None) if work else None
        if claim is not None:
            claim.release()
        active = self._is_activity(job.path, fp, outcome)
        self._record(job, outcome, run, fp, now, wall, active)
        if work is None:
            return
        work.outcomes.append(outcome)
        work.files.pop(job.path, None)
        if active:
            work.again = True
        if not work.files:
            self._end_run(run, work, now, wall)

    def _is_activity(self, path: str, fp: tuple[int, int, int] | None, o: Outcome) -> bool:
        """A torn or changing file means a trainer is writing: look again, do not count a failure.

        But a torn file that is still byte-for-byte the same torn file a quiet period later is a
        trainer killed mid-save: from then on it fails like any bad file (retries, then given up).
        """
        if o.status != FAILED or o.error_type not in _ACTIVE_KINDS:
            return False
        if o.error_type == "torn" and fp is not None:
            if (path, fp) in self._torn_seen:
                return False
            self._torn_seen.add((path, fp))
        return True

    def _record(self, job: StripJob, o: Outcome, run: Path, fp: tuple[int, int, int] | None,
                now: float, wall: float, active: bool = False) -> None:
        r = str(run)
        if self.metrics is not None:
            self.metrics.record_outcome(o)
        if o.status == FAILED and o.error_type in _VANISH_KINDS and not self._still_there(run, o):
            # the trainer deleted it meanwhile (save_total_limit, max_history, save_top_k): not
            # an error; nothing of ours is left behind (the worker removed its temp file)
            self.auditor.emit(audit.CKPT_VANISHED, path=o.path, run=r, reason=o.error)
            self.counts["vanished"] = self.counts.get("vanished", 0) + 1
            return
        if active:
            # a trainer is writing: not an error, the run settles again
            self.auditor.emit(audit.CKPT_SKIPPED, path=o.path, run=r,
                              reason=f"{o.error}; will look again after the next quiet period")
            self.counts["skipped"] += 1
            return
        if o.status == FAILED and o.error_type == "cancelled":
            self.auditor.emit(audit.CKPT_FAILED, path=o.path, run=r, error_type="cancelled",
                              error=o.error, attempt=job.attempt)
            return  # not an attempt: the next start looks at it again
        if o.status == INCOMPLETE or (o.status == FAILED and o.error_type == "torn"):
            # a torn file still torn a quiet period later, an incomplete checkpoint folder: what
            # a kill mid-save leaves. Reported once, left as it is; the rest of the run goes on.
            why = o.reason or o.error or "incomplete"
            self.auditor.emit(audit.CKPT_INCOMPLETE, path=o.path, run=r, reason=why)
            if not self.s.dry_run:
                self.store.give_up(o.path, run=r, now=wall, attempt=job.attempt,
                                   error_type="incomplete", error=why, fingerprint=fp)
            self.counts["incomplete"] = self.counts.get("incomplete", 0) + 1
            return
        event, fields = audit.outcome_event(o, run=r, attempt=job.attempt)
        if o.status == FAILED:
            final = (job.attempt >= self.s.max_attempts or self.s.dry_run
                     or o.error_type in FINAL_KINDS)
            fields["final"] = final
            if not self.s.dry_run:
                if final:
                    self.store.give_up(o.path, run=r, now=wall, attempt=job.attempt,
                                       error_type=o.error_type or "error", error=o.error or "",
                                       fingerprint=fp)
                else:
                    at = wall + self.s.retry_backoff * 2 ** (job.attempt - 1)
                    self.store.schedule_retry(o.path, run=r, at=at, attempt=job.attempt,
                                              error_type=o.error_type or "error",
                                              error=o.error or "", now=wall, fingerprint=fp)
                    fields["retry_in_s"] = round(at - wall, 3)
        elif not self.s.dry_run or o.status == WOULD_STRIP:
            self.store.record_outcome(o, run=r, now=wall, attempt=job.attempt)
        self.auditor.emit(event, **fields)
        self.counts[o.status] = self.counts.get(o.status, 0) + 1
        if o.status == STRIPPED and o.bytes_before and o.bytes_after:
            self.counts["bytes_saved"] += o.bytes_before - o.bytes_after

    def _still_there(self, run: Path, o: Outcome) -> bool:
        return any(str(u.path) == o.path for u in self._probe(run).units)

    def _end_run(self, run_dir: Path, work: _RunWork, now: float, wall: float) -> None:
        self.work.pop(run_dir, None)
        if work.again:
            self.tracker.look_again(str(run_dir), now)
            return
        p = self._probe(run_dir)
        self.tracker.finished(str(run_dir), p.obs.key)
        if self.s.dry_run:
            return
        # a file the trainer deleted meanwhile was audited ckpt.vanished: no failure of the run
        gone = {o.path for o in work.outcomes} - {str(u.path) for u in p.units}
        failed = [o for o in work.outcomes if o.status == FAILED and o.error_type != "torn"
                  and not (o.error_type in _VANISH_KINDS and o.path in gone)]
        stripped = [o for o in work.outcomes if o.status == STRIPPED]
        run = str(run_dir)
        self.store.upsert_run(run, state="failed" if failed else "stripped", now=wall,
                              reason=failed[0].error if failed else None)
        if stripped and self.s.on_stripped:
            self._run_hook(run, stripped)

    def _run_hook(self, run: str, stripped: list[Outcome]) -> None:
        from ckpt_watchd.ops import hooks

        files = [(o.path, o.bytes_before or 0, o.bytes_after or 0) for o in stripped]
        cmd = self.s.on_stripped
        assert cmd is not None

        def go() -> None:
            res = hooks.run_hook(cmd, shell=self.s.on_stripped_shell, timeout=self.s.hook_timeout,
                                 run_dir=run, files=files)
            if self.metrics is not None:
                self.metrics.hook_finished(res.ok)
            if res.ok:
                self.auditor.emit("hook.ran", run=run, duration_s=round(res.duration_s, 3))
            else:
                self.auditor.emit("hook.failed", run=run, error=res.error,
                                  returncode=res.returncode)

        threading.Thread(target=go, name="ckpt-watchd-hook", daemon=True).start()

    def _retry_due(self, now: float, wall: float) -> None:
        if self.s.once:
            return
        for row in self.store.retries_due(wall):
            run = Path(row.run)
            if run in self.work:
                continue
            view = self.tracker.view(str(run), now)
            if view is None or view.phase != DONE:
                continue  # written again, or not seen yet: the settle path takes it from here
            p = self._probe(run)
            match = [u for u in p.units if str(u.path) == row.path and u.fingerprint is not None]
            self.tracker.observe(str(run), p.obs, now)
            if not match or not self.tracker.hand(str(run)):
                continue  # gone, or changed since: it settles again first
            claims, elsewhere = self._claim([row.path], wall)
            if elsewhere:
                self.tracker.look_again(str(run), now)
                continue
            fp = match[0].fingerprint
            assert fp is not None
            self.work[run] = _RunWork(files={row.path: fp}, claims=claims)
            self._submit(run, match[0], row.attempts + 1)

    # ------------------------------------------------------------------ reporting

    def _report(self) -> None:
        settling = self.tracker.count(SETTLING)
        if self.metrics is not None:
            for _ in range(self.pool.restarts - self._restarts_seen):
                self.metrics.worker_restarted()
            self._restarts_seen = self.pool.restarts
            self.metrics.set_gauges(runs_watched=len(self.tracker.runs()), runs_settling=settling,
                                    queue_depth=self.pool.pending())
        if self.notifier is not None:
            text = (f"watching {len(self.tracker.runs())} runs, {settling} settling, "
                    f"{self.pool.pending()} queued; stripped {self.counts['stripped']}, "
                    f"failed {self.counts['failed']}")
            if text != self._status_sent:  # one datagram per change, not per step
                self._status_sent = text
                self.notifier.status(text)

    def healthy(self) -> tuple[bool, str]:
        if self.watcher is not None and not self.watcher.alive():
            return False, "file watcher is not running"
        if not self.pool.alive():
            return False, "worker pool is not running"
        if self.last_reconcile_wall is not None:
            late = self.wall() - self.last_reconcile_wall
            limit = 3 * (self.s.poll or self.s.rescan_interval) + 60
            if late > limit:
                return False, f"no reconcile for {late:.0f}s"
        return True, "ok"

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self, *_: Any) -> None:
        self.stop_event.set()
        self.urgent.set()
        self.wake.set()

    def on_sigint(self, *_: Any) -> None:
        self._sigints += 1
        if self._sigints > 1:
            # second Ctrl-C: leave now; every write is atomic, workers die with us (PDEATHSIG)
            os._exit(130)
        self.request_stop()

    def on_sighup(self, *_: Any) -> None:
        self.reopen_requested = True
        self.wake.set()

    def start(self) -> None:
        """Start watching, then the start-up scan: stale temps removed, every run looked at."""
        now, wall = self.clock(), self.wall()
        self.auditor.emit(audit.DAEMON_STARTED, root=str(self.s.root), pid=os.getpid(),
                          settings=self.s.as_dict(), writer_pids=self._writers_how)
        self.watcher = watcher.Watcher(self.s.root, self.hints, ignore=self._skip, warn=self.warn)
        if self.s.poll is None and not self.s.once:
            self.watcher.start()
        else:
            self.watcher.mode = "polling"
        runs = self.reconcile(now, wall)
        probes = {run: self._probe(run) for run in runs}
        if not self.s.dry_run:
            for p in [*probes.values(), *self._runs_no_longer_found(runs)]:
                self._finish_folder_strips(p)
                for folder in p.folders:
                    for tmp in atomic.remove_stale_temps(folder):
                        log.info("removed stale temp file", path=str(tmp))
                    self._clear_abandoned_claims(folder, wall)
        self._warn_unmatched(probes.values())
        for run in runs:
            self._observe(run, now, wall)

    def _warn_unmatched(self, probes: Iterable[discover.Probe]) -> None:
        """A --files glob or --pattern of the user's that matched nothing anywhere: say so."""
        from ckpt_watchd.settings import DEFAULT_FILES, DEFAULT_PATTERNS

        yolo = [PurePosixPath(u.unit.rel) for p in probes for u in p.units
                if u.unit.profile == "yolov5"]
        if tuple(self.s.files) != DEFAULT_FILES:
            for glob in self.s.files:
                if not any(fnmatch.fnmatchcase(u.name, glob) for u in yolo):
                    self.warn(f"--files {glob!r} matched no checkpoint in any run under "
                              f"{self.s.root} (the glob is matched against file names in the "
                              f"weights folders --pattern finds)")
        if tuple(self.s.pattern) != DEFAULT_PATTERNS:
            for pattern in self.s.pattern:
                if not any(paths.is_weights_dir(u.parent, [pattern]) for u in yolo):
                    self.warn(f"--pattern {pattern!r} matched no weights folder with "
                              f"checkpoints under {self.s.root}")

    def _runs_no_longer_found(self, found: set[Path]) -> list[discover.Probe]:
        """Runs of ours (the state store's) that discovery does not find now, as they are on disk.

        An accelerate project whose state folders are all stripped has no unit left, so it is no
        run; but a kill of the last strip there may have left that folder's journal, or our claim.
        """
        out = []
        for row in self.store.runs():
            run = Path(row.run)
            rel = paths.relative_to(run, self.s.root)
            if run in found or rel is None or paths.is_excluded(rel, self.s.exclude):
                continue
            try:
                if not stat.S_ISDIR(os.lstat(run).st_mode):
                    continue
            except OSError:
                continue  # deleted meanwhile
            out.append(self._probe(run))
        return out

    def _finish_folder_strips(self, p: discover.Probe) -> None:
        """A folder strip a kill interrupted is rolled back or finished (its journal says which).

        Every unit folder, and every other folder of the run holding a journal: an accelerate
        strip killed after it unlinked the file discovery keys on leaves a folder that is no unit.
        """
        from ckpt_watchd.engine import folder

        todo = {u.path for u in p.units if u.kind == common.FOLDER}
        todo.update(f for f in p.folders if os.path.lexists(f / folder.JOURNAL))
        for path in sorted(todo):
            done = folder.replay(path)
            if done is not None:
                log.info("finished an interrupted folder strip", path=str(path), result=done)

    def _clear_abandoned_claims(self, folder: Path, wall: float) -> None:
        """Claims a killed daemon left on files it had finished: take each over and release it.

        First the graves and breakers it left mid-removal go (claim.sweep).
        Files that still need work are claimed anew anyway; these would otherwise stay forever.
        A claim another live daemon holds is left alone (the claimer refuses it).
        """
        if self.claimer is None:
            return
        from ckpt_watchd.records import claim as claims
        from ckpt_watchd.records.claim import CLAIM_PREFIX

        for debris in claims.sweep(folder, host=socket.gethostname(), now=wall,
                                   stale_after=self.s.claim_timeout):
            log.info("removed a killed daemon's claim debris", path=str(debris))
        try:
            names = [e.name for e in os.scandir(folder)
                     if e.name.startswith(CLAIM_PREFIX) and e.name.endswith(".lock")]
        except OSError:
            return
        for name in names:
            claim = self.claimer(folder / name[len(CLAIM_PREFIX):-len(".lock")], wall)
            if claim is not None:
                claim.release()

    def warn(self, message: str) -> None:
        self.auditor.emit(audit.WARNING, message=message)

    def run(self) -> int:
        """Loop until stopped (or, with --once, until every quiet run is done)."""
        self.start()
        if self.notifier is not None:
            self.notifier.ready()
        ping = self.notifier.watchdog_interval() if self.notifier is not None else None
        next_ping = self.clock()
        while not self.stop_event.is_set():
            now = self.clock()
            deadline = self.step(now, self.wall())
            if self.s.once and not self.work and self.pool.pending() == 0 and \
                    self.outcomes.empty():
                break
            if self.watcher is not None and self.watcher.mode == "inotify" and \
                    not self.watcher.alive():
                self.watcher.degrade("the inotify observer thread died")
                self.next_reconcile = now
            if ping is not None and now >= next_ping:
                healthy, _why = self.healthy()
                if healthy:
                    self.notifier.watchdog()
                next_ping = now + ping
            waits = [d - now for d in (deadline, next_ping if ping else None) if d is not None]
            woken = self.wake.wait(timeout=max(0.0, min(waits)) if waits else None)
            self.wake.clear()
            if woken and self.outcomes.empty() and not self.reopen_requested:
                # woken by file events only: gather them for a moment, so a storm of writes
                # costs one round per _COALESCE_S instead of one per event; an outcome or a
                # stop request ends the pause at once
                self.urgent.wait(max(0.0, now + _COALESCE_S - self.clock()))
            self.urgent.clear()
        return self.shutdown()

    def shutdown(self) -> int:
        if self.notifier is not None:
            self.notifier.stopping()
        if self.watcher is not None:
            self.watcher.stop()
        for job in self.pool.shutdown(self.s.drain_timeout):  # never started: give claims back
            work = self.work.get(Path(job.run) if job.run else Path(job.path).parent)
            claim = work.claims.pop(job.path, None) if work else None
            if claim is not None:
                claim.release()
        self._drain_outcomes(self.clock(), self.wall())
        if self.progress is not None:
            self.progress.done()
        self.auditor.emit(audit.DAEMON_STOPPED, **self.counts)
        return 1 if (self.s.once and self.counts["failed"]) else 0


class _NoClaim:
    def release(self) -> bool:
        return False


def _default_claimer(settings: Settings) -> Callable[[Path, float], Any]:
    from ckpt_watchd.records import claim

    host, pid = socket.gethostname(), os.getpid()

    def take(path: Path, wall: float) -> Any:
        try:
            return claim.try_claim(path, host=host, pid=pid, now=wall,
                                   stale_after=settings.claim_timeout)
        except OSError:
            # an unwritable folder: no claim is possible, and the strip itself fails there with
            # a clear, audited error instead of the loop dying here
            return _NoClaim()

    return take


def run_daemon(settings: Settings) -> int:
    """Build the real service around a settings object and run it in the foreground."""
    from ckpt_watchd.ops.notify import Notifier
    from ckpt_watchd.pool import WorkerPool

    progress = Progress() if settings.once else None  # draws only on a terminal
    if progress is not None and progress.on:
        progress.start(0, "stripping")
        audit.configure_logging(settings.log_format, settings.log_level,
                                stream=progress.log_stream())
    else:
        progress = None
        audit.configure_logging(settings.log_format, settings.log_level)
    if not settings.root.is_dir():
        raise StartupError(f"--root: {settings.root} is not a directory")
    if not os.access(settings.root, os.R_OK | os.X_OK):
        raise StartupError(f"--root: {settings.root} is not readable")
    store = StateStore.open(settings.state_db)
    auditor = audit.Auditor.open(settings.audit_log)
    metrics = server = None
    if settings.metrics_addr:
        from ckpt_watchd.ops import metrics as metrics_mod

        metrics = metrics_mod.Metrics()
    notifier = Notifier.from_env()

    def make_pool(on_done: Callable[[StripJob, Outcome], None]) -> Pool:
        return WorkerPool(settings.workers, job_timeout=settings.job_timeout, on_done=on_done,
                          nice=settings.nice, io_idle=settings.io_idle)

    writers: WriterWatch | None = None
    if settings.once:
        writers_how = "off: --once"
    elif not settings.follow_writers:
        writers_how = "off: --no-follow-writers"
    else:
        writers, writers_how = WriterWatch.open()
    svc = Service(settings, store=store, auditor=auditor, pool_factory=make_pool,
                  claimer=_default_claimer(settings), notifier=notifier, metrics=metrics,
                  writers=writers, writers_how=writers_how, progress=progress)
    if metrics is not None and settings.metrics_addr:
        from ckpt_watchd.ops import metrics as metrics_mod

        server = metrics_mod.serve(settings.metrics_addr, metrics, svc.healthy)
    signal.signal(signal.SIGTERM, svc.request_stop)
    signal.signal(signal.SIGINT, svc.on_sigint)
    signal.signal(signal.SIGHUP, svc.on_sighup)
    try:
        return svc.run()
    finally:
        if server is not None:
            server.close()
        notifier.close()
        if writers is not None:
            writers.close()
        auditor.close()
        store.close()
