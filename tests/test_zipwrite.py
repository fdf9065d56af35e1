"""The save path: kept weights copied from the source, the zip layout, the verify and the fallback.

Every file `zipwrite` writes must read back in torch (with and without mmap) as the same tensors
`torch.save` would have written, keep torch's 64-byte data alignment, and be caught by the verify
when any byte of it is wrong. The `torch.save` fallback (a torch without the serialiser internals
`zipwrite` relies on) must give the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import gc
import os
import pickle
import struct
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_watchd.engine import atomic, safeload, strip, zipwrite
from ckpt_watchd.engine import checkpoint as engine
from ckpt_watchd.errors import NotACheckpoint, SourceChanged, VerifyFailed
from ckpt_watchd.worker import StripJob, run_job
from fixtures.harness import temp_files

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


def _strip_to_temp(path: Path) -> tuple[dict[str, Any], Path, zipwrite.Written | None, Any]:
    """Load, strip and save `path` into a temp file next to it (not verified, not replaced)."""
    loaded = safeload.load(path)
    profile = strip.detect_profile(loaded.obj, loaded.globals_seen)
    stripped = strip.strip(loaded.obj, profile, now=NOW)
    out = path.with_name("out.pt")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    writer = atomic.RecordingWriter(fd)
    try:
        written = engine._save(stripped, writer, path, loaded)
        atomic.finish_write(writer)
    finally:
        writer.close()
    return stripped, out, written, loaded


def _tensors(obj: Any) -> list[torch.Tensor]:
    return list(strip.walk_tensors(obj))


class _TrustedUnpickler(pickle.Unpickler):
    """Test-only: torch's real loader, with a plain class for each trainer class it cannot import."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (), {"__module__": module, "__setstate__": _set_state})


def _set_state(self: Any, state: Any) -> None:
    self.__dict__.update(state if isinstance(state, dict) else {})


_TRUSTED = types.SimpleNamespace(Unpickler=_TrustedUnpickler, load=pickle.load,
                                 __name__="trusted_test_pickle")


def _torch_load(path: Path, mmap: bool) -> Any:
    """What torch.load itself reads from the file, with and without mmap."""
    return torch.load(path, map_location="cpu", pickle_module=_TRUSTED, weights_only=False,
                      mmap=mmap)


@pytest.mark.parametrize("kind", ["yolov5", "yolov5_fp32", "ultralytics", "generic", "lightning"])
def test_written_file_reads_back_in_torch_as_the_stripped_tensors(
        checkpoint: Callable[..., Path], kind: str) -> None:
    stripped, out, written, _ = _strip_to_temp(path := checkpoint(kind))
    assert written is not None
    engine.verify(stripped, out, written, source=path)
    for mmap in (False, True):
        back = _torch_load(out, mmap)
        assert list(back) == list(stripped)
        a, b = _tensors(stripped), _tensors(back)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert (x.dtype, x.shape, x.stride(), x.requires_grad) == (
                y.dtype, y.shape, y.stride(), y.requires_grad)
            assert torch.equal(x, y)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None  # every CRC-32 right, the copied ones included


def test_fp16_ema_is_copied_from_the_source_not_rewritten(checkpoint: Callable[..., Path]) -> None:
    """YOLOv5 keeps its FP16 EMA as is: those records come from the source, byte for byte."""
    path = checkpoint("yolov5")
    _, _, written, _ = _strip_to_temp(path)
    assert written is not None
    assert written.copied_at and written.copied_bytes > 0
    # one run of consecutive records: the EMA block
    assert len(written.copied_from) == 1
    assert all(name.endswith(("data.pkl", "version", "byteorder", "serialization_id",
                              ".storage_alignment", ".format_version")) or "/data/" in name
               for name in written.from_memory)


def test_fp32_weights_are_converted_and_written_from_memory(
        checkpoint: Callable[..., Path]) -> None:
    _, out, written, _ = _strip_to_temp(checkpoint("yolov5_fp32"))
    assert written is not None
    assert any("/data/" in n for n in written.from_memory)
    back = _torch_load(out, mmap=True)
    convs = [t for t in _tensors(back["model"]) if t.dim() == 4]
    assert convs and {t.dtype for t in convs} == {torch.float16}


def test_storage_data_is_aligned_like_torch_aligns_it(checkpoint: Callable[..., Path]) -> None:
    _, out, _, _ = _strip_to_temp(checkpoint("yolov5"))
    raw = out.read_bytes()
    with zipfile.ZipFile(out) as zf:
        infos = [i for i in zf.infolist() if "/data/" in i.filename]
    assert infos
    for info in infos:
        nlen, elen = struct.unpack_from("<HH", raw, info.header_offset + 26)
        assert (info.header_offset + 30 + nlen + elen) % 64 == 0, info.filename


