"""The file to strip, up to its scanned pickle: everything a load does before torch is needed.

It owns opening a checkpoint without following a symlink or blocking on a FIFO, its identity facts
(inode, size, mtime: how a rewrite is noticed), the container check (zip only: the legacy and tar
formats are refused before any of torch's code for them could run), the strict zip parse, reading
data.pkl (within the bytes the file really holds on disk) and the static scan of that pickle. A
hostile file is refused here in a fraction of a second, without importing torch. No torch.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from ckpt_watchd.engine import opscan, zipread
from ckpt_watchd.errors import (
    EmptyFile,
    LimitExceeded,
    NotACheckpoint,
    NotARegularFile,
    UnreadableFile,
    Unsupported,
)

# data.pkl is the structure, not the weights: a few MB for the largest models (YOLOv5m: 0.3 MB)
MAX_PICKLE = 64 << 20
_ZIP_MAGIC = b"PK\x03\x04"

# `need(extra)`: raise the job's memory cap to what the next step needs beyond what it uses now
Need = Callable[[int], None]


def _no_cap(_extra: int) -> None:
    return None


@dataclass(frozen=True, slots=True)
class FileFacts:
    """Identity of a file at one moment: if any of these change, it is not the file we read."""

    ino: int
    size: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    dev: int
    blocks: int = 0  # 512-byte blocks really allocated (a sparse file has few)

    @classmethod
    def of(cls, st: os.stat_result) -> FileFacts:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid,
                   st.st_dev, getattr(st, "st_blocks", 0))

    @property
    def real_bytes(self) -> int:
        """The bytes the file holds on disk: st_size, unless it is sparse."""
        if self.blocks <= 0:  # a filesystem that does not report blocks
            return self.size
        return min(self.size, self.blocks * 512)

    def same_content_as(self, other: FileFacts) -> bool:
        return (self.dev, self.ino, self.size, self.mtime_ns) == (
            other.dev, other.ino, other.size, other.mtime_ns)


def kind_of(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink (never followed)"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def open_regular(path: os.PathLike[str] | str) -> tuple[int, FileFacts]:
    """Open a regular file for reading without following a symlink or blocking on a FIFO.

    lstat first, so that a device or a FIFO is never opened at all; O_NOFOLLOW|O_NONBLOCK and an
    fstat after the open, for a file swapped in between.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotARegularFile("no such file") from None
    except OSError as e:
        raise UnreadableFile(e.strerror or str(e)) from None
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(f"is {kind_of(st.st_mode)}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        raise UnreadableFile("permission denied (no read permission)") from None
    except FileNotFoundError:
        raise NotARegularFile("no such file (it disappeared)") from None
    except OSError as e:
        raise UnreadableFile(e.strerror or str(e)) from None
    fst = os.fstat(fd)
    if not stat.S_ISREG(fst.st_mode):  # swapped between lstat and open
        os.close(fd)
        raise NotARegularFile(f"is {kind_of(fst.st_mode)}")
    return fd, FileFacts.of(fst)


@dataclass(frozen=True, slots=True)
class Opened:
    """An open checkpoint whose container is checked and whose pickle is read and scanned."""

    fd: int
    facts: FileFacts
    archive: zipread.Archive
    pickle: bytes
    scan: opscan.Scan

    def close(self) -> None:
        os.close(self.fd)


def classify(fd: int, size: int) -> None:
    """Refuse what is not a zip checkpoint, before any reader for it could run."""
    if size == 0:
        raise EmptyFile("empty file (0 bytes)")
    head = os.pread(fd, 512, 0)
    # a tar header's name field comes first: its first byte can be 0x80, like a pickle's
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise Unsupported("the pre-1.0 torch tar format, which only torch's legacy loader reads")
    if head.startswith(_ZIP_MAGIC):
        return
    if head[:1] == b"\x80":
        raise Unsupported("the legacy (pre-1.6) torch format: only torch's legacy loader reads it, "
                          "and that loader is not safe on untrusted files; re-save the file "
                          "with a current torch to strip it")
    raise NotACheckpoint("not a PyTorch checkpoint (unknown format)")


def open_checkpoint(path: os.PathLike[str] | str, *, need: Need = _no_cap,
                    structure_only: bool = False) -> Opened:
    """Open, classify, parse the zip, read data.pkl and scan it; the caller closes `fd`.

    `structure_only`: the caller reads no weight (an estimate), so the kernel is told not to
    read ahead: the headers of the records are spread over the whole file, and readahead
    around each would bring nearly all of it into the page cache.
    """
    fd, facts = open_regular(path)
    try:
        if structure_only:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        classify(fd, facts.size)
        archive = zipread.read_archive(fd, facts.size)
        names = {r.name for r in archive.records}
        if archive.prefix + "constants.pkl" in names:
            raise NotACheckpoint("a TorchScript archive (torch.jit), not a training checkpoint")
        rec = archive.get("data.pkl")
        if rec is None:
            raise NotACheckpoint("a zip file, but not a torch checkpoint (no data.pkl)")
        if rec.size > MAX_PICKLE or rec.size > facts.real_bytes:
            raise LimitExceeded(f"data.pkl claims {rec.size} bytes, more than the file holds on "
                                "disk or a checkpoint's structure needs")
        order = archive.get("byteorder")
        if order is not None and zipread.read_record(fd, order) not in (b"little", b""):
            raise Unsupported("a big-endian checkpoint")
        need(16 * rec.size)  # the pickle, and the scan's abstract values
        data = zipread.read_record(fd, rec)
        scanned = opscan.scan(data)
        return Opened(fd, facts, archive, data, scanned)
    except BaseException:
        os.close(fd)
        raise
