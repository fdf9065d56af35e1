"""The strip dispatcher: which profile a loaded checkpoint belongs to, and its strip, by registry.

It names no trainer: detection asks the profiles of `profiles.registry` in order, and each
profile owns its rule (`profiles/<trainer>.py`). Pure on the loaded object: no I/O, no clock (the
time for Ultralytics' metadata is an argument). The tensor walks `inspect` and the verify share
live in `profiles.common` and are re-exported here.
"""

from __future__ import annotations

import datetime
from typing import Any

from ckpt_watchd.engine.profiles import common, registry
from ckpt_watchd.errors import UnrecognisedLayout

describe = common.describe
walk_tensors = common.walk_tensors
weights = common.weights
tensor_bytes = common.tensor_bytes
storage_key = common.storage_key


def detect_profile(obj: Any, globals_seen: frozenset[str] = frozenset()) -> str:
    """Which trainer wrote this: the first file profile whose detection says yes."""
    if not isinstance(obj, dict):
        raise UnrecognisedLayout(
            f"unrecognised checkpoint layout: top level is {type(obj).__name__}, not a dict")
    for p in registry.FILE_PROFILES:
        if p.detect(obj, globals_seen):
            return str(p.NAME)
    keys = ", ".join(_key(k) for k in list(obj)[:8])
    raise UnrecognisedLayout(f"unrecognised checkpoint layout (top-level keys: {keys})")


def _key(k: Any) -> str:
    try:
        return str(k)[:40]
    except ValueError:  # an int with more digits than str() allows
        return f"<{type(k).__name__}>"


def is_stripped(obj: dict[Any, Any], profile: str) -> bool:
    """Already what a strip would produce: then the file is never rewritten."""
    return bool(registry.BY_NAME[profile].is_stripped(obj))


def strip(obj: dict[Any, Any], profile: str, *, now: datetime.datetime,
          half: bool = False) -> dict[Any, Any]:
    """The stripped checkpoint. Modules are changed in place; the input dict is not reused."""
    p = registry.BY_NAME.get(profile)
    if p is None or p.KIND != common.FILE:
        raise UnrecognisedLayout(f"unknown profile {profile!r}")
    out: dict[Any, Any] = p.strip(obj, now=now, half=half)
    return out
