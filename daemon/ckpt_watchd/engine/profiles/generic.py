"""Generic PyTorch dicts: a checkpoint no trainer profile claims, stripped of its optimizer side.

Discovery: none of its own (it is the fallback for files other profiles found, and for `strip`
on any path). Detection: a dict with weights under a usual key (`state_dict`, `model`,
`model_state_dict`, ...) or a bare state dict. Strip: the optimizer-side keys are dropped
(`optimizer`, `optimizer_states`, `lr_schedulers`, `scheduler`, `scaler`, ...), weights and
metadata kept in order, dtypes kept unless `--half`. A bare state dict has nothing to strip.
"""

from __future__ import annotations

from typing import Any

from ckpt_watchd.engine.profiles import common

NAME = "generic"
KIND = common.FILE

DROP = (
    "optimizer", "optimizers", "optimizer_state", "optimizer_state_dict", "optimizer_states",
    "optim", "opt_state", "lr_scheduler", "lr_schedulers", "scheduler", "schedulers",
    "scheduler_state_dict", "lr_scheduler_state_dict", "scaler", "grad_scaler", "amp",
    "amp_scaler", "scaler_state_dict",
)
WEIGHTS = (
    "state_dict", "model", "model_state_dict", "model_state", "net", "module", "network",
    "weights", "params", "ema", "state_dict_ema", "model_ema", "ema_state_dict",
)


def discover(look: common.Look) -> common.Found | None:
    return None


def detect(obj: dict[Any, Any], globals_seen: frozenset[str]) -> bool:
    return any(k in obj for k in WEIGHTS) or common.is_state_dict(obj)


def is_stripped(obj: dict[Any, Any]) -> bool:
    return all(obj.get(k) is None for k in DROP)


def strip(ckpt: dict[Any, Any], *, now: Any = None, half: bool = False) -> dict[Any, Any]:
    x = common.drop_keys(ckpt, DROP)
    if half:
        for k in WEIGHTS:
            if k in x:
                x[k] = common.half_any(x[k])
        if common.is_state_dict(ckpt):
            x = {k: common.half_tensor(v) for k, v in x.items()}
    return x
