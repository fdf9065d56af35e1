"""Zip64: what `zipwrite` writes when a size, an offset or the record count needs 64 bits.

Every such file must read back in the strict reader (the verify's), in zipfile and in torch, with
and without mmap, carry the zip64 end records exactly when needed, and keep the kept weights copied
by the kernel. More than 65,535 records is the small, real case (a strip through the worker's
entry point); sizes and offsets past 4 GiB are sparse files, headers at explicit offsets, the data
a hole, so nothing large is written or read.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import types
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_watchd.engine import zipread, zipwrite
from ckpt_watchd.errors import NotACheckpoint
from ckpt_watchd.worker import StripJob, run_job
from fixtures.hostile import crc_with_hole

# More kept storages than the plain end record can count (0xFFFF is its sentinel): with the six
# small records every checkpoint has, 65,536 records.
MANY = 0xFFFF - 5
SMALL_RECORDS = 6  # data.pkl, .format_version, .storage_alignment, byteorder, version, serialization id
GiB = 1 << 30


def _end_records(path: Path) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(the plain end record, the zip64 end record or None), read from the file's last bytes."""
    with open(path, "rb") as f:
        f.seek(-zipread.END.size, os.SEEK_END)
        plain = zipread.END.unpack(f.read())
        f.seek(-zipread.END.size - zipread.END64_LOCATOR.size, os.SEEK_END)
        locator = zipread.END64_LOCATOR.unpack(f.read(zipread.END64_LOCATOR.size))
        if locator[0] != zipread.SIG_END64_LOCATOR:
            return plain, None
        f.seek(locator[2])
        return plain, zipread.END64.unpack(f.read(zipread.END64.size))


def _archive(path: Path) -> zipread.Archive:
    fd = os.open(path, os.O_RDONLY)
    try:
        return zipread.read_archive(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ 65,536 records


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """A checkpoint of MANY tiny weights and an optimizer, stripped by `run_job` (the worker's entry)."""
    path = tmp_path_factory.mktemp("zip64") / "last.pt"
    weights = {f"blocks.{i}.scale": torch.full((2,), float(i)) for i in range(MANY)}
    torch.save({"epoch": 4, "state_dict": weights,
                "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}},
                              "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]}},
               path)
    seen = types.SimpleNamespace(written=[], kernel_copied=0)
    real_save, real_copy = zipwrite.save, os.copy_file_range

    def save(*args: Any, **kwargs: Any) -> zipwrite.Written:
        written = real_save(*args, **kwargs)
        seen.written.append(written)
        return written

    def copy_file_range(*args: Any) -> int:
        n = real_copy(*args)
        seen.kernel_copied += n
        return n

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zipwrite, "save", save)
        mp.setattr(zipwrite.os, "copy_file_range", copy_file_range)
        outcome = run_job(StripJob(path=str(path)))
    return types.SimpleNamespace(path=path, outcome=outcome, weights=weights, **vars(seen))


def test_a_strip_past_65535_records_writes_zip64_end_records(many: types.SimpleNamespace) -> None:
    """65,536 records: zip64 end record and locator, the plain record's count at its sentinel."""
    assert many.outcome.status == "stripped", many.outcome
    records = MANY + SMALL_RECORDS
    plain, end64 = _end_records(many.path)
    assert end64 is not None
    (_sig, _rec_size, _made, need, _disk, _disk_cd, n_here, n_all, cd_size, cd_offset) = end64
    assert (n_here, n_all, need) == (records, records, 45)
    size = many.path.stat().st_size
    assert cd_offset + cd_size + zipread.END64.size + zipread.END64_LOCATOR.size + \
        zipread.END.size == size
    # the count does not fit (0xFFFF is the sentinel); the size and offset do and are stated
    assert plain[3:7] == (0xFFFF, 0xFFFF, cd_size, cd_offset)
    archive = _archive(many.path)
    assert len(archive.records) == records and len(archive.storages()) == MANY
    with zipfile.ZipFile(many.path) as zf:
        assert len(zf.infolist()) == records
        assert zf.read("last/data.pkl")[:1] == b"\x80"


@pytest.mark.parametrize("mmap", [True, False])
def test_the_zip64_file_loads_in_torch_as_the_kept_tensors(many: types.SimpleNamespace,
                                                          mmap: bool) -> None:
    back = torch.load(many.path, mmap=mmap, weights_only=True)
    assert list(back) == ["epoch", "state_dict"] and back["epoch"] == 4
    assert list(back["state_dict"]) == list(many.weights)
    assert all(torch.equal(back["state_dict"][k], v) for k, v in many.weights.items())


def test_the_kept_weights_were_copied_by_the_kernel(many: types.SimpleNamespace) -> None:
    """All 65,530 kept records come from the source in one `copy_file_range` run, none from memory."""
    (written,) = many.written
    assert len(written.copied_at) == MANY and len(written.copied_from) == 1
    assert many.kernel_copied == sum(length for _start, length in written.copied_from)
    assert not [n for n in written.from_memory if "/data/" in n]


# ------------------------------------------------------------------------------ packing, exactly


@pytest.mark.parametrize(("count", "zip64"), [(0xFFFE, False), (0xFFFF, True)])
def test_the_count_needs_zip64_from_65535_records(tmp_path: Path, count: int, zip64: bool) -> None:
    """0xFFFF is the plain record's sentinel: 65,535 records already need the zip64 end record."""
    path = tmp_path / "n.zip"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        zw = zipwrite._Writer(fd, 64)
        zw.add("data.pkl", b"\x80\x02N.")
        for i in range(count - 1):
            zw.add(f"data/{i}", b"w")
        zw.finish()
    finally:
        os.close(fd)
    plain, end64 = _end_records(path)
    assert (end64 is not None) is zip64
    assert plain[4] == (0xFFFF if zip64 else count)
    assert end64 is None or end64[7] == count
    assert len(_archive(path).records) == count  # the strict reader takes 65,535 as a count
    with zipfile.ZipFile(path) as zf:
        assert len(zf.infolist()) == count


class _HugeStoragePickler(pickle.Pickler):
    """Pickles a tensor whose storage is the `size`-byte record "0" (the data is never made)."""

    def __init__(self, file: io.BytesIO, size: int) -> None:
        super().__init__(file, protocol=2)
        self.size = size

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.storage.TypedStorage):
            return ("storage", torch.ByteStorage, "0", "cpu", self.size)
        return None


