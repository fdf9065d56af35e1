"""Worker processes killed mid-strip, and a worker hung past the job timeout.

A real `WorkerPool` strips small checkpoints while a test thread SIGKILLs the worker running a
chosen job at a random moment (seeded RNG; the moments span a whole strip, measured beforehand).
After each job its file is the original bytes or a valid stripped file, a killed job is a failed
Outcome ("crash"), no temp file is left and the pool goes on serving.

Hundreds of respawns are only cheap if a new worker does not import torch again, so the big runs
use the pool's forkserver start method with torch preloaded in the fork server. The parent-side
code under test (crash detection, reaping, temp cleanup, respawn) is the same for every start
method; one smaller run uses spawn, as the daemon does.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import queue
import random
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckpt_watchd.outcome import FAILED, STRIPPED, Outcome
from ckpt_watchd.pool import WorkerPool
from ckpt_watchd.worker import StripJob
from fixtures import payloads
from fixtures.daemon_io import wait_until
from reliability.conftest import is_valid_stripped, temp_files

SEED = 20261128


class PoolHarness:
    """A WorkerPool whose outcomes land in a queue, and a way to kill the worker running a job."""

    def __init__(self, *, size: int, job_timeout: float, start_method: str) -> None:
        if start_method == "forkserver":
            # workers fork from a server that imported torch (and never ran it): respawns are cheap
            multiprocessing.get_context("forkserver").set_forkserver_preload(
                ["ckpt_watchd.engine.checkpoint"])
        self.done: queue.Queue[tuple[StripJob, Outcome]] = queue.Queue()
        self.ended: set[str] = set()  # paths whose job has ended (written on the slot threads)
        self.pool = WorkerPool(size, job_timeout=job_timeout, nice=0, io_idle=False,
                               on_done=self._on_done, start_method=start_method)

    def _on_done(self, job: StripJob, outcome: Outcome) -> None:
        self.ended.add(job.path)
        self.done.put((job, outcome))

    def outcomes(self, count: int, timeout: float) -> dict[str, Outcome]:
        deadline = time.monotonic() + timeout
        out = {}
        while len(out) < count:
            try:
                job, outcome = self.done.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"only {len(out)} of {count} jobs ended in {timeout:g}s") \
                    from None
            out[job.path] = outcome
        return out

    def picked_up(self, job: StripJob, timeout: float = 60) -> float:
        """Wait until a slot has taken `job` (or it has already ended); the moment it was seen."""
        deadline = time.monotonic() + timeout
        while not any(s.job is job for s in self.pool._slots) and job.path not in self.ended:
            assert time.monotonic() < deadline, f"no slot took {job.path} in {timeout:g}s"
            time.sleep(0.0005)  # the poll period of this loop
        return time.monotonic()

    def kill_worker_of(self, job: StripJob) -> bool:
        """SIGKILL the worker process running `job`; False if no slot is on it (any more)."""
        for slot in self.pool._slots:
            proc = slot.proc
            if slot.job is job and proc is not None and proc.pid is not None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    return False
                return True
        return False

    def close(self) -> None:
        self.pool.shutdown(drain_timeout=10)


@dataclass(frozen=True)
class Record:
    """One job as the pool saw it: its file and how it ended."""

    path: str
    status: str
    error_type: str | None
    error: str | None


def new_file(base: Path, i: int, template: Path) -> Path:
    path = base / f"run-{i}" / "last.pt"
    path.parent.mkdir(parents=True)
    shutil.copyfile(template, path)
    path.chmod(0o644)
    return path


def kill_at_random(h: PoolHarness, base: Path, template: Path, strips: int,
                   kill_fraction: float, seed: int) -> tuple[list[Record], int]:
    """Strip `strips` copies of `template`, two at a time, killing workers at random moments.

    Returns every job's record and the number of SIGKILLs sent. Which job a kill hits is not
    recorded: between finding the worker of a job and killing it, that worker may have finished
    the job and taken the other one of the pair.
    """
    rng = random.Random(seed)
    # warm-up: start both workers and learn how long one strip takes on this machine
    warm = [new_file(base, -1 - i, template) for i in range(4)]
    for p in warm:
        h.pool.submit(StripJob(path=str(p)))
    typical = statistics.median(o.duration_s for o in h.outcomes(4, timeout=120).values())

    records, kills = [], 0
    for first in range(0, strips, 2):
        jobs = [StripJob(path=str(new_file(base, i, template))) for i in (first, first + 1)]
        plan = sorted(((rng.uniform(0, 1.2 * typical), job) for job in jobs
                       if rng.random() < kill_fraction), key=lambda x: x[0])
        for job in jobs:
            h.pool.submit(job)
        started = {job.path: h.picked_up(job) for _, job in plan}
        for delay, job in plan:
            # the random moment after the job started is this test's input, not a synchronisation
            time.sleep(max(0.0, started[job.path] + delay - time.monotonic()))
            kills += h.kill_worker_of(job)
        for path, o in h.outcomes(2, timeout=120).items():
            records.append(Record(path, o.status, o.error_type, o.error))
    return records, kills


def problems(records: list[Record], original: bytes) -> list[str]:
    """What is wrong with each job's file and outcome (empty when every job is consistent)."""
    found = []
    for r in records:
        path = Path(r.path)
        if temp_files(path.parent):
            found.append(f"{path}: temp files left: {temp_files(path.parent)}")
        if r.status == FAILED:
            if r.error_type != "crash" or "killed by SIGKILL" not in (r.error or ""):
                found.append(f"{path}: unexpected failure {r.error_type}: {r.error}")
            elif path.read_bytes() != original and not is_valid_stripped(path):
                found.append(f"{path}: killed mid-strip, left neither original nor stripped")
        elif r.status != STRIPPED or not is_valid_stripped(path):
            found.append(f"{path}: {r.status}, but not a valid stripped file")
    return found


