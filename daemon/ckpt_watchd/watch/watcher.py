"""Watchdog adapter and the filesystem scan; both only say *where* to look, never what happened.

The observer thread turns events into run-folder hints (deduplicated, so an event storm costs one
queue entry per run); the start-up scan and the periodic reconcile find weights folders with the same
path rules. `probe` stats one run's checkpoint files. Nothing here decides anything or imports torch,
and symlinks are never followed out of the root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ckpt_watchd.engine.atomic import TEMP_PREFIX
from ckpt_watchd.watch import paths, runfiles
from ckpt_watchd.watch.tracker import Observation

log = structlog.get_logger("ckpt_watchd.watch.watcher")

_START_FILES = ("args.yaml", "opt.yaml", "hyp.yaml")


# ------------------------------------------------------------------------------ scanning


def find_weights_dirs(root: Path, patterns: Iterable[str], *, below: Path | None = None,
                      skip: Iterable[Path] = ()) -> Iterator[Path]:
    """Weights folders matching the patterns, under `below` (default: the whole root).

    A level-by-level scandir walk that never follows symlinks and never descends into our own
    state/archive folders or temp names.
    """
    skip_set = set(skip)
    start = below or root
    rel = paths.relative_to(start, root)
    if rel is None:
        return
    rel_parts = "/".join(rel.parts)
    todo = paths.remaining_patterns(rel_parts, patterns) if rel_parts else list(patterns)
    if rel_parts and paths.is_weights_dir(rel_parts, patterns):
        yield start
    seen: set[Path] = set()
    for pattern in todo:
        for d in _walk_pattern(start, [p for p in pattern.split("/") if p], skip_set):
            if d not in seen:
                seen.add(d)
                yield d


def _walk_pattern(base: Path, parts: list[str], skip: set[Path]) -> Iterator[Path]:
    import fnmatch

    level = [base]
    for i, part in enumerate(parts):
        nxt = []
        for d in level:
            if not any(ch in part for ch in "*?["):
                cand = d / part
                if _is_real_dir(cand) and cand not in skip:
                    nxt.append(cand)
                continue
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                if (e.name.startswith(TEMP_PREFIX) or not fnmatch.fnmatchcase(e.name, part)
                        or not e.is_dir(follow_symlinks=False)):
                    continue
                p = Path(e.path)
                if p not in skip:
                    nxt.append(p)
        level = nxt
        if i == len(parts) - 1:
            yield from level


def _is_real_dir(p: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(p).st_mode)
    except OSError:
        return False


FileStat = tuple[str, str, int, int, int]  # name, "f" (regular) or "x", ino, size, mtime_ns


@dataclass(frozen=True, slots=True)
class Probe:
    """One look at a weights folder: its checkpoint files now, and whether the run is kept."""

    files: tuple[FileStat, ...]
    newest_ns: int  # newest mtime among the files (0 when there are none)
    kept: bool

    @property
    def obs(self) -> Observation:
        return Observation(self.files, self.newest_ns)

    @property
    def newest_mtime(self) -> float | None:
        """Wall-clock seconds of the newest write, for the age of a run found at start-up."""
        return self.newest_ns / 1e9 if self.files else None


def probe(wdir: Path, files: Iterable[str]) -> Probe:
    """Stat a weights folder's checkpoint files (never following symlinks) and the keep marker."""
    key: list[FileStat] = []
    newest = 0
    for name in files:
        try:
            st = os.lstat(wdir / name)
        except OSError:
            continue
        kind = "f" if stat.S_ISREG(st.st_mode) else "x"
        key.append((name, kind, st.st_ino, st.st_size, st.st_mtime_ns))
        newest = max(newest, st.st_mtime_ns)
    kept = any(os.path.lexists(d / paths.KEEP_MARKER) for d in (wdir, wdir.parent))
    return Probe(tuple(key), newest, kept)


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
    """Run folders someone should look at, deduplicated; filled by the observer thread."""

    def __init__(self, wake: threading.Event) -> None:
        self._lock = threading.Lock()
        self._runs: set[Path] = set()
        self._subtrees: set[Path] = set()
        self._wake = wake

    def add_run(self, run: Path) -> None:
        with self._lock:
            fresh = run not in self._runs
            self._runs.add(run)
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


_WEIGHTS, _PREFIX, _OTHER = "weights", "prefix", "other"


class Watcher:
    """A watchdog observer on the root that feeds `Hints`; falls back to polling when it cannot."""

    def __init__(self, root: Path, patterns: tuple[str, ...], files: tuple[str, ...],
                 hints: Hints, ignore: Iterable[Path], warn: Callable[[str], None]) -> None:
        self.root = root
        self.patterns = patterns
        self.files = frozenset(files)
        self.hints = hints
        self.ignore = tuple(p for p in ignore if p is not None)
        self._warn = warn
        self._observer: Any = None
        self._overflow: OverflowListener | None = None
        self._kinds: dict[str, str] = {}
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
            if paths.is_own_file(base):
                continue
            if event.is_directory:
                kind = self._classify(name)
                if kind == _WEIGHTS:
                    self.hints.add_run(Path(name))
                elif kind == _PREFIX:
                    self.hints.add_subtree(Path(name))
                continue
            if base in self.files:
                if self._classify(folder) == _WEIGHTS:
                    self.hints.add_run(Path(folder))
            elif base == paths.KEEP_MARKER and self._classify(folder) == _PREFIX:
                self.hints.add_subtree(Path(folder))

    def _classify(self, folder: str) -> str:
        """Weights folder, a folder that may gain one, or neither; remembered per folder string.

        An event storm (hundreds of trainers rewriting last.pt) asks about the same few hundred
        folders thousands of times a second: glob matching each time costs real CPU.
        """
        kind = self._kinds.get(folder)
        if kind is None:
            path = Path(folder)
            rel = paths.relative_to(path, self.root)
            if rel is None or any(paths.is_inside(path, d) for d in self.ignore):
                kind = _OTHER
            elif paths.is_weights_dir(rel, self.patterns):
                kind = _WEIGHTS
            elif paths.could_contain_weights_dir(rel, self.patterns):
                kind = _PREFIX
            else:
                kind = _OTHER
            if len(self._kinds) > 200_000:  # bounded: a huge tree must not grow it forever
                self._kinds.clear()
            self._kinds[folder] = kind
        return kind


def run_in_use(run_dir: Path, proc: Path = Path("/proc")) -> int | None:
    """The pid of a live process holding a file under `run_dir` open for writing, else None.

    A trainer between two saves still holds its TensorBoard event file open for writing, so this
    tells a very slow epoch from a killed run where the time rule alone cannot. Readers (a
    TensorBoard server tailing the events) do not count. Only processes we may inspect (same user or
    root, same PID namespace) are seen; elsewhere the check finds nothing. Called once per
    finished-looking run, never on a hot path.
    """
    prefix = str(run_dir).rstrip("/") + "/"
    me = os.getpid()
    try:
        pids = [int(e.name) for e in os.scandir(proc) if e.name.isdigit()]
    except OSError:
        return None
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
                    if os.readlink(fd.path).startswith(prefix) and _writable(base, fd.name):
                        return pid
    return None


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
