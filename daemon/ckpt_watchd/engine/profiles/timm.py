"""timm: `output/train/<name>/*.pth.tar` (its CheckpointSaver), stripped as its `clean_checkpoint.py`.

Discovery: a folder holding `last.pth.tar`, `model_best.pth.tar` or `checkpoint-<N>.pth.tar`;
those files are its units (in the trainer's folder the three names are often hard links to one
file: each name is a unit) and the folder is the run. `checkpoint-N` is the series "checkpoint"
at (N,); `last` and `model_best` are written again. `tmp.pth.tar` (what a kill mid-save leaves,
0-byte or truncated) is never a unit: it is listed as incomplete. Detection: a training
checkpoint's keys: `state_dict` and an `arch` name, with `args`, `version`, `state_dict_ema` or
`metric`. Strip = `clean_checkpoint.py` with its defaults (`load_state_dict(use_ema=True)`, then
`clean_state_dict`): the EMA weights when present (`state_dict_ema`, else `model_ema`), else
`state_dict` (else `model`), as a bare plain dict whose keys lose a `module.` (DDP) and then an
`_orig_mod.` (torch.compile) prefix, then a `module.` once more; everything else goes. (An
empty or non-dict entry there is refused as unrecognised: the script would save it, but a strip
never leaves a file without weights.) A bare state dict, what the script writes, is already
stripped: detection leaves it to the generic profile, which says so too.
"""

from __future__ import annotations

import re
from typing import Any

from ckpt_watchd.engine.profiles import common
from ckpt_watchd.errors import UnrecognisedLayout

NAME = "timm"
KIND = common.FILE

_NUMBERED = common.numbered("checkpoint-", ".pth.tar")  # CheckpointSaver's checkpoint_prefix
REWRITTEN = frozenset({"last.pth.tar", "model_best.pth.tar"})
_SAVED = re.compile(r".+\.pth\.tar")  # CheckpointSaver's extension
_TMP = "tmp.pth.tar"  # written first, then renamed to last.pth.tar
_COMPANIONS = ("args", "version", "state_dict_ema", "metric")
# load_state_dict(use_ema=True): the first of these that holds something
_EMA_KEYS = ("state_dict_ema", "model_ema")
_PLAIN_KEYS = ("state_dict", "model")


def discover(look: common.Look) -> common.Found | None:
    names = look.files_named(_SAVED)
    units = []
    for name in names:
        numbered = _NUMBERED.fullmatch(name)
        if numbered is None and name not in REWRITTEN:
            continue
        units.append(common.Unit(
            common.rel_of(look, name), common.FILE, NAME,
            series="checkpoint" if numbered else None,
            index=(int(numbered.group(1)),) if numbered else (),
            rewritten=name in REWRITTEN))
    if not units:
        return None
    run = str(look.rel) if str(look.rel) != "." else ""
    incomplete = (common.rel_of(look, _TMP),) if _TMP in names else ()
    return common.Found(run, tuple(units), incomplete)


def detect(obj: dict[Any, Any], globals_seen: frozenset[str]) -> bool:
    # `arch` and `state_dict` alone are also what pytorch/examples' ImageNet script saves (with
    # its epoch and best_acc1): such a file goes to the generic profile, which keeps them
    return (isinstance(obj.get("state_dict"), dict) and isinstance(obj.get("arch"), str)
            and any(k in obj for k in _COMPANIONS))


def is_stripped(obj: dict[Any, Any]) -> bool:
    return common.is_state_dict(obj)


def strip(ckpt: dict[Any, Any], *, now: Any = None, half: bool = False) -> dict[Any, Any]:
    # `half` is ignored: the script saves the weights in their own dtypes
    key = next((k for k in _EMA_KEYS if ckpt.get(k) is not None), None)
    if key is None:
        key = next((k for k in _PLAIN_KEYS if k in ckpt), None)
    weights = ckpt[key] if key is not None else ckpt
    if not isinstance(weights, dict) or not weights:
        # the script would save even an empty one; a strip never leaves a file without weights
        what = "an empty dict" if isinstance(weights, dict) else f"a {common.describe(weights)}"
        raise UnrecognisedLayout(
            f"unrecognised checkpoint layout: {key!r} is {what}, not a state dict")
    # two passes, as the script makes them: where cleaned names collide, the same key wins
    cleaned = _without_prefixes(weights, ("module.", "_orig_mod."))  # clean_state_dict
    return _without_prefixes(cleaned, ("module.",))  # clean_checkpoint.py: `k[7:]`


def _without_prefixes(d: dict[Any, Any], prefixes: tuple[str, ...]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in d.items():
        name = k
        for prefix in prefixes:
            if isinstance(name, str) and name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = v
    return out
