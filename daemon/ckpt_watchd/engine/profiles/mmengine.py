"""MMEngine: `work_dirs/<config>/{epoch,iter}_<N>.pth`, stripped as its CheckpointHook without optimizer.

Discovery: a work dir holding `last_checkpoint` (the text file CheckpointHook writes after each
save, naming the newest one; 0 bytes after a kill mid-write, which changes nothing here), or,
when there is none (a kill between the first checkpoint and that file), one holding
`epoch_N.pth`/`iter_N.pth` beside a `<YYYYMMDD_HHMMSS>/` folder: the log folder the Runner makes
in every work dir (its config dump is named after the config file, so it is no sign). Units:
`epoch_<N>.pth`, `iter_<N>.pth` (series "epoch"/"iter" at (N,)) and the `best_<metric>_epoch_<N>.pth`
(or `_iter_`) files of `save_best` (already saved without optimizer; the previous best is removed,
never rewritten); the run is that folder. Detection: `state_dict` beside a `meta` dict naming
`mmengine_version` (Runner) or `mmengine` (FlexibleRunner's strategies); `message_hub` is not
required, so a published checkpoint (`meta` and `state_dict` only) is MMEngine's too.
Strip = `CheckpointHook(save_optimizer=False, save_param_scheduler=False)`: `optimizer` and
`param_schedulers` go; `meta`, `state_dict`, `message_hub` and anything else (what a
`before_save_checkpoint` hook added, e.g. EMAHook's `ema_state_dict`) stay, in order, as they are.
"""

from __future__ import annotations

import re
from typing import Any

from ckpt_watchd.engine.profiles import common

NAME = "mmengine"
KIND = common.FILE

_MARKER = "last_checkpoint"
_NUMBERED = re.compile(r"(epoch|iter)_(\d+)\.pth")  # CheckpointHook's default filename_tmpl
_BEST = re.compile(r"best_.+_(?:epoch|iter)_\d+\.pth")  # f'best_{key_indicator}_{ckpt_filename}'
_LOG_FOLDER = re.compile(r"\d{8}_\d{6}")  # Runner.timestamp: time.strftime('%Y%m%d_%H%M%S')
DROP = frozenset({"optimizer", "param_schedulers"})


def discover(look: common.Look) -> common.Found | None:
    numbered = look.files_named(_NUMBERED)
    marked = look.entries.get(_MARKER) is False  # a file: a folder of that name is no sign
    if not marked and not (numbered and look.folders_named(_LOG_FOLDER)):
        return None
    units = [common.Unit(common.rel_of(look, name), common.FILE, NAME,
                         series=m.group(1), index=(int(m.group(2)),))
             for name in numbered if (m := _NUMBERED.fullmatch(name))]
    units += [common.Unit(common.rel_of(look, name), common.FILE, NAME)
              for name in look.files_named(_BEST)]
    if not units:
        return None
    run = str(look.rel) if str(look.rel) != "." else ""
    return common.Found(run, tuple(sorted(units, key=lambda u: u.rel)))


def detect(obj: dict[Any, Any], globals_seen: frozenset[str]) -> bool:
    meta = obj.get("meta")
    return isinstance(meta, dict) and ("mmengine_version" in meta or "mmengine" in meta) and (
        "state_dict" in obj)


def is_stripped(obj: dict[Any, Any]) -> bool:
    return not any(k in obj for k in DROP)


def strip(ckpt: dict[Any, Any], *, now: Any = None, half: bool = False) -> dict[Any, Any]:
    # `half` is ignored: the hook saves the model's dtypes
    return common.drop_keys(ckpt, DROP)
