"""accelerate `save_state`: a state folder, thinned to the model files (`save_model`'s output).

Discovery: a folder with `model*.safetensors` or `pytorch_model*.bin` beside `optimizer*.bin`,
or with the `random_states_<rank>.pkl` every `save_state` writes (so DeepSpeed and FSDP state
folders are found and reported); never a transformers `checkpoint-N/` (its `trainer_state.json`
says so). The unit is the folder, the run its parent; a trailing number in its name
(`checkpoint_3`, `step_2`) is its place in the series named by the rest. Nothing is unpickled,
and `plan` changes nothing.

Removed (`save_accelerator_state` writes them for resuming only): `optimizer.bin` and
`optimizer_<i>.bin`, `scheduler.bin` and `scheduler_<i>.bin`, the dataloader's `sampler*.bin`
and `dl_state_dict*.bin`, `scaler.pt`, `random_states_<rank>.pkl`; the optimizer files last, so
discovery still sees the folder until its strip is complete. Kept byte-identical: the model
files `model.safetensors`, `model_<i>.safetensors`, `pytorch_model.bin`, `pytorch_model_<i>.bin`.
Kept and reported as of unknown purpose: everything else, notably `custom_checkpoint_<i>.pkl`
(what `register_for_checkpointing` saved: it may be an EMA or anything else) and subfolders
(a save-state hook's models). `load_state` needs the removed files; `from_pretrained` or
`load_checkpoint_in_model` read what is kept.

Not supported, left untouched: DeepSpeed (`pytorch_model/`, `latest`, `zero_to_fp32.py`: with
ZeRO-3 the weights may exist only in the optimizer-side shards), FSDP (`pytorch_model_fsdp*`,
`optimizer_<i>/`, `*_rank<r>.bin`), Megatron-LM (`iter_*/`, `latest_checkpointed_iteration.txt`),
and a folder with the optimizer side but no model file. Incomplete, left untouched: an empty or
torn file to remove (each must be a complete torch zip) or model file (a `*.safetensors` must end
exactly where its header says), or no `random_states_<rank>.pkl` (written after the optimizer).
"""

from __future__ import annotations

import re
from pathlib import Path

from ckpt_watchd.engine.profiles import common, files

NAME = "accelerate"
KIND = common.FOLDER

_MODEL = re.compile(r"model(_\d+)?\.safetensors|pytorch_model(_\d+)?\.bin")
_OPTIMIZER = re.compile(r"optimizer(_\d+)?\.bin")
_RNG = re.compile(r"random_states_\d+\.pkl")
_REMOVE = re.compile(r"(optimizer|scheduler|sampler|dl_state_dict)(_\d+)?\.bin|scaler\.pt|"
                     + _RNG.pattern)
_SERIES = re.compile(r"(.*?)[-_]?(\d+)")
# (regex, is a folder or None for either, what it is)
_UNSUPPORTED = (
    (re.compile(r"pytorch_model(_\d+)?|global_step\d+"), True, "a DeepSpeed"),
    (re.compile(r"latest|zero_to_fp32\.py"), False, "a DeepSpeed"),
    (re.compile(r"pytorch_model_fsdp.*"), None, "an FSDP"),
    (re.compile(r"optimizer_\d+"), True, "an FSDP"),
    (re.compile(r".+_rank\d+\.bin"), False, "an FSDP"),
    (re.compile(r"iter_\d+"), True, "a Megatron-LM"),
    (re.compile(r"latest_checkpointed_iteration\.txt"), False, "a Megatron-LM"),
)


def discover(look: common.Look) -> common.Found | None:
    files = {n for n, is_dir in look.entries.items() if not is_dir}
    if "trainer_state.json" in files:
        return None  # a transformers checkpoint (its FSDP layout also has optimizer.bin)
    model = any(_MODEL.fullmatch(n) or n.startswith("pytorch_model_fsdp") for n in files)
    optimizer = any(_OPTIMIZER.fullmatch(n) for n in files)
    if not (model and optimizer) and not any(_RNG.fullmatch(n) for n in files):
        return None
    m = _SERIES.fullmatch(look.name)
    unit = common.Unit(str(look.rel), common.FOLDER, NAME,
                       series=(m.group(1) or "state") if m else None,
                       index=(int(m.group(2)),) if m else ())
    return common.Found(common.parent_of(look), (unit,))


def plan(folder: Path) -> common.FolderPlan:
    entries = files.entries(folder)
    names = sorted(entries)
    for name in names:
        for regex, is_dir, what in _UNSUPPORTED:
            if regex.fullmatch(name) and is_dir in (None, entries[name] == "dir"):
                return common.FolderPlan(unsupported=f"{what} state folder ({name}): its "
                                         "weights may live in the optimizer-side files")
    regular = [n for n in names if entries[n] == "file"]
    # the optimizer goes last: until then discovery still knows the folder for a replay
    remove = tuple(sorted((n for n in regular if _REMOVE.fullmatch(n)),
                          key=lambda n: (_OPTIMIZER.fullmatch(n) is not None, n == "optimizer.bin", n)))
    keep = tuple(n for n in regular if _MODEL.fullmatch(n))
    unknown = tuple(n + ("/" if entries[n] == "dir" else "") for n in names
                    if n not in remove and n not in keep)
    if remove and not keep:
        return common.FolderPlan(unsupported="no model file beside the optimizer state")
    facts: dict[str, tuple[int, int, int]] = {}
    problem = None
    for name in (*remove, *keep, *(n for n in unknown if entries.get(n) == "file")):
        kind = (None if name not in remove and name not in keep
                else files.SAFETENSORS if name.endswith(".safetensors") else files.ZIP)
        fact, why = files.check(folder, name, kind)
        if fact is not None:
            facts[name] = fact
        problem = problem or why
    if problem is None and remove and not any(_RNG.fullmatch(n) for n in remove):
        problem = ("no random_states_<rank>.pkl (save_state writes it after the optimizer): "
                   "a save that did not finish")
    return common.FolderPlan(remove, keep, unknown, facts, incomplete=problem)
