"""The strict reader of a torch checkpoint's zip container: one answer to "which bytes are record X".

Python's zipfile and torch's reader (miniz) disagree on hostile zips: the last or the first of two
records with one name, a central directory that points elsewhere than the local header says,
records outside the archive's folder that one reader sees and the other ignores. So the daemon
reads the container once, with this parser, and refuses every zip on which two readers could
disagree: duplicate or odd names, more than one top folder, compressed or encrypted records,
central entries that disagree with their local headers, overlapping records, junk between the
records, the central directory and the end record. Pure, no torch: only `os.pread` on an fd.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from ckpt_watchd.errors import NotACheckpoint, TornWrite

LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, 30 bytes
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory entry, 46 bytes
END = struct.Struct("<IHHHHIIH")  # end of central directory, 22 bytes
END64_LOCATOR = struct.Struct("<IIQI")  # 20 bytes
END64 = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
SIG_LOCAL, SIG_CENTRAL, SIG_END = 0x04034B50, 0x02014B50, 0x06054B50
SIG_END64, SIG_END64_LOCATOR = 0x06064B50, 0x07064B50
FLAG_DESCRIPTOR, FLAG_UTF8 = 0x0008, 0x0800
_ALLOWED_FLAGS = FLAG_DESCRIPTOR | FLAG_UTF8
_U32, _U16 = 0xFFFFFFFF, 0xFFFF
_MAX_TAIL = 22 + 0xFFFF  # the end record plus the longest comment


@dataclass(frozen=True, slots=True)
class Record:
    """One stored record: where its header and its bytes are, as every reader must see them."""

    name: str  # the full name, e.g. "last/data/12"
    header_offset: int  # its local header
    data_offset: int  # its first byte of data (from the local header, as torch computes it)
    size: int
    crc: int
    flags: int
    index: int  # its place in the file's physical order
    span_end: int  # where the next record (or the central directory) starts

    @property
    def key(self) -> str:
        """The storage key of a `data/<key>` record."""
        return self.name.rsplit("/data/", 1)[1]

    @property
    def prefix(self) -> str:
        return self.name.split("/", 1)[0] + "/"


@dataclass(frozen=True, slots=True)
class Archive:
    """A zip checkpoint's records, checked."""

    prefix: str  # the one top folder every record is in, e.g. "archive/"
    records: tuple[Record, ...]  # in central-directory order
    start_dir: int
    by_name: dict[str, Record]

    def get(self, rel: str) -> Record | None:
        return self.by_name.get(self.prefix + rel)

    def storages(self) -> dict[str, Record]:
        """Storage key -> its record, for every `data/<key>` record."""
        start = self.prefix + "data/"
        return {r.name[len(start):]: r for r in self.records if r.name.startswith(start)}


def _bad(why: str) -> NotACheckpoint:
    return NotACheckpoint(f"a zip file torch would not write ({why})")


def _pread(fd: int, size: int, offset: int) -> bytes:
    out = os.pread(fd, size, offset)
    if len(out) != size:
        raise TornWrite("incomplete or torn write: the zip ends inside one of its records")
    return out


def _end_record(fd: int, size: int) -> tuple[int, int, int, int]:
    """(entries, cd_size, cd_offset, where the central directory must end) from the end records."""
    tail_start = max(0, size - _MAX_TAIL)
    tail = os.pread(fd, size - tail_start, tail_start)
    at = len(tail)
    while True:
        at = tail.rfind(b"PK\x05\x06", 0, at)
        if at < 0:
            raise TornWrite("incomplete or torn write: zip has no central directory "
                            "(a trainer is writing it, or was killed mid-write)")
        if at + END.size <= len(tail):
            sig, disk, disk_cd, n_here, n_all, cd_size, cd_offset, comment = \
                END.unpack_from(tail, at)
            if at + END.size + comment == len(tail):
                break
    eocd = tail_start + at
    if disk != 0 or disk_cd != 0 or n_here != n_all:
        raise _bad("a multi-disk archive")
    cd_end = eocd
    zip64 = False
    loc = eocd - END64_LOCATOR.size
    if loc >= 0:
        sig, disk64, end64_at, disks = END64_LOCATOR.unpack(_pread(fd, END64_LOCATOR.size, loc))
        if sig == SIG_END64_LOCATOR:
            zip64 = True
            if disk64 != 0 or disks != 1 or end64_at + END64.size > loc:
                raise _bad("a zip64 locator that points elsewhere")
            (sig64, rec_size, _made, _need, d, dcd, n64_here, n64_all, cd64_size,
             cd64_offset) = END64.unpack(_pread(fd, END64.size, end64_at))
            if sig64 != SIG_END64 or end64_at + 12 + rec_size != loc or d != 0 or dcd != 0 \
                    or n64_here != n64_all:
                raise _bad("a zip64 end record that disagrees with its locator")
            for small, big, sentinel in ((n_all, n64_all, _U16), (cd_size, cd64_size, _U32),
                                         (cd_offset, cd64_offset, _U32)):
                if small != sentinel and small != big:
                    raise _bad("zip64 and plain end records that disagree")
            n_all, cd_size, cd_offset, cd_end = n64_all, cd64_size, cd64_offset, end64_at
    # (only the plain record's fields can be sentinels: in a zip64 one, 65,535 records or a
    # directory at 0xFFFFFFFF are values)
    if not zip64 and (n_all == _U16 or _U32 in (cd_size, cd_offset)):
        raise _bad("a zip64 archive without its zip64 end record")
    if cd_offset + cd_size != cd_end:
        raise _bad("bytes between the central directory and the end record")
    return n_all, cd_size, cd_offset, cd_end


