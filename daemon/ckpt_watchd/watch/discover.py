"""Where the runs are, and what one run holds now: the walks that show folders to the profiles.

A run is the trainer's output folder (a YOLO run folder, a transformers `output_dir`, Lightning's
`version_N`, a timm or MMEngine work folder). `find_runs` walks the root level by level (bounded
depth, never following a symlink, never entering our own folders or hidden ones) and asks every
profile, by `registry.discover`, what each folder holds. `probe` looks at one run: every file in
it, links and FIFOs by their own facts (so the quiet rule covers everything written there), its
units with their fingerprints, and which names share an inode. Nothing here decides anything or imports torch.
"""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ckpt_watchd.engine.atomic import TEMP_PREFIX
from ckpt_watchd.engine.profiles import common, registry
from ckpt_watchd.watch import paths
from ckpt_watchd.watch.tracker import Observation

DEFAULT_MAX_DEPTH = 6  # below the root: runs/<task>/<name>/weights is 3, hf/<exp>/checkpoint-N is 2
_RUN_DEPTH = 4  # below a run folder: weights/, checkpoint-N/, lightning's checkpoints/
_MAX_FILES = 20_000  # a run is looked at through at most this many files

# name relative to the run, "f" (regular file) or "o" (link, FIFO, device), ino, size, mtime_ns
FileStat = tuple[str, str, int, int, int]
Fingerprint = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Where:
    """What discovery needs of the settings."""

    root: Path
    patterns: tuple[str, ...]
    files: tuple[str, ...]
    skip: tuple[Path, ...] = ()
    max_depth: int = DEFAULT_MAX_DEPTH


def entries_of(folder: Path) -> dict[str, os.DirEntry[str]] | None:
    """Every entry of the folder by name, none of our own names; nothing followed or opened."""
    try:
        with os.scandir(folder) as it:
            return {e.name: e for e in it if not e.name.startswith(TEMP_PREFIX)}
    except OSError:
        return None


def _kind(e: os.DirEntry[str]) -> str | None:
    """'dir', 'file', or another kind for a Look's `other`; None when it cannot be told."""
    try:
        if e.is_symlink():
            return common.SYMLINK
        if e.is_dir(follow_symlinks=False):
            return "dir"
        if e.is_file(follow_symlinks=False):
            return "file"
        mode = e.stat(follow_symlinks=False).st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "socket" if stat.S_ISSOCK(mode) else "device"


def _look(where: Where, folder: Path, entries: dict[str, os.DirEntry[str]]) -> common.Look:
    rel = paths.relative_to(folder, where.root) or PurePosixPath(".")
    kinds = {n: _kind(e) for n, e in entries.items()}
    return common.Look(rel, {n: k == "dir" for n, k in kinds.items() if k in ("dir", "file")},
                       where.patterns, where.files,
                       {n: k for n, k in kinds.items() if k not in (None, "dir", "file")})


def _subfolders(entries: dict[str, os.DirEntry[str]], folder: Path, where: Where
                ) -> Iterator[Path]:
    for name, e in sorted(entries.items()):
        try:
            if name.startswith(".") or not e.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        sub = folder / name
        if sub not in where.skip:
            yield sub


def find_runs(where: Where, *, below: Path | None = None, depth: int | None = None
              ) -> dict[Path, list[common.Found]]:
    """Every run under `below` (default: the whole root) and what its folders hold.

    `depth` bounds the walk below `below` (0: that folder alone); the root's `max_depth`
    bounds it anyway.
    """
    start = below or where.root
    rel = paths.relative_to(start, where.root)
    if rel is None:
        return {}
    runs: dict[Path, list[common.Found]] = {}
    level = [start]
    at = 0 if str(rel) == "." else len(rel.parts)
    last = where.max_depth if depth is None else min(where.max_depth, at + depth)
    while level and at <= last:
        nxt: list[Path] = []
        for folder in level:
            entries = entries_of(folder)
            if entries is None:
                continue
            for found in registry.discover(_look(where, folder, entries)):
                runs.setdefault(where.root / found.run if found.run else where.root,
                                []).append(found)
            nxt.extend(_subfolders(entries, folder, where))
        level, at = nxt, at + 1
    return runs


@dataclass(frozen=True, slots=True)
class UnitState:
    """One unit as it stands now."""

    unit: common.Unit
    path: Path
    fingerprint: Fingerprint | None  # None: not there (or a folder unit that is no folder)
    # other names of the same file (hard links) inside the run: stripped with it
    also: tuple[Path, ...] = ()

    @property
    def kind(self) -> str:
        return self.unit.kind


