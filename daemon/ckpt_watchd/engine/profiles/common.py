"""What every trainer profile shares: how a profile describes its checkpoints, and the tensor and
module helpers a strip uses on a loaded checkpoint (real torch objects and stand-ins alike).

Importing this module does not import torch (discovery runs in the daemon's main process); the
helpers that touch tensors import it when first called, in a worker. Profiles import this module
(the folder profiles also `files`, their file checks) and nothing else of the package: never one
another, never the dispatcher.
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ckpt_watchd.engine.standin import StandIn, class_name

FILE = "file"  # a unit a strip rewrites (a checkpoint file)
FOLDER = "folder"  # a unit a strip thins (files removed from a checkpoint folder)
SYMLINK = "symlink"  # a Look's `other` kind that is never a trainer's own file


# ------------------------------------------------------------------------------ discovery


@dataclass(frozen=True, slots=True)
class Look:
    """One folder, as discovery sees it: where it is and what it holds. No I/O.

    `entries` maps each name in the folder to True for a folder, False for a regular file.
    `other` maps the rest (never followed, never opened here) to their kind: "symlink", "fifo",
    "socket", "device". A FIFO or device named like a checkpoint is still a unit, so that the
    worker refuses it with one clear error; a symlink is one only where the user named it
    (`--files`): trainers make links themselves (Lightning's `save_last="link"`).
    """

    rel: PurePosixPath  # the folder, relative to the root
    entries: Mapping[str, bool]
    patterns: tuple[str, ...] = ()  # --pattern: YOLO weights folders
    files: tuple[str, ...] = ()  # --files: YOLO checkpoint names (globs)
    other: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.rel.name

    def files_named(self, regex: re.Pattern[str]) -> list[str]:
        """Regular files, and FIFOs or devices, whose names match: a trainer's file names."""
        names = [n for n, is_dir in self.entries.items() if not is_dir]
        names += [n for n, kind in self.other.items() if kind != SYMLINK]
        return sorted(n for n in names if regex.fullmatch(n))

    def folders_named(self, regex: re.Pattern[str]) -> list[str]:
        return sorted(n for n, is_dir in self.entries.items() if is_dir and regex.fullmatch(n))


@dataclass(frozen=True, slots=True)
class Unit:
    """One checkpoint a trainer leaves in a run: a file a strip rewrites or a folder it thins."""

    rel: str  # relative to the root
    kind: str  # FILE or FOLDER
    profile: str  # the profile that found it
    series: str | None = None  # units of one series supersede each other (issue: superseded)
    index: tuple[int, ...] = ()  # its place in the series: a newer one has a larger index
    rewritten: bool = False  # the trainer writes this name again (last.pt): never superseded


@dataclass(frozen=True, slots=True)
class Found:
    """What one folder holds for one profile: the run it belongs to and its units."""

    run: str  # the run folder (the trainer's output folder), relative to the root
    units: tuple[Unit, ...]
    # leftovers of a kill mid-save that are not units (timm's tmp.pth.tar): reported, untouched
    incomplete: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class FolderPlan:
    """What a strip does with one checkpoint folder, as its profile's `plan` found it on disk.

    Names are the folder's own entries. `facts` holds (inode, size, mtime_ns) of each regular
    file as the plan's checks saw it (the fstat of the fd they read): a strip removes a file
    only while it still has these facts. An `incomplete` or `unsupported` folder is left as it is.
    """

    remove: tuple[str, ...] = ()  # the optimizer side, in the order a strip removes it
    keep: tuple[str, ...] = ()  # kept byte-identical: weights, configs, the trainer's state
    unknown: tuple[str, ...] = ()  # kept as well, and reported: files of unknown purpose
    facts: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    incomplete: str | None = None  # why this looks like what a kill mid-save leaves
    unsupported: str | None = None  # why this layout is not one we strip (DeepSpeed, FSDP)


def numbered(prefix: str, suffix: str = "") -> re.Pattern[str]:
    """`prefix<N>suffix`, N captured: checkpoint-500, epoch_3.pth, epoch12.pt."""
    return re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))


def rel_of(look: Look, name: str) -> str:
    return str(look.rel / name) if str(look.rel) != "." else name


def parent_of(look: Look) -> str:
    parent = look.rel.parent
    return "" if str(parent) == "." else str(parent)


# ------------------------------------------------------------------------------ checkpoints


def present(value: Any) -> bool:
    """Truthy the way the trainers test `if x.get('ema')`: None and empty containers are not."""
    if value is None:
        return False
    if isinstance(value, (dict, list, tuple, str)):
        return bool(value)
    return True


