"""The safe loader: unpickle a checkpoint without importing or running anything it names.

It takes what `source.open_checkpoint` checked (the strict zip parse, the data.pkl bytes and their
static scan) and unpickles exactly those bytes with CPython's C unpickler, whose every global goes
through `guards.find` and whose every storage is a record of our own zip parse, mapped from the
file (mmap) so that storages a strip drops are never read. It never calls `torch.load` (whose
legacy and tar paths run code on untrusted files), never follows a symlink, and re-reads nothing:
what was scanned is what is unpickled. `load_structure` reads a freshly written file back with
weight-less storages, for the verify. Imports torch: worker processes and one-shot commands only.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_watchd.engine import guards, opscan, source, standin, zipread
from ckpt_watchd.engine.source import FileFacts, Need, open_regular
from ckpt_watchd.errors import (
    CheckpointError,
    LimitExceeded,
    NotACheckpoint,
    UnreadableFile,
    UnsafePickle,
)

__all__ = ["FileFacts", "Loaded", "Structure", "load", "load_structure", "loads", "open_regular"]

# The unpickler decodes Python 2 strings as torch.load does.
_ENCODING = "utf-8"


class SafeUnpickler(pickle.Unpickler):
    """The C unpickler with the policy's objects for globals and this file's storages."""

    def find_class(self, module: str, name: str) -> Any:
        return guards.find(module, name)


def _element_size(dtype: torch.dtype) -> int:
    size: Any = torch._utils._element_size
    return int(size(dtype))


class _Storages:
    """persistent_load for one file: every storage is exactly one record of the strict parse."""

    def __init__(self, records: dict[str, zipread.Record],
                 make: Callable[[zipread.Record, int], torch.UntypedStorage]) -> None:
        self.records = records
        self.make = make
        self.loaded: dict[str, torch.storage.TypedStorage] = {}
        self.order: list[tuple[str, torch.dtype, int]] = []
        self.untyped: dict[str, torch.UntypedStorage] = {}

    def __call__(self, saved_id: Any) -> Any:
        if type(saved_id) is not tuple or len(saved_id) != 5 or saved_id[0] != "storage":
            raise NotACheckpoint(f"unexpected persistent id {saved_id!r:.80}")
        _kind, stype, key, location, numel = saved_id
        if not isinstance(stype, guards.StorageType) or stype.dtype is None or \
                type(key) is not str or type(location) is not str or type(numel) is not int \
                or numel < 0:
            raise NotACheckpoint(f"unexpected persistent id {saved_id!r:.80}")
        dtype = stype.dtype
        known = self.loaded.get(key)
        if known is not None:
            if known.dtype != dtype:
                raise NotACheckpoint(f"storage {key!r} is read as two dtypes")
            return known
        rec = self.records.get(key)
        nbytes = numel * _element_size(dtype)
        if rec is None or nbytes != rec.size:
            raise NotACheckpoint(f"storage {key!r} claims {nbytes} bytes but its record holds "
                                 f"{rec.size if rec is not None else 'none'}")
        untyped = self.make(rec, nbytes)
        typed = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)  # type: ignore[no-untyped-call]
        self.loaded[key] = typed
        self.untyped[key] = untyped
        self.order.append((key, dtype, nbytes))
        guards.Loading.storages.add(id(typed))
        return typed


def _unpickle(data: bytes, storages: _Storages | None) -> Any:
    unpickler = SafeUnpickler(io.BytesIO(data), encoding=_ENCODING)

    def refuse(saved_id: Any) -> Any:
        raise NotACheckpoint("a persistent id in a pickle that has no storages")

    unpickler.persistent_load = storages if storages is not None else refuse  # type: ignore[method-assign]
    guards.Loading.storages = set()
    try:
        obj = unpickler.load()
    except CheckpointError:
        raise
    except RecursionError:
        raise LimitExceeded("the pickle nests too deeply") from None
    except MemoryError:
        raise LimitExceeded("the pickle needs more memory than its size allows") from None
    except Exception as e:  # the unpickler and torch's rebuilds raise many kinds
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NotACheckpoint(f"corrupt pickle: {msg[:200]}") from None
    finally:
        guards.Loading.storages = set()
    check_loaded(obj)
    return obj


_REAL_DICTS = (collections.OrderedDict, collections.Counter, collections.defaultdict)
_SHADOWED = frozenset(dir(collections.OrderedDict)) | frozenset(dir(types.SimpleNamespace))


def check_loaded(obj: Any) -> None:
    """The runtime check of what BUILD may have written into real objects' own attributes.

    The C unpickler's BUILD writes straight into an instance's `__dict__` when its class has no
    `__setstate__` (an OrderedDict's `_metadata`, a SimpleNamespace's fields): no special names,
    and nothing that shadows the class's methods. Stand-ins check their own state.
    """
    seen: set[int] = set()
    todo = [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        t = type(o)
        if t is dict or t is list or t is tuple:
            todo.extend(o.values() if t is dict else o)
            continue
        if isinstance(o, _REAL_DICTS) or t is types.SimpleNamespace:
            attrs = o.__dict__
            for k in attrs:
                if type(k) is not str or (k.startswith("__") and k.endswith("__")) or (
                        k in _SHADOWED and t is not types.SimpleNamespace):
                    raise UnsafePickle("", why=f"an attribute {k!r} set on a {t.__name__}")
            todo.extend(attrs.values())
            todo.extend(o.values() if isinstance(o, dict) else ())
        elif isinstance(o, standin.StandIn):
            todo.extend((o.__dict__, o._sw_args, o._sw_items or (), o._sw_dictitems or {}))


@dataclass(slots=True)
class Loaded:
    obj: Any
    facts: FileFacts
    format: str
    scan: opscan.Scan
    # data pointer of each storage mapped from the file -> (its record, the storage)
    sources: dict[int, tuple[zipread.Record, Any]] = field(default_factory=dict)

    @property
    def globals_seen(self) -> frozenset[str]:
        return self.scan.globals


def _fd_path(fd: int) -> str:
    # Mapping through /proc/self/fd pins the inode we checked: a rename or symlink swap
    # afterwards cannot make torch map another file.
    return f"/proc/self/fd/{fd}"


def load(path: os.PathLike[str] | str, *, mmap: bool = True,
         opened: source.Opened | None = None, need: Need = source._no_cap) -> Loaded:
    """Load a checkpoint safely; storages stay on disk (mmap) until something reads them."""
    mine = opened is None
    if opened is None:
        opened = source.open_checkpoint(path, need=need)
    try:
        fd, facts = opened.fd, opened.facts
        # the mapping (address space only) and what unpickling a pickle this size may build
        need((facts.size if mmap else facts.real_bytes) + 64 * len(opened.pickle))
        sources: dict[int, tuple[zipread.Record, Any]] = {}
        if mmap:
            overall = torch.UntypedStorage.from_file(_fd_path(fd), False, facts.size)

            def make(rec: zipread.Record, nbytes: int) -> torch.UntypedStorage:
                s: torch.UntypedStorage = overall[rec.data_offset:rec.data_offset + nbytes]
                if nbytes:
                    sources[s.data_ptr()] = (rec, s)
                return s
        else:
            def make(rec: zipread.Record, nbytes: int) -> torch.UntypedStorage:
                data = zipread.read_record(fd, rec)
                untyped: Any = torch.UntypedStorage
                return untyped.from_buffer(data, dtype=torch.uint8) if data else untyped(0)  # type: ignore[no-any-return]

        storages = _Storages(opened.archive.storages(), make)
        obj = _unpickle(opened.pickle, storages)
        return Loaded(obj, facts, "zip", opened.scan, sources)
    finally:
        if mine:
            opened.close()


def loads(data: bytes) -> Any:
    """Unpickle plain bytes (no storages) under the same scan and policy."""
    opscan.scan(data)
    return _unpickle(data, None)


@dataclass(slots=True)
class Structure:
    """A checkpoint read back without its weights (see `load_structure`)."""

    obj: Any
    pickle: bytes
    scan: opscan.Scan
    archive: zipread.Archive
    # each storage as the pickle first names it: (key, dtype, bytes)
    storages: list[tuple[str, torch.dtype, int]]


def load_structure(path: os.PathLike[str] | str) -> Structure:
    """Parse a zip checkpoint strictly, scan its data.pkl and unpickle it with meta storages.

    The same container checks, scan and policy as `load`, and every storage must name a record
    of exactly its size, but no storage is mapped or read: what comes back has the classes, keys,
    values and each tensor's dtype, shape, strides and offset, for comparing a freshly written
    file with what was meant.
    """
    try:
        opened = source.open_checkpoint(path)
    except (UnreadableFile, OSError) as e:
        raise UnreadableFile(f"cannot read back: {e}") from None
    try:
        def make(rec: zipread.Record, nbytes: int) -> torch.UntypedStorage:
            untyped: Any = torch.UntypedStorage
            return untyped(nbytes, device="meta")  # type: ignore[no-any-return]

        storages = _Storages(opened.archive.storages(), make)
        obj = _unpickle(opened.pickle, storages)
        return Structure(obj, opened.pickle, opened.scan, opened.archive, storages.order)
    finally:
        opened.close()
