"""Strip and inspect one checkpoint file: safe load, strip, verified atomic save.

It owns the sequence temp file -> write (kept weights copied from the source, `zipwrite`) -> fsync
(in a thread, overlapping the next step, and finished before anything else happens to the temp
file) -> read back, scan and compare -> source unchanged? -> os.replace -> directory fsync, and
the `inspect` report. Nothing is renamed over the source until the output's own pickle has passed
a scan of its own (its globals and their roles among the source's) and every record of it has
been checked. Failures are raised as `CheckpointError`s; the worker turns them into values.
Imports torch: only worker processes and one-shot commands load it.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import pickle
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, cast

import torch

from ckpt_watchd.engine import (
    atomic,
    opscan,
    policy,
    safeload,
    source,
    standin,
    strip,
    zipread,
    zipwrite,
)
from ckpt_watchd.errors import (
    CheckpointError,
    NotACheckpoint,
    SourceChanged,
    VerifyFailed,
    WriteFailed,
)
from ckpt_watchd.outcome import SKIPPED, STRIPPED, WOULD_STRIP, Outcome

BeforeReplace = Callable[[Path, source.FileFacts], None]
Uses = frozenset[tuple[str, policy.Role]]

# What writing a stripped checkpoint may name although the source did not: torch's own tensor
# rebuild and state-dict container, and the storage type of a dtype the strip converted to.
WRITER_VOCABULARY: Uses = frozenset(
    {("torch._utils._rebuild_tensor_v2", policy.CALL), ("collections.OrderedDict", policy.CALL)}
    | {(f"torch.{s}", policy.PERSID) for s in policy.STORAGE_TYPES})


def strip_file(
    path: Path,
    *,
    output: Path | None = None,
    dry_run: bool = False,
    half: bool = False,
    hashes: bool = False,
    before_replace: BeforeReplace | None = None,
    now: datetime.datetime | None = None,
    opened: source.Opened | None = None,
    need: source.Need = source._no_cap,
    also: tuple[Path, ...] = (),
) -> Outcome:
    """Strip `path` in place (or into `output`). Returns stripped/skipped/would-strip, or raises.

    `opened` is the file already opened and scanned by `source.open_checkpoint` (closed here);
    `need` raises the job's memory cap step by step (see worker.memory_cap); `also` are other
    names (hard links) of the same file, pointed at the stripped file after it replaced `path`.
    """
    with _gc_paused():
        if opened is None:
            opened = source.open_checkpoint(path, need=need)
        try:
            return _strip_file(path, output=output, dry_run=dry_run, half=half, hashes=hashes,
                               before_replace=before_replace, now=now, opened=opened, need=need,
                               also=also)
        finally:
            opened.close()


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
    opened: source.Opened,
    need: source.Need,
    also: tuple[Path, ...] = (),
) -> Outcome:
    started = time.monotonic()
    path = Path(path)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    loaded = safeload.load(path, opened=opened, need=need)
    facts = loaded.facts
    profile = strip.detect_profile(loaded.obj, loaded.globals_seen)
    common: dict[str, Any] = {"path": str(path), "profile": profile, "bytes_before": facts.size}
    if strip.is_stripped(loaded.obj, profile):
        return Outcome(status=SKIPPED, reason="already stripped", bytes_after=facts.size,
                       duration_s=time.monotonic() - started,
                       fingerprint=(facts.ino, facts.size, facts.mtime_ns), **common)
    # converted weights and the new pickle: within the bytes the file really holds
    need(facts.real_bytes + (64 << 20) + 4 * len(opened.pickle))
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
        try:
            written = _save(stripped, writer, path, loaded)
        except NotACheckpoint:
            # a kept record failing its CRC-32: most likely a trainer rewriting the file now
            _check_unchanged(path, facts)
            raise
        if dest == path and written is not None and loaded.sources:
            with contextlib.suppress(CheckpointError):
                fd = _reopen(path, facts, "before its cache was dropped")
                forgetting = atomic.forget_cached_pages(fd, facts.size, written.copied_from)
        syncing = atomic.BackgroundFsync(writer)
        try:
            verify(stripped, tmp, written, allowed=loaded.scan.uses | WRITER_VOCABULARY,
                   source=path)
        except VerifyFailed:
            # the source is mmapped: a trainer rewriting it also changes the tensors we compare
            # against, so a mismatch is first of all a sign that the source changed
            _check_unchanged(path, facts)
            raise
        finally:
            syncing.wait()  # before anything renames, closes or removes the temp file
        atomic.copy_ownership(tmp, facts.uid, facts.gid, facts.mode)
        sha_after = atomic.sha256_path(tmp) if hashes else None
        # after hashing the copy (seconds for a big one): a checkpoint the trainer deleted
        # meanwhile (a rotation) must not be brought back by os.replace as our stripped copy
        _check_unchanged(path, facts)
        if before_replace is not None and dest == path:
            before_replace(path, facts)
        atomic.replace(tmp, dest)
    if also and dest == path:
        atomic.relink(dest, list(also), facts.ino, facts.dev)
    st = os.lstat(dest)
    return Outcome(status=STRIPPED, output=str(dest) if output is not None else None,
                   bytes_after=st.st_size, sha256_before=sha_before, sha256_after=sha_after,
                   duration_s=time.monotonic() - started,
                   fingerprint=(st.st_ino, st.st_size, st.st_mtime_ns), **common)


def output_protocol(scan: opscan.Scan) -> int:
    """The pickle protocol to write: the source's, or what its names need (never below 2)."""
    return min(policy.HIGHEST, max(2, scan.proto, scan.needs))