def is_module(value: Any) -> bool:
    """A module, real or stood in for: something with nn.Module's `_modules` or `_parameters`."""
    d = getattr(value, "__dict__", None)
    return isinstance(d, dict) and (isinstance(d.get("_modules"), dict)
                                    or isinstance(d.get("_parameters"), dict))


def describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (dict, list, tuple, str, int, float, bool)):
        return type(value).__name__
    return class_name(value)


@functools.cache
def _torch() -> Any:
    import torch  # only ever called in a worker, on a loaded checkpoint

    return torch


def is_tensor(value: Any) -> bool:
    return isinstance(value, _torch().Tensor)


def is_state_dict(obj: Any) -> bool:
    """A dict whose every value is a tensor: a bare state dict."""
    return isinstance(obj, dict) and bool(obj) and all(is_tensor(v) for v in obj.values())


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


def half_tensor(t: Any) -> Any:
    torch = _torch()
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float16:
        return t.half()
    return t


def half_any(v: Any) -> Any:
    """FP16 copies of the floating tensors of a tensor, a dict of tensors or a module (in place)."""
    if is_tensor(v):
        return half_tensor(v)
    if isinstance(v, dict):
        return type(v)((k, half_any(t)) for k, t in v.items())
    if _module_dict(v) is not None:
        half_module(v)
    return v


def half_module(root: Any, head_attrs: tuple[str, ...] = ()) -> None:
    """`model.half()`: floating parameters and buffers to FP16; already-FP16 tensors are not read.

    `head_attrs`: tensors that the model's last layer holds as plain attributes and converts in
    its own `_apply` (YOLO's Detect head: stride, grid, anchors).
    """
    torch = _torch()
    with torch.no_grad():
        for d in iter_modules(root):
            params = d.get("_parameters") or {}
            for p in params.values():
                if isinstance(p, torch.Tensor) and p.is_floating_point() and p.dtype != torch.float16:
                    p.data = p.data.half()
            buffers = d.get("_buffers") or {}
            for name, b in list(buffers.items()):
                buffers[name] = half_tensor(b)
        if head_attrs:
            head = _last_layer(root)
            if head is not None:
                hd = head.__dict__
                for attr in head_attrs:
                    v = hd.get(attr)
                    if isinstance(v, torch.Tensor):
                        hd[attr] = half_tensor(v)
                    elif isinstance(v, list):
                        hd[attr] = [half_tensor(t) for t in v]


def _last_layer(root: Any) -> Any:
    d = _module_dict(root)
    seq = d["_modules"].get("model") if d else None
    sd = _module_dict(seq)
    if not sd or not sd["_modules"]:
        return None
    return list(sd["_modules"].values())[-1]


def freeze(root: Any) -> None:
    """`p.requires_grad = False` for every parameter of the model."""
    torch = _torch()
    for d in iter_modules(root):
        for p in (d.get("_parameters") or {}).values():
            if isinstance(p, torch.Tensor):
                p.requires_grad_(False)


# ------------------------------------------------------------------------------ tensor walks

# exact types with nothing inside (a subclass takes the slow path: it may carry a __dict__)
_LEAF_TYPES = frozenset({type(None), str, bytes, int, float, bool, complex})


def walk_tensors(obj: Any) -> Iterator[Any]:
    """Every tensor reachable from `obj`, depth first in a stable order, each object visited once.

    Iterative on purpose: a hostile, deeply nested pickle must not blow the Python stack here.
    """
    seen: set[int] = set()
    stack: list[Any] = [obj]
    tensor = _torch().Tensor
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


def weights(obj: Any) -> Iterator[Any]:
    """The tensors where checkpoints keep weights, found fast: a hint, not an inventory.

    Tensors in containers (dicts, lists, tuples) and the parameters and buffers of every module
    (real or stand-in) reachable through them; other module attributes are not searched. For
    planning which weights a save can copy; anything missed is simply written from memory.
    """
    seen: set[int] = set()
    stack: list[Any] = [obj]
    tensor = _torch().Tensor
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


def storage_key(t: Any) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def tensor_bytes(tensors: Iterator[Any]) -> tuple[int, int, set[str]]:
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


def drop_keys(ckpt: dict[Any, Any], keys: tuple[str, ...] | frozenset[str]) -> dict[Any, Any]:
    """The checkpoint without `keys`, every other key kept with its value and order."""
    return {k: v for k, v in ckpt.items() if k not in keys}