def _sparse_checkpoint(path: Path, size: int, *, offset: int) -> bytes:
    """A torch checkpoint whose storage record "0" (`size` bytes of zeros, a hole) starts at `offset`.

    Written by zipwrite's own `_Writer` like `save` writes, except that the storage's data is
    skipped over instead of written: the file is sparse.
    """
    buf = io.BytesIO()
    _HugeStoragePickler(buf, size).dump({"w": torch.zeros(16, dtype=torch.uint8)})
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        zw = zipwrite._Writer(fd, 64)
        zw.add("data.pkl", buf.getvalue())
        zw.add("byteorder", b"little")
        zw.offset = max(zw.offset, offset)  # a hole before the storage's local header
        header = zw._local("data/0", size, crc_with_hole(b"", size, b""))
        os.pwrite(fd, header, zw.offset)
        zw.offset += len(header) + size  # its data: a hole of zeros
        zw.add("version", b"3\n")
        zw.add(".data/serialization_id", b"0" * 40)
        zw.finish()
    finally:
        os.close(fd)
    return header


@pytest.mark.parametrize(("size", "offset"), [(4096, 5 * GiB), (4 * GiB + 64, 0),
                                              (0xFFFF_FFFF, 0)],
                         ids=["offset past 4 GiB", "size past 4 GiB", "size 0xFFFFFFFF"])
def test_sizes_and_offsets_past_4_gib_read_back_everywhere(tmp_path: Path, size: int,
                                                           offset: int) -> None:
    """zipread, zipfile and torch (mmap) read the 64-bit sizes and offsets zipwrite writes."""
    path = tmp_path / "big.pt"
    header = _sparse_checkpoint(path, size, offset=offset)
    # the local header: the sizes that do not fit go into its zip64 field, both of them
    fields = zipread.LOCAL.unpack_from(header)
    big = size >= 0xFFFF_FFFF
    assert fields[7:9] == ((0xFFFF_FFFF,) * 2 if big else (size, size))
    nlen = fields[9]
    extra = header[zipread.LOCAL.size + nlen:]
    assert extra.startswith(struct.pack("<HHQQ", 1, 16, size, size)) is big
    rec = _archive(path).get("data/0")
    assert rec is not None and (rec.size, rec.data_offset % 64) == (size, 0)
    assert rec.header_offset >= offset
    plain, end64 = _end_records(path)
    assert end64 is not None and end64[9] > 0xFFFF_FFFF  # the directory starts past 4 GiB
    assert plain[6] == 0xFFFF_FFFF
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("archive/data/0")
        assert (info.file_size, info.header_offset) == (size, rec.header_offset)
        with zf.open(info) as f:
            assert f.read(64) == bytes(64)
        assert zf.read("archive/version") == b"3\n"  # a record past the big one or the hole
    back = torch.load(path, mmap=True, weights_only=True)
    storage = back["w"].untyped_storage()
    assert storage.nbytes() == size and not back["w"].any()
    if not big:  # without mmap torch reads every storage: only the small one
        assert torch.equal(torch.load(path, weights_only=True)["w"], back["w"])


def test_central_entry_states_in_64_bits_only_what_needs_them() -> None:
    name = b"archive/data/7"
    for size, offset, want in [(10, 20, b""), (10, 5 * GiB, struct.pack("<HHQ", 1, 8, 5 * GiB)),
                               (5 * GiB, 20, struct.pack("<HHQQ", 1, 16, 5 * GiB, 5 * GiB)),
                               (5 * GiB, 6 * GiB, struct.pack("<HHQQQ", 1, 24, 5 * GiB, 5 * GiB,
                                                              6 * GiB))]:
        entry = zipwrite.central_entry(name, 0x0808, 0x1234, size, offset)
        fields = zipread.CENTRAL.unpack_from(entry)
        assert entry[zipread.CENTRAL.size:] == name + want
        assert fields[8:10] == (min(size, 0xFFFF_FFFF),) * 2
        assert fields[16] == min(offset, 0xFFFF_FFFF)
        assert fields[11] == len(want) and fields[3] == 0x0808


