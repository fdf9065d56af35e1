"""The zip container of a saved checkpoint, with the kept weights copied file-to-file from the source.

It owns the save: the object is pickled with torch's persistent ids for storages, and the records
are written as a zip that `torch.load` reads like its own (stored records, data aligned to torch's
storage alignment, `.format_version`, `.storage_alignment`, `byteorder`, `version` and
`.data/serialization_id`, one archive prefix). What a strip keeps of the source (the EMA, FP16
already) is, in the source, a run of consecutive records: each run is copied verbatim, local
headers and all, by the kernel (`copy_file_range`, a reflink where the filesystem has them) in a
thread while the pickling runs, and keeps its record names, so the pickle names those storages by
their source keys and the central directory reuses the source's CRC-32s (each checked against
the source's bytes while the kernel copies them). Everything else is
written from memory. Not byte-identical to `torch.save` (record order, names, no data descriptors
of our own), so `torch.utils.serialization.config.load.calculate_storage_offsets`, which assumes
torch's exact layout, must stay off (its default). Zip64 where a size, an offset or the record
count needs it, and only there: a 13 GB checkpoint is written like a small one, its kept weights
copied by the kernel. Imports torch: worker processes and one-shot commands only.
"""

from __future__ import annotations

import collections
import contextlib
import copyreg
import ctypes
import errno
import io
import os
import pickle
import secrets
import struct
import sys
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_watchd.engine.zipread import (
    CENTRAL,
    END,
    END64,
    END64_LOCATOR,
    LOCAL,
    SIG_CENTRAL,
    SIG_END,
    SIG_END64,
    SIG_END64_LOCATOR,
    SIG_LOCAL,
    Record,
    check_crc,
)
from ckpt_watchd.errors import SourceChanged

ARCHIVE = "archive/"
_UTF8 = 0x0800
_PAD_ID = b"FB"  # torch's own padding extra field: "FB", a length, then that many b"Z"
_U16, _U32 = 0xFFFF, 0xFFFF_FFFF  # a field's ceiling, and the sentinel that sends readers to zip64
_ZIP64_ID = 0x0001  # the zip64 extended information extra field
_ZIP64_VERSION = 45  # "version needed to extract" of what has zip64 fields (APPNOTE 4.4.3.2)
_CHUNK = 1 << 20
# copy_file_range refuses these (other filesystem, old kernel, special files): copy by hand
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF,
                             errno.ENOTSUP, errno.EPERM})


@dataclass(slots=True)
class Written:
    """What went where, for the verify."""

    # records written from memory (their CRC-32 is checked by reading them back)
    from_memory: list[str] = field(default_factory=list)
    # records copied from the source: (local header offset in the new file, size, the source's
    # record it was copied from)
    copied_at: list[tuple[int, int, Record]] = field(default_factory=list)
    # the source ranges (offset, length) that were copied
    copied_from: list[tuple[int, int]] = field(default_factory=list)
    # the data.pkl written, and each storage as the pickle first names it: (key, dtype, bytes)
    pickle: bytes = b""
    storages: list[tuple[str, torch.dtype, int]] = field(default_factory=list)
    size: int = 0

    @property
    def copied_bytes(self) -> int:
        return sum(size for _header, size, _storage in self.copied_at)


def available() -> bool:
    """The torch internals `save` relies on are there (they are private: check, else torch.save)."""
    ts = torch.storage.TypedStorage
    return all(hasattr(x, n) for x, n in (
        (ts, "_pickle_storage_type"), (ts, "_size"),
        (torch.serialization, "location_tag"), (torch.serialization, "_get_storage_alignment")))


# ------------------------------------------------------------------------------ zip64 layout
# A field holds its value when the value is below its ceiling; at or above it, the field holds
# the sentinel and the value goes into a zip64 field (an exact 0xFFFFFFFF is a sentinel too).


