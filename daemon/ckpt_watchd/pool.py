"""The worker process pool, seen from the daemon: one thread per slot, one process per thread.

It owns spawning (spawn context: never fork a process that runs watchdog threads), the job timeout,
crash detection and respawn, idle shutdown of workers (torch costs memory only while there is work),
which slot runs which job, and the drain on shutdown. Every job ends in exactly one
`on_done(job, outcome)` call, made on a slot thread. It never imports torch; the workers do, lazily.

Starting a worker costs about a second (an interpreter and torch), a strip of a small checkpoint a
few tens of milliseconds. So a job never waits for a start while a started worker could take it:
a slot without a worker starts one *ahead* (taking no job) when every started worker is busy, and
the queued job goes to whichever worker is free first. Only when no other worker exists does a slot
take a job and start its worker for it, so that a failure to start is that job's outcome.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ckpt_watchd.engine import atomic
from ckpt_watchd.outcome import FAILED, Outcome
from ckpt_watchd.worker import WORKER_READY, StripJob, worker_main

OnDone = Callable[[StripJob, Outcome], None]

# what a slot thread does next (WorkerPool._next)
_RUN, _START, _IDLE, _EXIT = "run", "start", "idle", "exit"


class _Slot:
    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.proc: Any = None
        self.conn: Connection | None = None
        self.job: StripJob | None = None
        self.ready = False  # the worker has said it started (see worker_main)
        self.starting = False  # starting a worker ahead of any job (pool.cv guards it)
        self.busy = False  # running a job, its worker perhaps still starting (pool.cv guards it)
        self.start_failed = False  # the last start ahead failed: take jobs, do not start again
        self.thread = threading.Thread(target=self._loop, name=f"ckpt-watchd-slot-{index}",
                                       daemon=True)

    def _spawn(self) -> None:
        parent, child = self.pool.ctx.Pipe()
        # a forkserver worker's parent is the fork server (which exits with us), not this process
        expected_parent = None if self.pool.ctx.get_start_method() == "forkserver" else os.getpid()
        try:
            proc = self.pool.ctx.Process(target=worker_main, name=f"ckpt-watchd-worker-{self.index}",
                                         args=(child, self.pool.nice, self.pool.io_idle,
                                               expected_parent, self.pool.job_timeout),
                                         daemon=True)
            # One start at a time: multiprocessing's resource tracker, which every start consults
            # and relaunches if it died, is not safe against two threads starting processes at once
            # (a relaunch closes the descriptor the other start is about to pass on).
            with self.pool.spawn_lock:
                proc.start()
        finally:
            child.close()
        self.proc, self.conn, self.ready = proc, parent, False

    def _reap(self, kill: bool) -> None:
        proc, conn = self.proc, self.conn
        self.proc = self.conn = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
        if proc is not None:
            if kill and proc.is_alive():
                proc.kill()
            proc.join(timeout=10)

    def _loop(self) -> None:
        pool = self.pool
        while True:
            action, job = pool._next(self)
            if action == _EXIT:
                self._reap(kill=True)
                return
            if action == _IDLE:
                self._reap(kill=True)  # idle: give torch's memory back until the next job
                continue
            if action == _START:
                ok = self._start_ahead()
                with pool.cv:
                    self.starting, self.start_failed = False, not ok
                    pool.cv.notify_all()
                continue
            assert job is not None
            self.job = job
            outcome = self._run(job)
            self.job = None
            pool.finish(job, outcome)

    def _start_ahead(self) -> bool:
        """Start a worker and wait until it has imported torch; False if it could not start.

        No job is charged for a failure here (EAGAIN, ENOMEM, a broken interpreter): the next job
        this slot takes tries again and reports why, and an exception would end this slot's thread
        and strand every later job.
        """
        self._reap(kill=True)
        try:
            self._spawn()
            assert self.conn is not None
            if self.conn.poll(self.pool.job_timeout) and self.conn.recv() == WORKER_READY:
                self.ready = True
                return True
        except Exception:
            pass
        self._reap(kill=True)
        return False

    def _run(self, job: StripJob) -> Outcome:
        pool = self.pool
        started = time.monotonic()
        try:
            if self.proc is None or not self.proc.is_alive():
                if self.proc is not None:
                    self._reap(kill=True)
                try:
                    self._spawn()
                except Exception as e:  # any reason to be unable to start is a value
                    self._reap(kill=True)
                    return Outcome(path=job.path, status=FAILED, error_type="crash",
                                   error=f"could not start a worker process: {type(e).__name__}: {e}",
                                   duration_s=time.monotonic() - started)
            assert self.conn is not None
            self.conn.send(job)
            deadline = time.monotonic() + pool.job_timeout
            while self.conn.poll(max(0.0, deadline - time.monotonic())):
                result: Outcome | str = self.conn.recv()
                if result == WORKER_READY:
                    self.ready = True
                    continue
                assert isinstance(result, Outcome)
                return result
            reason = (f"timed out after {pool.job_timeout:g}s (worker killed)"
                      if not pool.cancelling.is_set() else "cancelled at shutdown (worker killed)")
            kind = "timeout" if not pool.cancelling.is_set() else "cancelled"
        except (EOFError, OSError, BrokenPipeError):
            code = self.proc.exitcode if self.proc is not None else None
            if self.proc is not None and code is None:
                self.proc.join(timeout=5)
                code = self.proc.exitcode
            if pool.cancelling.is_set():
                kind, reason = "cancelled", "cancelled at shutdown (worker killed)"
            else:
                kind, reason = "crash", _crash_text(code, started=self.ready)
        self._reap(kill=True)
        pool.restarts += 1
        atomic.remove_temps_for(Path(job.output or job.path))
        return Outcome(path=job.path, status=FAILED, error_type=kind, error=reason,
                       duration_s=time.monotonic() - started)

    def cancel(self) -> None:
        """Kill the worker mid-job (the slot thread then reports the job as cancelled)."""
        proc = self.proc
        if proc is not None and proc.is_alive():
            proc.kill()


def _crash_text(code: int | None, *, started: bool = True) -> str:
    if not started and code is not None and code > 0:
        # 255 is what a child exits with when exec() of the interpreter fails after the fork
        hint = ": the Python interpreter could not be executed" if code == 255 else ""
        return f"worker process failed to start (exit code {code}{hint}; see the daemon's stderr)"
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"worker crashed: killed by {name}{hint}"
    return f"worker crashed (exit code {code})"


class WorkerPool:
    def __init__(self, size: int, *, job_timeout: float, on_done: OnDone, nice: int = 10,
                 io_idle: bool = True, idle_exit: float = 120.0, start_method: str = "spawn") -> None:
        self.ctx: Any = multiprocessing.get_context(start_method)
        self.job_timeout = job_timeout
        self.nice = nice
        self.io_idle = io_idle
        self.idle_exit = idle_exit
        self.on_done = on_done
        self.cancelling = threading.Event()
        # guards the queue, the three fields below it, and each slot's starting/busy/start_failed
        self.cv = threading.Condition()
        self._queue: deque[StripJob] = deque()
        self._warm_wanted = False  # prewarm(): have one worker started before the next job
        self._closing = False
        self.warm_idle = 0  # slots with a started worker waiting for a job
        self.restarts = 0
        self._lock = threading.Lock()
        self.spawn_lock = threading.Lock()
        self._in_flight = 0
        self._slots = [_Slot(self, i) for i in range(size)]
        for s in self._slots:
            s.thread.start()

    def submit(self, job: StripJob) -> None:
        with self._lock:
            self._in_flight += 1
        with self.cv:
            self._queue.append(job)
            self.cv.notify_all()

    def _next(self, slot: _Slot) -> tuple[str, StripJob | None]:
        """What `slot` does next: run a job, start a worker ahead, retire an idle worker, or exit."""
        with self.cv:
            slot.busy = False
            warm = slot.proc is not None
            deadline = time.monotonic() + self.idle_exit if warm else None
            if warm:
                self.warm_idle += 1
                self.cv.notify_all()
            try:
                while True:
                    if self._closing:
                        return _EXIT, None
                    if not self._queue:
                        slot.start_failed = False
                    action = self._decide(slot, warm)
                    if action == _RUN:
                        slot.busy = True
                        self._warm_wanted = False  # this job starts a worker if none is up
                        return _RUN, self._queue.popleft()
                    if action == _START:
                        slot.starting = True
                        return _START, None
                    if deadline is not None and time.monotonic() >= deadline:
                        return _IDLE, None
                    self.cv.wait(None if deadline is None else deadline - time.monotonic())
            finally:
                if warm:
                    self.warm_idle -= 1
                    self.cv.notify_all()

    def _decide(self, slot: _Slot, warm: bool) -> str | None:
        """The dispatch rule, under self.cv: _RUN, _START, or None (wait)."""
        if warm:
            return _RUN if self._queue else None
        if self.warm_idle:  # a started worker sits idle: the next job is its
            return None
        others = [s for s in self._slots if s is not slot]
        if not any(s.starting or s.busy or s.proc is not None for s in others):
            if self._warm_wanted:  # asked for before the job came: start ahead, then take it
                self._warm_wanted = False
                return _START
            if self._queue:
                return _RUN  # nobody else can run it: take it, and start the worker for it
            return None
        starting = sum(1 for s in others if s.starting)
        if len(self._queue) > starting and not slot.start_failed:
            return _START  # every started worker is busy: start one, leave the job queued
        return None

    def finish(self, job: StripJob, outcome: Outcome) -> None:
        with self._lock:
            self._in_flight -= 1
        self.on_done(job, outcome)

    def pending(self) -> int:
        """Jobs submitted and not finished yet (queued or running)."""
        with self._lock:
            return self._in_flight

    def prewarm(self) -> None:
        """Have one worker process started (and torch imported) before the next job arrives."""
        with self.cv:
            if self._warm_wanted or any(s.starting or s.busy or
                                        (s.proc is not None and s.proc.is_alive())
                                        for s in self._slots):
                return
            self._warm_wanted = True
            self.cv.notify_all()

    def queue_depth(self) -> int:
        with self.cv:
            return len(self._queue)

    def alive(self) -> bool:
        return all(s.thread.is_alive() for s in self._slots)

    def shutdown(self, drain_timeout: float) -> list[StripJob]:
        """Let running jobs finish for up to `drain_timeout`, then kill them; returns unstarted jobs."""
        with self.cv:
            unstarted = list(self._queue)
            self._queue.clear()
            self._closing = True
            self.cv.notify_all()
        with self._lock:
            self._in_flight -= len(unstarted)
        deadline = time.monotonic() + drain_timeout
        for s in self._slots:
            s.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(s.thread.is_alive() for s in self._slots):
            self.cancelling.set()
            for s in self._slots:
                s.cancel()
            for s in self._slots:
                s.thread.join(timeout=10)
        return unstarted