def _zip64_extra(extra: bytes, fields: list[int]) -> list[int]:
    """Replace the 0xFFFFFFFF fields (usize, csize, offset in that order) from the zip64 extra.

    Also for a local header (`fields` = usize, csize): there the zip64 field must hold both.
    """
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, at)
        body = extra[at + 4: at + 4 + length]
        if len(body) != length:
            raise _bad("a truncated extra field")
        if tag == 0x0001:
            out, pos = list(fields), 0
            for i, v in enumerate(fields):
                if v == _U32:
                    if pos + 8 > len(body):
                        raise _bad("a short zip64 extra field")
                    out[i] = struct.unpack_from("<Q", body, pos)[0]
                    pos += 8
            return out
        at += 4 + length
    if at != len(extra):
        raise _bad("a truncated extra field")
    if _U32 in fields:
        raise _bad("a 0xFFFFFFFF size without a zip64 extra field")
    return fields


def _check_name(name: str) -> None:
    if not name.isascii() or not name.isprintable() or "\\" in name or name.startswith("/"):
        raise _bad(f"a record named {name[:60]!r}")
    parts = name.split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        raise _bad(f"a record named {name[:60]!r}")


def read_archive(fd: int, size: int) -> Archive:
    """Parse and check the whole container of the file behind `fd` (`size` bytes)."""
    if size < END.size + LOCAL.size:
        raise TornWrite("incomplete or torn write: too short to be a zip")
    count, cd_size, cd_offset, cd_end = _end_record(fd, size)
    if cd_end > size or cd_size < count * CENTRAL.size:
        raise _bad("a central directory larger than its entries or the file")
    cd = _pread(fd, cd_size, cd_offset)
    entries: list[tuple[str, bytes, int, int, int, int]] = []  # name, raw, flags, lho, size, crc
    names: set[str] = set()
    problems: list[str | None] = []
    at = 0
    for _ in range(count):
        if at + CENTRAL.size > len(cd):
            raise _bad("a central directory shorter than its entry count")
        (sig, _made, _need, flags, method, _t, _d, crc, csize, usize, nlen, elen, clen, disk,
         _ia, _ea, lho) = CENTRAL.unpack_from(cd, at)
        if sig != SIG_CENTRAL:
            raise _bad("a damaged central directory")
        raw = cd[at + CENTRAL.size: at + CENTRAL.size + nlen]
        extra = cd[at + CENTRAL.size + nlen: at + CENTRAL.size + nlen + elen]
        at += CENTRAL.size + nlen + elen + clen
        if at > len(cd) or len(raw) != nlen:
            raise _bad("a damaged central directory")
        usize, csize, lho = _zip64_extra(extra, [usize, csize, lho])
        name = raw.decode("utf-8" if flags & FLAG_UTF8 else "cp437", "replace")
        problems.append(
            "compressed" if method != 0 else
            f"has flags {flags:#x} (encrypted or patched)" if flags & ~_ALLOWED_FLAGS else
            "has inconsistent sizes" if csize != usize or disk != 0 else None)
        entries.append((name, raw, flags, lho, usize, crc))
    if at != len(cd):
        raise _bad("bytes after the last central directory entry")
    if any(e[0].endswith("/constants.pkl") for e in entries):  # say what it is, not how it is stored
        raise NotACheckpoint("a TorchScript archive (torch.jit), not a training checkpoint")
    for (name, *_rest), problem in zip(entries, problems, strict=True):
        _check_name(name)
        if problem == "compressed":
            raise NotACheckpoint(f"zip record {name!r} is compressed; torch never writes that")
        if problem is not None:
            raise _bad(f"record {name!r} {problem}")
        if name in names:
            raise _bad(f"two records named {name!r}")
        names.add(name)
    if not entries:
        raise NotACheckpoint("an empty zip file")
    prefix = entries[0][0].split("/", 1)[0] + "/"
    for name, *_rest in entries:
        if not name.startswith(prefix):
            raise _bad(f"record {name!r} outside the archive's folder {prefix!r}")
    physical = sorted(range(len(entries)), key=lambda i: entries[i][3])
    if entries[physical[0]][3] != 0:
        raise _bad("bytes before the first record")
    records: list[Record | None] = [None] * len(entries)
    for rank, i in enumerate(physical):
        name, raw, flags, lho, usize, crc = entries[i]
        nxt = entries[physical[rank + 1]][3] if rank + 1 < len(physical) else cd_offset
        header = _pread(fd, LOCAL.size + len(raw), lho)
        (sig, _need, lflags, lmethod, _t, _d, lcrc, lcsize, lusize, lnlen, lelen) = \
            LOCAL.unpack_from(header)
        if sig != SIG_LOCAL or lflags != flags or lmethod != 0 or lnlen != len(raw) or \
                header[LOCAL.size:] != raw:
            raise _bad(f"record {name!r}: its local header disagrees with the central directory")
        stated = (lcrc, lcsize, lusize)
        if stated != (crc, usize, usize) and not (flags & FLAG_DESCRIPTOR and stated == (0, 0, 0)) \
                and not (lcsize == lusize == _U32 and lcrc == crc):
            raise _bad(f"record {name!r}: its local header states other sizes or CRC")
        if lcsize == lusize == _U32 and stated != (crc, usize, usize):
            # the sizes are in the local header's zip64 field: a reader that streams the zip
            # (no central directory) takes them from there, so they must be the same sizes
            lextra = _pread(fd, lelen, lho + LOCAL.size + lnlen)
            if _zip64_extra(lextra, [_U32, _U32]) != [usize, usize]:
                raise _bad(f"record {name!r}: its local header states other sizes or CRC")
        data_offset = lho + LOCAL.size + lnlen + lelen
        if data_offset + usize > nxt:
            if nxt == cd_offset and data_offset + usize > size:
                raise TornWrite("incomplete or torn write: records claim more bytes than the file")
            raise _bad(f"record {name!r} overlaps the next one")
        if flags & FLAG_DESCRIPTOR:
            _check_descriptor(fd, name, data_offset + usize, nxt, crc, usize)
        records[i] = Record(name, lho, data_offset, usize, crc, flags, rank, nxt)
    done = tuple(r for r in records if r is not None)
    return Archive(prefix, done, cd_offset, {r.name: r for r in done})


