"""YOLOv5: `runs/train/<name>/weights/{last,best,epoch<N>}.pt`, stripped as its `strip_optimizer`.

Discovery: a weights folder matching `--pattern` (default `train/*/weights` and `*/*/weights`,
which also covers Ultralytics' `runs/<task>/<name>/weights`: both trainers' files are told apart
by their pickle, not by their folder); its units are the files matching `--files` (default
`last.pt`, `best.pt` and the save-period snapshots `epoch*.pt`). The run is the weights folder's
parent. Detection: the pickle names YOLOv5's `models.*` classes and has `model` and `epoch`.
Strip (utils/general.py `strip_optimizer`): `model` <- `ema` (when it is a model); `optimizer`,
`best_fitness`, `ema`, `updates` None (and `training_results`, `wandb_id` where present);
`epoch` -1; the model in FP16 with `requires_grad` off; every other key kept in order.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from ckpt_watchd.engine.profiles import common
from ckpt_watchd.errors import UnrecognisedLayout
from ckpt_watchd.watch import paths

NAME = "yolov5"
KIND = common.FILE

_NONE = ("optimizer", "best_fitness", "ema", "updates")
_OLD_NONE = ("training_results", "wandb_id")  # 2021 releases also saved these two
_EPOCH = common.numbered("epoch", ".pt")  # --save-period snapshots (both YOLO trainers)
REWRITTEN = frozenset({"last.pt", "best.pt"})  # written again every epoch (best when it improves)


def discover(look: common.Look) -> common.Found | None:
    if not paths.is_weights_dir(look.rel, look.patterns):
        return None
    units = []
    # every entry named like a checkpoint: a folder, link or FIFO named last.pt is a unit too,
    # which the worker refuses with one clear error (never followed, never opened)
    for name in sorted({*look.entries, *look.other}):
        if not any(fnmatch.fnmatchcase(name, g) for g in look.files):
            continue
        epoch = _EPOCH.fullmatch(name)
        units.append(common.Unit(
            common.rel_of(look, name), common.FILE, NAME,
            series="epoch" if epoch else None,
            index=(int(epoch.group(1)),) if epoch else (),
            rewritten=name in REWRITTEN))
    return common.Found(common.parent_of(look), tuple(units))


def detect(obj: dict[Any, Any], globals_seen: frozenset[str]) -> bool:
    modules = {g.rsplit(".", 1)[0] for g in globals_seen}
    return any(m.startswith("models.") for m in modules) and "model" in obj and "epoch" in obj


def is_stripped(obj: dict[Any, Any]) -> bool:
    return obj.get("epoch") == -1 and obj.get("optimizer") is None


def strip(ckpt: dict[Any, Any], *, now: Any = None, half: bool = False) -> dict[Any, Any]:
    x = dict(ckpt)
    ema = x.get("ema")
    if common.present(ema):  # the trainer tests `if x.get('ema')`
        if not common.is_module(ema):
            raise UnrecognisedLayout(f"unrecognised checkpoint layout: 'ema' is a "
                                     f"{common.describe(ema)}, not a model")
        x["model"] = ema
    if not common.is_module(x.get("model")):
        raise UnrecognisedLayout("unrecognised checkpoint layout: 'model' is not a model")
    for k in _NONE:
        x[k] = None
    for k in _OLD_NONE:
        if k in x:
            x[k] = None
    x["epoch"] = -1
    model = x["model"]
    # DetectionModel._apply also converts the Detect head's non-buffer tensors
    common.half_module(model, head_attrs=("stride", "grid", "anchor_grid"))
    common.freeze(model)
    return x
