"""`--archive-dir`: keep each original before it is replaced, and `restore` to put it back.

It owns the archive layout (the path relative to the root, plus the original's mtime_ns) and the
append-only `manifest.jsonl`, whose entries for a folder strip also name the folder and the strip,
so `restore FOLDER` puts a whole checkpoint folder back. It never writes to a checkpoint path
except through a same-directory temp file and a rename (a folder's files never over an existing
name), and never deletes anything from the archive. No torch here.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ckpt_watchd.engine import atomic
from ckpt_watchd.errors import CheckpointError, SourceChanged, WriteFailed

MANIFEST = "manifest.jsonl"
# a hard link needs the same filesystem, and some (FAT, some FUSE mounts) refuse links at all
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK})


class Facts(Protocol):
    """What the archiver needs of `safeload.FileFacts` (imported there with torch, so not here)."""

    @property
    def ino(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...
    @property
    def mode(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...


@dataclass(frozen=True, slots=True)
class FolderStrip:
    """Which folder strip an archived file belongs to, for `restore FOLDER`."""

    id: str  # one strip of one folder
    files: int  # how many files it removes: a strip with fewer entries never finished archiving
    folder_mtime_ns: int  # the folder's mtime before the strip, given back by a restore


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


class Archiver:
    def __init__(self, archive_dir: Path, root: Path | None, *, hashes: bool = False,
                 clock: Callable[[], str] = _now_iso) -> None:
        self.archive_dir = Path(archive_dir).absolute()
        self.root = Path(root).resolve() if root is not None else None
        self.hashes = hashes
        self._clock = clock

    def archived_name(self, original: Path, mtime_ns: int) -> Path:
        """`<archive>/<path relative to root>` with the mtime_ns before the suffix."""
        rel = None
        if self.root is not None:
            with contextlib.suppress(ValueError):
                rel = original.relative_to(self.root)
        if rel is None:  # outside the root: mirror the absolute path
            rel = original.relative_to(original.anchor)
        return self.archive_dir / rel.parent / f"{original.stem}.{mtime_ns}{original.suffix}"

    def keep(self, path: Path, facts: Facts, *, strip: FolderStrip | None = None) -> None:
        """Archive the file at `path` (about to be replaced or removed); append it to the manifest.

        `strip`: the file is one of a folder strip's; its entry says which, so `restore` of the
        folder finds every file of that strip.
        """
        original = Path(path).resolve()
        try:
            self._check(original, facts, "before it was archived")
            archived = self._place(original, facts)
            sha = atomic.sha256_path(archived) if self.hashes else None
            entry: dict[str, Any] = {"original": str(original), "archived": str(archived),
                                     "size": facts.size, "mtime_ns": facts.mtime_ns}
            if sha is not None:
                entry["sha256"] = sha
            if strip is not None:
                entry.update(folder=str(original.parent), strip=strip.id, strip_files=strip.files,
                             folder_mtime_ns=strip.folder_mtime_ns)
            entry["archived_at"] = self._clock()
            self._append(entry)
        except OSError as e:
            raise WriteFailed(f"cannot archive the original into {self.archive_dir}: "
                              f"{atomic.describe_oserror(e)}") from None

    @staticmethod
    def _check(path: Path, facts: Facts, when: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise SourceChanged(f"changed while stripping (removed {when})") from None
        if (st.st_ino, st.st_size, st.st_mtime_ns) != (facts.ino, facts.size, facts.mtime_ns):
            raise SourceChanged(f"changed while stripping (rewritten {when}); nothing was replaced")

    def _place(self, original: Path, facts: Facts) -> Path:
        target = self.archived_name(original, facts.mtime_ns)
        target.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            candidate = target if n == 0 else target.with_name(f"{target.stem}-{n}{target.suffix}")
            try:
                st = os.lstat(candidate)
            except FileNotFoundError:
                return self._link_or_copy(original, candidate, facts)
            # already archived: the same inode came back (a restore) and is being stripped again
            if (st.st_ino, st.st_size, st.st_mtime_ns) == (facts.ino, facts.size, facts.mtime_ns):
                return candidate
        raise WriteFailed(f"too many archived versions of {original} in {target.parent}")

    def _link_or_copy(self, original: Path, archived: Path, facts: Facts) -> Path:
        try:
            os.link(original, archived, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
            _copy_durably(original, archived, facts)
        else:
            try:  # the link is by name: make sure it caught the inode we read, unchanged
                self._check(archived, facts, "while it was archived")
            except SourceChanged:
                atomic.remove_quietly(archived)
                raise
            atomic.fsync_path(archived)
        atomic.fsync_dir(archived.parent)
        return archived

    def _append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self.archive_dir / MANIFEST,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # several workers may archive at once
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy_durably(src: Path, dest: Path, facts: Facts | None, *, overwrite: bool = True) -> None:
    """Copy to a temp next to `dest`, fsync, keep owner/mode/mtime, rename into place.

    `overwrite=False`: the temp takes the name only while no file has it (FileExistsError).
    """
    with atomic.temp_writer(dest) as (tmp, writer):
        with open(src, "rb") as f:
            shutil.copyfileobj(f, writer, 1 << 20)
        atomic.finish_write(writer)
        st = os.lstat(src)
        if facts is not None:
            Archiver._check(src, facts, "while it was copied to the archive")
            uid, gid, mode, mtime_ns = facts.uid, facts.gid, facts.mode, facts.mtime_ns
        else:
            uid, gid, mode, mtime_ns = st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns
        atomic.copy_ownership(tmp, uid, gid, mode)
        os.utime(tmp, ns=(st.st_atime_ns, mtime_ns), follow_symlinks=False)
        if overwrite:
            os.replace(tmp, dest)
        else:
            _take_free_name(tmp, dest)


def _take_free_name(tmp: Path, dest: Path) -> None:
    """Rename `tmp` to `dest` unless a file has that name: a restore never overwrites one."""
    try:
        os.link(tmp, dest, follow_symlinks=False)  # atomic, and fails with EEXIST
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
        if os.path.lexists(dest):  # no hard links here: check, then rename
            raise FileExistsError(errno.EEXIST, "File exists", str(dest)) from None
        os.rename(tmp, dest)
        return
    os.unlink(tmp)


def read_manifest(archive_dir: Path) -> list[dict[str, Any]]:
    """Every complete entry, oldest first; a torn last line (killed mid-append) is ignored."""
    entries = []
    try:
        text = (Path(archive_dir) / MANIFEST).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and "original" in entry and "archived" in entry:
                entries.append(entry)
    return entries


def restore(path: Path, archive_dir: Path) -> int:
    """Put the newest archived original of `path` back in place; 0 on success, 1 otherwise.

    For a folder: every file of its newest complete folder strip, each atomically, none over a
    name that is taken (then nothing is restored).
    """
    target = Path(path).resolve()
    archive_dir = Path(archive_dir).absolute()
    if not archive_dir.is_dir():
        return _fail(f"{archive_dir}: no such archive directory")
    if target.is_dir():
        return _restore_folder(target, archive_dir)
    matches = [e for e in read_manifest(archive_dir) if e["original"] == str(target)]
    if not matches:
        return _fail(f"{target}: no archived original in {archive_dir / MANIFEST}")
    entry = matches[-1]
    archived = Path(entry["archived"])
    try:
        st = os.lstat(archived)
    except FileNotFoundError:
        return _fail(f"{target}: the archived original {archived} is missing")
    if st.st_size != entry.get("size", st.st_size):
        return _fail(f"{target}: the archived original {archived} has {st.st_size} bytes, the "
                     f"manifest says {entry['size']}; not restored")
    if "sha256" in entry and atomic.sha256_path(archived) != entry["sha256"]:
        return _fail(f"{target}: the archived original {archived} fails its sha256 check; "
                     "not restored")
    if not target.parent.is_dir():
        return _fail(f"{target}: the folder {target.parent} does not exist")
    try:
        # a copy, not a link: a resumed trainer rewrites last.pt in place and would otherwise
        # overwrite the archived original through the shared inode
        _copy_durably(archived, target, None)
        atomic.fsync_dir(target.parent)
    except (CheckpointError, OSError) as e:
        why = e.message if isinstance(e, CheckpointError) else atomic.describe_oserror(e)
        return _fail(f"{target}: not restored: {why}")
    print(f"{target}: restored from {archived}", flush=True)
    return 0


def _restore_folder(folder: Path, archive_dir: Path) -> int:
    from ckpt_watchd.engine import folder as folders  # engine -> records is the usual direction

    entries = [e for e in read_manifest(archive_dir) if e.get("folder") == str(folder)]
    strips: dict[str, dict[str, dict[str, Any]]] = {}  # strip -> original -> its newest entry
    for e in entries:
        files = strips.pop(str(e.get("strip")), {})  # re-inserted: the latest strip comes last
        files[e["original"]] = e
        strips[str(e.get("strip"))] = files
    complete = [s for s in strips.values()
                if all(len(s) == e.get("strip_files", len(s)) for e in s.values())]
    if not complete:
        return _fail(f"{folder}: no archived folder strip in {archive_dir / MANIFEST}")
    files = complete[-1]
    folders.replay(folder)  # a strip a kill interrupted: rolled back or finished first
    if os.path.lexists(folder / folders.JOURNAL):
        return _fail(f"{folder}: not restored: a strip of it is under way, or was interrupted "
                     f"and could not be finished ({folders.JOURNAL})")
    taken = sorted(Path(o).name for o in files if os.path.lexists(o))
    if taken:
        return _fail(f"{folder}: not restored: {', '.join(taken)} already there (the folder is "
                     "not as the strip left it)")
    for original, e in sorted(files.items()):
        archived = Path(e["archived"])
        try:
            st = os.lstat(archived)
        except FileNotFoundError:
            return _fail(f"{original}: the archived original {archived} is missing; nothing "
                         "restored")
        if st.st_size != e.get("size", st.st_size) or (
                "sha256" in e and atomic.sha256_path(archived) != e["sha256"]):
            return _fail(f"{original}: the archived original {archived} fails its check; "
                         "nothing restored")
    done = []
    try:
        for original, e in sorted(files.items()):
            _copy_durably(Path(e["archived"]), Path(original), None, overwrite=False)
            done.append(original)
        atomic.fsync_dir(folder)
    except (CheckpointError, OSError) as e:
        why = e.message if isinstance(e, CheckpointError) else atomic.describe_oserror(e)
        return _fail(f"{folder}: restored {len(done)} of {len(files)} files, then: {why}")
    mtime_ns = next(iter(files.values())).get("folder_mtime_ns")
    if isinstance(mtime_ns, int):
        with contextlib.suppress(OSError):  # the trainer's rotation orders its folders by mtime
            os.utime(folder, ns=(os.lstat(folder).st_atime_ns, mtime_ns), follow_symlinks=False)
    print(f"{folder}: restored {len(files)} files from {archive_dir}", flush=True)
    return 0


def _fail(message: str) -> int:
    print(f"ckpt-watchd: {message}", file=sys.stderr)
    return 1
