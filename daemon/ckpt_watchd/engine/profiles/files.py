"""What the folder profiles share: a checkpoint folder's listing, and whether each file in it is
complete, told from its bytes without unpickling anything.

A kill mid-save leaves an empty file, a torch zip without its central directory, a safetensors
file shorter than its header says or JSON cut short; each check names what it found, in words a
person reads in the audit. Every file is opened without following a symlink and without blocking
on a FIFO. No torch; profiles import this module and `common`, nothing else of the package.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

from ckpt_watchd.engine import zipread
from ckpt_watchd.errors import NotACheckpoint, TornWrite

ZIP, SAFETENSORS, JSON = "zip", "safetensors", "json"  # what a file is checked to be

Fact = tuple[int, int, int]  # (inode, size, mtime_ns)

OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO never blocks
OWN = ".ckpt-watchd-"  # the daemon's own names (a strip's journal): never the trainer's
JSON_LIMIT = 64 << 20  # configs, tokenizers, indexes; larger ones are only checked non-empty
_HEADER_LIMIT = 100 << 20  # the safetensors library's own limit
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def entries(folder: Path) -> dict[str, str]:
    """Name -> "file", "dir" or "other" (symlinks, FIFOs: never followed); none of our own."""
    out = {}
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith(OWN):
                continue
            kind = "other"
            if e.is_dir(follow_symlinks=False):
                kind = "dir"
            elif e.is_file(follow_symlinks=False):
                kind = "file"
            out[e.name] = kind
    return out


def check(folder: Path, name: str, kind: str | None) -> tuple[Fact | None, str | None]:
    """The file's facts, and why it looks unfinished (None: it does not, or `kind` is None:
    only its facts are wanted)."""
    try:
        fd = os.open(folder / name, OPEN)
    except OSError as e:
        return None, f"{name} cannot be read ({e.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, f"{name} is no longer a regular file"
        fact = (st.st_ino, st.st_size, st.st_mtime_ns)
        if kind is None:
            return fact, None
        if st.st_size == 0:
            return fact, f"{name} is empty (0 bytes): a save that did not finish"
        if kind == ZIP:
            return fact, zip_problem(fd, name, st.st_size)
        if kind == SAFETENSORS:
            return fact, safetensors_problem(fd, name, st.st_size)
        if st.st_size <= JSON_LIMIT:
            try:
                json.loads(pread_all(fd, st.st_size))
            except ValueError:
                return fact, f"{name} does not parse as JSON: a save that did not finish"
        return fact, None
    finally:
        os.close(fd)


def zip_problem(fd: int, name: str, size: int) -> str | None:
    try:
        zipread.read_archive(fd, size)
    except TornWrite:
        return f"{name} is not a complete torch zip (torn): a save that did not finish"
    except NotACheckpoint as e:
        return f"{name} is not a torch zip ({e.message})"
    return None


def safetensors_problem(fd: int, name: str, size: int) -> str | None:
    """A safetensors file is complete when its data ends exactly where its header says."""
    torn = f"{name} is torn: a save that did not finish"
    if size < 8:
        return torn
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > min(size - 8, _HEADER_LIMIT):
        return torn
    try:
        header = json.loads(pread_all(fd, n, 8))
    except ValueError:
        return f"{name} has a header that is not JSON"
    if not isinstance(header, dict):
        return f"{name} has a header that is not a table of tensors"
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and isinstance(shape, list)
                and all(type(v) is int for v in (*offsets, *shape))
                and 0 <= offsets[0] <= offsets[1]):
            return f"{name} has a header entry {key[:60]!r} without valid offsets"
        dtype = info.get("dtype")
        width = _DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None
        count = 1
        for dim in shape:
            count *= dim
        if width is not None and count * width != offsets[1] - offsets[0]:
            return f"{name} has a tensor {key[:60]!r} whose bytes do not match its shape"
        end = max(end, offsets[1])
    if 8 + n + end != size:
        return (f"{name} holds {size} bytes but its header says {8 + n + end}: "
                "a save that did not finish")
    return None


def pread_all(fd: int, size: int, offset: int = 0) -> bytes:
    chunks, at = [], offset
    while at < offset + size:
        chunk = os.pread(fd, min(offset + size - at, 1 << 24), at)
        if not chunk:
            break
        chunks.append(chunk)
        at += len(chunk)
    return b"".join(chunks)
