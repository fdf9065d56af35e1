"""Worker side: the one boundary where a per-file error becomes an `Outcome` value, and the process
each file is handled in.

`run_job` strips one file in the calling process and turns every exception into a failed Outcome;
its memory cap grows step by step with the bytes the file really holds. `run_isolated` runs one
job in a forked child of its own, so no state carries from one file to the next, with a CPU
budget, a wall-clock deadline, no core dump and no output of its own: a crash, a CPU burn or a
hang costs that child and one clear Outcome. Worker processes (`worker_main`) and the one-shot
commands go through it. Nothing here imports torch at module level, so the daemon's main process
can import this module to describe jobs; the torch side is imported only after a file's container
and pickle passed the checks that need no torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ckpt_watchd.errors import CheckpointError
from ckpt_watchd.outcome import FAILED, Outcome

WORKER_READY = "ready"  # a worker's first message: it started and imported torch
_MAX_MESSAGE = 1000  # an error message is one line of at most this many characters
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4


@dataclass(frozen=True, slots=True)
class StripJob:
    path: str  # a checkpoint file, or a checkpoint folder (kind "folder")
    run: str | None = None  # the run folder it belongs to (the daemon's jobs)
    kind: str = "file"
    profile: str | None = None  # the profile that found it (a folder's strip rule)
    also: tuple[str, ...] = ()  # other names of the same file (hard links): they follow it
    output: str | None = None
    dry_run: bool = False
    half: bool = False
    hashes: bool = False
    archive_dir: str | None = None
    root: str | None = None
    attempt: int = 1


# ------------------------------------------------------------------------------ limits


def cpu_budget(real_bytes: int) -> float:
    """CPU seconds one file may take: a strip is I/O and a linear pass over its pickle.

    2 s plus 1 s per 20 MB really on disk: a 15 MB YOLOv5n strip needs ~0.2 s of it, a 13 GB
    Lightning file about 20 s of its 670 s. A CPU bomb in a small file has 2 s.
    """
    return 2.0 + real_bytes / 20e6


# Beyond each step's own need: thread stacks and malloc arenas are address space too
_SLACK = 256 << 20


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


class MemoryCap:
    """Bound the address space for one job, step by step: `need(n)` allows n bytes more than now.

    A pickle of a few bytes can make the unpickler allocate gigabytes, and on a training box the
    OOM killer might pick the trainer; with the cap the allocation fails with MemoryError and only
    this file fails. Each step's need is derived from bytes the file really holds (its pickle, its
    blocks on disk), never from a size it merely claims. The previous soft limit is restored.
    """

    def __init__(self) -> None:
        self.soft, self.hard = resource.getrlimit(resource.RLIMIT_AS)
        # someone already set a tighter limit (a test, a container): keep it
        self.active = self.soft == resource.RLIM_INFINITY

    def need(self, extra: int) -> None:
        if not self.active:
            return
        try:
            cap = _address_space() + extra + _SLACK
        except (OSError, ValueError):
            return
        if self.hard != resource.RLIM_INFINITY:
            cap = min(cap, self.hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, self.hard))

    def restore(self) -> None:
        if self.active:
            resource.setrlimit(resource.RLIMIT_AS, (self.soft, self.hard))

    def torch_side(self) -> Any:
        """Import the torch side without the cap (its libraries map gigabytes of address space,
        none of which a file chose); the next `need` caps the job again."""
        self.restore()
        from ckpt_watchd.engine import checkpoint

        self.need(0)
        return checkpoint


@contextlib.contextmanager
def memory_cap() -> Iterator[MemoryCap]:
    cap = MemoryCap()
    cap.need(0)
    try:
        yield cap
    finally:
        cap.restore()


# ------------------------------------------------------------------------------ one job


def run_job(job: StripJob, *, on_torch: Callable[[], None] | None = None) -> Outcome:
    """Strip one file in this process; never raises for a problem with the file.

    The container and pickle are checked first (no torch); `on_torch` runs once the torch side
    is imported, so that its import is not charged to the file's CPU budget.
    """
    started = time.monotonic()
    try:
        if job.kind == "folder":
            return _strip_folder(job)
        with memory_cap() as cap:
            from ckpt_watchd.engine import source

            opened = source.open_checkpoint(Path(job.path), need=cap.need)
            try:
                checkpoint = cap.torch_side()
            except BaseException:
                opened.close()
                raise
            if on_torch is not None:
                on_torch()
            before_replace = None
            if job.archive_dir is not None:
                from ckpt_watchd.records.archive import Archiver

                before_replace = Archiver(Path(job.archive_dir),
                                          Path(job.root) if job.root else None).keep
            outcome: Outcome = checkpoint.strip_file(
                Path(job.path), output=Path(job.output) if job.output else None,
                dry_run=job.dry_run, half=job.half, hashes=job.hashes,
                before_replace=before_replace, opened=opened, need=cap.need,
                also=tuple(Path(a) for a in job.also))
            return outcome
    except CheckpointError as e:
        return _failed(job, e.kind, e.message, started)
    except MemoryError:
        return _failed(job, "memory", "ran out of memory while loading or stripping", started)
    except OSError as e:
        return _failed(job, "os", f"{e.strerror or e}", started)
    except Exception as e:  # a bug or an input we did not foresee: still only this file fails
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
        return _failed(job, "internal", f"{type(e).__name__}: {e}{at}", started)


def _strip_folder(job: StripJob) -> Outcome:
    """A checkpoint folder: files removed, nothing unpickled (no torch, no memory cap needed)."""
    from ckpt_watchd.engine import folder

    outcome: Outcome = folder.strip_folder(
        Path(job.path), profile=job.profile or "", dry_run=job.dry_run,
        archive_dir=Path(job.archive_dir) if job.archive_dir else None,
        root=Path(job.root) if job.root else None)
    return outcome


def _one_line(message: str) -> str:
    text = " ".join(message.split())
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE - 3] + "..."


def _failed(job: StripJob, kind: str, message: str, started: float) -> Outcome:
    return Outcome(path=job.path, status=FAILED, error_type=kind, error=_one_line(message),
                   duration_s=time.monotonic() - started)


def inspect_boundary(path: Path, *, on_torch: Callable[[], None] | None = None
                     ) -> tuple[dict[str, Any] | None, str | None]:
    """`inspect` for one file in this process: (report, None) or (None, one-line error)."""
    try:
        with memory_cap() as cap:
            from ckpt_watchd.engine import source

            source.open_checkpoint(path, need=cap.need).close()  # refusals come before torch
            checkpoint = cap.torch_side()

            if on_torch is not None:
                on_torch()
            return checkpoint.inspect_file(path, need=cap.need), None
    except CheckpointError as e:
        return None, _one_line(e.message)
    except MemoryError:
        return None, "ran out of memory while loading"
    except Exception as e:
        return None, _one_line(f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------ isolation


class Isolated(Exception):
    """The job's process ended without an answer: crashed, over its budget or its deadline."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


