"""Strip and inspect one checkpoint file: safe load, strip, verified atomic save.

It owns the sequence temp file -> write -> fsync -> reload and compare -> source unchanged? ->
os.replace -> directory fsync, and the `inspect` report. Failures are raised as `CheckpointError`s;
the worker turns them into values. Imports torch: only worker processes and one-shot commands load it.
"""

from __future__ import annotations

import datetime
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import torch

from ckpt_watchd import atomic, safeload, strip
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
    with atomic.temp_writer(dest) as (tmp, writer):
        _save(stripped, writer)
        atomic.finish_write(writer)
        try:
            verify(stripped, tmp)
        except VerifyFailed:
            # the source is mmapped: a trainer rewriting it also changes the tensors we compare
            # against, so a mismatch is first of all a sign that the source changed
            _check_unchanged(path, facts)
            raise
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


def _save(obj: Any, writer: atomic.RecordingWriter) -> None:
    try:
        with safeload.standins_importable() as fast:
            module = safeload.FAST_SAVE_PICKLE if fast else safeload.SAVE_PICKLE
            torch.save(obj, cast(IO[bytes], writer), pickle_module=module, pickle_protocol=2)
    except CheckpointError:
        raise
    except Exception as e:
        cause = writer.error
        if cause is None and isinstance(e.__context__, OSError):
            cause = e.__context__
        if cause is not None:
            raise WriteFailed(f"write failed: {atomic.describe_oserror(cause)}") from None
        raise WriteFailed(f"cannot serialise the stripped checkpoint: {e}") from None


def _hash_source(path: Path, facts: safeload.FileFacts) -> str:
    fd, now_facts = safeload.open_regular(path)
    try:
        if not now_facts.same_content_as(facts):
            raise SourceChanged("changed while stripping (rewritten before it was hashed)")
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


def verify(expected: dict[Any, Any], written: Path) -> None:
    """Read the new file back: the same structure, and every byte as torch meant to write it.

    The structure (keys, classes, each tensor's dtype, shape, strides, offset, requires_grad and
    storage size) comes from a safe reload that maps the file without reading any weight; the
    weights are checked against the CRC-32 torch computed for each record while writing. Reading
    them back in chunks keeps memory flat; comparing values would also fail on NaN weights.
    """
    try:
        back = safeload.load(written).obj
    except CheckpointError as e:
        raise VerifyFailed(f"the written file does not read back: {e.message}") from None
    if not isinstance(back, dict) or list(back) != list(expected):
        raise VerifyFailed("the written file has other top-level keys than the stripped checkpoint")
    for key in expected:
        if strip.describe(back[key]) != strip.describe(expected[key]):
            raise VerifyFailed(f"key {key!r} reads back as {strip.describe(back[key])}")
    a, b = list(strip.walk_tensors(expected)), list(strip.walk_tensors(back))
    if len(a) != len(b):
        raise VerifyFailed(f"{len(b)} tensors read back, {len(a)} were written")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if _layout(x) != _layout(y):
            raise VerifyFailed(f"tensor #{i} differs after the write: {_layout(y)} != {_layout(x)}")
    try:
        with zipfile.ZipFile(written) as zf:
            for info in zf.infolist():
                with zf.open(info) as f:
                    while f.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, OSError) as e:
        raise VerifyFailed(f"the written file fails its checksums: {e}") from None


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