def _zip64_extra(values: list[int]) -> bytes:
    """The zip64 extra field holding `values` (in the order the format fixes), or nothing."""
    if not values:
        return b""
    return struct.pack(f"<HH{len(values)}Q", _ZIP64_ID, 8 * len(values), *values)


def local_header(raw_name: bytes, size: int, crc: int, pad: int) -> bytes:
    """The local header of a stored record written from memory, then `pad` bytes of torch's padding.

    No data descriptor: the CRC-32 and size are known before the write. A size of 4 GiB or more
    goes into a zip64 field carrying both sizes (a local header's zip64 field must hold both,
    and never an offset).
    """
    extra = _zip64_extra([size, size] if size >= _U32 else [])
    small = min(size, _U32)
    return LOCAL.pack(SIG_LOCAL, _ZIP64_VERSION if extra else 0, _UTF8, 0, 0, 0, crc, small,
                      small, len(raw_name), len(extra) + 4 + pad) + raw_name + extra + \
        _PAD_ID + struct.pack("<H", pad) + b"Z" * pad


def local_zip64_length(size: int) -> int:
    """Bytes `local_header` adds for zip64 before the padding field (0, or 20 for a large record)."""
    return len(_zip64_extra([size, size])) if size >= _U32 else 0


def central_entry(raw_name: bytes, flags: int, crc: int, size: int, offset: int) -> bytes:
    """A central directory entry; the sizes and the offset that need 64 bits in its zip64 field."""
    big_size, big_offset = size >= _U32, offset >= _U32
    extra = _zip64_extra(([size, size] if big_size else []) + ([offset] if big_offset else []))
    version = _ZIP64_VERSION if extra else 0
    small = min(size, _U32)
    return CENTRAL.pack(SIG_CENTRAL, version, version, flags, 0, 0, 0, crc, small, small,
                        len(raw_name), len(extra), 0, 0, 0, 0, min(offset, _U32)) + raw_name + extra


def needs_zip64_end(count: int, cd_size: int, cd_offset: int) -> bool:
    """Whether the end of the archive needs the zip64 end record and its locator."""
    return count >= _U16 or cd_size >= _U32 or cd_offset >= _U32


def end_records(count: int, cd_size: int, cd_offset: int) -> bytes:
    """What follows the central directory: [zip64 end record, locator,] the plain end record.

    The zip64 pair is written when the count, the directory's size or its offset reach their
    field's ceiling; the plain record then holds each such value as its sentinel (the others as
    they are, like zipfile and miniz write them), so every reader takes them from the zip64 one.
    """
    out = b""
    if needs_zip64_end(count, cd_size, cd_offset):
        end64_at = cd_offset + cd_size
        out = END64.pack(SIG_END64, END64.size - 12, _ZIP64_VERSION, _ZIP64_VERSION, 0, 0, count,
                         count, cd_size, cd_offset) + \
            END64_LOCATOR.pack(SIG_END64_LOCATOR, 0, end64_at, 1)
    n = min(count, _U16)
    return out + END.pack(SIG_END, 0, 0, n, n, min(cd_size, _U32), min(cd_offset, _U32), 0)


def _reduce_ordered_dict(od: collections.OrderedDict[Any, Any]) -> tuple[Any, ...]:
    # What OrderedDict.__reduce__ returns (state = its __dict__, e.g. a state_dict's _metadata),
    # without the call into copyreg._slotnames that the C version makes for every instance
    # (a built-in type cannot cache it): a model has ten OrderedDicts per module.
    return (collections.OrderedDict, (), od.__dict__ or None, None, iter(od.items()))


# exact types only: a subclass of OrderedDict keeps its own reduction
_DISPATCH = {**copyreg.dispatch_table, collections.OrderedDict: _reduce_ordered_dict}


@dataclass(frozen=True, slots=True)
class _Run:
    records: tuple[Record, ...]
    out_start: int

    @property
    def src_start(self) -> int:
        return self.records[0].header_offset

    @property
    def length(self) -> int:
        return self.records[-1].span_end - self.src_start