def _child_setup(parent: int, budget: float) -> Callable[[], None]:
    """In the job's process: die with the parent, no core dump, no output, the CPU budget."""
    libc = ctypes.CDLL(None, use_errno=True)
    with contextlib.suppress(OSError, AttributeError):
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(3)
    # a crash or SIGXCPU must not write a core file anywhere (nor hand one to a core handler)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)

    def charge_from_now() -> None:
        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
        limit = int(used + budget) + 1
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (limit, hard))

    charge_from_now()
    return charge_from_now


def _real_bytes(path: str) -> int:
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    blocks = getattr(st, "st_blocks", 0)
    return min(st.st_size, blocks * 512) if blocks else st.st_size


@dataclass(slots=True)
class _Child:
    """One job's process, as the parent sees it."""

    pid: int
    fd: int
    budget: float
    deadline: float
    chunks: list[bytes]


def _spawn(work: Callable[[Callable[[], None]], dict[str, Any]], path: str,
           wall: float) -> _Child:
    budget = cpu_budget(_real_bytes(path))
    parent = os.getpid()
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the job's process: never returns
        code = 0
        try:
            os.close(r)
            on_torch = _child_setup(parent, budget)
            data = json.dumps(work(on_torch)).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    os.close(w)
    return _Child(pid, r, budget, time.monotonic() + wall, [])


def _kill(child: _Child) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child.pid, 0)
    with contextlib.suppress(OSError):
        os.close(child.fd)


