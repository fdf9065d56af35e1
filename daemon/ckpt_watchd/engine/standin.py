"""Inert stand-ins for the classes a checkpoint names (the trainer's, torch's layers), and their save.

A stand-in records how the pickle built it (NEWOBJ, `copyreg._reconstructor`, or a call a named
rule allows) and its state, and pickles back the same way, so the trainer finds its own class on
load. A stand-in class cannot be called (REDUCE of it is refused), a BUILD on the class itself is
refused, and a BUILD state may not set special attributes. `importable()` lets the fast C pickler
write stand-ins under their original names for the length of one save. No torch here.
"""

from __future__ import annotations

import contextlib
import copyreg
import pickle
import sys
import types
from collections.abc import Iterator
from typing import Any

from ckpt_watchd.errors import UnsafePickle

_MISSING = object()


class _StandInMeta(type):
    """Stand-in classes are built by NEWOBJ (`cls.__new__`), never called."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickle(f"{cls.__module__}.{cls.__qualname__}",
                           role="a class called with REDUCE")


def _check_state_dict(owner: str, state: Any) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise UnsafePickle(owner, why=f"BUILD of {owner} with a {type(state).__name__} state")
    for key in state:
        if type(key) is not str:
            raise UnsafePickle(owner, why="BUILD with a state whose keys are not strings")
        if key.startswith("__") and key.endswith("__"):
            raise UnsafePickle(owner, why=f"BUILD sets the special attribute {key!r}")
    return dict(state)


class StandIn(metaclass=_StandInMeta):
    """An inert object standing for an instance of a class we refuse to import.

    Attribute access works like the original's `__dict__`, and like `nn.Module` for submodules,
    parameters and buffers. `append`/`extend` are properties, so a BUILD state cannot shadow what
    the unpickler calls for list items.
    """

    __slots__ = ("__dict__", "_sw_args", "_sw_dictitems", "_sw_how", "_sw_items", "_sw_state")
    _sw_origin: tuple[str, str] = ("", "")

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        self = object.__new__(cls)
        object.__setattr__(self, "_sw_args", (args, kwargs))
        object.__setattr__(self, "_sw_how", "new")
        object.__setattr__(self, "_sw_state", None)
        object.__setattr__(self, "_sw_items", None)
        object.__setattr__(self, "_sw_dictitems", None)
        return self

    def __setstate__(self, state: Any = _MISSING) -> None:
        if state is _MISSING or not isinstance(self, StandIn):
            # BUILD on the class object: pickle calls cls.__setstate__(state) unbound
            raise UnsafePickle("", why="BUILD on a class, not on an instance")
        owner = f"{type(self).__module__}.{type(self).__qualname__}"
        if isinstance(state, dict):
            object.__setattr__(self, "__dict__", _check_state_dict(owner, state))
            object.__setattr__(self, "_sw_state", {})
        elif isinstance(state, tuple) and len(state) == 2 and (
                state[0] is None or isinstance(state[0], dict)) and isinstance(state[1], dict):
            slots = _check_state_dict(owner, state[1])
            object.__setattr__(self, "__dict__", _check_state_dict(owner, state[0] or {}))
            object.__setattr__(self, "_sw_state", (None, slots))
        else:  # the class's own state format (its __getstate__): kept as it is
            object.__setattr__(self, "_sw_state", state)

    # list/dict subclasses get their items by APPENDS/SETITEMS after the object exists
    def _sw_extend(self, items: Any) -> None:
        if self._sw_items is None:
            object.__setattr__(self, "_sw_items", [])
        self._sw_items.extend(items)

    def _sw_append(self, item: Any) -> None:
        self._sw_extend([item])

    extend = property(lambda self: self._sw_extend)
    append = property(lambda self: self._sw_append)

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._sw_dictitems is None:
            object.__setattr__(self, "_sw_dictitems", {})
        self._sw_dictitems[key] = value

    def __getattr__(self, name: str) -> Any:
        # Mirrors nn.Module.__getattr__ so `model.model[-1]`-style walks work on stand-ins.
        if not name.startswith("_"):
            d = object.__getattribute__(self, "__dict__")
            for slot in ("_parameters", "_buffers", "_modules"):
                table = d.get(slot)
                if isinstance(table, dict) and name in table:
                    return table[name]
        raise AttributeError(f"{type(self).__module__}.{type(self).__qualname__} has no {name!r}")

    def __getitem__(self, index: Any) -> Any:
        # nn.Sequential / nn.ModuleList stand-ins index their submodules
        mods = self.__dict__.get("_modules")
        if isinstance(mods, dict):
            return list(mods.values())[index]
        if self._sw_items is not None:
            return self._sw_items[index]
        raise TypeError(f"{type(self).__qualname__} stand-in is not subscriptable")

    def __iter__(self) -> Iterator[Any]:
        # dict(namespace_like) in Ultralytics' strip means vars(); keep that for IterableSimpleNamespace
        return iter(self.__dict__.items())

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        cls = type(self)
        args, kwargs = self._sw_args
        state = self._current_state()
        items = iter(self._sw_items) if self._sw_items is not None else None
        dictitems = iter(self._sw_dictitems.items()) if self._sw_dictitems is not None else None
        if self._sw_how == "call":  # a rule's call with no arguments (SimpleNamespace's reduce)
            return (cls, tuple(args), state, items, dictitems)
        if self._sw_how == "reconstructor":
            return (copyreg._reconstructor, (cls, object, None), state, items,  # type: ignore[attr-defined]
                    dictitems)
        if kwargs:
            return (copyreg.__newobj_ex__, (cls, tuple(args), kwargs), state, items, dictitems)  # type: ignore[attr-defined]
        return (copyreg.__newobj__, (cls, *args), state, items, dictitems)  # type: ignore[attr-defined]

    def _current_state(self) -> Any:
        raw = self._sw_state
        d = self.__dict__
        if isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[1], dict):
            return (d or None, raw[1])
        if raw is None or isinstance(raw, dict):
            return d if (d or raw is not None) else None
        return raw

    def __repr__(self) -> str:
        return f"<stand-in {type(self).__module__}.{type(self).__qualname__}>"


def made_by(cls: type[StandIn], how: str) -> StandIn:
    """A new, empty stand-in of `cls`, recorded as built by `how` ("call" or "reconstructor")."""
    obj = StandIn.__new__(cls)
    object.__setattr__(obj, "_sw_how", how)
    return obj


_CLASSES: dict[tuple[str, str], type[StandIn]] = {}


def standin_class(module: str, name: str) -> type[StandIn]:
    """One stand-in class per (module, name), so identical globals stay identical objects."""
    key = (module, name)
    cls = _CLASSES.get(key)
    if cls is None:
        made: Any = _StandInMeta(name.rsplit(".", 1)[-1], (StandIn,),
                                 {"__module__": module, "__qualname__": name, "__slots__": (),
                                  "_sw_origin": key})
        _CLASSES[key] = cls = made
    return cls


def is_standin_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, StandIn) and obj is not StandIn


class CallValue:
    """An inert value a named rule allows a call for (`pathlib.PosixPath('runs', 'x')`).

    It keeps the arguments and pickles back as the same call of the real (never called) class.
    """

    __slots__ = ("_sw_args", "_sw_name", "_sw_real")

    def __init__(self, name: str, real: Any, args: tuple[Any, ...]) -> None:
        self._sw_name, self._sw_real, self._sw_args = name, real, args

    def __setstate__(self, state: Any = None) -> None:
        raise UnsafePickle(self._sw_name, why=f"BUILD on a {self._sw_name} value")

    def __reduce__(self) -> tuple[Any, ...]:
        return (self._sw_real, self._sw_args)

    def __repr__(self) -> str:
        return f"<{self._sw_name}{self._sw_args!r}>"


class AttrRef:
    """`getattr(HistoryBuffer, 'min')` in MMEngine's message_hub, kept as that expression."""

    __slots__ = ("_sw_cls", "_sw_name")

    def __init__(self, cls: type[StandIn], name: str) -> None:
        self._sw_cls, self._sw_name = cls, name

    def __setstate__(self, state: Any = None) -> None:
        raise UnsafePickle("builtins.getattr", why="BUILD on a getattr result")

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (self._sw_cls, self._sw_name))

    def __repr__(self) -> str:
        return f"<getattr({self._sw_cls.__qualname__}, {self._sw_name!r})>"


