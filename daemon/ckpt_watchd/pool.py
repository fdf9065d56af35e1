"""The worker process pool, seen from the daemon: one thread per slot, one process per thread.

It owns spawning (spawn context: never fork a process that runs watchdog threads), the job timeout,
crash detection and respawn, idle shutdown of workers (torch costs memory only while there is work),
and the drain on shutdown. Every job ends in exactly one `on_done(job, outcome)` call, made on a slot
thread. It never imports torch; the workers do, lazily.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ckpt_watchd import atomic
from ckpt_watchd.outcome import FAILED, Outcome
from ckpt_watchd.worker import WORKER_READY, StripJob, worker_main

OnDone = Callable[[StripJob, Outcome], None]
_WARM: Any = object()  # queue token: start a worker process now, so a strip due soon starts at once


class _Slot:
    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.proc: Any = None
        self.conn: Connection | None = None
        self.job: StripJob | None = None
        self.ready = False  # the worker has said it started (see worker_main)
        self.thread = threading.Thread(target=self._loop, name=f"ckpt-watchd-slot-{index}",
                                       daemon=True)

    def _spawn(self) -> None:
        parent, child = self.pool.ctx.Pipe()
        # a forkserver worker's parent is the fork server (which exits with us), not this process
        expected_parent = None if self.pool.ctx.get_start_method() == "forkserver" else os.getpid()
        try:
            proc = self.pool.ctx.Process(target=worker_main, name=f"ckpt-watchd-worker-{self.index}",
                                         args=(child, self.pool.nice, self.pool.io_idle,
                                               expected_parent),
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
            warm = self.proc is not None
            if not warm:
                # a slot without a worker leaves jobs to an idle warm one: taking it would make
                # the strip wait seconds for a spawn and a torch import while a worker sits idle
                with pool.cv:
                    pool.cv.wait_for(lambda: pool.warm_idle == 0)
            else:
                pool.note_warm_idle(+1)
            try:
                job = pool.jobs.get(timeout=pool.idle_exit if warm else None)
            except queue.Empty:
                pool.note_warm_idle(-1)
                self._reap(kill=True)  # idle: give torch's memory back until the next job
                continue
            if warm:
                pool.note_warm_idle(-1)
            if job is None:
                self._reap(kill=True)
                return
            if job is _WARM:
                pool.warm_requested.clear()
                if self.proc is None or not self.proc.is_alive():
                    self._reap(kill=True)
                    # cannot start one now (EAGAIN, ENOMEM, a broken interpreter): the next job
                    # tries again and reports why; an exception here would end this slot's
                    # thread and strand every later job
                    with contextlib.suppress(Exception):
                        self._spawn()  # the worker imports torch at once, before any job arrives
                continue
            self.job = job
            outcome = self._run(job)
            self.job = None
            pool.finish(job, outcome)

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
        self.jobs: queue.Queue[StripJob | None] = queue.Queue()
        self.cancelling = threading.Event()
        self.warm_requested = threading.Event()
        self.cv = threading.Condition()
        self.warm_idle = 0  # slots with a live worker waiting for a job
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
        self.jobs.put(job)

    def finish(self, job: StripJob, outcome: Outcome) -> None:
        with self._lock:
            self._in_flight -= 1
        self.on_done(job, outcome)

    def pending(self) -> int:
        """Jobs submitted and not finished yet (queued or running)."""
        with self._lock:
            return self._in_flight

    def note_warm_idle(self, delta: int) -> None:
        with self.cv:
            self.warm_idle += delta
            self.cv.notify_all()

    def prewarm(self) -> None:
        """Have one worker process started (and torch imported) before the next job arrives."""
        if self.warm_requested.is_set() or any(
                s.proc is not None and s.proc.is_alive() for s in self._slots):
            return
        self.warm_requested.set()
        self.jobs.put(_WARM)

    def queue_depth(self) -> int:
        return self.jobs.qsize()

    def alive(self) -> bool:
        return all(s.thread.is_alive() for s in self._slots)

    def shutdown(self, drain_timeout: float) -> list[StripJob]:
        """Let running jobs finish for up to `drain_timeout`, then kill them; returns unstarted jobs."""
        unstarted: list[StripJob] = []
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and job is not _WARM:
                unstarted.append(job)
                with self._lock:
                    self._in_flight -= 1
        for _ in self._slots:
            self.jobs.put(None)
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