def plan_runs(kept: Iterable[Record]) -> list[tuple[Record, ...]]:
    """Group source records into runs of physically consecutive records."""
    runs: list[list[Record]] = []
    for rec in sorted(set(kept), key=lambda r: r.index):
        if runs and runs[-1][-1].index + 1 == rec.index:
            runs[-1].append(rec)
        else:
            runs.append([rec])
    return [tuple(r) for r in runs]


def save(obj: Any, tensors: Iterable[torch.Tensor], out_fd: int, src_fd: int | None,
         sources: dict[int, tuple[Record, Any]], pickler: type[pickle.Pickler],
         protocol: int = 2) -> Written:
    """Write `obj` as a torch zip checkpoint into `out_fd`.

    `tensors` are the tensors of `obj` (to find, before pickling, which source records are kept);
    `sources` maps the data pointer of each storage mapped from the source to its record, and
    `src_fd` is that source file. The persistent ids are torch's: `("storage", storage_type, key,
    location, numel)`; only the per-object check is cheaper than torch's. `protocol` is the
    pickle protocol: the source's, or what its names need (see `opscan.Scan.needs`).
    """
    zw = _Writer(out_fd, torch.serialization._get_storage_alignment())
    kept: dict[int, Record] = {}
    if src_fd is not None and sources:
        for t in tensors:
            s = t.untyped_storage()
            hit = sources.get(s.data_ptr())
            if hit is not None and hit[0].size == s.nbytes() and s.nbytes():
                kept[s.data_ptr()] = hit[0]
        prefixes = {r.prefix for r in kept.values()}
        if len(prefixes) == 1:
            zw.prefix = prefixes.pop()
        else:
            kept.clear()
    copier = zw.start_runs(src_fd, plan_runs(kept.values())) if kept else None

    typed, untyped = torch.storage.TypedStorage, torch.UntypedStorage
    is_storage: dict[type, bool] = {typed: True, untyped: True}
    new: dict[str, torch.UntypedStorage] = {}
    keys: dict[int, str] = {}
    dtypes: dict[int, torch.dtype] = {}
    order: list[tuple[str, torch.dtype, int]] = []
    taken = {r.key for r in kept.values()}
    fresh = iter(str(n) for n in range(1 << 62) if str(n) not in taken)

    def persistent_id(_pickler: Any, o: Any) -> Any:
        cls = o.__class__
        hit = is_storage.get(cls)
        if hit is None:
            hit = is_storage[cls] = isinstance(o, typed) or torch.is_storage(o)
        if not hit:
            return None
        if isinstance(o, typed):
            storage, dtype = o._untyped_storage, o.dtype
            storage_type = getattr(torch, o._pickle_storage_type())  # type: ignore[no-untyped-call]
            numel = o._size()  # type: ignore[no-untyped-call]
        else:
            storage, dtype = o, torch.uint8
            storage_type = getattr(torch, type(o).__name__)
            numel = o.nbytes()
        ptr = storage.data_ptr()
        if ptr != 0 and dtypes.setdefault(ptr, dtype) != dtype:
            raise RuntimeError("Cannot save multiple tensors or storages that view the same "
                               "data as different types")
        key = keys.get(storage._cdata)
        if key is None:
            rec = kept.get(ptr)
            if rec is not None and rec.size == storage.nbytes():
                key = rec.key
            else:
                key = next(fresh)
                new[key] = storage
            keys[storage._cdata] = key
            order.append((key, dtype, numel * torch._utils._element_size(dtype)))  # type: ignore[no-untyped-call]
        return ("storage", storage_type, key, torch.serialization.location_tag(storage), numel)

    # the function itself is the method: one Python call per pickled object, not two
    storage_pickler = type("StoragePickler", (pickler,), {"persistent_id": persistent_id,
                                                          "dispatch_table": _DISPATCH})
    try:
        buf = io.BytesIO()
        storage_pickler(buf, protocol=protocol).dump(obj)
        data = buf.getvalue()
        zw.add("data.pkl", data)
        if copier is None:
            zw.add(".format_version", b"1")
        zw.add(".storage_alignment", str(zw.alignment).encode())
        zw.add("byteorder", sys.byteorder.encode())
        for key, storage in new.items():
            if storage.device.type != "cpu":
                storage = storage.cpu()  # type: ignore[no-untyped-call]
            zw.add_storage(f"data/{key}", storage)
        zw.add("version", b"3\n")
        zw.add(".data/serialization_id",
               "".join(secrets.choice("0123456789") for _ in range(40)).encode())
        if copier is not None:
            # while the kernel copies them (on another core): each kept record must match its
            # own CRC-32, which the new central directory takes over; the verify then compares
            # the copies with the source in full
            assert src_fd is not None
            for rec in sorted(set(kept.values()), key=lambda r: r.index):
                check_crc(src_fd, rec)
            copier.finish(by_ptr={r: ptr for ptr, r in kept.items()}, sources=sources)
        written = zw.finish()
        written.pickle = data
        written.storages = order
        return written
    finally:
        if copier is not None:
            copier.join()
        # A class is cyclic garbage, and this one's method holds these dicts: left filled, they
        # would keep the source's mapping, and with it the replaced file's disk space, alive
        # until some later garbage collection.
        new.clear()
        keys.clear()
        dtypes.clear()
        kept.clear()


