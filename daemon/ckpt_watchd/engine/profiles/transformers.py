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
from pathlib import Path

from ckpt_watchd.engine.profiles import common, files

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
    entries = files.entries(folder)
    names = sorted(entries)
    for name in names:
        for regex, is_dir, what in _UNSUPPORTED:
            if regex.fullmatch(name) and is_dir in (None, entries[name] == "dir"):
                return common.FolderPlan(unsupported=f"{what} checkpoint ({name}): its "
                                         "weights may live in the optimizer-side files")
    regular = [n for n in names if entries[n] == "file"]
    remove = tuple(n for n in regular if _REMOVE.fullmatch(n))
    keep = tuple(n for n in regular if n not in remove and _KEEP.fullmatch(n))
    unknown = tuple(n + ("/" if entries[n] == "dir" else "") for n in names
                    if n not in remove and n not in keep)
    if remove and not any(_WEIGHTS.fullmatch(n) for n in keep):
        return common.FolderPlan(unsupported="no model weights file beside the optimizer state")
    facts: dict[str, tuple[int, int, int]] = {}
    problem = None
    for name in (*remove, *keep, *(n for n in unknown if entries.get(n) == "file")):
        fact, why = files.check(folder, name, _kind(name, removing=name in remove,
                                                     known=name in keep))
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


def _kind(name: str, *, removing: bool, known: bool) -> str | None:
    """What a file is checked to be: the torch zips (removed or kept), the weights, the JSON;
    a tokenizer's text or a file of unknown purpose is kept as it is, unchecked."""
    if removing or (known and _TORCH_ZIP.fullmatch(name) is not None):
        return files.ZIP
    if known and name.endswith(".safetensors"):
        return files.SAFETENSORS
    if known and name.endswith(".json"):
        return files.JSON
    return None


def _missing_shards(folder: Path, keep: tuple[str, ...]) -> str | None:
    """A sharded save's index names every shard: one that is not there was never written."""
    for index in (n for n in keep if n.endswith(".index.json")):
        try:
            fd = os.open(folder / index, files.OPEN)
            try:
                size = os.fstat(fd).st_size
                data = json.loads(files.pread_all(fd, size)) if size <= files.JSON_LIMIT else {}
            finally:
                os.close(fd)
        except (OSError, ValueError):
            continue  # files.check has said what is wrong with it
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            continue
        for shard in sorted({v for v in weight_map.values() if isinstance(v, str)}):
            if shard not in keep:
                return f"{shard}, named in {index}, is missing: a save that did not finish"
    return None
