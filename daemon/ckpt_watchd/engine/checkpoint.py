"""Strip and inspect one checkpoint file: safe load, strip, verified atomic save.

It owns the sequence temp file -> write (kept weights copied from the source, `zipwrite`) -> fsync
(in a thread, overlapping the next step, and finished before anything else happens to the temp
file) -> reload and compare -> source unchanged? -> os.replace -> directory fsync, and the
`inspect` report. Failures are raised as `CheckpointError`s;
the worker turns them into values. Imports torch: only worker processes and one-shot commands load it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

import torch

from ckpt_watchd.engine import atomic, safeload, strip, zipwrite
from ckpt_watchd.errors import (
    CheckpointError,
    NotACheckpoint,
    SourceChanged,
    VerifyFailed,
    WriteFailed,
)
from ckpt_watchd.outcome import SKIPPED, STRIPPED, WOULD_STRIP, Outcome

BeforeReplace = Callable[[Path, safeload.FileFacts], None]


def strip_file(
    path: Path,
    *,
    output: Path | None = None,
    dry_run: bool = False,
    half: bool = False,
    hashes: bool = False,
    before_replace: BeforeReplace | None = None,
    now: datetime.datetime | None = None,
) -> Outcome:
    """Strip `path` in place (or into `output`). Returns stripped/skipped/would-strip, or raises."""
    with _gc_paused():
        return _strip_file(path, output=output, dry_run=dry_run, half=half, hashes=hashes,
                           before_replace=before_replace, now=now)


_FROZEN: list[bool] = []


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection during one strip.

    A load creates tens of thousands of objects that all live until the strip ends, and each
    allocation burst makes the collector walk every object in the process (torch's included):
    for a YOLOv5m checkpoint that was half of the strip's time. What a strip leaves in cycles
    is collected once, afterwards.
    """
    # (a list, so the flag needs no `global`)
    if not _FROZEN:
        # what is alive before the first strip (torch and its imports) lives as long as the
        # process: moved out of the collector's sight, a full collection no longer walks it
        gc.freeze()
        _FROZEN.append(True)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _strip_file(
    path: Path,
    *,
    output: Path | None,
    dry_run: bool,
    half: bool,
    hashes: bool,
    before_replace: BeforeReplace | None,
    now: datetime.datetime | None,
) -> Outcome:
    started = time.monotonic()
    path = Path(path)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    loaded = safeload.load(path)
    facts = loaded.facts
    profile = strip.detect_profile(loaded.obj, loaded.globals_seen)
    common: dict[str, Any] = {"path": str(path), "profile": profile, "bytes_before": facts.size}
    if strip.is_stripped(loaded.obj, profile):
        return Outcome(status=SKIPPED, reason="already stripped", bytes_after=facts.size,
                       duration_s=time.monotonic() - started,
                       fingerprint=(facts.ino, facts.size, facts.mtime_ns), **common)
    stripped = strip.strip(loaded.obj, profile, now=now, half=half)
    if dry_run:
        return Outcome(status=WOULD_STRIP, bytes_after=estimate_size(stripped),
                       duration_s=time.monotonic() - started, **common)
    sha_before = _hash_source(path, facts) if hashes else None
    dest = Path(output) if output is not None else path
    forgetting: threading.Thread | None = None
    with contextlib.ExitStack() as later:
        # joined last: the thread dropping the source's page cache must not outlive the strip
        later.callback(lambda: forgetting.join() if forgetting is not None else None)
        tmp, writer = later.enter_context(atomic.temp_writer(dest))
        written = _save(stripped, writer, path, loaded)
        if dest == path and written is not None and loaded.sources:
            with contextlib.suppress(CheckpointError):
                fd = _reopen(path, facts, "before its cache was dropped")
                forgetting = atomic.forget_cached_pages(fd, facts.size, written.copied_from)
        syncing = atomic.BackgroundFsync(writer)
        try:
            verify(stripped, tmp, written)
        except VerifyFailed:
            # the source is mmapped: a trainer rewriting it also changes the tensors we compare
            # against, so a mismatch is first of all a sign that the source changed
            _check_unchanged(path, facts)
            raise
        finally:
            syncing.wait()  # before anything renames, closes or removes the temp file
        _check_unchanged(path, facts)
        atomic.copy_ownership(tmp, facts.uid, facts.gid, facts.mode)
        sha_after = atomic.sha256_path(tmp) if hashes else None
        if before_replace is not None and dest == path:
            before_replace(path, facts)
        atomic.replace(tmp, dest)
    st = os.lstat(dest)
    return Outcome(status=STRIPPED, output=str(dest) if output is not None else None,
                   bytes_after=st.st_size, sha256_before=sha_before, sha256_after=sha_after,
                   duration_s=time.monotonic() - started,
                   fingerprint=(st.st_ino, st.st_size, st.st_mtime_ns), **common)