def _save(obj: Any, writer: atomic.RecordingWriter, source: Path,
          loaded: safeload.Loaded) -> zipwrite.Written | None:
    """Serialise `obj` into the temp file; returns the record layout when `zipwrite` wrote it.

    `zipwrite` copies the storages that are unchanged bytes of the source file straight from it,
    zip64 or not; `torch.save` is the fallback only for a torch whose serialiser internals
    differ from what `zipwrite` relies on (`zipwrite.available`).
    """
    src_fd: int | None = None
    protocol = output_protocol(loaded.scan)
    try:
        with standin.importable() as fast:
            pickler: Any = pickle.Pickler if fast else standin.StandInPickler
            if not zipwrite.available():
                # torch.save reads every kept storage into memory: only where zipwrite cannot
                module = types.SimpleNamespace(Pickler=pickler, dump=pickle.dump,
                                               dumps=pickle.dumps, __name__="ckpt_watchd.save")
                torch.save(obj, cast(IO[bytes], writer), pickle_module=module,
                           pickle_protocol=protocol)
                return None
            if loaded.sources:
                src_fd = _reopen(source, loaded.facts, "before it was saved")
            return zipwrite.save(obj, strip.weights(obj), writer.fileno(), src_fd,
                                 loaded.sources, pickler, protocol)
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


def _reopen(path: Path, facts: source.FileFacts, when: str) -> int:
    """An fd on `path`, provided it is still the file that was loaded (else SourceChanged)."""
    fd, now = source.open_regular(path)
    if not now.same_content_as(facts):
        os.close(fd)
        raise SourceChanged(f"changed while stripping (rewritten {when})")
    return fd


def _hash_source(path: Path, facts: source.FileFacts) -> str:
    fd = _reopen(path, facts, "before it was hashed")
    try:
        return atomic.sha256_fd(fd)
    finally:
        os.close(fd)


def _check_unchanged(path: Path, facts: source.FileFacts) -> None:
    try:
        now = source.FileFacts.of(os.lstat(path))
    except FileNotFoundError:
        raise SourceChanged("changed while stripping (the file was removed)") from None
    if not now.same_content_as(facts):
        raise SourceChanged("changed while stripping (a trainer rewrote it); nothing was replaced")


def same_keys(a: list[Any], b: list[Any]) -> bool:
    """Top-level keys equal in order, a NaN key equal to a NaN key (NaN != NaN otherwise)."""
    def norm(k: Any) -> Any:
        if type(k) is float:
            return ("float", k.hex())
        if type(k) in (int, str, bool, bytes, type(None)):
            return (type(k).__name__, k)
        return ("object", standin.class_name(k))
    return len(a) == len(b) and all(norm(x) == norm(y) for x, y in zip(a, b, strict=True))


def verify(expected: dict[Any, Any], written: Path, layout: zipwrite.Written | None = None, *,
           allowed: Uses | None = None, source: Path | None = None) -> None:
    """Read the new file back and check it is the stripped checkpoint, every byte as meant.

    The written file's container is parsed by the same strict reader as a source, and its pickle
    is scanned on its own, opcode by opcode: every global it names must play a role the policy
    allows and, with `allowed` (the source's uses plus `WRITER_VOCABULARY`), one the source's
    pickle gave it. It must unpickle under the safe loader's policy with every storage naming a
    record of its exact size; the top-level keys and their classes must be those of `expected`.

    For a file `zipwrite` wrote (`layout`): its pickle must be, byte for byte, the pickle that was
    written, naming the storages in the order, dtypes and sizes that were saved; records written
    from memory must match the CRC-32 computed while writing; records copied from the source are
    read whole and compared with the source's records (read from `source`, by `pread`: the pages
    torch mapped are never touched, so the verify adds no resident memory), whose CRC-32s the
    save checked while the kernel copied them. No weight is loaded. For a file `torch.save`
    wrote (the fallback where `zipwrite` is not available) each tensor's dtype, shape, strides,
    offset, requires_grad and storage size is compared with `expected`, and every record is read
    against its CRC-32.
    """
    try:
        structure = safeload.load_structure(written)
    except CheckpointError as e:
        raise VerifyFailed(f"the written file does not read back: {e.message}") from None
    if allowed is not None:
        extra = sorted(structure.scan.uses - allowed, key=str)
        if extra:
            name, role = extra[0]
            raise VerifyFailed(f"the written pickle would name {name} "
                               f"({policy.describe_role(role, policy.kind(name))}), "
                               "which the source's pickle did not")
    obj = structure.obj
    if not isinstance(obj, dict) or not same_keys(list(obj), list(expected)):
        raise VerifyFailed("the written file has other top-level keys than the stripped checkpoint")
    for (key, want), (_key, got) in zip(expected.items(), obj.items(), strict=True):
        if strip.describe(got) != strip.describe(want):
            raise VerifyFailed(f"key {_printable(key)} reads back as {strip.describe(got)}")
    if layout is None:
        _compare_tensors(expected, obj)
        _check_records(written, structure.archive, [r.name for r in structure.archive.records])
        return
    if structure.pickle != layout.pickle:
        raise VerifyFailed("the written file's pickle is not the one that was written")
    if structure.storages != layout.storages:
        raise VerifyFailed(f"the written file names {len(structure.storages)} storages, "
                           f"{len(layout.storages)} were written, or their sizes differ")
    _check_records(written, structure.archive, layout.from_memory, layout.copied_at, source)


