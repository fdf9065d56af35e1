"""Worker side: the one boundary where a per-file error becomes an `Outcome` value.

`run_job` is what a worker process (or a one-shot command, in-process) runs for one file: it imports
the torch side lazily, strips, and turns every exception into a failed Outcome. Nothing here imports
torch at module level, so the daemon's main process can import this module to describe jobs.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ckpt_watchd.errors import CheckpointError
from ckpt_watchd.outcome import FAILED, Outcome

WORKER_READY = "ready"  # a worker's first message: it started and imported torch


@dataclass(frozen=True, slots=True)
class StripJob:
    path: str
    output: str | None = None
    dry_run: bool = False
    half: bool = False
    hashes: bool = False
    archive_dir: str | None = None
    root: str | None = None
    attempt: int = 1


def run_job(job: StripJob) -> Outcome:
    """Strip one file; never raises for a problem with the file."""
    started = time.monotonic()
    try:
        from ckpt_watchd.engine import checkpoint

        before_replace = None
        if job.archive_dir is not None:
            from ckpt_watchd.records.archive import Archiver

            before_replace = Archiver(Path(job.archive_dir), Path(job.root) if job.root else None
                                      ).keep
        with memory_cap(Path(job.path)):
            return checkpoint.strip_file(
                Path(job.path), output=Path(job.output) if job.output else None,
                dry_run=job.dry_run, half=job.half, hashes=job.hashes,
                before_replace=before_replace)
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


# What one job may map and allocate beyond the process's current size: the input (mapped), the
# output (written, then mapped to verify) and this much more for the unpickled structure.
_JOB_SLACK = 1 << 30


@contextlib.contextmanager
def memory_cap(path: Path) -> Iterator[None]:
    """Bound the address space for one job: 2 x the file size + 1 GiB above the current size.

    A pickle of a few bytes can make the C unpickler allocate gigabytes (a huge memo index) and
    on a training box the OOM killer might pick the trainer; with the cap the allocation fails
    with MemoryError and only this file fails. The previous soft limit is restored afterwards.
    """
    try:
        size = os.lstat(path).st_size
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, ValueError):
        yield
        return
    cap = current + 2 * size + _JOB_SLACK
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY and soft < cap:
        yield  # someone already set a tighter limit: keep it
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _failed(job: StripJob, kind: str, message: str, started: float) -> Outcome:
    return Outcome(path=job.path, status=FAILED, error_type=kind, error=message,
                   duration_s=time.monotonic() - started)


def inspect_boundary(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """`inspect` for one file: (report, None) or (None, one-line error)."""
    try:
        from ckpt_watchd.engine import checkpoint

        with memory_cap(path):
            return checkpoint.inspect_file(path), None
    except CheckpointError as e:
        return None, e.message
    except MemoryError:
        return None, "ran out of memory while loading"
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def lower_priority(nice: int, io_idle: bool) -> None:
    """Make this process yield to training: CPU niceness and the idle I/O class."""
    if nice:
        with contextlib.suppress(OSError):
            os.nice(max(0, nice - os.nice(0)))
    if io_idle:
        _set_io_idle()


def _set_io_idle() -> None:
    # ioprio_set(IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << 13); Python has no binding for it
    import ctypes
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


def worker_main(conn: Connection, nice: int, io_idle: bool, parent_pid: int | None) -> None:
    """Entry point of a worker process: strip the jobs the parent sends until the pipe closes."""
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
    conn.send(WORKER_READY)  # from here on a death is a crash, not a failure to start
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(run_job(job))


def _die_with_parent(parent_pid: int | None) -> None:
    # prctl(PR_SET_PDEATHSIG, SIGKILL): a kill -9 of the daemon must not leave workers writing.
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    # the parent may have died before prctl took effect (compared by pid: in a container the
    # daemon itself is pid 1, so "reparented to 1" proves nothing)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)