def _save(obj: Any, writer: atomic.RecordingWriter, source: Path,
          loaded: safeload.Loaded) -> zipwrite.Written | None:
    """Serialise `obj` into the temp file; returns the record layout when `zipwrite` wrote it.

    `zipwrite` copies the storages that are unchanged bytes of the source file straight from it;
    `torch.save` is the fallback for files that need zip64 or a torch whose serialiser differs.
    """
    src_fd: int | None = None
    try:
        with safeload.standins_importable() as fast:
            module = safeload.FAST_SAVE_PICKLE if fast else safeload.SAVE_PICKLE
            if not (zipwrite.available()
                    and zipwrite.fits(loaded.facts.size, len(loaded.sources) + 1)):
                # a strip never grows a file: one that was a plain zip stays one
                torch.save(obj, cast(IO[bytes], writer), pickle_module=module, pickle_protocol=2)
                return None
            if loaded.sources:
                src_fd = _reopen(source, loaded.facts, "before it was saved")
            return zipwrite.save(obj, strip.weights(obj), writer.fileno(), src_fd,
                                 loaded.sources, module.Pickler)
    except CheckpointError:
        raise
    except OSError as e:
        raise WriteFailed(f"write failed: {atomic.describe_oserror(e)}") from None
    except Exception as e:
        cause = writer.error
        if cause is None and isinstance(e.__context__, OSError):
            cause = e.__context__
        if cause is not None:
            raise WriteFailed(f"write failed: {atomic.describe_oserror(cause)}") from None
        raise WriteFailed(f"cannot serialise the stripped checkpoint: {e}") from None
    finally:
        if src_fd is not None:
            os.close(src_fd)


def _reopen(path: Path, facts: safeload.FileFacts, when: str) -> int:
    """An fd on `path`, provided it is still the file that was loaded (else SourceChanged)."""
    fd, now = safeload.open_regular(path)
    if not now.same_content_as(facts):
        os.close(fd)
        raise SourceChanged(f"changed while stripping (rewritten {when})")
    return fd


def _hash_source(path: Path, facts: safeload.FileFacts) -> str:
    fd = _reopen(path, facts, "before it was hashed")
    try:
        return atomic.sha256_fd(fd)
    finally:
        os.close(fd)


def _check_unchanged(path: Path, facts: safeload.FileFacts) -> None:
    try:
        now = safeload.FileFacts.of(os.lstat(path))
    except FileNotFoundError:
        raise SourceChanged("changed while stripping (the file was removed)") from None
    if not now.same_content_as(facts):
        raise SourceChanged("changed while stripping (a trainer rewrote it); nothing was replaced")


def verify(expected: dict[Any, Any], written: Path, layout: zipwrite.Written | None = None) -> None:
    """Read the new file back and check it is the stripped checkpoint, every byte as meant.

    For a file `zipwrite` wrote (`layout`): its pickle is read back from the file and must be,
    byte for byte, the pickle of `expected`; it must unpickle under the safe loader's policy with
    every storage naming a record of its exact size, in the order, dtypes and sizes that were
    saved; the top-level keys and their classes must be those of `expected`. Records written
    from memory are checked against the CRC-32 computed while writing. Records copied from the
    source carry the source's own CRC-32, and re-reading them whole would only re-read the
    source: their first and last 4 KiB in the new file are compared with the bytes the strip
    kept (catching a record copied from the wrong place). No weight is loaded.

    For a file `torch.save` wrote (the zip64 fallback), the reload is torch's own (mmap, no
    weight read), each tensor's dtype, shape, strides, offset, requires_grad and storage size
    is compared with `expected`, and every record is re-read against its CRC-32.
    """
    structure: safeload.Structure | None = None
    try:
        if layout is not None:
            structure = safeload.load_structure(written, read_through=layout.from_memory)
            obj = structure.obj
        else:
            obj = safeload.load(written).obj
            _read_all_records(written)
    except CheckpointError as e:
        raise VerifyFailed(f"the written file does not read back: {e.message}") from None
    if not isinstance(obj, dict) or list(obj) != list(expected):
        raise VerifyFailed("the written file has other top-level keys than the stripped checkpoint")
    for key in expected:
        if strip.describe(obj[key]) != strip.describe(expected[key]):
            raise VerifyFailed(f"key {key!r} reads back as {strip.describe(obj[key])}")
    if layout is None or structure is None:
        _compare_tensors(expected, obj)
        return
    if structure.pickle != layout.pickle:
        raise VerifyFailed("the written file's pickle is not the one that was written")
    if structure.storages != layout.storages:
        raise VerifyFailed(f"the written file names {len(structure.storages)} storages, "
                           f"{len(layout.storages)} were written, or their sizes differ")
    if layout.copied_at:
        try:
            _check_copied(written, layout.copied_at)
        except OSError as e:
            raise VerifyFailed(f"the written file cannot be read back: {e}") from None


