"""The list of trainer profiles, in the order detection asks them.

Add a trainer by adding its module here; nothing else names a profile. Importing this module
does not import torch: the daemon's main process uses it for discovery.
"""

from __future__ import annotations

from types import ModuleType

from ckpt_watchd.engine.profiles import (
    accelerate,
    common,
    generic,
    lightning,
    mmengine,
    timm,
    transformers,
    ultralytics,
    yolov5,
)

# Most specific first: a file is the first profile's whose `detect` says yes; generic is last.
# Lightning, MMEngine and timm files also satisfy generic's `detect`; timm's strip keeps only the
# weights, so it asks after the two whose keys are their own (none of the three overlaps today).
# The folder profiles have no `detect`; their discoveries leave each other's folders alone.
PROFILES: tuple[ModuleType, ...] = (yolov5, ultralytics, lightning, mmengine, timm, generic,
                                    transformers, accelerate)
BY_NAME: dict[str, ModuleType] = {p.NAME: p for p in PROFILES}
FILE_PROFILES = tuple(p for p in PROFILES if p.KIND == common.FILE)
FOLDER_PROFILES = tuple(p for p in PROFILES if p.KIND == common.FOLDER)


def discover(look: common.Look) -> list[common.Found]:
    """What every profile finds in one folder (most folders: nothing)."""
    found = []
    for p in PROFILES:
        f = p.discover(look)
        if f is not None and (f.units or f.incomplete):
            found.append(f)
    return found
