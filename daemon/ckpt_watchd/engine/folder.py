"""The folder strip: a checkpoint folder thinned by removing files, atomically under kill -9.

A folder is either as the trainer left it or fully stripped. Never half. It owns the journal
(`.ckpt-watchd-strip.json` in the folder) and its replay; which files go is the profile's
`plan`. Nothing here unpickles, opens a kept file or writes one: kept files stay byte-identical,
and every name it creates starts with `.ckpt-watchd-` (the watcher and discovery ignore those).
No torch, and no symlink is followed (every operation is relative to the folder's own fd).

The protocol, per folder, under an flock of the folder (each step durable before the next):
1. `replay` any earlier journal; plan; check every file to remove still has the planned facts.
2. Write the journal, state "begun": each file's name, its aside name, (inode, size, mtime_ns),
   and the folder's times (an O_TMPFILE written, fsynced and linked in, then the folder fsynced;
   until then the folder, mtime included, is untouched).
3. With `--archive-dir`, archive each file (hard link or durable copy, manifest entry).
4. Rename each file but the last to its aside name `.ckpt-watchd-aside.<strip>.<name>`, each
   only while it still has its facts; fsync the folder; check the last file's facts.
   A change anywhere up to here: roll back, `SourceChanged`.
5. Rewrite the journal, state "committed" (temp, fsync, rename, fsync): a replay now finishes.
6. Unlink the aside files, then the last file (left in place until now so that discovery,
   which keys on it for accelerate, still shows the folder to a replay); fsync the folder.
   If the last file was written again before any unlink, the journal goes back to "begun"
   and the strip rolls back instead: the trainer is saving into this folder.
7. Remove the journal; give the folder back its mtime (transformers' `rotate_checkpoints`
   orders checkpoint folders by mtime: a stripped old one must not look like the newest).
A replay of "begun" renames each aside file back where its name is free; of "committed" it
unlinks what the journal lists, each only while it is the file recorded there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ckpt_watchd.engine.atomic import TEMP_PREFIX, TEMP_SUFFIX, describe_oserror
from ckpt_watchd.engine.profiles import common, registry
from ckpt_watchd.errors import (
    CheckpointError,
    NotARegularFile,
    SourceChanged,
    UnrecognisedLayout,
    Unsupported,
    WriteFailed,
)
from ckpt_watchd.outcome import INCOMPLETE, SKIPPED, STRIPPED, WOULD_STRIP, Outcome
from ckpt_watchd.records.archive import Archiver, FolderStrip

JOURNAL = f"{TEMP_PREFIX}strip.json"
ASIDE_PREFIX = f"{TEMP_PREFIX}aside."
_JOURNAL_TEMP = f"{TEMP_PREFIX}strip."  # + token + TEMP_SUFFIX: start-up cleanup removes it
BEGUN, COMMITTED = "begun", "committed"
_VERSION = 1
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Tests only: called with a label before each step that changes the disk (the crash tests stop
# the process there). None in the daemon.
STEP_HOOK: Callable[[str], None] | None = None


def _step(label: str) -> None:
    if STEP_HOOK is not None:
        STEP_HOOK(label)


Fact = tuple[int, int, int]  # inode, size, mtime_ns


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    aside: str | None  # None: the last file, unlinked in place after the commit
    fact: Fact


class _Folder:
    """An open checkpoint folder: every name is resolved against its fd, never a path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, _DIR_FLAGS)
        except OSError as e:
            raise NotARegularFile(f"not a checkpoint folder ({describe_oserror(e)}); "
                                  "a symlink is never followed") from None

    def close(self) -> None:
        os.close(self.fd)

    def lock(self) -> bool:
        """An exclusive lock on the folder for this strip or replay; False if another holds it."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            # a filesystem without flock on folders: the daemon runs one job per folder anyway
        return True

    def fact(self, name: str) -> Fact | None:
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return (-1, -1, -1)  # something, but never a file we recorded
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def sync(self) -> None:
        _step("fsync folder")
        os.fsync(self.fd)

    # ---------------------------------------------------------------------- the journal

    def write_journal(self, data: dict[str, Any]) -> None:
        """Write the journal durably: its bytes fsynced before its name appears, then the folder.

        The first one is an unnamed O_TMPFILE linked in: until the journal exists, nothing in
        the folder changes, not even its mtime (which the journal is there to give back).
        """
        body = json.dumps(data, sort_keys=True).encode()
        if not self.exists(JOURNAL) and self._link_unnamed(body, data["state"]):
            self.sync()
            return
        tmp = f"{_JOURNAL_TEMP}{secrets.token_hex(4)}{TEMP_SUFFIX}"
        _step("journal temp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.fd)
        try:
            try:
                _write_all(fd, body)
            finally:
                os.close(fd)
            _step(f"journal {data['state']}")
            os.replace(tmp, JOURNAL, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(tmp)
            raise
        self.sync()

    def _link_unnamed(self, body: bytes, state: str) -> bool:
        """O_TMPFILE, write, fsync, link as the journal; False where the filesystem cannot."""
        tmpfile = getattr(os, "O_TMPFILE", 0)
        if not tmpfile:
            return False
        _step("journal temp")
        try:
            fd = os.open(".", tmpfile | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        except OSError:
            return False  # NFS, older kernels: a named temp file then
        try:
            _write_all(fd, body)
            _step(f"journal {state}")
            os.link(f"/proc/self/fd/{fd}", JOURNAL, dst_dir_fd=self.fd)
        except FileNotFoundError:
            return False  # no /proc
        finally:
            os.close(fd)
        return True

    def read_journal(self) -> dict[str, Any] | None:
        """The journal, checked; None when there is none. Unsupported when it makes no sense."""
        try:
            fd = os.open(JOURNAL, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise Unsupported(f"a strip journal {JOURNAL} that cannot be read "
                              f"({describe_oserror(e)})") from None
        try:
            raw = os.read(fd, 1 << 20) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        finally:
            os.close(fd)
        try:
            data = json.loads(raw)
            _entries(data)
            if not isinstance(data, dict):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            raise Unsupported(f"a strip journal {JOURNAL} that does not parse "
                              "(remove it by hand once the folder is checked)") from None
        times = data.get("folder_times")
        if data.get("state") not in (BEGUN, COMMITTED) or not (
                times is None or (isinstance(times, list) and len(times) == 2
                                  and all(type(t) is int for t in times))):
            raise Unsupported(f"a strip journal {JOURNAL} in no known state")
        return data

    def remove_journal(self, times: list[int] | None) -> None:
        """The strip is over: the journal goes and the folder gets its mtime back, then fsync."""
        _step("journal remove")
        self.unlink(JOURNAL)
        if times is not None:  # (a kill right here is the one that costs the folder its mtime)
            _step("folder mtime")
            with contextlib.suppress(OSError):  # a folder we may not utime keeps today's mtime
                os.utime(self.fd, ns=(times[0], times[1]))
        self.sync()

    def remove_journal_temps(self) -> None:
        """Journal temps of a strip killed before its journal existed (nothing else was done)."""
        with os.scandir(self.fd) as it:
            names = [e.name for e in it if e.name.startswith(_JOURNAL_TEMP)
                     and e.name.endswith(TEMP_SUFFIX)]
        for name in names:
            _step("journal temp remove")
            self.unlink(name)


def _write_all(fd: int, body: bytes) -> None:
    view = memoryview(body)
    while view:
        view = view[os.write(fd, view):]
    _step("journal fsync")
    os.fsync(fd)


def _plain(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\0" not in name)


def _entries(data: dict[str, Any]) -> list[_Entry]:
    """The journal's files, refusing any name that is not a plain name in this folder."""
    out = []
    for f in data["files"]:
        aside = f["aside"]
        if not _plain(f["name"]) or not (aside is None or (_plain(aside)
                                                           and aside.startswith(ASIDE_PREFIX))):
            raise ValueError("a journal entry that names something outside the folder")
        fact = (int(f["ino"]), int(f["size"]), int(f["mtime_ns"]))
        out.append(_Entry(f["name"], aside, fact))
    return out


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[_Folder]:
    d = _Folder(path)
    try:
        yield d
    finally:
        d.close()