_DESCRIPTOR32 = struct.Struct("<III")
_DESCRIPTOR64 = struct.Struct("<IQQ")


def _check_descriptor(fd: int, name: str, at: int, end: int, crc: int, size: int) -> None:
    """A record's data descriptor (after its data) must state what the central directory does.

    A streaming reader takes the sizes from it; one that lies would make that reader see other
    records than we do. Its signature is optional, its sizes 4 or 8 bytes (zip64).
    """
    raw = os.pread(fd, min(28, max(0, end - at)), at)
    body = raw[4:] if raw[:4] == b"PK\x07\x08" else raw
    for fmt in (_DESCRIPTOR32, _DESCRIPTOR64):
        if len(body) >= fmt.size and fmt.unpack_from(body) == (crc, size, size):
            return
    raise _bad(f"record {name!r}: its data descriptor states other sizes or CRC")


def read_record(fd: int, rec: Record) -> bytes:
    """A record's bytes, checked against its CRC-32."""
    data = _pread(fd, rec.size, rec.data_offset)
    if zlib.crc32(data) != rec.crc:
        raise NotACheckpoint(f"record {rec.name!r} fails its CRC-32 check")
    return data


CRC_CHUNK = 256 << 10  # L2-sized


def check_crc(fd: int, rec: Record) -> None:
    """`read_record`'s check without holding the record: for weights of any size."""
    crc = 0
    for start in range(0, rec.size, CRC_CHUNK):
        crc = zlib.crc32(_pread(fd, min(CRC_CHUNK, rec.size - start), rec.data_offset + start),
                         crc)
    if crc != rec.crc:
        raise NotACheckpoint(f"record {rec.name!r} fails its CRC-32 check")