def _printable(key: Any) -> str:
    try:
        return ascii(key)[:80]
    except ValueError:  # an int of more digits than str() allows
        return f"<{type(key).__name__}>"


def _compare_tensors(expected: Any, back: Any) -> None:
    a, b = list(strip.walk_tensors(expected)), list(strip.walk_tensors(back))
    if len(a) != len(b):
        raise VerifyFailed(f"{len(b)} tensors read back, {len(a)} were written")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if _layout(x) != _layout(y):
            raise VerifyFailed(f"tensor #{i} differs after the write: {_layout(y)} != {_layout(x)}")


_CHUNK = 256 << 10  # L2-sized


def _check_records(written: Path, archive: zipread.Archive, from_memory: list[str],
                   copied_at: Sequence[tuple[int, int, zipread.Record]] = (),
                   source_path: Path | None = None) -> None:
    """Read back what was written from memory (its CRC-32) and what was copied (all of it)."""
    if copied_at and source_path is None:
        raise ValueError("verify needs the source to compare the copied records with")
    fd = os.open(written, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    src = -1
    try:
        if source_path is not None and copied_at:
            try:
                src, _facts = source.open_regular(source_path)
            except CheckpointError:
                raise SourceChanged("changed while stripping (the file was removed or replaced "
                                    "before its copied records were compared)") from None
        for name in from_memory:
            rec = archive.by_name.get(name)
            if rec is None:
                raise VerifyFailed(f"the written file lacks its record {name!r}")
            try:
                zipread.read_record(fd, rec)
            except CheckpointError as e:
                raise VerifyFailed(f"the written file fails its checksums: {e.message}") from None
        by_header = {r.header_offset: r for r in archive.records}
        for header, size, src_rec in copied_at:
            rec = by_header.get(header)
            if rec is None or rec.size != size or src_rec.size != size:
                raise VerifyFailed(f"no zip record where one was copied (offset {header})")
            if rec.crc != src_rec.crc:
                raise VerifyFailed(f"the record {rec.name!r} copied from the source has "
                                   "another CRC-32 in the new central directory")
            # (the source's bytes matched this CRC-32 when the save copied them: zipwrite)
            for start in range(0, size, _CHUNK):
                n = min(_CHUNK, size - start)
                got = os.pread(fd, n, rec.data_offset + start)
                if got != os.pread(src, n, src_rec.data_offset + start):
                    raise VerifyFailed("a weight record copied from the source reads back with "
                                       f"other bytes (at offset {rec.data_offset + start})")
    except OSError as e:
        raise VerifyFailed(f"the written file cannot be read back: {e}") from None
    finally:
        os.close(fd)
        if src >= 0:
            os.close(src)


def _layout(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t.requires_grad,
            t.untyped_storage().nbytes())


def estimate_size(obj: Any) -> int:
    """Bytes a save would take: the distinct storages plus zip and pickle overhead (approximate)."""
    _count, total, _ = strip.tensor_bytes(strip.walk_tensors(obj))
    storages = {strip.storage_key(t) for t in strip.walk_tensors(obj)}
    return total + 64 * 2 * (len(storages) + 6) + 200 * len(storages) + 4096


def _epoch(value: Any) -> int | None:
    # an epoch of 10**5000 is a value, not a count of epochs: not reported (nor printed)
    return value if type(value) is int and abs(value) < 1 << 63 else None


def inspect_file(path: Path, *, need: source.Need = source._no_cap) -> dict[str, Any]:
    """Where the bytes go: per top-level key, its type, tensors, bytes and dtypes."""
    with _gc_paused():
        loaded = safeload.load(Path(path), need=need)
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
        keys.append({"key": _printable(key) if not isinstance(key, str) else key[:200],
                     "type": strip.describe(value), "tensors": count, "bytes": nbytes,
                     "dtypes": sorted(dtypes)})
    report: dict[str, Any] = {
        "path": str(path), "format": loaded.format, "bytes": loaded.facts.size,
        "profile": profile, "keys": keys, "epoch": _epoch(obj.get("epoch")),
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