# ------------------------------------------------------------------------------ replay


def replay(path: Path) -> str | None:
    """Finish or roll back a strip of this folder that a kill interrupted.

    Returns None when there was nothing to do (no journal, or another process holds the
    folder), else one line on what was done. Never raises: start-up calls it for every folder.
    """
    try:
        with _opened(Path(path)) as d:
            if not d.lock():
                return None
            return _replay(d)
    except CheckpointError as e:
        return f"left as it is: {e.message}"
    except OSError as e:
        return f"left as it is: {describe_oserror(e)}"


def _replay(d: _Folder) -> str | None:
    d.remove_journal_temps()
    data = d.read_journal()
    if data is None:
        return None
    if data["state"] == COMMITTED:
        finished, left = _finish(d, data)
        if finished:
            return "finished the interrupted strip" + (f"; {left}" if left else "")
    else:
        left = _roll_back(d, data)
    return "rolled back the interrupted strip" + (f"; {left}" if left else "")


def _roll_back(d: _Folder, data: dict[str, Any]) -> str | None:
    """Put every aside file back under its name; the journal stays if one cannot go back."""
    stuck = []
    for e in _entries(data):
        if e.aside is None or not d.exists(e.aside):
            continue
        if d.exists(e.name):  # written again meanwhile: ours stays aside, nothing is overwritten
            stuck.append(f"{e.name} is there again, the original is kept as {e.aside}")
            continue
        # whatever is under the aside name came from this name (only a strip moves files there)
        _step(f"move back {e.name}")
        d.rename(e.aside, e.name)
    d.sync()
    if stuck:
        return "; ".join(stuck)
    d.remove_journal(data.get("folder_times"))
    return None