@dataclass(frozen=True, slots=True)
class Probe:
    """One look at a run: every file the trainer wrote there, its units, whether it is kept."""

    files: tuple[FileStat, ...]
    newest_ns: int  # newest mtime among the files (0 when there are none)
    kept: bool
    units: tuple[UnitState, ...] = ()
    incomplete: tuple[str, ...] = ()  # leftovers of a kill mid-save (relative to the root)
    folders: tuple[Path, ...] = ()  # the run's folders (for the writer watch, temp cleanup)

    @property
    def obs(self) -> Observation:
        return Observation(self.files, self.newest_ns)

    @property
    def newest_mtime(self) -> float | None:
        """Wall-clock seconds of the newest write, for the age of a run found at start-up."""
        return self.newest_ns / 1e9 if self.files else None


def _folder_fingerprint(listing: Iterable[FileStat], st: os.stat_result) -> Fingerprint:
    # a folder unit changes when any file in it does: (inode, bytes, a digest of its listing)
    items = sorted(listing)
    digest = zlib.crc32(repr(items).encode()) | (len(items) << 32)
    return (st.st_ino, sum(i[3] for i in items), digest)


def probe(run: Path, where: Where) -> Probe:
    """Stat everything in `run` (bounded), and find its units the way `find_runs` does."""
    files: list[FileStat] = []
    newest = 0
    kept = False
    units: list[common.Unit] = []
    incomplete: list[str] = []
    folders: list[Path] = []
    inodes: dict[tuple[int, int], list[Path]] = {}
    stats: dict[Path, os.stat_result] = {}
    per_folder: dict[Path, list[FileStat]] = {}
    run_rel = paths.relative_to(run, where.root)
    run_key = "" if run_rel is None or str(run_rel) == "." else str(run_rel)
    level, depth = [run], 0
    while level and depth <= _RUN_DEPTH and len(files) < _MAX_FILES:
        nxt: list[Path] = []
        for folder in level:
            entries = entries_of(folder)
            if entries is None:
                continue
            folders.append(folder)
            kept = kept or os.path.lexists(folder / paths.KEEP_MARKER)  # (our prefix: not listed)
            listing: list[FileStat] = []
            for name, e in entries.items():
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                path = folder / name
                stats[path] = st
                if stat.S_ISREG(st.st_mode):
                    item = (str(path.relative_to(run)), "f", st.st_ino, st.st_size,
                            st.st_mtime_ns)
                    files.append(item)
                    listing.append(item)
                    newest = max(newest, st.st_mtime_ns)
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
                elif not stat.S_ISDIR(st.st_mode):
                    # a link, FIFO or device (its own facts, never followed): it settles like a
                    # file, so one named like a checkpoint gets its one clear error
                    files.append((str(path.relative_to(run)), "o", st.st_ino, st.st_size,
                                  st.st_mtime_ns))
                    newest = max(newest, st.st_mtime_ns)
            per_folder[folder] = listing
            for found in registry.discover(_look(where, folder, entries)):
                if found.run == run_key:
                    units.extend(found.units)
                    incomplete.extend(found.incomplete)
            nxt.extend(_subfolders(entries, folder, where))
        level, depth = nxt, depth + 1
    states = []
    seen: set[str] = set()
    for u in units:
        if u.rel in seen:
            continue
        seen.add(u.rel)
        path = where.root / u.rel
        found_st = stats.get(path)
        fp: Fingerprint | None = None
        also: tuple[Path, ...] = ()
        if found_st is not None and u.kind == common.FILE:
            # (a FIFO, link or folder named like a checkpoint too: the worker refuses it)
            fp = (found_st.st_ino, found_st.st_size, found_st.st_mtime_ns)
            if stat.S_ISREG(found_st.st_mode):
                also = tuple(p for p in inodes.get((found_st.st_dev, found_st.st_ino), [])
                             if p != path)
        elif found_st is not None and u.kind == common.FOLDER and stat.S_ISDIR(found_st.st_mode):
            fp = _folder_fingerprint(_listing_below(path, per_folder), found_st)
        states.append(UnitState(u, path, fp, also))
    return Probe(tuple(sorted(files)), newest, kept, tuple(states), tuple(sorted(incomplete)),
                 tuple(folders))


def _listing_below(folder: Path, per_folder: dict[Path, list[FileStat]]) -> list[FileStat]:
    out: list[FileStat] = []
    for f, listing in per_folder.items():
        if f == folder or folder in f.parents:
            out.extend(listing)
    return out
