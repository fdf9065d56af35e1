"""What a strip would leave of one checkpoint, from the safe loader's structure pass alone.

It owns the estimate `scan` reports: the file is opened and scanned like any source, unpickled
with weight-less (meta) storages, detected and stripped; the result is pickled for real (its
exact size) and laid out the way the zip writer lays it out: the records a strip keeps are the
source's own spans, copied; converted weights are new records of their converted size. No weight
is ever read. Imports torch: worker processes only.
"""

from __future__ import annotations

import collections
import datetime
import io
import pickle
from typing import Any

import torch

from ckpt_watchd.engine import checkpoint, safeload, source, standin, strip, zipread, zipwrite
from ckpt_watchd.errors import CheckpointError

# Per record the writer adds a local header (30 bytes + name + its padding extra field, which
# aligns the data to 64: 32 bytes on average) and a central entry (46 bytes + name).
_PER_RECORD = 30 + 4 + 32 + 46
_END = 22 + 56 + 20  # the end record, and the zip64 end record and locator when needed
_SMALL = (".format_version", ".storage_alignment", "byteorder", "version",
          ".data/serialization_id")


def estimate_file(path: str, *, need: source.Need = source._no_cap,
                  opened: source.Opened | None = None) -> dict[str, Any]:
    """{profile, stripped, bytes, bytes_after} for one checkpoint file; CheckpointError if bad.

    `opened`: the file as `source.open_checkpoint(path, structure_only=True)` opened it (this
    closes it); by default it is opened here."""
    if opened is None:
        opened = source.open_checkpoint(path, need=need, structure_only=True)
    try:
        facts = opened.facts
        meta: dict[str, torch.UntypedStorage] = {}

        def make(rec: zipread.Record, nbytes: int) -> torch.UntypedStorage:
            untyped: Any = torch.UntypedStorage
            s: torch.UntypedStorage = untyped(nbytes, device="meta")
            meta[rec.key] = s
            return s

        storages = safeload._Storages(opened.archive.storages(), make)
        obj = safeload._unpickle(opened.pickle, storages)
        profile = strip.detect_profile(obj, opened.scan.globals)
        if strip.is_stripped(obj, profile):
            return {"profile": profile, "stripped": True, "bytes": facts.size,
                    "bytes_after": facts.size}
        now = datetime.datetime.now(datetime.timezone.utc)
        stripped = strip.strip(obj, profile, now=now)
        return {"profile": profile, "stripped": False, "bytes": facts.size,
                "bytes_after": _layout(stripped, opened, meta)}
    finally:
        opened.close()


def _layout(obj: Any, opened: source.Opened, meta: dict[str, torch.UntypedStorage]) -> int:
    """Bytes of the file the writer would write for `obj` (see zipwrite.save)."""
    by_cdata = {s._cdata: key for key, s in meta.items()}
    records = opened.archive.storages()
    kept: dict[int, zipread.Record] = {}
    new: dict[int, tuple[str, int]] = {}

    def key_of(s: Any) -> str:
        # as the writer keys them: a kept record keeps its name, a new one takes a fresh number
        c = s._cdata
        if c in kept:
            return kept[c].key
        if c in new:
            return new[c][0]
        key = by_cdata.get(c)
        if key is not None and records[key].size == s.nbytes():
            kept[c] = records[key]
            return key
        fresh = str(len(new))
        while fresh in records:
            fresh = str(int(fresh) + len(records))
        new[c] = (fresh, s.nbytes())
        return fresh

    data = _pickle_size(obj, key_of, opened)
    prefix = len(opened.archive.prefix)
    total = _END + len(_SMALL) * (_PER_RECORD + 2 * prefix + 24)
    total += data + _PER_RECORD + 2 * (prefix + len("data.pkl"))
    for key, nbytes in new.values():
        total += nbytes + _PER_RECORD + 2 * (prefix + len("data/") + len(key))
    for run in zipwrite.plan_runs(kept.values()):
        # a run of kept records is the source's own bytes (headers, data, descriptors), copied,
        # placed at the source's alignment; its central entries are written anew
        total += run[-1].span_end - run[0].header_offset + 32
        total += sum(46 + len(r.name) for r in run)
    return total


def _pickle_size(obj: Any, key_of: Any, opened: source.Opened) -> int:
    """The exact size of the pickle a save would write (same pickler, protocol, persistent ids);
    `key_of` sees every storage the pickle names, as the writer's does."""
    def persistent_id(o: Any) -> Any:
        if isinstance(o, torch.storage.TypedStorage):
            return ("storage", o._pickle_storage_type(),  # type: ignore[no-untyped-call]
                    key_of(o._untyped_storage), "cpu", o._size())  # type: ignore[no-untyped-call]
        if isinstance(o, torch.UntypedStorage):
            return ("storage", "UntypedStorage", key_of(o), "cpu", o.nbytes())
        return None

    buf = io.BytesIO()
    dispatch = {**zipwrite._DISPATCH, torch.Tensor: _reduce_tensor,
                torch.nn.Parameter: _reduce_parameter}
    with standin.importable() as fast:
        pickler: Any = (pickle.Pickler if fast else standin.StandInPickler)(
            buf, protocol=checkpoint.output_protocol(opened.scan))
        pickler.persistent_id = persistent_id
        pickler.dispatch_table = dispatch
        try:
            pickler.dump(obj)
        except (pickle.PicklingError, RecursionError, TypeError) as e:
            raise CheckpointError(f"cannot estimate the stripped size: {e}") from None
    return buf.tell()


# A meta tensor reduces to a storage-less rebuild; these reduce it as torch reduces a CPU tensor
# (the same callable, the same arguments), so the pickle names its storage and is of the size
# the writer's would be.
def _reduce_tensor(t: torch.Tensor) -> tuple[Any, ...]:
    typed = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
        wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True)
    return (torch._utils._rebuild_tensor_v2,
            (typed, t.storage_offset(), tuple(t.size()), t.stride(), t.requires_grad,
             collections.OrderedDict()))


def _reduce_parameter(p: torch.nn.Parameter) -> tuple[Any, ...]:
    return (torch._utils._rebuild_parameter,
            (p.data, p.requires_grad, collections.OrderedDict()))