def _finish(d: _Folder, data: dict[str, Any]) -> tuple[bool, str | None]:
    """Unlink what the committed journal lists, each only while it is the file recorded.

    (False, why) when it rolled back instead: the last file, still in place, was written
    again before anything was unlinked (the trainer is saving into this folder).
    """
    left = []
    entries = _entries(data)
    again = [e.name for e in entries if e.aside is None and d.exists(e.name)
             and d.fact(e.name) != e.fact]
    if again and all(d.fact(e.aside) == e.fact for e in entries if e.aside is not None):
        data = {**data, "state": BEGUN}
        d.write_journal(data)
        stuck = _roll_back(d, data)
        return False, f"{', '.join(again)} was written again" + (f"; {stuck}" if stuck else "")
    for e in entries:
        if e.aside is None:
            continue
        now = d.fact(e.aside)
        if now is None:
            continue
        if now == e.fact:
            _step(f"unlink {e.aside}")
            d.unlink(e.aside)
        elif not d.exists(e.name):  # not what the plan removes: it goes back, never away
            _step(f"move back {e.name}")
            d.rename(e.aside, e.name)
        else:
            left.append(f"{e.aside} is not the file recorded, kept")
    for e in entries:
        if e.aside is None and d.fact(e.name) == e.fact:
            _step(f"unlink {e.name}")
            d.unlink(e.name)
        elif e.aside is None and d.exists(e.name):
            left.append(f"{e.name} was written again, kept")
    d.sync()
    if any("is not the file recorded" in why for why in left):
        return True, "; ".join(left)
    d.remove_journal(data.get("folder_times"))
    return True, "; ".join(left) or None


