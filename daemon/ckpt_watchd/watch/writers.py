"""Who last wrote each run's files, learnt from fanotify, and whether that process still runs.

The time rule cannot tell a very slow epoch from a killed run, and a trainer that holds no file
of its run open between saves leaves the open-file check nothing to see. The process that last
wrote the run's checkpoints can tell them apart: while it still runs, and has not gone on to write
another run since (a sweep training runs one after another in one process), the run is live.

inotify, which the watcher uses, does not say who wrote; fanotify's close-after-write event does.
A fanotify listener that sees other processes' pids needs CAP_SYS_ADMIN (root outside a user
namespace); without it `WriterWatch.open` returns None with the reason, and the time rule and the
open-file check stand alone. Events from a PID namespace we cannot see carry no pid and teach
nothing. `parse` and `Writers` take their facts as arguments (pure); `WriterWatch` owns the fd.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckpt_watchd.engine.atomic import TEMP_PREFIX

# <linux/fanotify.h>
FAN_CLOSE_WRITE = 0x08
FAN_Q_OVERFLOW = 0x4000
FAN_EVENT_ON_CHILD = 0x08000000
FAN_CLASS_NOTIF = 0x0
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_NOFD = -1
_METADATA = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_METADATA_VERSION = 3
_AT_FDCWD = -100
# Each event read opens the written file for us: read a few at a time to bound open fds.
_BATCH = 64 * _METADATA.size


@dataclass(frozen=True, slots=True)
class Event:
    mask: int
    fd: int
    pid: int


def parse(buf: bytes) -> list[Event]:
    """The events in one read(2) of a fanotify fd (no info records: FAN_CLASS_NOTIF, fd mode)."""
    events, at = [], 0
    while at + _METADATA.size <= len(buf):
        length, version, _, _, mask, fd, pid = _METADATA.unpack_from(buf, at)
        if version != _METADATA_VERSION or length < _METADATA.size:
            raise ValueError(f"unexpected fanotify event (version {version}, length {length})")
        events.append(Event(mask, fd, pid))
        at += length
    return events


def process_start(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The start time (clock ticks since boot) of a running `pid`; None if gone or a zombie.

    A pid with the same start time is the same process, so a reused pid is never taken for the
    writer it replaced.
    """
    try:
        stat = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])  # field 22 of stat(5); fields here start at field 3 (state)


@dataclass(frozen=True, slots=True)
class Writer:
    pid: int
    start: int


class Writers:
    """The last writer of each weights folder, and each writer's latest folder (pure)."""

    def __init__(self) -> None:
        self._by_dir: dict[str, Writer] = {}
        self._latest: dict[int, str] = {}  # pid -> the folder it wrote last

    def saw(self, folder: str, pid: int, start_of: Callable[[int], int | None]) -> None:
        """`pid` closed a file it had written in `folder`."""
        known = self._by_dir.get(folder)
        if known is None or known.pid != pid:
            start = start_of(pid)
            if start is None:  # already gone: it cannot keep the run alive
                self._by_dir.pop(folder, None)
            else:
                self._by_dir[folder] = Writer(pid, start)
        self._latest[pid] = folder

    def live(self, folder: str, start_of: Callable[[int], int | None]) -> int | None:
        """The pid of the folder's last writer if it still runs and wrote nothing elsewhere since."""
        w = self._by_dir.get(folder)
        if w is None:
            return None
        if start_of(w.pid) != w.start:  # exited (or its pid reused): forget it
            del self._by_dir[folder]
            if self._latest.get(w.pid) == folder:
                del self._latest[w.pid]
            return None
        return w.pid if self._latest.get(w.pid) == folder else None

    def forget(self, folder: str) -> None:
        w = self._by_dir.pop(folder, None)
        if w is not None and self._latest.get(w.pid) == folder:
            del self._latest[w.pid]

    def __len__(self) -> int:
        return len(self._by_dir)