@pytest.fixture
def pools() -> Iterator[Callable[..., PoolHarness]]:
    """`pools(size=, job_timeout=, start_method=)`: a PoolHarness, shut down at teardown."""
    made: list[PoolHarness] = []

    def make(**kw: Any) -> PoolHarness:
        made.append(PoolHarness(**kw))
        return made[-1]

    yield make
    for h in made:
        h.close()


def _kills(h: PoolHarness, template: Path, base: Path, strips: int, seed: int) -> None:
    records, kills = kill_at_random(h, base, template, strips=strips, kill_fraction=0.5, seed=seed)
    assert len(records) == strips
    assert problems(records, template.read_bytes()) == []
    crashes = sum(r.status == FAILED for r in records)
    # every failure is one of our kills (a kill that came after the reply fails nothing), and
    # every job not killed was served
    assert 1 <= crashes <= kills and h.pool.restarts == crashes and h.pool.alive()
    last = new_file(base, 100_000, template)
    h.pool.submit(StripJob(path=str(last)))
    assert h.outcomes(1, timeout=120)[str(last)].status == STRIPPED


@pytest.mark.timeout(280)
def test_killing_workers_mid_strip_never_loses_a_file(
        ckpts: Path, tmp_path: Path, pools: Callable[..., PoolHarness]) -> None:
    """200 strips, about half SIGKILLed at a random moment: every file original or stripped."""
    h = pools(size=2, job_timeout=60, start_method="forkserver")
    _kills(h, ckpts / "yolov5.pt", tmp_path, strips=200, seed=SEED)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("kind", ["yolov5", "ultralytics"])
def test_thousand_strips_with_random_worker_kills(
        ckpts: Path, tmp_path: Path, pools: Callable[..., PoolHarness], kind: str) -> None:
    """1,000 strips per layout with SIGKILLs at random moments: no file is ever lost."""
    h = pools(size=2, job_timeout=60, start_method="forkserver")
    _kills(h, ckpts / f"{kind}.pt", tmp_path, strips=1000, seed=SEED + len(kind))