# ------------------------------------------------------------------------------ strip


@dataclass(frozen=True, slots=True)
class _Facts:
    """What the archiver needs of a file (records.archive.Facts)."""

    ino: int
    size: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int


def strip_folder(path: Path, *, profile: str, dry_run: bool = False,
                 archive_dir: Path | None = None, root: Path | None = None) -> Outcome:
    """Strip one checkpoint folder as its trainer's weights-only save would have written it.

    Returns stripped, skipped (nothing to remove), would_strip (dry run) or incomplete (a kill
    mid-save's leftover, or a layout not supported; left untouched); raises a CheckpointError
    for a failure, with the folder as the trainer left it.
    """
    started = time.monotonic()
    folder = Path(path)
    with _opened(folder) as d:
        if not dry_run:
            if not d.lock():
                raise SourceChanged("another strip of this folder is under way; left as it is")
            left = _replay(d)
            if d.exists(JOURNAL):  # a rollback that found a name taken: a person decides
                raise WriteFailed(f"an interrupted strip of this folder is unfinished ({left}); "
                                  "left as it is")
        prof = _profile(folder, profile)
        plan: common.FolderPlan = prof.plan(folder)
        before = sum(plan.facts[n][1] for n in (*plan.remove, *plan.keep, *plan.unknown)
                     if n in plan.facts)
        base: dict[str, Any] = {"path": str(folder), "profile": prof.NAME, "bytes_before": before}
        unknown = (f"kept, of unknown purpose: {', '.join(plan.unknown)}" if plan.unknown
                   else None)
        if plan.unsupported is not None or plan.incomplete is not None:
            why = (f"not supported: {plan.unsupported}" if plan.unsupported is not None
                   else f"incomplete: {plan.incomplete}")
            return Outcome(status=INCOMPLETE, reason=f"{why}; left untouched",
                           duration_s=time.monotonic() - started, **base)
        if not plan.remove:
            return Outcome(status=SKIPPED, reason="already stripped", bytes_after=before,
                           duration_s=time.monotonic() - started, **base)
        after = before - sum(plan.facts[n][1] for n in plan.remove)
        if dry_run:
            return Outcome(status=WOULD_STRIP, bytes_after=after, reason=unknown,
                           duration_s=time.monotonic() - started, **base)
        archiver = Archiver(archive_dir, root) if archive_dir is not None else None
        try:
            _strip(d, plan, prof.NAME, archiver)
        except OSError as e:
            raise WriteFailed(f"cannot strip the folder: {describe_oserror(e)}; "
                              "left as the trainer wrote it") from None
        return Outcome(status=STRIPPED, bytes_after=after, reason=unknown,
                       duration_s=time.monotonic() - started, **base)


def inspect_folder(path: Path) -> dict[str, Any]:
    """`inspect DIR`: the folder's profile and what a strip would remove, keep and report, each
    file with its size; changes nothing. Raises UnrecognisedLayout for a folder of no trainer."""
    folder = Path(path)
    prof = _profile(folder, "")
    plan: common.FolderPlan = prof.plan(folder)

    def sized(names: tuple[str, ...]) -> list[dict[str, Any]]:
        return [{"name": n, "bytes": plan.facts[n][1] if n in plan.facts else None}
                for n in names]

    files = {"remove": sized(plan.remove), "keep": sized(plan.keep),
             "unknown": sized(plan.unknown)}
    size = sum(f["bytes"] or 0 for group in files.values() for f in group)
    return {"path": str(folder), "profile": prof.NAME, "bytes": size,
            "bytes_after_strip": size - sum(f["bytes"] or 0 for f in files["remove"]),
            "incomplete": plan.incomplete, "unsupported": plan.unsupported, **files}


