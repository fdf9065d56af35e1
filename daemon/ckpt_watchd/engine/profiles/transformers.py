"""transformers `Trainer`: a `checkpoint-N/` folder, thinned to what `save_only_model=True` writes.

Discovery: a folder named `checkpoint-<N>` (the unit; its parent, the `output_dir`, is the run;
series "checkpoint", index (N,)) holding `trainer_state.json`, which `_save_checkpoint` writes
last. One that holds the trainer's other files but no `trainer_state.json` is what a kill
mid-save leaves: reported as incomplete, never a unit. Nothing here is unpickled, and nothing
in the folder is changed by `plan`.

Removed (what `_save_optimizer_and_scheduler`, `_save_scaler` and `_save_rng_state` write, and
`save_only_model` skips): `optimizer.pt`, `scheduler.pt`, `scaler.pt`, `rng_state.pth` and the
per-process `rng_state_<rank>.pth`. Resuming then starts a fresh optimizer and scheduler, as it
does from a `save_only_model` checkpoint. Kept byte-identical (what `save_model` and the state
save write, `save_only_model` or not): the weights (`*.safetensors`, `pytorch_model*.bin`,
`adapter_model.bin`, their `*.index.json`), `training_args.bin`, `trainer_state.json`, the
configs and the tokenizer or processor files (`*.json`, `*.txt`, `*.model`, `*.jinja`,
`README.md`, remote-code `*.py`). Anything else is kept and reported as of unknown purpose.

Not supported, left untouched: DeepSpeed (`global_step*/`, `latest`, `zero_to_fp32.py`: under
ZeRO-3 the weights may exist only in those optimizer-side shards), FSDP (`pytorch_model_fsdp*`,
`optimizer*.bin`, `optimizer_<i>/`), XLA FSDP (`rank*-of-*-*`), SageMaker MP (`user_content.pt`,
`optimizer.pt_*`), and a folder with the optimizer side but no weights file.

Incomplete, left untouched: no `trainer_state.json`, the JIT checkpoint's
`checkpoint-is-incomplete.txt`, an empty or torn file to remove (each must be a complete torch
zip) or to keep (a `*.safetensors` whose header does not end exactly at the file's end, a JSON
file that does not parse, a torch zip without its central directory, a shard the index names
that is not there).
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from pathlib import Path

from ckpt_watchd.engine import zipread
from ckpt_watchd.engine.profiles import common
from ckpt_watchd.errors import NotACheckpoint, TornWrite

NAME = "transformers"
KIND = common.FOLDER

STATE = "trainer_state.json"
SENTINEL = "checkpoint-is-incomplete.txt"  # the JIT checkpoint's marker while it saves
_FOLDER = common.numbered("checkpoint-")
_REMOVE = re.compile(r"optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth")
_WEIGHTS = re.compile(r".+\.safetensors|pytorch_model.*\.bin|adapter_model\.bin")
_TORCH_ZIP = re.compile(r"pytorch_model.*\.bin|adapter_model\.bin|training_args\.bin")
_KEEP = re.compile(r".+\.(json|safetensors|txt|model|jinja|py)|README\.md|pytorch_model.*\.bin|"
                   r"adapter_model\.bin|training_args\.bin")
# names only the Trainer writes (after the model): a checkpoint-N/ without trainer_state.json
# that holds one is a save a kill cut short, not someone's exported model
_OURS = re.compile(r"training_args\.bin|" + _REMOVE.pattern)
_ACCELERATE = re.compile(r"random_states_\d+\.pkl")  # an accelerate state folder named like ours
# (regex, is a folder or None for either, what it is)
_UNSUPPORTED = (
    (re.compile(r"global_step\d+"), True, "a DeepSpeed"),
    (re.compile(r"latest|zero_to_fp32\.py"), False, "a DeepSpeed"),
    (re.compile(r"pytorch_model_fsdp.*"), None, "an FSDP"),
    (re.compile(r"optimizer.*\.bin"), False, "an FSDP"),
    (re.compile(r".*optimizer.*"), True, "an FSDP"),
    (re.compile(r"rank\d+-of-\d+-.+"), False, "an XLA FSDP"),
    (re.compile(r"user_content\.pt|optimizer\.pt_.+"), False, "a SageMaker model parallel"),
)
_JSON_LIMIT = 64 << 20  # configs, tokenizers, indexes; larger ones are only checked non-empty
_HEADER_LIMIT = 100 << 20  # the safetensors library's own limit
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO never blocks
_OWN = ".ckpt-watchd-"  # the daemon's own names (a strip's journal): never the trainer's


def discover(look: common.Look) -> common.Found | None:
    m = _FOLDER.fullmatch(look.name)
    if m is None:
        return None
    files = {n for n, is_dir in look.entries.items() if not is_dir}
    rel = str(look.rel)
    if STATE in files:
        unit = common.Unit(rel, common.FOLDER, NAME, series="checkpoint", index=(int(m.group(1)),))
        return common.Found(common.parent_of(look), (unit,))
    if any(_OURS.fullmatch(n) for n in files) and not any(_ACCELERATE.fullmatch(n) for n in files):
        return common.Found(common.parent_of(look), (), incomplete=(rel,))
    return None


def plan(folder: Path) -> common.FolderPlan:
    entries = _entries(folder)
    names = sorted(entries)
    for name in names:
        for regex, is_dir, what in _UNSUPPORTED:
            if regex.fullmatch(name) and is_dir in (None, entries[name] == "dir"):
                return common.FolderPlan(unsupported=f"{what} checkpoint ({name}): its "
                                         "weights may live in the optimizer-side files")
    files = [n for n in names if entries[n] == "file"]
    remove = tuple(n for n in files if _REMOVE.fullmatch(n))
    keep = tuple(n for n in files if n not in remove and _KEEP.fullmatch(n))
    unknown = tuple(n + ("/" if entries[n] == "dir" else "") for n in names
                    if n not in remove and n not in keep)
    if remove and not any(_WEIGHTS.fullmatch(n) for n in keep):
        return common.FolderPlan(unsupported="no model weights file beside the optimizer state")
    facts: dict[str, tuple[int, int, int]] = {}
    problem = None
    for name in (*remove, *keep, *(n for n in unknown if entries.get(n) == "file")):
        fact, why = _check(folder, name, removing=name in remove, known=name in keep)
        if fact is not None:
            facts[name] = fact
        problem = problem or why
    if problem is None and SENTINEL in entries:
        problem = f"{SENTINEL} is there: the trainer's JIT checkpoint did not finish"
    if problem is None and STATE not in keep:
        problem = f"{STATE} is missing (the trainer writes it last): a save that did not finish"
    if problem is None:
        problem = _missing_shards(folder, keep)
    return common.FolderPlan(remove, keep, unknown, facts, incomplete=problem)


def _entries(folder: Path) -> dict[str, str]:
    """Name -> "file", "dir" or "other" (symlinks, FIFOs: never followed); none of our own."""
    out = {}
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith(_OWN):
                continue
            kind = "other"
            if e.is_dir(follow_symlinks=False):
                kind = "dir"
            elif e.is_file(follow_symlinks=False):
                kind = "file"
            out[e.name] = kind
    return out


def _check(folder: Path, name: str, *, removing: bool, known: bool
           ) -> tuple[tuple[int, int, int] | None, str | None]:
    """(inode, size, mtime_ns) of the file, and why it looks unfinished (None: it does not)."""
    try:
        fd = os.open(folder / name, _OPEN)
    except OSError as e:
        return None, f"{name} cannot be read ({e.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, f"{name} is no longer a regular file"
        fact = (st.st_ino, st.st_size, st.st_mtime_ns)
        zipped = removing or (known and _TORCH_ZIP.fullmatch(name) is not None)
        tensors = known and name.endswith(".safetensors")
        parsed = known and name.endswith(".json")
        if not (zipped or tensors or parsed):
            return fact, None  # a tokenizer's text, a file of unknown purpose: kept as it is
        if st.st_size == 0:
            return fact, f"{name} is empty (0 bytes): a save that did not finish"
        if zipped:
            return fact, _zip_problem(fd, name, st.st_size)
        if tensors:
            return fact, _safetensors_problem(fd, name, st.st_size)
        if st.st_size <= _JSON_LIMIT:
            try:
                json.loads(_pread_all(fd, st.st_size))
            except ValueError:
                return fact, f"{name} does not parse as JSON: a save that did not finish"
        return fact, None
    finally:
        os.close(fd)


def _zip_problem(fd: int, name: str, size: int) -> str | None:
    try:
        zipread.read_archive(fd, size)
    except TornWrite:
        return f"{name} is not a complete torch zip (torn): a save that did not finish"
    except NotACheckpoint as e:
        return f"{name} is not a torch zip ({e.message})"
    return None


def _safetensors_problem(fd: int, name: str, size: int) -> str | None:
    torn = f"{name} is torn: a save that did not finish"
    if size < 8:
        return torn
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > min(size - 8, _HEADER_LIMIT):
        return torn
    try:
        header = json.loads(_pread_all(fd, n, 8))
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


def _missing_shards(folder: Path, keep: tuple[str, ...]) -> str | None:
    """A sharded save's index names every shard: one that is not there was never written."""
    for index in (n for n in keep if n.endswith(".index.json")):
        try:
            fd = os.open(folder / index, _OPEN)
            try:
                size = os.fstat(fd).st_size
                data = json.loads(_pread_all(fd, size)) if size <= _JSON_LIMIT else {}
            finally:
                os.close(fd)
        except (OSError, ValueError):
            continue  # _check has said what is wrong with it
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            continue
        for shard in sorted({v for v in weight_map.values() if isinstance(v, str)}):
            if shard not in keep:
                return f"{shard}, named in {index}, is missing: a save that did not finish"
    return None


def _pread_all(fd: int, size: int, offset: int = 0) -> bytes:
    chunks, at = [], offset
    while at < offset + size:
        chunk = os.pread(fd, min(offset + size - at, 1 << 24), at)
        if not chunk:
            break
        chunks.append(chunk)
        at += len(chunk)
    return b"".join(chunks)