class _Writer:
    """Lays records out at explicit offsets (pwrite), and the central directory at the end."""

    def __init__(self, out_fd: int, alignment: int) -> None:
        self.out = out_fd
        self.alignment = alignment
        self.prefix = ARCHIVE
        self.offset = 0
        # (sort rank, name, flags, CRC-32, size, local header offset): packed by `finish`
        self._central: list[tuple[int, bytes, int, int, int, int]] = []
        self.written = Written()

    def _local(self, name: str, size: int, crc: int, extra_to: int | None = None) -> bytes:
        raw = (self.prefix + name).encode("utf-8")
        fixed = self.offset + LOCAL.size + len(raw) + local_zip64_length(size) + 4
        # data aligned like torch aligns it; or, for the lead record, its end at `extra_to`
        pad = (-fixed) % self.alignment if extra_to is None else (extra_to - fixed - size) % self.alignment
        rank = 0 if name == "data.pkl" else 1  # torch takes the archive name from the first entry
        self._central.append((rank, raw, _UTF8, crc, size, self.offset))
        return local_header(raw, size, crc, pad)

    def add(self, name: str, data: bytes | memoryview, *, end_residue: int | None = None) -> None:
        header = self._local(name, len(data), zlib.crc32(data), end_residue)
        self._pwrite(header, self.offset)
        self._pwrite(data, self.offset + len(header))
        self.offset += len(header) + len(data)
        self.written.from_memory.append(self.prefix + name)

    def add_storage(self, name: str, storage: torch.UntypedStorage) -> None:
        n = storage.nbytes()
        view = (memoryview((ctypes.c_char * n).from_address(storage.data_ptr())).cast("B")
                if n else memoryview(b""))
        self.add(name, view)

    def add_copied(self, rec: Record, out_header: int) -> None:
        # The local header was copied verbatim: its flags (a data descriptor follows the data, in
        # torch's files) must be the entry's. Its own zip64 field, if any (miniz writes one with
        # the sizes when they need it, and with the record's offset in the *source* when that
        # is past 4 GiB), describes the source: no reader takes an offset from a local header,
        # and the descriptor keeps the 8-byte sizes that field announces, so both travel as
        # they are. The entry states the record as the source's central directory did (CRC-32,
        # size) at its place in this file, and gets zip64 fields for what this file needs.
        raw = rec.name.encode("utf-8")
        self._central.append((1, raw, rec.flags, rec.crc, rec.size, out_header))

    def start_runs(self, src_fd: int | None, runs: list[tuple[Record, ...]]) -> _Copier:
        """Write the lead record, place the runs (each as aligned as in the source), start copying."""
        assert src_fd is not None
        a = self.alignment
        self.add(".format_version", b"1", end_residue=runs[0][0].header_offset % a)
        placed = []
        for records in runs:
            start = records[0].header_offset
            out = self.offset + (start - self.offset) % a
            if out > self.offset:
                self._pwrite(bytes(out - self.offset), self.offset)  # a gap no record claims
            run = _Run(records, out)
            placed.append(run)
            self.offset = out + run.length
        copier = _Copier(self, src_fd, placed)
        copier.start()
        return copier

    def finish(self) -> Written:
        start = self.offset
        entries = b"".join(central_entry(*e[1:]) for e in sorted(self._central, key=lambda x: x[0]))
        tail = entries + end_records(len(self._central), len(entries), start)
        self._pwrite(tail, start)
        self.offset = start + len(tail)
        self.written.size = self.offset
        return self.written

    def _pwrite(self, data: bytes | memoryview, at: int) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.out, view[done:done + (64 << 20)], at + done)


