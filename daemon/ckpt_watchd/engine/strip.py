"""The strip transform: what each trainer's `strip_optimizer` does, as a pure function of the object.

It owns profile detection (YOLOv5, Ultralytics, generic), the "already stripped" rule and the strip
itself, applied to an already loaded checkpoint (real torch.nn modules and inert stand-ins alike).
No I/O, no clock: the time for Ultralytics' metadata is an argument. It also owns the tensor walk that
`inspect` and the post-write verification share.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import types
from collections.abc import Iterator
from typing import Any

import torch

from ckpt_watchd.engine.standin import StandIn, class_name
from ckpt_watchd.errors import UnrecognisedLayout

YOLOV5 = "yolov5"
ULTRALYTICS = "ultralytics"
GENERIC = "generic"

# YOLOv5 `strip_optimizer` (utils/general.py): these become None; older releases also had the
# `training_results` and `wandb_id` keys, which are cleared only where present.
_YOLOV5_NONE = ("optimizer", "best_fitness", "ema", "updates")
_YOLOV5_OLD_NONE = ("training_results", "wandb_id")
# Ultralytics 8.4 `strip_optimizer` (utils/torch_utils.py).
_ULTRA_NONE = ("optimizer", "best_fitness", "ema", "updates", "scaler", "stopper")
_ULTRA_META = ("date", "version", "license", "docs")
_ULTRA_META_DEFAULTS = {
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

# Generic checkpoints: the optimizer side that a strip drops, and where the weights live.
GENERIC_DROP = (
    "optimizer", "optimizers", "optimizer_state", "optimizer_state_dict", "optimizer_states",
    "optim", "opt_state", "lr_scheduler", "lr_schedulers", "scheduler", "schedulers",
    "scheduler_state_dict", "lr_scheduler_state_dict", "scaler", "grad_scaler", "amp",
    "amp_scaler", "scaler_state_dict",
)
GENERIC_WEIGHTS = (
    "state_dict", "model", "model_state_dict", "model_state", "net", "module", "network",
    "weights", "params", "ema", "state_dict_ema", "model_ema", "ema_state_dict",
)


# ------------------------------------------------------------------------------ detection


def detect_profile(obj: Any, globals_seen: frozenset[str] = frozenset()) -> str:
    """Which trainer wrote this: by the classes the pickle names, then by its keys."""
    if not isinstance(obj, dict):
        raise UnrecognisedLayout(
            f"unrecognised checkpoint layout: top level is {type(obj).__name__}, not a dict")
    modules = {g.rsplit(".", 1)[0] for g in globals_seen}
    if any(m == "ultralytics" or m.startswith("ultralytics.") for m in modules) and (
        "ema" in obj or "model" in obj
    ):
        return ULTRALYTICS
    if any(m.startswith("models.") for m in modules) and "model" in obj and "epoch" in obj:
        return YOLOV5
    if any(k in obj for k in GENERIC_WEIGHTS) or _is_state_dict(obj):
        return GENERIC
    keys = ", ".join(map(str, list(obj)[:8]))
    raise UnrecognisedLayout(f"unrecognised checkpoint layout (top-level keys: {keys})")


def _is_state_dict(obj: dict[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def is_stripped(obj: dict[Any, Any], profile: str) -> bool:
    """Already what a strip would produce: then the file is never rewritten."""
    if profile in (YOLOV5, ULTRALYTICS):
        return obj.get("epoch") == -1 and obj.get("optimizer") is None
    return all(obj.get(k) is None for k in GENERIC_DROP)


# ------------------------------------------------------------------------------ the strip


def strip(obj: dict[Any, Any], profile: str, *, now: datetime.datetime,
          half: bool = False) -> dict[Any, Any]:
    """Return the stripped checkpoint. Modules are changed in place; the input dict is not reused."""
    if profile == YOLOV5:
        return _strip_yolov5(obj)
    if profile == ULTRALYTICS:
        return _strip_ultralytics(obj, now)
    if profile == GENERIC:
        return _strip_generic(obj, half=half)
    raise UnrecognisedLayout(f"unknown profile {profile!r}")


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, (dict, list, tuple, str)):
        return bool(value)
    return True


def is_module(value: Any) -> bool:
    """A module, real or stood in for: something with nn.Module's `_modules` or `_parameters`.

    Only a module may replace `model` (a string or a state_dict under `ema` must not).
    """
    d = getattr(value, "__dict__", None)
    return isinstance(d, dict) and (isinstance(d.get("_modules"), dict)
                                    or isinstance(d.get("_parameters"), dict))


def _strip_yolov5(ckpt: dict[Any, Any]) -> dict[Any, Any]:
    x = dict(ckpt)
    ema = x.get("ema")
    if _present(ema):  # the trainers test `if x.get('ema')`
        if not is_module(ema):
            raise UnrecognisedLayout(f"unrecognised checkpoint layout: 'ema' is a "
                                     f"{describe(ema)}, not a model")
        x["model"] = ema
    if not is_module(x.get("model")):
        raise UnrecognisedLayout("unrecognised checkpoint layout: 'model' is not a model")
    for k in _YOLOV5_NONE:
        x[k] = None
    for k in _YOLOV5_OLD_NONE:
        if k in x:
            x[k] = None
    x["epoch"] = -1
    model = x["model"]
    # DetectionModel._apply also converts the Detect head's non-buffer tensors
    half_module(model, head_attrs=("stride", "grid", "anchor_grid"))
    freeze(model)
    return x


def _strip_ultralytics(ckpt: dict[Any, Any], now: datetime.datetime) -> dict[Any, Any]:
    x = dict(ckpt)
    ema = x.get("ema")
    if _present(ema):  # the trainers test `if x.get('ema')`
        if not is_module(ema):
            raise UnrecognisedLayout(f"unrecognised checkpoint layout: 'ema' is a "
                                     f"{describe(ema)}, not a model")
        x["model"] = ema
    model = x.get("model")
    if not is_module(model):
        raise UnrecognisedLayout("unrecognised checkpoint layout: Ultralytics file without a model")
    attrs = getattr(model, "__dict__", {})
    if "args" in attrs:
        attrs["args"] = _as_plain_dict(attrs["args"])
    if "criterion" in attrs:
        attrs["criterion"] = None
    half_module(model, head_attrs=("stride", "anchors", "strides"))
    freeze(model)
    for k in _ULTRA_NONE:
        x[k] = None
    x["epoch"] = -1
    if isinstance(x.get("train_args"), dict):
        x["train_args"] = {k: v for k, v in x["train_args"].items() if k in ULTRALYTICS_CFG_KEYS}
    # `{**metadata, **x}`: the four metadata keys come first; values already in the file win.
    fresh = {"date": now.isoformat(), "version": x.get("version"), **_ULTRA_META_DEFAULTS}
    meta = {k: x.pop(k) if k in x else fresh[k] for k in _ULTRA_META}
    return {**meta, **x}


def _strip_generic(ckpt: dict[Any, Any], *, half: bool) -> dict[Any, Any]:
    x = {k: v for k, v in ckpt.items() if k not in GENERIC_DROP}
    if half:
        for k in GENERIC_WEIGHTS:
            if k in x:
                x[k] = _half_any(x[k])
        if _is_state_dict(ckpt):
            x = {k: _half_tensor(v) for k, v in x.items()}
    return x


def _as_plain_dict(args: Any) -> Any:
    if isinstance(args, dict):
        return dict(args)
    if isinstance(args, (StandIn, types.SimpleNamespace, argparse.Namespace)):
        return dict(vars(args))
    return args


# ------------------------------------------------------------------------------ module helpers


def _module_dict(obj: Any) -> dict[str, Any] | None:
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict) and isinstance(d.get("_modules"), dict):
        return d
    return None


def iter_modules(root: Any) -> Iterator[dict[str, Any]]:
    """The `__dict__` of `root` and every submodule (real nn.Module or stand-in), each once."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        m = stack.pop()
        d = _module_dict(m)
        if d is None or id(m) in seen:
            continue
        seen.add(id(m))
        yield d
        stack.extend(reversed([c for c in d["_modules"].values() if c is not None]))


