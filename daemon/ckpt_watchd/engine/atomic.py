"""Atomic file replacement: same-directory temp file, fsync, os.replace, directory fsync, cleanup.

It owns the temp-file naming (so the watcher and the start-up cleanup can recognise our own files),
the errno -> message mapping for write failures, and ownership/mode preservation. No torch here, and
nothing in this module ever writes to the destination path except through `os.replace`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ckpt_watchd.errors import WriteFailed

TEMP_PREFIX = ".ckpt-watchd-"
TEMP_SUFFIX = ".tmp"

_ERRNO_TEXT = {
    errno.ENOSPC: "disk full (no space left on device)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem or limit",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied (cannot write to the directory)",
    errno.EPERM: "operation not permitted",
    errno.EIO: "I/O error",
}


def is_temp_name(name: str) -> bool:
    """True for the names `temp_path` makes: the watcher ignores them, start-up removes stale ones."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def temp_path(dest: Path) -> Path:
    return dest.with_name(f"{TEMP_PREFIX}{dest.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def describe_oserror(e: OSError) -> str:
    text = _ERRNO_TEXT.get(e.errno or 0)
    return text if text else (e.strerror or str(e))


class RecordingWriter:
    """A binary file over an fd that remembers the first OSError (torch re-raises it as text)."""

    def __init__(self, fd: int) -> None:
        self._f: BinaryIO = os.fdopen(fd, "wb", buffering=1 << 20)
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()


@contextlib.contextmanager
def temp_writer(dest: Path) -> Iterator[tuple[Path, RecordingWriter]]:
    """Create the temp file next to `dest`; on any exception it is removed before re-raising."""
    tmp = temp_path(dest)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise WriteFailed(f"cannot create a temp file in {dest.parent}: {describe_oserror(e)}") from None
    writer = RecordingWriter(fd)
    try:
        yield tmp, writer
    except BaseException:
        with contextlib.suppress(OSError):
            writer.close()
        remove_quietly(tmp)
        raise


def finish_write(writer: RecordingWriter) -> None:
    """Flush and fsync the temp file: after this its bytes survive a power cut."""
    try:
        writer.flush()
        os.fsync(writer.fileno())
        writer.close()
    except OSError as e:
        raise WriteFailed(f"write failed: {describe_oserror(e)}") from None


class BackgroundFsync:
    """`finish_write` with the fsync running in a thread, so the caller can verify meanwhile.

    The data is flushed to the kernel first; the fsync (mostly waiting on the device) then
    overlaps with CPU work. `wait()` must return before the temp file is renamed or closed: it
    raises what `finish_write` would.
    """

    def __init__(self, writer: RecordingWriter) -> None:
        self._writer = writer
        self._error: OSError | None = None
        try:
            writer.flush()
        except OSError as e:
            raise WriteFailed(f"write failed: {describe_oserror(e)}") from None
        self._thread = threading.Thread(target=self._run, name="ckpt-watchd-fsync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            os.fsync(self._writer.fileno())
        except OSError as e:
            self._error = e

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise WriteFailed(f"write failed: {describe_oserror(self._error)}") from None
        try:
            self._writer.close()
        except OSError as e:
            raise WriteFailed(f"write failed: {describe_oserror(e)}") from None


def forget_cached_pages(fd: int, size: int, keep: list[tuple[int, int]]) -> threading.Thread:
    """Drop a file's cached pages outside `keep` (offset, length) in a thread, which closes fd.

    For a source about to be replaced by its stripped copy: the kernel has to drop those pages
    when the old file goes, and doing most of it now overlaps with the verify on another core
    (and gives the memory back to the training job sooner). The kept ranges (weights the verify
    still compares) stay cached. Join the thread before returning.
    """

    def run() -> None:
        try:
            start = 0
            for offset, length in [*sorted(keep), (size, 0)]:
                if offset > start:
                    os.posix_fadvise(fd, start, offset - start, os.POSIX_FADV_DONTNEED)
                start = max(start, offset + length)
        except (OSError, AttributeError):
            pass  # only an optimisation
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name="ckpt-watchd-fadvise", daemon=True)
    thread.start()
    return thread


def copy_ownership(tmp: Path, uid: int, gid: int, mode: int) -> None:
    """Give the temp file the original's owner, group and permission bits."""
    try:
        st = os.lstat(tmp)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(tmp, uid, gid, follow_symlinks=False)
        os.chmod(tmp, mode & 0o7777)
    except OSError as e:
        raise WriteFailed(f"cannot keep the original owner/mode: {describe_oserror(e)}") from None


def replace(tmp: Path, dest: Path) -> None:
    """os.replace then fsync the directory, so the rename itself is durable."""
    try:
        os.replace(tmp, dest)
    except OSError as e:
        remove_quietly(tmp)
        raise WriteFailed(f"cannot replace {dest.name}: {describe_oserror(e)}") from None
    fsync_dir(dest.parent)


def relink(target: Path, names: list[Path], ino: int, dev: int) -> list[Path]:
    """Point each of `names` that still is inode (dev, ino) at `target` instead; what moved.

    For the other hard links of a file just replaced by its stripped copy (timm links
    last/checkpoint-N/model_best to one inode): each name is swapped atomically (a link to a
    temp name, then os.replace), so no name ever points at nothing or at a fat copy we made.
    A name that is another file by now (the trainer wrote it again) is left alone.
    """
    moved = []
    for name in names:
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        if (st.st_ino, st.st_dev) != (ino, dev):
            continue
        tmp = temp_path(name)
        try:
            os.link(target, tmp, follow_symlinks=False)
            os.replace(tmp, name)
        except OSError as e:
            remove_quietly(tmp)
            raise WriteFailed(f"cannot point the hard link {name.name} at the stripped file: "
                              f"{describe_oserror(e)}") from None
        fsync_dir(name.parent)
        moved.append(name)
    return moved


def fsync_dir(directory: Path) -> None:
    fsync_path(directory, directory=True)


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """fsync a file or folder by name (never following a symlink to a file)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temp files a killed strip left behind in `directory`; returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if is_temp_name(entry.name) and entry.is_file(follow_symlinks=False):
            remove_quietly(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def sha256_fd(fd: int, chunk: int = 1 << 20) -> str:
    """Hash a file by pread, without moving the fd's offset or holding more than one chunk."""
    h = hashlib.sha256()
    offset = 0
    while True:
        block = os.pread(fd, chunk, offset)
        if not block:
            break
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def temp_bytes(dest: Path) -> int:
    """Bytes written so far into the temp files of one destination (a progress display)."""
    prefix = f"{TEMP_PREFIX}{dest.name}."
    total = 0
    try:
        with os.scandir(dest.parent) as it:
            for entry in it:
                if entry.name.startswith(prefix) and entry.name.endswith(TEMP_SUFFIX):
                    with contextlib.suppress(OSError):
                        total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total


def remove_temps_for(dest: Path) -> list[Path]:
    """Delete the temp files of one destination (after its worker was killed mid-write)."""
    prefix = f"{TEMP_PREFIX}{dest.name}."
    removed: list[Path] = []
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(prefix) and entry.name.endswith(TEMP_SUFFIX):
            remove_quietly(Path(entry.path))
            removed.append(Path(entry.path))
    return removed