def _compare_tensors(expected: Any, back: Any) -> None:
    a, b = list(strip.walk_tensors(expected)), list(strip.walk_tensors(back))
    if len(a) != len(b):
        raise VerifyFailed(f"{len(b)} tensors read back, {len(a)} were written")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if _layout(x) != _layout(y):
            raise VerifyFailed(f"tensor #{i} differs after the write: {_layout(y)} != {_layout(x)}")


def _read_all_records(written: Path) -> None:
    try:
        with zipfile.ZipFile(written) as zf:
            for info in zf.infolist():
                with zf.open(info) as f:
                    while f.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, OSError) as e:
        raise VerifyFailed(f"the written file fails its checksums: {e}") from None


def _check_copied(written: Path, copied_at: list[tuple[int, int, Any]], span: int = 4096) -> None:
    fd = os.open(written, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        for header, size, storage in copied_at:
            local = os.pread(fd, zipwrite.LOCAL.size, header)
            if len(local) != zipwrite.LOCAL.size or local[:4] != b"PK\x03\x04":
                raise VerifyFailed(f"no zip record where one was copied (offset {header})")
            *_fields, nlen, elen = zipwrite.LOCAL.unpack(local)
            offset = header + zipwrite.LOCAL.size + nlen + elen
            ptr = storage.data_ptr()
            for start in sorted({0, max(0, size - span)}):
                n = min(span, size - start)
                if os.pread(fd, n, offset + start) != ctypes.string_at(ptr + start, n):
                    raise VerifyFailed(f"a weight record copied from the source reads back "
                                       f"with other bytes (at offset {offset + start})")
    finally:
        os.close(fd)


def _layout(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t.requires_grad,
            t.untyped_storage().nbytes())


def estimate_size(obj: Any) -> int:
    """Bytes a save would take: the distinct storages plus zip and pickle overhead (approximate)."""
    _count, total, _ = strip.tensor_bytes(strip.walk_tensors(obj))
    storages = {strip.storage_key(t) for t in strip.walk_tensors(obj)}
    return total + 64 * 2 * (len(storages) + 6) + 200 * len(storages) + 4096


def inspect_file(path: Path) -> dict[str, Any]:
    """Where the bytes go: per top-level key, its type, tensors, bytes and dtypes."""
    with _gc_paused():
        loaded = safeload.load(Path(path))
    obj = loaded.obj
    profile: str | None
    reason: str | None
    try:
        profile = strip.detect_profile(obj, loaded.globals_seen)
    except CheckpointError as e:
        if not isinstance(obj, dict):
            raise
        profile, reason = None, e.message
    else:
        reason = None
    if not isinstance(obj, dict):
        raise NotACheckpoint("top level is not a dict")
    keys = []
    for key, value in obj.items():
        count, nbytes, dtypes = strip.tensor_bytes(strip.walk_tensors(value))
        keys.append({"key": str(key), "type": strip.describe(value), "tensors": count,
                     "bytes": nbytes, "dtypes": sorted(dtypes)})
    report: dict[str, Any] = {
        "path": str(path), "format": loaded.format, "bytes": loaded.facts.size,
        "profile": profile, "keys": keys,
        "epoch": obj.get("epoch") if isinstance(obj.get("epoch"), int) else None,
    }
    if profile is None:
        report.update(stripped=None, bytes_after_strip=None, note=reason)
        return report
    done = strip.is_stripped(obj, profile)
    report["stripped"] = done
    if done:
        report["bytes_after_strip"] = loaded.facts.size
    else:
        now = datetime.datetime.now(datetime.timezone.utc)
        report["bytes_after_strip"] = estimate_size(strip.strip(obj, profile, now=now))
    return report
