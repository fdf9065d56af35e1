"""Lightning: `lightning_logs/version_<N>/checkpoints/*.ckpt`, stripped as its weights-only save.

Discovery: the `.ckpt` files of a folder named `checkpoints` (Lightning's default
`lightning_logs/version_N/checkpoints/` and a custom `<dir>/checkpoints/`); the run is the folder
holding `checkpoints/` (`version_0`). `epoch=E-step=S[-...].ckpt` (ModelCheckpoint's default name,
`-v1` or metrics after it) is the series "epoch-step" at (E, S); `last.ckpt` and `last-v1.ckpt`
are written again (`save_last`). Detection: Lightning's own keys (`pytorch-lightning_version`, or
`state_dict` with `loops` and `global_step`). Strip = `ModelCheckpoint(save_weights_only=True)`
(`_CheckpointConnector.dump_checkpoint(weights_only=True)`): `callbacks`, `optimizer_states`,
`lr_schedulers` and the precision plugin's state go; that state sits under the plugin's class
`__qualname__` (`MixedPrecision`, `FSDPPrecision`; before 2.2 `MixedPrecisionPlugin`, ...), and
under `native_amp_scaling_state`/`amp_scaling_state` before 1.6. Every other key (epoch,
global_step, loops, hparams, a datamodule's state, what `on_save_checkpoint` added) is kept with
its value and order; tensors are not converted.
"""

from __future__ import annotations

import re
from typing import Any

from ckpt_watchd.engine.profiles import common

NAME = "lightning"
KIND = common.FILE

_FOLDER = "checkpoints"
_SERIES = re.compile(r"epoch=(\d+)-step=(\d+)(?:-.*)?\.ckpt")
_LAST = re.compile(r"last(?:-v\d+)?\.ckpt")
_CKPT = re.compile(r".+\.ckpt")

# The top-level keys only a full save writes (`if not weights_only:` in dump_checkpoint).
_TRAINING_STATE = ("callbacks", "optimizer_states", "lr_schedulers")
# `checkpoint[prec_plugin.__class__.__qualname__] = prec_plugin.state_dict()`, written only when
# that state is not empty: the plugins with a state (a GradScaler's, or apex's) in each release.
# A user's own subclass saves under its own name and is kept (a few floats, never weights):
# guessing by shape could drop a key the user's `on_save_checkpoint` wrote.
_PRECISION_STATE = (
    "MixedPrecision", "FSDPPrecision",  # 2.2 and later
    "MixedPrecisionPlugin", "FSDPPrecisionPlugin", "FSDPMixedPrecisionPlugin",  # 1.9 to 2.1
    "NativeMixedPrecisionPlugin", "ApexMixedPrecisionPlugin",  # 1.6 to 1.9
    "ShardedNativeMixedPrecisionPlugin", "FullyShardedNativeMixedPrecisionPlugin",
    "FullyShardedNativeNativeMixedPrecisionPlugin",
    "native_amp_scaling_state", "amp_scaling_state",  # before 1.6 (torch amp, apex)
)
DROP = frozenset(_TRAINING_STATE + _PRECISION_STATE)


def discover(look: common.Look) -> common.Found | None:
    if look.name != _FOLDER:
        return None
    units = []
    for name in look.files_named(_CKPT):
        series = _SERIES.fullmatch(name)
        units.append(common.Unit(
            common.rel_of(look, name), common.FILE, NAME,
            series="epoch-step" if series else None,
            index=(int(series.group(1)), int(series.group(2))) if series else (),
            rewritten=_LAST.fullmatch(name) is not None))
    if not units:
        return None
    return common.Found(common.parent_of(look), tuple(units))


def detect(obj: dict[Any, Any], globals_seen: frozenset[str]) -> bool:
    return "pytorch-lightning_version" in obj or (
        "state_dict" in obj and "loops" in obj and "global_step" in obj)


def is_stripped(obj: dict[Any, Any]) -> bool:
    return not any(k in obj for k in DROP)


def strip(ckpt: dict[Any, Any], *, now: Any = None, half: bool = False) -> dict[Any, Any]:
    # `half` is ignored: Lightning's weights-only save keeps the model's dtypes
    return common.drop_keys(ckpt, DROP)