def _half_tensor(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float16:
        return t.half()
    return t


def _half_any(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return _half_tensor(v)
    if isinstance(v, dict):
        return type(v)((k, _half_any(t)) for k, t in v.items())
    if _module_dict(v) is not None:
        half_module(v)
    return v


def half_module(root: Any, head_attrs: tuple[str, ...] = ()) -> None:
    """`model.half()`: floating parameters and buffers to FP16; already-FP16 tensors are not read."""
    with torch.no_grad():
        for d in iter_modules(root):
            params = d.get("_parameters") or {}
            for p in params.values():
                if isinstance(p, torch.Tensor) and p.is_floating_point() and p.dtype != torch.float16:
                    p.data = p.data.half()
            buffers = d.get("_buffers") or {}
            for name, b in list(buffers.items()):
                buffers[name] = _half_tensor(b)
        if head_attrs:
            head = _last_layer(root)
            if head is not None:
                hd = head.__dict__
                for attr in head_attrs:
                    v = hd.get(attr)
                    if isinstance(v, torch.Tensor):
                        hd[attr] = _half_tensor(v)
                    elif isinstance(v, list):
                        hd[attr] = [_half_tensor(t) for t in v]


def _last_layer(root: Any) -> Any:
    d = _module_dict(root)
    seq = d["_modules"].get("model") if d else None
    sd = _module_dict(seq)
    if not sd or not sd["_modules"]:
        return None
    return list(sd["_modules"].values())[-1]


def freeze(root: Any) -> None:
    """`p.requires_grad = False` for every parameter of the model."""
    for d in iter_modules(root):
        for p in (d.get("_parameters") or {}).values():
            if isinstance(p, torch.Tensor):
                p.requires_grad_(False)


# ------------------------------------------------------------------------------ tensor walk


def walk_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `obj`, depth first in a stable order, each object visited once.

    Iterative on purpose: a hostile, deeply nested pickle must not blow the Python stack here.
    """
    seen: set[int] = set()
    stack: list[Any] = [obj]
    tensor = torch.Tensor
    while stack:
        o = stack.pop()
        cls = type(o)
        if cls in _LEAF_TYPES:
            continue
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, tensor):
            yield o
            continue
        children: list[Any]
        if cls is dict or cls is collections.OrderedDict or isinstance(o, dict):
            children = list(o.values())
        elif cls is list or cls is tuple or isinstance(o, (list, tuple)):
            children = list(o)
        elif isinstance(o, (str, bytes, int, float, complex)):
            continue
        elif isinstance(o, (set, frozenset)):
            children = [t for t in o if isinstance(t, tensor)]
        elif isinstance(o, StandIn):
            children = [o.__dict__, o._sw_args, o._sw_items, o._sw_dictitems]
            if not isinstance(o._sw_state, dict):
                children.append(o._sw_state)
        elif isinstance(getattr(o, "__dict__", None), dict):
            children = [o.__dict__]
        else:
            continue
        stack.extend(reversed(children))


# exact types with nothing inside (a subclass takes the slow path: it may carry a __dict__)
_LEAF_TYPES = frozenset({type(None), str, bytes, int, float, bool, complex})


def weights(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors where checkpoints keep weights, found fast: a hint, not an inventory.

    Tensors in containers (dicts, lists, tuples) and the parameters and buffers of every module
    (real or stand-in) reachable through them; other module attributes are not searched. For
    planning which weights a save can copy; anything missed is simply written from memory.
    """
    seen: set[int] = set()
    stack: list[Any] = [obj]
    tensor = torch.Tensor
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, tensor):
            yield o
        elif isinstance(o, dict):
            stack.extend(v for v in o.values() if type(v) not in _LEAF_TYPES)
        elif isinstance(o, (list, tuple)):
            stack.extend(v for v in o if type(v) not in _LEAF_TYPES)
        else:
            d = _module_dict(o)
            if d is not None:
                for slot in ("_parameters", "_buffers", "_modules"):
                    table = d.get(slot)
                    if isinstance(table, dict):
                        stack.extend(v for v in table.values() if v is not None)


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> tuple[int, int, set[str]]:
    """(count, bytes of the distinct storages, dtypes) for a group of tensors."""
    count, total, dtypes = 0, 0, set()
    storages: set[tuple[int, int]] = set()
    for t in tensors:
        count += 1
        dtypes.add(str(t.dtype).removeprefix("torch."))
        key = storage_key(t)
        if key not in storages:
            storages.add(key)
            total += key[1]
    return count, total, dtypes


def describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (dict, list, tuple, str, int, float, bool)):
        return type(value).__name__
    return class_name(value)