class WriterWatch:
    """A fanotify listener on the runs' folders: `watch` each, ask `live` before stripping."""

    def __init__(self, fd: int, libc: ctypes.CDLL) -> None:
        self._fd = fd
        self._libc = libc
        self._me = os.getpid()
        self.writers = Writers()
        self._keys: dict[str, str] = {}  # real path of a watched folder -> the run it is part of
        self._reals: dict[str, set[str]] = {}  # a run -> the real paths of its watched folders
        self.overflowed = 0
        # why writers are no longer (all) followed: set once, then no more folders are marked,
        # and after a failed read nothing more is read (the time rule and open-file check remain)
        self.error: str | None = None
        self._reading = True

    @classmethod
    def open(cls) -> tuple[WriterWatch | None, str]:
        """A listener and "fanotify", or None and why there is none (never raises)."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init, mark = libc.fanotify_init, libc.fanotify_mark
        except (OSError, AttributeError):
            return None, "unavailable: no fanotify in this C library"
        init.argtypes, init.restype = [ctypes.c_uint, ctypes.c_uint], ctypes.c_int
        mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                         ctypes.c_char_p]
        mark.restype = ctypes.c_int
        fd = init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK,
                  os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)
        if fd < 0:
            err = ctypes.get_errno()
            why = ("needs CAP_SYS_ADMIN" if err in (errno.EPERM, errno.EACCES)
                   else os.strerror(err))
            return None, f"unavailable: fanotify {why}"
        return cls(fd, libc), "fanotify"

    def watch(self, folder: Path, run: Path | None = None) -> None:
        """Learn the writers of files in `folder` from now on, as writers of `run` (idempotent).

        A run has several folders (the run folder, weights/, checkpoint-N/): a write in any of
        them is a write of the run, so the trainer moving from one to the next is not mistaken
        for it going on to another run.
        """
        if self.error is not None:
            return
        if self._libc.fanotify_mark(self._fd, FAN_MARK_ADD, FAN_CLOSE_WRITE | FAN_EVENT_ON_CHILD,
                                    _AT_FDCWD, os.fsencode(folder)) < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                return  # gone already, or not ours to read: this folder only
            # ENOSPC (fs.fanotify.max_user_marks), ENOMEM, a filesystem without fanotify, ...
            self.error = f"fanotify_mark: {os.strerror(err)} (at {folder})"
            return
        # the kernel names event files by their real path; the service by the path it walked
        real, key = os.path.realpath(folder), str(run if run is not None else folder)
        self._keys[real] = key
        self._reals.setdefault(key, set()).add(real)

    def drain(self) -> None:
        """Read every queued event (non-blocking) into `writers`; never raises."""
        while self._reading:
            try:
                buf = os.read(self._fd, _BATCH)
                events = parse(buf)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    return  # out of fds for the event files: try again next round
                self._stop_reading(f"reading fanotify events: {e.strerror or e}")
                return
            except ValueError as e:
                self._stop_reading(str(e))
                return
            if not events:
                return
            for ev in events:
                self._take(ev)

    def _stop_reading(self, why: str) -> None:
        self._reading = False
        self.error = why
        self.writers = Writers()  # what we knew can no longer be kept up to date

    def _take(self, ev: Event) -> None:
        if ev.mask & FAN_Q_OVERFLOW:
            self.overflowed += 1
        if ev.fd == FAN_NOFD or ev.fd < 0:
            return
        try:
            path = os.readlink(f"/proc/self/fd/{ev.fd}")
        except OSError:
            return
        finally:
            os.close(ev.fd)
        real, name = os.path.split(path)
        folder = self._keys.get(real)
        # pid 0: a process in a PID namespace we cannot see; our own workers only write temps
        if folder is not None and ev.pid > 0 and ev.pid != self._me \
                and not name.startswith(TEMP_PREFIX):
            self.writers.saw(folder, ev.pid, process_start)

    def live(self, run: Path) -> int | None:
        """The pid of a still-running process that wrote in `run` last, after reading events."""
        self.drain()
        return self.writers.live(str(run), process_start)

    def forget(self, run: Path) -> None:
        """Stop following `run` (and every folder watched for it)."""
        self.writers.forget(str(run))
        for real in self._reals.pop(str(run), {os.path.realpath(run)}):
            if self._keys.get(real) == str(run):
                del self._keys[real]
            self._libc.fanotify_mark(self._fd, FAN_MARK_REMOVE,
                                     FAN_CLOSE_WRITE | FAN_EVENT_ON_CHILD, _AT_FDCWD,
                                     os.fsencode(real))  # ENOENT if already gone: fine

    def close(self) -> None:
        os.close(self._fd)