def test_same_checkpoint_as_the_torch_save_fallback(checkpoint: Callable[..., Path],
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where zipwrite is not available torch.save writes instead; both give the same checkpoint."""
    _, fast, written, _ = _strip_to_temp(checkpoint("yolov5", directory=tmp_path / "a"))
    monkeypatch.setattr(zipwrite, "available", lambda: False)
    stripped2, slow, written2, _ = _strip_to_temp(
        path := checkpoint("yolov5", directory=tmp_path / "b"))
    assert written is not None and written2 is None
    engine.verify(stripped2, slow, written2, source=path)
    a, b = _torch_load(fast, mmap=False), _torch_load(slow, mmap=False)
    assert list(a) == list(b)
    assert [k for k in a if k not in ("date",)] == [k for k in b if k not in ("date",)]
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) == len(tb)
    assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(ta, tb, strict=True))


def test_copy_without_copy_file_range(checkpoint: Callable[..., Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Another filesystem (EXDEV) or an old kernel: the records are copied by hand instead."""
    calls = []

    def refuse(*args: Any) -> int:
        calls.append(args)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(zipwrite.os, "copy_file_range", refuse)
    stripped, out, written, _ = _strip_to_temp(path := checkpoint("yolov5"))
    assert calls and written is not None and written.copied_bytes > 0
    engine.verify(stripped, out, written, source=path)
    assert all(torch.equal(x, y) for x, y in zip(_tensors(stripped),
                                                  _tensors(_torch_load(out, False)), strict=True))


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_verify_catches_a_wrong_byte_in_a_copied_record(checkpoint: Callable[..., Path]) -> None:
    stripped, out, written, _ = _strip_to_temp(path := checkpoint("yolov5"))
    assert written is not None
    header = written.copied_at[0][0]
    nlen, elen = struct.unpack_from("<HH", out.read_bytes(), header + 26)
    _flip(out, header + 30 + nlen + elen)  # first byte of its data
    with pytest.raises(VerifyFailed, match="copied from the source reads back"):
        engine.verify(stripped, out, written, source=path)


def test_a_kept_source_record_that_fails_its_crc_is_refused_by_the_save(
        checkpoint: Callable[..., Path]) -> None:
    """A kept record whose bytes no longer match the source's own CRC-32 (bit rot, a torn
    rewrite) is refused while it is copied: the stripped file would carry it on. Through
    strip_file, the source is left as it was."""
    _, out, written, _ = _strip_to_temp(path := checkpoint("yolov5"))
    assert written is not None and written.copied_at
    out.unlink()
    _flip(path, written.copied_at[0][2].data_offset)  # the first kept record, in the source
    with pytest.raises(NotACheckpoint, match="fails its CRC-32 check"):
        _strip_to_temp(path)
    out.unlink()
    before = path.read_bytes()
    outcome = run_job(StripJob(path=str(path)))  # the worker boundary: an error as a value
    assert (outcome.status, outcome.error_type) == ("failed", "not_a_checkpoint"), outcome
    assert "fails its CRC-32 check" in (outcome.error or "")
    assert path.read_bytes() == before and temp_files(path.parent) == []


def test_verify_catches_a_copy_with_another_crc_in_the_central_directory(
        checkpoint: Callable[..., Path]) -> None:
    stripped, out, written, _ = _strip_to_temp(path := checkpoint("yolov5"))
    assert written is not None
    header, size, rec = written.copied_at[0]
    written.copied_at[0] = (header, size, dataclasses.replace(rec, crc=rec.crc ^ 1))
    with pytest.raises(VerifyFailed, match="another CRC-32"):
        engine.verify(stripped, out, written, source=path)


def test_verify_catches_a_wrong_byte_in_the_pickle(checkpoint: Callable[..., Path]) -> None:
    stripped, out, written, _ = _strip_to_temp(path := checkpoint("yolov5"))
    with zipfile.ZipFile(out) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
    nlen, elen = struct.unpack_from("<HH", out.read_bytes(), info.header_offset + 26)
    _flip(out, info.header_offset + 30 + nlen + elen + info.file_size // 2)
    with pytest.raises(VerifyFailed):
        engine.verify(stripped, out, written, source=path)


def test_a_source_rewritten_before_the_save_is_not_copied(
        checkpoint: Callable[..., Path]) -> None:
    path = checkpoint("yolov5")
    loaded = safeload.load(path)
    stripped = strip.strip(loaded.obj, "yolov5", now=NOW)
    os.utime(path, ns=(1, 1))  # the trainer touched it: not the file we mapped
    writer = atomic.RecordingWriter(os.open(path.with_name("o.pt"), os.O_WRONLY | os.O_CREAT))
    try:
        with pytest.raises(SourceChanged):
            engine._save(stripped, writer, path, loaded)
    finally:
        writer.close()


def test_the_replaced_file_is_released_when_the_strip_returns(
        checkpoint: Callable[..., Path]) -> None:
    """No mapping or fd keeps the old file (and its disk space) alive after strip_file returns.

    The automatic garbage collector is off for the test, so only reference counting can free
    what the strip used: a reference cycle holding the source's mapping would show here.
    """
    path = checkpoint("yolov5")
    st = path.stat()
    old = (st.st_dev, st.st_ino)
    was = gc.isenabled()
    gc.disable()
    try:
        outcome = engine.strip_file(path)
        assert outcome.status == "stripped"
        maps = Path("/proc/self/maps").read_text()
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                fst = os.stat(f"/proc/self/fd/{fd}")
                fds.append((fst.st_dev, fst.st_ino))
            except OSError:
                continue
    finally:
        if was:
            gc.enable()
    assert (path.stat().st_dev, path.stat().st_ino) != old
    assert f"{path} (deleted)" not in maps
    assert old not in fds