@pytest.mark.timeout(200)
def test_spawned_workers_recover_from_kills(ckpts: Path, tmp_path: Path,
                                            pools: Callable[..., PoolHarness]) -> None:
    """With spawn (the daemon's start method), workers killed mid-job are replaced."""
    h = pools(size=2, job_timeout=120, start_method="spawn")
    rng = random.Random(SEED)
    # jobs that never end by themselves, so each kill lands mid-job whatever the machine's speed
    jobs = []
    for i in range(2):
        busy_checkpoint(ckpts / "generic.pt", tmp_path / f"busy-{i}" / "last.pt")
        jobs.append(StripJob(path=str(tmp_path / f"busy-{i}" / "last.pt")))
        h.pool.submit(jobs[-1])
    for job in jobs:
        h.picked_up(job)
        time.sleep(rng.uniform(0, 0.5))  # a random moment into the job: the test's input
        assert h.kill_worker_of(job)
    outcomes = h.outcomes(2, timeout=120)
    assert {(o.status, o.error_type) for o in outcomes.values()} == {(FAILED, "crash")}
    assert all("killed by SIGKILL" in (o.error or "") for o in outcomes.values())
    assert h.pool.restarts == 2
    template = ckpts / "yolov5.pt"
    after = [new_file(tmp_path, i, template) for i in range(2)]
    for p in after:
        h.pool.submit(StripJob(path=str(p)))
    assert {o.status for o in h.outcomes(2, timeout=120).values()} == {STRIPPED}
    assert all(is_valid_stripped(p) for p in after)


# ------------------------------------------------------------------------------ job timeout


def busy_checkpoint(template: Path, dest: Path) -> None:
    """A checkpoint whose job runs for seconds: a 60 MB pickle of 60M cheap opcodes.

    Its scan takes seconds of CPU (or until its CPU budget of 2 s + 3 s stops it), so a kill
    soon after the job started lands mid-job whatever the machine's speed: CPU time never runs
    faster than the clock. NONE, POP pairs keep the scan's memory flat. A test that needs the
    job to stay busy for as long as it likes stops the job's process (`stop_job_process`).
    """
    p = payloads
    spin = b"N0" * 30_000_000
    body = b"}" + p.pstr("state_dict") + b"}s" + spin
    dest.parent.mkdir(parents=True)
    p.rezip(template, dest, data_pkl=p.whole(body))