def _profile(folder: Path, name: str) -> Any:
    """The named folder profile, or the first whose discovery claims this folder."""
    p = registry.BY_NAME.get(name)
    if p is not None and p.KIND == common.FOLDER:
        return p
    if name:
        raise UnrecognisedLayout(f"{name!r} is not a folder profile")
    entries = {}
    with os.scandir(folder) as it:
        for e in it:
            if not e.name.startswith(TEMP_PREFIX) and (e.is_dir(follow_symlinks=False)
                                                       or e.is_file(follow_symlinks=False)):
                entries[e.name] = e.is_dir(follow_symlinks=False)
    look = common.Look(PurePosixPath(folder.name), entries)
    for p in registry.FOLDER_PROFILES:
        found = p.discover(look)
        if found is not None and (found.units or found.incomplete):
            return p
    raise UnrecognisedLayout("is a directory, but not a checkpoint folder of a trainer we know")


def _strip(d: _Folder, plan: common.FolderPlan, profile: str, archiver: Archiver | None) -> None:
    sid = secrets.token_hex(6)
    names = plan.remove
    # (an aside name never ends like a temp file: start-up cleanup would delete it)
    entries = [_Entry(n, None if i == len(names) - 1 else
                      f"{ASIDE_PREFIX}{sid}.{n}" + (".aside" if n.endswith(TEMP_SUFFIX) else ""),
                      plan.facts[n]) for i, n in enumerate(names)]
    for e in entries:  # before the journal: a folder changed since the plan is not touched
        if d.fact(e.name) != e.fact:
            raise SourceChanged(f"changed while stripping ({e.name} was written again); "
                                "nothing was removed")
    st = os.fstat(d.fd)
    journal: dict[str, Any] = {
        "version": _VERSION, "state": BEGUN, "strip": sid, "profile": profile,
        "folder_times": [st.st_atime_ns, st.st_mtime_ns],
        "files": [{"name": e.name, "aside": e.aside, "ino": e.fact[0], "size": e.fact[1],
                   "mtime_ns": e.fact[2]} for e in entries]}
    try:
        d.write_journal(journal)
        if archiver is not None:
            strip = FolderStrip(sid, len(entries), st.st_mtime_ns)
            for e in entries:
                full = os.stat(e.name, dir_fd=d.fd, follow_symlinks=False)
                _step(f"archive {e.name}")
                archiver.keep(d.path / e.name, _Facts(*e.fact, full.st_mode, full.st_uid,
                                                      full.st_gid), strip=strip)
        for e in entries:
            if e.aside is None:
                continue
            if d.fact(e.name) != e.fact:
                raise _changed(e.name)
            _step(f"move aside {e.name}")
            d.rename(e.name, e.aside)
            if d.fact(e.aside) != e.fact:  # the name was swapped between the check and the move
                raise _changed(e.name)
        d.sync()
        last = entries[-1]  # stays in place until the commit: checked as late as can be
        if d.fact(last.name) != last.fact:
            raise _changed(last.name)
        journal["state"] = COMMITTED
        d.write_journal(journal)
    except BaseException:
        _undo(d)
        raise
    try:
        finished, left = _finish(d, journal)
    except OSError as e:
        raise WriteFailed(f"the strip was committed, then: {describe_oserror(e)}; the next replay "
                          "of the folder finishes it") from None
    if not finished:
        raise SourceChanged(f"changed while stripping ({left}); rolled back, nothing was removed")
    if left:  # a file written again after the unlinks began is the trainer's: it stays
        raise SourceChanged(f"changed while stripping: {left}")


def _changed(name: str) -> SourceChanged:
    return SourceChanged(f"changed while stripping ({name} was written again); rolled back, "
                         "nothing was removed")


def _undo(d: _Folder) -> None:
    """After a failure in this process: roll back, unless the commit reached the disk."""
    with contextlib.suppress(CheckpointError, OSError):
        data = d.read_journal()
        if data is None:
            return
        if data["state"] == COMMITTED:
            _finish(d, data)
        else:
            _roll_back(d, data)
