"""Watchdog adapter and the facts of a run's processes; both only say *where* to look.

The observer thread turns events into folder hints (deduplicated, so an event storm costs one
queue entry per folder); `discover` finds the runs those folders belong to. `cadence_hint` reads a
run's own records, `run_in_use` and `watched_inodes` the processes'. Nothing here decides anything
or imports torch, and symlinks are never followed out of the root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import structlog

from ckpt_watchd.watch import paths, runfiles

log = structlog.get_logger("ckpt_watchd.watch.watcher")

_START_FILES = ("args.yaml", "opt.yaml", "hyp.yaml")


def cadence_hint(run_dir: Path, newest_mtime: float | None) -> float | None:
    """Average epoch time from the run's own files: (last write - start) / epochs in results.csv.

    Used until two writes have been seen, so a run found mid-training at start-up with slow epochs
    is not mistaken for a finished one.
    """
    if newest_mtime is None:
        return None
    starts = []
    for name in _START_FILES:
        with contextlib.suppress(OSError):
            starts.append(os.lstat(run_dir / name).st_mtime)
    if not starts:
        return None
    try:
        text = runfiles.read_small(run_dir / "results.csv", 4 << 20)
        rows = sum(1 for line in text.splitlines() if line.strip()) - 1
    except OSError:  # missing, unreadable, or not a regular file (a FIFO must not block us)
        rows = 0
    epochs = max(1, rows)
    return max(0.0, (newest_mtime - min(starts)) / epochs)


# ------------------------------------------------------------------------------ the observer


class Hints:
    """Folders someone should look at, deduplicated; filled by the observer thread.

    A folder hint is a folder in which a file changed (the service maps it to its run); a
    subtree hint is a folder that appeared or moved in (the service looks for runs below it).
    """

    def __init__(self, wake: threading.Event) -> None:
        self._lock = threading.Lock()
        self._runs: set[Path] = set()
        self._subtrees: set[Path] = set()
        self._wake = wake

    def add_folder(self, folder: Path) -> None:
        with self._lock:
            fresh = folder not in self._runs
            self._runs.add(folder)
        if fresh:
            self._wake.set()

    def add_subtree(self, folder: Path) -> None:
        with self._lock:
            self._subtrees.add(folder)
        self._wake.set()

    def drain(self) -> tuple[set[Path], set[Path]]:
        with self._lock:
            runs, subtrees = self._runs, self._subtrees
            self._runs, self._subtrees = set(), set()
        return runs, subtrees


class Watcher:
    """A watchdog observer on the root that feeds `Hints`; falls back to polling when it cannot."""

    def __init__(self, root: Path, hints: Hints, ignore: Iterable[Path],
                 warn: Callable[[str], None]) -> None:
        self.root = root
        self.hints = hints
        self.ignore = tuple(p for p in ignore if p is not None)
        self._warn = warn
        self._observer: Any = None
        self._overflow: OverflowListener | None = None
        self._inside: dict[str, bool] = {}
        self.mode = "polling"

    def start(self) -> None:
        from watchdog.events import (
            DirCreatedEvent,
            DirDeletedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileMovedEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                watcher.on_event(event)

        try:
            observer = Observer()
            # Only what can change a checkpoint or the tree. Without the filter inotify also
            # reports every open and every directory listing: our own scans would flood its
            # queue, and each overflow makes watchdog walk the whole tree again.
            observer.schedule(Handler(), str(self.root), recursive=True, event_filter=[
                FileClosedEvent, FileCreatedEvent, FileMovedEvent, FileDeletedEvent,
                DirCreatedEvent, DirMovedEvent, DirDeletedEvent])
            observer.start()
        except OSError as e:
            self._warn(f"cannot watch {self.root} with inotify ({e.strerror or e}); "
                       f"falling back to polling the tree (raise fs.inotify.max_user_watches "
                       f"to avoid this)")
            self.mode = "polling"
            return
        self._observer = observer
        self.mode = "inotify"
        self._overflow = OverflowListener(lambda: self.hints.add_subtree(self.root))
        logging.getLogger("watchdog.observers").addHandler(self._overflow)

    def alive(self) -> bool:
        """False once the observer thread died (e.g. inotify ran out of watches mid-run)."""
        if self._observer is None:
            return self.mode == "polling"
        return bool(self._observer.is_alive())

    def degrade(self, why: str) -> None:
        self._warn(f"file watching stopped ({why}); falling back to polling the tree")
        self.stop()
        self.mode = "polling"

    def stop(self) -> None:
        if self._overflow is not None:
            logging.getLogger("watchdog.observers").removeHandler(self._overflow)
            self._overflow = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def on_event(self, event: Any) -> None:
        """Runs on the observer thread: a cached decision per folder and a set insert."""
        for raw in (getattr(event, "src_path", None), getattr(event, "dest_path", None)):
            if not raw:
                continue
            name = os.fsdecode(raw)
            folder, _, base = name.rpartition("/")
            if paths.is_own_file(base) or not self._followed(folder):
                continue
            if event.is_directory and event.event_type != "deleted":
                self.hints.add_subtree(Path(name))  # a new folder: look for runs in it
            else:
                self.hints.add_folder(Path(folder))  # a change in this folder's run

    def _followed(self, folder: str) -> bool:
        """Inside the root and not inside our own folders; remembered per folder string.

        An event storm (hundreds of trainers rewriting last.pt) asks about the same few hundred
        folders thousands of times a second: path arithmetic each time costs real CPU.
        """
        hit = self._inside.get(folder)
        if hit is None:
            path = Path(folder)
            hit = paths.relative_to(path, self.root) is not None and not any(
                paths.is_inside(path, d) for d in self.ignore)
            if len(self._inside) > 200_000:  # bounded: a huge tree must not grow it forever
                self._inside.clear()
            self._inside[folder] = hit
        return hit


def run_in_use(run_dir: Path, proc: Path = Path("/proc")) -> int | None:
    """The pid of a live process holding a file under `run_dir` open for writing, else None.

    A trainer between two saves still holds its TensorBoard event file open for writing, so this
    tells a very slow epoch from a killed run where the time rule alone cannot. Readers (a
    TensorBoard server tailing the events) do not count. Only processes we may inspect (same user or
    root, same PID namespace) are seen; elsewhere the check finds nothing. Called once per
    finished-looking run, never on a hot path.
    """
    prefix = str(run_dir).rstrip("/") + "/"
    for pid, path in _written_files(proc):
        if path.startswith(prefix):
            return pid
    return None


def open_for_writing(proc: Path = Path("/proc")) -> dict[str, int]:
    """Every file some process has open for writing, and that process: one /proc walk for many
    runs (`scan` asks about all of them at once)."""
    return {path: pid for pid, path in _written_files(proc)}


def _written_files(proc: Path) -> Iterator[tuple[int, str]]:
    me = os.getpid()
    try:
        pids = [int(e.name) for e in os.scandir(proc) if e.name.isdigit()]
    except OSError:
        return
    for pid in pids:
        if pid == me:
            continue
        base = proc / str(pid)
        try:
            fds = os.scandir(base / "fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                with contextlib.suppress(OSError, ValueError):
                    target = os.readlink(fd.path)
                    if target.startswith("/") and _writable(base, fd.name):
                        yield pid, target


def _writable(base: Path, fd: str) -> bool:
    with open(base / "fdinfo" / fd, "rb") as f:
        for line in f:
            if line.startswith(b"flags:"):
                return int(line.split()[1], 8) & 0o3 != 0  # O_WRONLY or O_RDWR
    return False


def watched_inodes(proc_self: Path = Path("/proc/self")) -> set[tuple[int, int, int]] | None:
    """(major, minor, inode) of every directory this process's inotify instances watch, or None.

    watchdog skips a subfolder silently when inotify_add_watch fails (fs.inotify.max_user_watches
    reached); the kernel's fdinfo is the one place that says which folders really are watched.
    """
    out: set[tuple[int, int, int]] = set()
    found = False
    try:
        fds = list(os.scandir(proc_self / "fd"))
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(fd.path) != "anon_inode:inotify":
                continue
            text = (proc_self / "fdinfo" / fd.name).read_text()
        except OSError:
            continue
        found = True
        for line in text.splitlines():
            if not line.startswith("inotify wd:"):
                continue
            fields = dict(f.split(":", 1) for f in line.split()[1:] if ":" in f)
            with contextlib.suppress(KeyError, ValueError):
                sdev = int(fields["sdev"], 16)  # the kernel's dev_t: major << 20 | minor
                out.add((sdev >> 20, sdev & 0xFFFFF, int(fields["ino"], 16)))
    return out if found else None


def unwatched(dirs: Iterable[Path], watched: set[tuple[int, int, int]]) -> list[Path]:
    """The folders among `dirs` that no inotify watch covers."""
    missing = []
    for d in dirs:
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) not in watched:
            missing.append(d)
    return missing


class OverflowListener(logging.Handler):
    """watchdog reports a kernel queue overflow only as a log line; turn it into a full rescan."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._on_overflow()