def stop_job_process(h: PoolHarness, job: StripJob, timeout: float = 60) -> int:
    """SIGSTOP the process a worker forked for `job` (each job has one); its pid.

    A stopped job never ends by itself, so the slot stays busy for as long as the test needs.
    """
    deadline = time.monotonic() + timeout
    while True:
        worker = next((s.proc.pid for s in h.pool._slots if s.job is job and s.proc is not None),
                      None)
        if worker is not None:
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    stat = Path("/proc", name, "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == worker:
                    os.kill(int(name), signal.SIGSTOP)
                    return int(name)
        assert time.monotonic() < deadline, f"no process runs {job.path}"
        time.sleep(0.001)  # the poll period of this loop


@pytest.mark.timeout(200)
def test_job_timeout_kills_a_hung_worker_and_the_pool_goes_on(
        ckpts: Path, tmp_path: Path, pools: Callable[..., PoolHarness]) -> None:
    """A job still running at the timeout is killed: failed 'timeout', no temp, pool serves.

    The allowlist leaves no pickle that spins forever (range is refused), so the job is an
    ordinary strip under a timeout far shorter than any strip takes.
    """
    h = pools(size=1, job_timeout=60, start_method="forkserver")
    hung = new_file(tmp_path, 0, ckpts / "yolov5.pt")
    before = hung.read_bytes()
    h.pool.job_timeout = 0.001
    # what a strip killed mid-write leaves behind: the pool must remove it after the timeout
    stale = hung.with_name(".ckpt-watchd-last.pt.0123abcd.tmp")
    stale.write_bytes(b"partial")
    h.pool.submit(StripJob(path=str(hung)))
    outcome = h.outcomes(1, timeout=120)[str(hung)]
    assert (outcome.status, outcome.error_type) == (FAILED, "timeout")
    assert "timed out after 0.001s" in (outcome.error or "")
    h.pool.job_timeout = 60
    assert hung.read_bytes() == before and temp_files(hung.parent) == []
    assert h.pool.restarts == 1

    after = new_file(tmp_path, 1, ckpts / "yolov5.pt")
    h.pool.submit(StripJob(path=str(after)))
    assert h.outcomes(1, timeout=60)[str(after)].status == STRIPPED
    assert is_valid_stripped(after)


# ------------------------------------------------------------------------------ start-up failure


class _Context:
    """A multiprocessing context that passes everything on to `real`; subclasses change Process."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _FailingFirstProcess(_Context):
    """A multiprocessing context whose first Process() fails like fork does at the process limit."""

    def __init__(self, real: Any) -> None:
        super().__init__(real)
        self.failures = 0

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # the context's API spells it so
        if self.failures == 0:
            self.failures += 1
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return self._real.Process(*args, **kwargs)


@pytest.mark.timeout(200)
def test_a_worker_that_cannot_be_started_for_prewarm_does_not_strand_jobs(
        ckpts: Path, tmp_path: Path, pools: Callable[..., PoolHarness]) -> None:
    """EAGAIN while prewarming a worker: the slot survives and the next job is stripped."""
    h = pools(size=1, job_timeout=120, start_method="forkserver")
    ctx = _FailingFirstProcess(h.pool.ctx)
    h.pool.ctx = ctx
    h.pool.prewarm()
    path = new_file(tmp_path, 0, ckpts / "yolov5.pt")
    h.pool.submit(StripJob(path=str(path)))
    assert h.outcomes(1, timeout=120)[str(path)].status == STRIPPED
    assert ctx.failures == 1 and h.pool.alive()


class _FailingStart(_Context):
    """A multiprocessing context whose first process fails in start() with a non-OS error."""

    def __init__(self, real: Any) -> None:
        super().__init__(real)
        self.failures = 0

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # the context's API spells it so
        proc = self._real.Process(*args, **kwargs)
        if self.failures == 0:
            self.failures += 1

            def start() -> None:
                raise ValueError("bad value(s) in fds_to_keep")  # what a tracker race raised in CI

            proc.start = start
        return proc


@pytest.mark.timeout(200)
def test_a_start_that_raises_fails_the_job_with_the_reason_and_the_slot_serves_on(
        ckpts: Path, tmp_path: Path, pools: Callable[..., PoolHarness]) -> None:
    """Any exception from starting a worker is the job's failed Outcome; the next job is stripped."""
    h = pools(size=1, job_timeout=120, start_method="forkserver")
    h.pool.ctx = _FailingStart(h.pool.ctx)
    first, second = new_file(tmp_path, 0, ckpts / "yolov5.pt"), new_file(tmp_path, 1, ckpts / "yolov5.pt")
    before = first.read_bytes()
    h.pool.submit(StripJob(path=str(first)))
    outcome = h.outcomes(1, timeout=120)[str(first)]
    assert (outcome.status, outcome.error_type) == (FAILED, "crash")
    assert outcome.error == ("could not start a worker process: "
                             "ValueError: bad value(s) in fds_to_keep")
    assert first.read_bytes() == before and h.pool.alive()
    h.pool.submit(StripJob(path=str(second)))
    assert h.outcomes(1, timeout=120)[str(second)].status == STRIPPED


@pytest.mark.timeout(200)
def test_an_interpreter_that_cannot_be_executed_is_reported_as_a_failed_start(
        ckpts: Path, tmp_path: Path, pools: Callable[..., PoolHarness]) -> None:
    """exec() of the worker's interpreter fails: 'failed to start (exit code 255 ...)', file intact."""
    from multiprocessing import resource_tracker, spawn

    resource_tracker.ensure_running()  # the tracker is started with the same interpreter
    h = pools(size=1, job_timeout=120, start_method="spawn")
    broken = tmp_path / "python-not-executable"
    broken.write_text("not a program")  # mode 0644: execve fails with EACCES in the child
    path = new_file(tmp_path, 0, ckpts / "yolov5.pt")
    before = path.read_bytes()
    real = spawn.get_executable()
    spawn.set_executable(str(broken))
    try:
        h.pool.submit(StripJob(path=str(path)))
        outcome = h.outcomes(1, timeout=120)[str(path)]
    finally:
        spawn.set_executable(real)
    assert (outcome.status, outcome.error_type) == (FAILED, "crash")
    assert outcome.error == ("worker process failed to start (exit code 255: the Python interpreter "
                             "could not be executed; see the daemon's stderr)")
    assert path.read_bytes() == before and h.pool.alive()
    h.pool.submit(StripJob(path=str(path)))
    assert h.outcomes(1, timeout=120)[str(path)].status == STRIPPED


# ------------------------------------------------------------------------------ dispatch


class _HeldStarts(_Context):
    """A multiprocessing context whose second and later Process() calls wait for `release`."""

    def __init__(self, real: Any) -> None:
        super().__init__(real)
        self.processes = 0
        self.holding = threading.Event()  # a start is being held
        self.release = threading.Event()

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # the context's API spells it so
        self.processes += 1
        if self.processes > 1:
            self.holding.set()
            self.release.wait(120)
        return self._real.Process(*args, **kwargs)


@pytest.mark.timeout(200)
def test_a_queued_job_goes_to_the_worker_free_first_not_to_a_start(
        ckpts: Path, tmp_path: Path, pools: Callable[..., PoolHarness]) -> None:
    """Two jobs at once and one started worker: both run on it; neither waits for a second start.

    (A run's last.pt and best.pt arrive together: a start costs a second, a strip milliseconds.)
    """
    h = pools(size=2, job_timeout=120, start_method="forkserver")
    ctx = _HeldStarts(h.pool.ctx)
    h.pool.ctx = ctx
    try:
        first = new_file(tmp_path, 0, ckpts / "yolov5.pt")
        h.pool.submit(StripJob(path=str(first)))
        assert h.outcomes(1, timeout=120)[str(first)].status == STRIPPED
        pair = [new_file(tmp_path, i, ckpts / "yolov5.pt") for i in (1, 2)]
        for p in pair:
            h.pool.submit(StripJob(path=str(p)))
        # every later start is held: the pair can only end if the started worker ran both
        assert {o.status for o in h.outcomes(2, timeout=120).values()} == {STRIPPED}
        assert all(is_valid_stripped(p) for p in pair)
    finally:
        ctx.release.set()


@pytest.mark.timeout(200)
def test_with_every_worker_busy_a_free_slot_starts_one_and_the_job_waits_queued(
        ckpts: Path, tmp_path: Path, pools: Callable[..., PoolHarness]) -> None:
    """A job queued while all started workers are busy makes a free slot start a worker ahead.

    The job stays queued during that start (a worker freed meanwhile would take it), then the new
    worker strips it while the first is still busy; a start ahead charges no job.
    """
    h = pools(size=2, job_timeout=600, start_method="forkserver")
    ctx = _HeldStarts(h.pool.ctx)
    h.pool.ctx = ctx
    try:
        hung = tmp_path / "hung" / "last.pt"
        busy_checkpoint(ckpts / "yolov5.pt", hung)  # its job runs for seconds...
        hung_job = StripJob(path=str(hung))
        h.pool.submit(hung_job)
        h.picked_up(hung_job)
        stop_job_process(h, hung_job)  # ...and, stopped, for as long as this test runs
        path = new_file(tmp_path, 0, ckpts / "yolov5.pt")
        h.pool.submit(StripJob(path=str(path)))
        assert ctx.holding.wait(60), "no slot started a worker for the queued job"
        assert h.pool.queue_depth() == 1, "the starting slot took the job before its worker was up"
        ctx.release.set()
        assert h.outcomes(1, timeout=120)[str(path)].status == STRIPPED
        assert str(hung) not in h.ended and is_valid_stripped(path)
    finally:
        ctx.release.set()


@pytest.mark.timeout(200)
def test_an_idle_worker_is_retired_and_the_next_job_starts_another(
        ckpts: Path, tmp_path: Path, pools: Callable[..., PoolHarness]) -> None:
    """Torch's memory is held only while there is work: a worker idle for idle_exit exits."""
    h = pools(size=2, job_timeout=120, start_method="forkserver")
    h.pool.idle_exit = 0.5
    first = new_file(tmp_path, 0, ckpts / "yolov5.pt")
    h.pool.submit(StripJob(path=str(first)))
    assert h.outcomes(1, timeout=120)[str(first)].status == STRIPPED
    procs = [s.proc for s in h.pool._slots if s.proc is not None]
    assert procs, "no worker ran the job"
    wait_until(lambda: all(s.proc is None for s in h.pool._slots)
               and not any(p.is_alive() for p in procs), 60, "the idle worker to be retired")
    second = new_file(tmp_path, 1, ckpts / "yolov5.pt")
    h.pool.submit(StripJob(path=str(second)))
    assert h.outcomes(1, timeout=120)[str(second)].status == STRIPPED