def _reap(child: _Child) -> dict[str, Any] | Isolated:
    """The answer of a child whose pipe reached EOF."""
    os.close(child.fd)
    _, status = os.waitpid(child.pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and child.chunks:
        try:
            result = json.loads(b"".join(child.chunks))
        except ValueError:
            return Isolated("crash", "its process answered garbage")
        if isinstance(result, dict):
            return result
    return Isolated(*_death(status, child.budget))


def isolated(work: Callable[[Callable[[], None]], dict[str, Any]], *, path: str,
             wall: float, tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run `work(on_torch)` in a forked child; its JSON-able result, or raise Isolated.

    The child has the CPU budget of the file at `path` (charged from the moment torch is
    imported, `on_torch`), its stdout/stderr on /dev/null and no core dump; the parent waits at
    most `wall` seconds and kills it after that. `tick` is called every `_TICK` seconds while
    it waits (a progress display).
    """
    for _key, result in isolated_map([(None, work, path)], parallel=1, wall=wall, tick=tick):
        if isinstance(result, Isolated):
            raise result
        return result
    raise AssertionError("isolated_map yields one result per task")  # pragma: no cover


Task = tuple[Any, Callable[[Callable[[], None]], dict[str, Any]], str]


_TICK = 0.2


def isolated_map(tasks: Iterable[Task], *, parallel: int, wall: float,
                 tick: Callable[[], None] | None = None
                 ) -> Iterator[tuple[Any, dict[str, Any] | Isolated]]:
    """Run each (key, work, path) in a forked child, `parallel` at a time; yield (key, result).

    All children are forked and waited for from this one thread: a process with other threads
    must never fork (a lock one of them holds would stay locked in the child).
    """
    pending = iter(tasks)
    running: dict[int, tuple[Any, _Child]] = {}
    try:
        while True:
            while len(running) < max(1, parallel):
                task = next(pending, None)
                if task is None:
                    break
                key, work, path = task
                child = _spawn(work, path, wall)
                running[child.fd] = (key, child)
            if not running:
                return
            left = min(c.deadline for _k, c in running.values()) - time.monotonic()
            if tick is not None:
                left = min(left, _TICK)
            ready, _, _ = select.select(list(running), [], [], max(0.0, left))
            if tick is not None:
                tick()
            now = time.monotonic()
            for fd in ready:
                key, child = running[fd]
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    child.chunks.append(chunk)
                    continue
                del running[fd]
                yield key, _reap(child)
            for fd, (key, child) in list(running.items()):
                if now >= child.deadline and fd not in ready:
                    del running[fd]
                    _kill(child)
                    yield key, Isolated("timeout", f"timed out after {wall:g}s "
                                                   "(its process was killed)")
    finally:
        for _key, child in running.values():
            _kill(child)


def _death(status: int, budget: float) -> tuple[str, str]:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return "limit", (f"needed more than its CPU budget of {budget:.0f}s "
                             "(a CPU bomb?); its process was stopped")
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = " (out of memory?)" if sig == signal.SIGKILL else ""
        return "crash", f"its process crashed: killed by {name}{hint}"
    return "crash", f"its process crashed (exit code {os.WEXITSTATUS(status)})"


def run_isolated(job: StripJob, *, wall: float,
                 tick: Callable[[], None] | None = None) -> Outcome:
    """`run_job` in a process of its own (see `isolated`)."""
    started = time.monotonic()
    try:
        result = isolated(lambda on_torch: run_job(job, on_torch=on_torch).to_wire(),
                          path=job.path, wall=wall, tick=tick)
    except Isolated as e:
        from ckpt_watchd.engine import atomic

        atomic.remove_temps_for(Path(job.output or job.path))
        return _failed(job, e.kind, e.message, started)
    return Outcome.from_wire(result)


def inspect_isolated(path: Path, *, wall: float) -> tuple[dict[str, Any] | None, str | None]:
    """`inspect_boundary` in a process of its own."""
    def work(on_torch: Callable[[], None]) -> dict[str, Any]:
        report, error = inspect_boundary(path, on_torch=on_torch)
        return {"report": report, "error": error}

    try:
        result = isolated(work, path=str(path), wall=wall)
    except Isolated as e:
        return None, e.message
    return result.get("report"), result.get("error")


# ------------------------------------------------------------------------------ worker processes


def lower_priority(nice: int, io_idle: bool) -> None:
    """Make this process yield to training: CPU niceness and the idle I/O class."""
    if nice:
        with contextlib.suppress(OSError):
            os.nice(max(0, nice - os.nice(0)))
    if io_idle:
        _set_io_idle()


def _set_io_idle() -> None:
    # ioprio_set(IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << 13); Python has no binding for it
    import platform

    numbers = {"x86_64": 251, "aarch64": 30, "arm64": 30}
    nr = numbers.get(platform.machine())
    if nr is None:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(nr, 1, 0, 3 << 13)
    except OSError:
        pass


def inner_deadline(job_timeout: float) -> float:
    """The job process's own deadline: just before the pool would kill the whole worker."""
    return job_timeout - 1.0 if job_timeout > 2.0 else job_timeout


def worker_main(conn: Connection, nice: int, io_idle: bool, parent_pid: int | None,
                job_timeout: float = 1800.0) -> None:
    """Entry point of a worker process: strip the jobs the parent sends until the pipe closes.

    The worker itself never opens a checkpoint: it imports torch once and forks a fresh process
    for each job (`run_isolated`), which handles that one file and exits.
    """
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group and systemd may signal the cgroup: the parent decides
    # when a strip is abandoned (drain timeout), so workers ignore both and exit when the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lower_priority(nice, io_idle)
    # import the torch side now: a worker is started just before a strip is due (prewarm), so the
    # strip itself does not wait seconds for torch
    import torch

    from ckpt_watchd.engine import checkpoint  # noqa: F401

    # one thread: a strip is I/O and pickling, and must not compete with training for every core
    torch.set_num_threads(1)
    # what lives now lives as long as the worker: out of the collector's sight, and not copied
    # page by page into each job's process by the collector's writes
    gc.collect()
    gc.freeze()
    conn.send(WORKER_READY)  # from here on a death is a crash, not a failure to start
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(run_isolated(job, wall=inner_deadline(job_timeout)))


def _die_with_parent(parent_pid: int | None) -> None:
    # prctl(PR_SET_PDEATHSIG, SIGKILL): a kill -9 of the daemon must not leave workers writing.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # the parent may have died before prctl took effect (compared by pid: in a container the
    # daemon itself is pid 1, so "reparented to 1" proves nothing)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)