class _Copier:
    """Copies the planned runs in a thread: one `copy_file_range` loop per run, no GIL needed."""

    def __init__(self, zw: _Writer, src_fd: int, runs: list[_Run]) -> None:
        self._zw = zw
        self._src = src_fd
        self._runs = runs
        self._error: BaseException | None = None
        self._kernel = hasattr(os, "copy_file_range")
        self._done = 0  # runs fully copied by the thread
        self._thread = threading.Thread(target=self._run, name="ckpt-watchd-copy", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        try:
            for run in self._runs:
                if not self._copy(run, kernel_only=True):
                    return  # the main thread copies the rest by hand
                self._done += 1
                self._start_writeback(run)
        except BaseException as e:  # re-raised by finish() in the main thread
            self._error = e

    def _start_writeback(self, run: _Run) -> None:
        # Start writing the copied bytes to the disk now, while the pickling goes on: the fsync
        # before the rename then has less left to wait for. Only a hint; fsync still decides.
        write = getattr(os, "SYNC_FILE_RANGE_WRITE", None)
        sync_file_range = getattr(os, "sync_file_range", None)  # Linux only
        if write is None or sync_file_range is None:
            return
        with contextlib.suppress(OSError):
            sync_file_range(self._zw.out, run.out_start, run.length, write)

    def _copy(self, run: _Run, *, kernel_only: bool) -> bool:
        done, size = 0, run.length
        while done < size:
            if self._kernel:
                try:
                    n = os.copy_file_range(self._src, self._zw.out, size - done,
                                           run.src_start + done, run.out_start + done)
                except OSError as e:
                    if e.errno not in _NO_KERNEL_COPY:
                        raise
                    self._kernel = False
                    if kernel_only:
                        return False
                    continue
            else:
                chunk = os.pread(self._src, min(size - done, _CHUNK), run.src_start + done)
                n = len(chunk)
                if n:
                    self._zw._pwrite(chunk, run.out_start + done)
            if n == 0:
                raise SourceChanged("changed while stripping (the file got shorter)")
            done += n
        return True

    def finish(self, by_ptr: dict[Record, int], sources: dict[int, tuple[Record, Any]]
               ) -> None:
        """Wait for the copies (finishing by hand what the kernel refused); add their entries."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        for run in self._runs[self._done:]:
            self._copy(run, kernel_only=False)
        written = self._zw.written
        for run in self._runs:
            written.copied_from.append((run.src_start, run.length))
            for rec in run.records:
                out_header = run.out_start + rec.header_offset - run.src_start
                self._zw.add_copied(rec, out_header)
                written.copied_at.append((out_header, rec.size, rec))
