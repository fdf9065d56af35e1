"""Ultralytics YOLOv8/11: `runs/<task>/<name>/weights/*.pt`, stripped as its 8.4 `strip_optimizer`.

Discovery: its weights folders are found by the YOLOv5 profile's weights-folder rule (the same
layout and names, told apart by the pickle). Detection: the pickle names `ultralytics.*` classes.
Strip (utils/torch_utils.py): `model` <- `ema` (when it is a model); `model.args` a plain dict,
`criterion` None; FP16, `requires_grad` off; `optimizer`, `best_fitness`, `ema`, `updates`,
`scaler`, `stopper` None; `epoch` -1; `train_args` without runtime-only keys (those outside the
default configuration, e.g. `save_dir`); `date`, `version`, `license`, `docs` first. As in the
trainer (`{**metadata, **ckpt}`), values already in the file win; fresh ones only fill gaps.
"""

from __future__ import annotations

import argparse
import datetime
import types
from typing import Any

from ckpt_watchd.engine.profiles import common
from ckpt_watchd.engine.standin import StandIn
from ckpt_watchd.errors import UnrecognisedLayout

NAME = "ultralytics"
KIND = common.FILE

_NONE = ("optimizer", "best_fitness", "ema", "updates", "scaler", "stopper")
_META = ("date", "version", "license", "docs")
_META_DEFAULTS = {
    "license": "AGPL-3.0 (https://ultralytics.com/license)",
    "docs": "https://docs.ultralytics.com",
}
# The keys of Ultralytics 8.4's default configuration (ultralytics/cfg/default.yaml); `train_args`
# keeps only these, as the trainer's own strip does (it drops runtime keys such as `save_dir`).
ULTRALYTICS_CFG_KEYS = frozenset({
    "task", "mode", "model", "data", "epochs", "time", "patience", "batch", "imgsz", "save",
    "save_period", "cache", "device", "workers", "project", "name", "exist_ok", "pretrained",
    "cls_remap", "optimizer", "verbose", "seed", "deterministic", "single_cls", "rect", "cos_lr",
    "close_mosaic", "resume", "amp", "fraction", "profile", "freeze", "multi_scale", "compile",
    "channels_last", "overlap_mask", "mask_ratio", "dropout", "val", "split", "save_json", "conf", "iou",
    "max_det", "quantize", "dnn", "plots", "nms", "source", "vid_stride", "stream_buffer", "visualize",
    "augment", "agnostic_nms", "classes", "retina_masks", "embed", "show", "save_frames", "save_txt",
    "save_conf", "save_crop", "show_labels", "show_conf", "show_boxes", "line_width", "format",
    "optimize", "dynamic", "simplify", "opset", "workspace", "lr0", "lrf", "momentum", "weight_decay",
    "warmup_epochs", "warmup_momentum", "warmup_bias_lr", "distill_model", "dis", "box", "cls", "cls_pw",
    "dfl", "pose", "kobj", "rle", "angle", "dlog", "dgrad", "dlam", "nbs", "hsv_h", "hsv_s", "hsv_v",
    "degrees", "translate", "scale", "shear", "perspective", "flipud", "fliplr", "bgr", "mosaic",
    "mixup", "cutmix", "copy_paste", "copy_paste_mode", "auto_augment", "erasing", "cfg", "tracker",
    "int8", "half", "keras", "batch_size", "line_thickness", "hide_labels", "hide_conf", "boxes",
})


def discover(look: common.Look) -> common.Found | None:
    return None  # the YOLOv5 profile's weights-folder rule finds Ultralytics' folders too


def detect(obj: dict[Any, Any], globals_seen: frozenset[str]) -> bool:
    modules = {g.rsplit(".", 1)[0] for g in globals_seen}
    return any(m == "ultralytics" or m.startswith("ultralytics.") for m in modules) and (
        "ema" in obj or "model" in obj)


def is_stripped(obj: dict[Any, Any]) -> bool:
    return obj.get("epoch") == -1 and obj.get("optimizer") is None


def strip(ckpt: dict[Any, Any], *, now: datetime.datetime, half: bool = False) -> dict[Any, Any]:
    x = dict(ckpt)
    ema = x.get("ema")
    if common.present(ema):
        if not common.is_module(ema):
            raise UnrecognisedLayout(f"unrecognised checkpoint layout: 'ema' is a "
                                     f"{common.describe(ema)}, not a model")
        x["model"] = ema
    model = x.get("model")
    if not common.is_module(model):
        raise UnrecognisedLayout("unrecognised checkpoint layout: Ultralytics file without a model")
    attrs = getattr(model, "__dict__", {})
    if "args" in attrs:
        attrs["args"] = _as_plain_dict(attrs["args"])
    if "criterion" in attrs:
        attrs["criterion"] = None
    common.half_module(model, head_attrs=("stride", "anchors", "strides"))
    common.freeze(model)
    for k in _NONE:
        x[k] = None
    x["epoch"] = -1
    if isinstance(x.get("train_args"), dict):
        x["train_args"] = {k: v for k, v in x["train_args"].items() if k in ULTRALYTICS_CFG_KEYS}
    # `{**metadata, **x}`: the four metadata keys come first; values already in the file win.
    fresh = {"date": now.isoformat(), "version": x.get("version"), **_META_DEFAULTS}
    meta = {k: x.pop(k) if k in x else fresh[k] for k in _META}
    return {**meta, **x}


def _as_plain_dict(args: Any) -> Any:
    if isinstance(args, dict):
        return dict(args)
    if isinstance(args, (StandIn, types.SimpleNamespace, argparse.Namespace)):
        return dict(vars(args))
    return args