def class_name(obj: Any) -> str:
    """`module.qualname` of an object's class, the same for a stand-in and the real thing."""
    if isinstance(obj, CallValue):
        return obj._sw_name
    if isinstance(obj, AttrRef):
        return "builtins.function"
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------------ the save


class StandInPickler(pickle._Pickler):
    """Writes a stand-in class as the GLOBAL it came from (the C pickler would try to import it)."""

    def save_global(self, obj: Any, name: Any = None) -> None:
        me: Any = self  # pickle._Pickler has no type stubs
        if is_standin_class(obj):
            module, qualname = obj._sw_origin
            if me.proto >= 4:
                me.save(module)
                me.save(qualname)
                me.write(pickle.STACK_GLOBAL)
            else:
                if me.proto < 3 and me.fix_imports:
                    import _compat_pickle

                    module = _compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module)
                encoding = "utf-8" if me.proto >= 3 else "ascii"
                me.write(pickle.GLOBAL + module.encode(encoding) + b"\n"
                         + qualname.encode(encoding) + b"\n")
            me.memoize(obj)
            return
        pickle._Pickler.save_global(me, obj, name)  # type: ignore[attr-defined]


@contextlib.contextmanager
def importable() -> Iterator[bool]:
    """Make the stand-in classes findable under their original names while we pickle.

    The C pickler (~5x faster than `StandInPickler`) writes a class by name only after checking
    that importing that name gives the same object back. For the length of one save, each
    stand-in is put where that import looks: on an empty placeholder module (nothing is imported
    and nothing runs), or, for a module this process has loaded (torch's layers), on that module
    in place of the real class, put back afterwards. Workers handle one file per process, so
    nothing else runs meanwhile. Yields False (use `StandInPickler`) for nested class names.
    """
    added: list[str] = []
    swapped: list[tuple[Any, str, Any]] = []
    try:
        if any("." in qualname for (_m, qualname) in _CLASSES):
            yield False
            return
        for (module, qualname), cls in list(_CLASSES.items()):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    placeholder = types.ModuleType(name, "ckpt-watchd stand-in namespace")
                    placeholder.__ckpt_watchd_placeholder__ = True  # type: ignore[attr-defined]
                    sys.modules[name] = placeholder
                    added.append(name)
                    if i > 1:
                        parent = sys.modules[".".join(parts[: i - 1])]
                        swapped.append((parent, parts[i - 1],
                                        parent.__dict__.get(parts[i - 1], _MISSING)))
                        setattr(parent, parts[i - 1], placeholder)
            target = sys.modules[module]
            swapped.append((target, qualname, target.__dict__.get(qualname, _MISSING)))
            setattr(target, qualname, cls)
        yield True
    finally:
        for target, qualname, old in reversed(swapped):
            if old is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(target, qualname)
            else:
                setattr(target, qualname, old)
        for name in reversed(added):
            sys.modules.pop(name, None)