# ------------------------------------------------------------------------------ copied headers


def _zip64_local_headers(src: bytes) -> bytes:
    """`src` (a torch.save file) as miniz lays out records past 4 GiB, at the same small offsets.

    Each record's local header gets a zip64 field holding an offset 5 GiB off its real one (miniz
    writes the record's offset there when it is past 4 GiB: in a copy, it is the source's offset,
    no longer the record's), its data descriptor the 8-byte sizes that field announces.
    """
    with zipfile.ZipFile(io.BytesIO(src)) as zf:
        infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
        datas = {i.filename: zf.read(i) for i in infos}
    out = bytearray()
    central = bytearray()
    for info in infos:
        at, raw, data = len(out), info.filename.encode(), datas[info.filename]
        zip64 = struct.pack("<HHQ", 1, 8, at + 5 * GiB)
        pad = -(at + zipread.LOCAL.size + len(raw) + len(zip64) + 4) % 64
        extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
        crc = zlib.crc32(data)
        out += zipread.LOCAL.pack(zipread.SIG_LOCAL, 0, 0x0808, 0, 0, 0, 0, 0, 0, len(raw),
                                  len(extra)) + raw + extra + data
        out += struct.pack("<IIQQ", 0x08074B50, crc, len(data), len(data))
        central += zipwrite.central_entry(raw, 0x0808, crc, len(data), at)
    return bytes(out + central + zipwrite.end_records(len(infos), len(central), len(out)))


def test_copied_local_headers_with_their_own_zip64_field(tmp_path: Path) -> None:
    """A source whose headers carry miniz's zip64 field: copied verbatim, every reader agrees."""
    path = tmp_path / "last.pt"
    weights = {f"layer{i}.weight": torch.randn(8, 8) for i in range(4)}
    buf = io.BytesIO()
    torch.save({"epoch": 2, "model_state_dict": weights,
                "optimizer_state_dict": {"state": {0: {"exp_avg": torch.ones(8, 8)}},
                                         "param_groups": [{"lr": 0.01, "params": [0]}]}}, buf)
    path.write_bytes(_zip64_local_headers(buf.getvalue()))
    src_records = {r.name: r for r in _archive(path).records}
    outcome = run_job(StripJob(path=str(path)))
    assert outcome.status == "stripped", outcome
    raw = path.read_bytes()
    archive = _archive(path)
    assert _end_records(path)[1] is None  # nothing in the stripped file needs zip64 ...
    copied = [r for r in archive.records if "/data/" in r.name]
    assert len(copied) == len(weights)
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        for rec in copied:
            # ... but the copied local headers keep the source's zip64 field (its stale offset)
            # and its 64-bit descriptor, while the central entry states the new place plainly
            nlen, elen = struct.unpack_from("<HH", raw, rec.header_offset + 26)
            extra = raw[rec.header_offset + 30 + nlen: rec.header_offset + 30 + nlen + elen]
            tag, length, stale = struct.unpack_from("<HHQ", extra)
            assert (tag, length) == (1, 8) and stale != rec.header_offset
            assert stale == src_records[rec.name].header_offset + 5 * GiB
            assert infos[rec.name].extra == b"" and infos[rec.name].header_offset == rec.header_offset
            assert raw[rec.data_offset + rec.size:][:24] == struct.pack(
                "<IIQQ", 0x08074B50, rec.crc, rec.size, rec.size)
        assert zf.testzip() is None
    for mmap in (True, False):
        back = torch.load(path, mmap=mmap, weights_only=True)
        assert list(back) == ["epoch", "model_state_dict"]
        assert all(torch.equal(back["model_state_dict"][k], v) for k, v in weights.items())


def test_a_local_zip64_field_that_disagrees_with_the_central_entry_is_refused(
        tmp_path: Path) -> None:
    """Local sizes at 0xFFFFFFFF: a streaming reader takes them from the local zip64 field."""
    name = b"archive/data.pkl"
    data = b"\x80\x02N."
    crc = zlib.crc32(data)

    def zip_with(local_sizes: tuple[int, int]) -> bytes:
        extra = struct.pack("<HHQQ", 1, 16, *local_sizes)
        local = zipread.LOCAL.pack(zipread.SIG_LOCAL, 45, 0x0800, 0, 0, 0, crc, 0xFFFF_FFFF,
                                   0xFFFF_FFFF, len(name), len(extra)) + name + extra + data
        central = zipwrite.central_entry(name, 0x0800, crc, len(data), 0)
        return local + central + zipwrite.end_records(1, len(central), len(local))

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    good.write_bytes(zip_with((len(data), len(data))))
    bad.write_bytes(zip_with((len(data) + 100, len(data) + 100)))
    assert _archive(good).records[0].size == len(data)
    with pytest.raises(NotACheckpoint, match="local header states other sizes"):
        _archive(bad)
