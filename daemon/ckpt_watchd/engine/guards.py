"""The runtime half of the policy: the objects `find_class` gives the unpickler for each global.

Nothing handed out is a real class or function the pickle could change or call freely: a global
that builds data is a `Guard`, which checks its arguments' types and sizes before it calls the
real function; a class a rule needs as an argument is a `Token`; torch's layers and the trainer's
classes are stand-ins; dtypes are immutable values. A guard or token refuses BUILD (no `setattr`
on anything shared) and cannot be pickled into an output. This holds even if the static scan
(`opscan`) let something through: the two are independent. Imports torch: worker side only.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import pathlib
import pickle
import re
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

from ckpt_watchd.engine import policy, standin
from ckpt_watchd.errors import NotACheckpoint, UnsafePickle, Unsupported

_MAX_DIMS = 64
_MAX_TEXT = 4096


class Guard:
    """A global that builds plain data: called only through its argument check."""

    __slots__ = ("_fn", "name")

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name, self._fn = name, fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setstate__(self, state: Any = None) -> None:
        raise UnsafePickle(self.name, why="BUILD on it")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise pickle.PicklingError(f"{self.name} is a function, not data")

    def __repr__(self) -> str:
        return f"<guarded {self.name}>"


class Token:
    """A class that only means something as one argument of one rule (numpy.ndarray, object)."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: torch.dtype | None = None) -> None:
        self.name, self.dtype = name, dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickle(self.name, role="a class called with REDUCE")

    def __setstate__(self, state: Any = None) -> None:
        raise UnsafePickle(self.name, why="BUILD on it")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise pickle.PicklingError(f"{self.name} is a class, not data")

    def __repr__(self) -> str:
        return f"<token {self.name}>"


class StorageType(Token):
    """`torch.FloatStorage` and friends: only meaningful inside a storage persistent id."""

    __slots__ = ()


# ------------------------------------------------------------------------------ argument checks


def _refuse(name: str, why: str) -> UnsafePickle:
    return UnsafePickle(name, why=why)


def _int(name: str, v: Any, *, low: int = 0) -> int:
    if type(v) is not int or v < low:
        raise _refuse(name, f"with {type(v).__name__} where a count belongs")
    return v


def _shape(name: str, v: Any) -> tuple[int, ...]:
    if type(v) not in (tuple, torch.Size) or len(v) > _MAX_DIMS or \
            not all(type(d) is int and d >= 0 for d in v):
        raise _refuse(name, "with a shape that is not a short tuple of sizes")
    return tuple(v)


def _bool(name: str, v: Any) -> bool:
    if type(v) is not bool:
        raise _refuse(name, f"with {type(v).__name__} for a flag")
    return v


def _no_hooks(name: str, v: Any) -> Any:
    if not isinstance(v, dict) or v:
        raise _refuse(name, "with backward hooks (torch never saves hooks)")
    return v


def _text(name: str, v: Any, limit: int = _MAX_TEXT) -> str:
    if type(v) is not str or len(v) > limit:
        raise _refuse(name, f"with {type(v).__name__} where a short string belongs")
    return v


class Loading:
    """The storages of the load in progress: a tensor may only be rebuilt over one of them."""

    storages: set[int] = set()

    @classmethod
    def storage(cls, name: str, v: Any) -> Any:
        if type(v) is not torch.storage.TypedStorage or id(v) not in cls.storages:
            raise _refuse(name, "over something that is not a storage of this file")
        return v


def _rebuild(storage: Any, offset: int, shape: tuple[int, ...], strides: tuple[int, ...],
             requires_grad: bool = False, metadata: Any = None) -> torch.Tensor:
    """What torch's `_rebuild_tensor_v2` does for a CPU or meta storage, with hooks of its own.

    The tensor gets a fresh, empty hooks dict, never the pickle's: that one sits in the memo,
    and a later SETITEM could fill it after this check. (torch's fake-tensor mode, which its
    rebuild looks up on every tensor, is never on here.)"""
    t = torch.empty((0,), dtype=storage.dtype, device=storage._untyped_storage.device)
    t.set_(storage._untyped_storage, offset, shape, strides)
    t.requires_grad = requires_grad
    if metadata:
        torch._utils.set_tensor_metadata(t, metadata)  # type: ignore[no-untyped-call]
    t._backward_hooks = collections.OrderedDict()
    return t


def _tensor_v2(name: str) -> Callable[..., Any]:
    def check(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
              hooks: Any, metadata: Any = None) -> Any:
        Loading.storage(name, storage)
        shape = _shape(name, size)
        strides = _shape(name, stride)
        if len(shape) != len(strides):
            raise _refuse(name, "with sizes and strides of different lengths")
        if metadata is not None and not (isinstance(metadata, dict) and all(
                type(k) is str and type(v) is bool for k, v in metadata.items())):
            raise _refuse(name, "with tensor metadata that is not flags")
        _no_hooks(name, hooks)
        return _rebuild(storage, _int(name, offset), shape, strides,
                        _bool(name, requires_grad), metadata)

    return check


def _tensor_v1(name: str) -> Callable[..., Any]:
    def check(storage: Any, offset: Any, size: Any, stride: Any) -> Any:
        Loading.storage(name, storage)
        shape = _shape(name, size)
        strides = _shape(name, stride)
        if len(shape) != len(strides):
            raise _refuse(name, "with sizes and strides of different lengths")
        return _rebuild(storage, _int(name, offset), shape, strides)

    return check


def _is_tensor(v: Any) -> bool:
    return type(v) in (torch.Tensor, torch.nn.Parameter)


def _new_parameter(data: torch.Tensor, requires_grad: bool) -> torch.nn.Parameter:
    """torch's `_rebuild_parameter`, with a fresh, empty hooks dict (see `_rebuild`)."""
    param = torch.nn.Parameter(data, requires_grad)
    param._backward_hooks = collections.OrderedDict()
    return param


def _parameter(name: str) -> Callable[..., Any]:
    def check(data: Any, requires_grad: Any, hooks: Any) -> Any:
        if not _is_tensor(data):
            raise _refuse(name, "of something that is not a tensor")
        _no_hooks(name, hooks)
        return _new_parameter(data, _bool(name, requires_grad))

    return check


def _parameter_with_state(name: str) -> Callable[..., Any]:
    def check(data: Any, requires_grad: Any, hooks: Any, state: Any) -> Any:
        if state not in (None, {}, (None, None), (None, {}), ({}, None), ({}, {})):
            raise Unsupported("a Parameter with attributes of its own")
        if not _is_tensor(data):
            raise _refuse(name, "of something that is not a tensor")
        _no_hooks(name, hooks)
        return _new_parameter(data, _bool(name, requires_grad))

    return check


def _from_type_v2(name: str) -> Callable[..., Any]:
    def check(func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if not (isinstance(func, Guard) and policy.CALLS.get(func.name) in policy.TENSOR_RULES):
            raise _refuse(name, "of something that is not torch's tensor rebuild")
        if not (isinstance(new_type, Token) and new_type.name in ("torch.Tensor",
                                                                    "torch._tensor.Tensor")):
            raise Unsupported("a tensor subclass")
        if state not in (None, {}) or type(args) is not tuple:
            raise Unsupported("a tensor with attributes of its own")
        return func(*args)

    return check


def _meta_tensor(name: str) -> Callable[..., Any]:
    real: Any = torch._utils._rebuild_meta_tensor_no_storage

    def check(dtype: Any, size: Any, stride: Any, requires_grad: Any) -> Any:
        if not isinstance(dtype, torch.dtype):
            raise _refuse(name, "without a dtype")
        return real(dtype, _shape(name, size), _shape(name, stride), _bool(name, requires_grad))

    return check


_LAYOUTS = frozenset({"torch.strided", "torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc",
                      "torch.sparse_bsr", "torch.sparse_bsc", "torch._mkldnn", "torch.jagged"})


def _layout(name: str) -> Callable[..., Any]:
    def check(layout: Any) -> Any:
        if layout not in _LAYOUTS:
            raise _refuse(name, "of an unknown layout")
        get: Any = torch.serialization._get_layout
        return get(layout)

    return check


def _size(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        if len(args) != 1:
            raise _refuse(name, f"called with {len(args)} arguments")
        return torch.Size(_shape(name, args[0]))

    return check


def _device(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        if not 1 <= len(args) <= 2:
            raise _refuse(name, f"called with {len(args)} arguments")
        kind = _text(name, args[0], 32)
        return torch.device(kind) if len(args) == 1 else torch.device(kind, _int(name, args[1]))

    return check


def _containers(rule: str, name: str) -> Callable[..., Any]:
    real: Any = {"ordered_dict": collections.OrderedDict, "counter": collections.Counter,
                 "deque": collections.deque, "set": set, "frozenset": frozenset}[rule]

    def check(*args: Any) -> Any:
        if len(args) > (2 if rule == "deque" else 1):
            raise _refuse(name, f"called with {len(args)} arguments")
        if args:
            kinds: tuple[type, ...] = (dict,) if rule == "counter" else (list, tuple, dict) \
                if rule == "ordered_dict" else (list, tuple)
            if type(args[0]) not in kinds:
                raise _refuse(name, f"of a {type(args[0]).__name__}")
            if rule == "deque" and len(args) == 2 and args[1] is not None:
                _int(name, args[1])
        return real(*args)

    return check


_FACTORIES = {"builtins.list": list, "builtins.dict": dict, "builtins.set": set,
              "builtins.int": int, "builtins.float": float, "builtins.str": str,
              "builtins.tuple": tuple, "builtins.bool": bool}


def _defaultdict(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        factory = args[0] if args else None
        if factory is not None and not (isinstance(factory, Token) and
                                        factory.name in _FACTORIES):
            raise _refuse(name, "with a default factory other than a builtin type")
        if len(args) > 2 or (len(args) == 2 and type(args[1]) is not dict):
            raise _refuse(name, "with unexpected arguments")
        real = _FACTORIES[factory.name] if factory is not None else None
        return collections.defaultdict(real, *args[1:])

    return check


def _bytes_like(rule: str, name: str) -> Callable[..., Any]:
    real: Any = bytes if rule == "bytes" else bytearray

    def check(*args: Any) -> Any:
        # never bytes(N): a few bytes of pickle must not allocate (and the strip write) N bytes
        if not args:
            return real()
        if len(args) == 1 and type(args[0]) in (bytes, bytearray):
            return real(args[0])
        if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
            return real(args[0], args[1])
        raise _refuse(name, "with arguments other than bytes or a latin-1 string")

    return check


def _complex(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        if len(args) > 2 or not all(type(a) in (int, float) for a in args):
            raise _refuse(name, "of something that is not two numbers")
        return complex(*args)

    return check


def _slice(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        if len(args) > 3 or not all(a is None or type(a) is int for a in args):
            raise _refuse(name, "of something that is not three indices")
        return slice(*args)

    return check


def _getattr(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        if len(args) != 2:
            raise _refuse(name, f"called with {len(args)} arguments")
        cls, attr = args
        origin = ".".join(getattr(cls, "_sw_origin", ("", "")))
        if not standin.is_standin_class(cls) or origin not in policy.GETATTR_TARGETS or \
                type(attr) is not str or not attr.isidentifier() or attr.startswith("_"):
            raise _refuse(name, "of anything but a public method of MMEngine's HistoryBuffer")
        return standin.AttrRef(cls, attr)

    return check


def _reconstructor(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        if len(args) != 3:
            raise _refuse(name, f"called with {len(args)} arguments")
        cls, base, state = args
        if not standin.is_standin_class(cls) or not (isinstance(base, Token) and
                                                    base.name == "builtins.object"):
            raise _refuse(name, "of anything but a plain class over object")
        if state is not None:
            raise _refuse(name, "with a state")
        return standin.made_by(cls, "reconstructor")

    return check


def _encode(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        # numpy and pickle write raw bytes as _codecs.encode(text, 'latin1'); other codecs
        # could import modules
        if len(args) != 2 or type(args[0]) is not str or args[1] not in ("latin1", "latin-1"):
            raise _refuse(name, "with a codec other than latin1")
        return args[0].encode("latin1")

    return check


def _numpy() -> Any:
    import numpy

    return numpy


def _np_reconstruct(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        np = _numpy()
        core = getattr(np, "_core", None) or np.core
        # exactly what ndarray.__reduce__ writes; the data comes with the BUILD that follows
        if len(args) != 3 or not (isinstance(args[0], Token) and args[0].name == "numpy.ndarray") \
                or args[1] != (0,) or type(args[1]) is not tuple or args[2] != b"b":
            raise _refuse(name, "with arguments ndarray.__reduce__ never writes")
        return core.multiarray._reconstruct(np.ndarray, (0,), b"b")

    return check


def _np_scalar(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        np = _numpy()
        core = getattr(np, "_core", None) or np.core
        if len(args) != 2 or not isinstance(args[0], np.dtype) or args[0].hasobject or \
                type(args[1]) is not bytes or len(args[1]) != args[0].itemsize:
            raise _refuse(name, "of something that is not a number's bytes")
        return core.multiarray.scalar(args[0], args[1])

    return check


def _np_dtype(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        if not 1 <= len(args) <= 3 or not all(type(a) is bool for a in args[1:]):
            raise _refuse(name, "with unexpected arguments")
        return _numpy().dtype(_text(name, args[0], 64), *args[1:])

    return check


_DATETIME = {"datetime.datetime": datetime.datetime, "datetime.date": datetime.date,
             "datetime.time": datetime.time, "datetime.timedelta": datetime.timedelta,
             "datetime.timezone": datetime.timezone}


def _datetime(name: str) -> Callable[..., Any]:
    real = _DATETIME[name]

    def check(*args: Any) -> Any:
        for a in args:
            if not (type(a) in (int, float, bool) or (type(a) is bytes and len(a) <= 16)
                    or (type(a) is str and len(a) <= 64)
                    or isinstance(a, (datetime.tzinfo, datetime.timedelta))):
                raise _refuse(name, f"with a {type(a).__name__} argument")
        return real(*args)

    return check


def _decimal(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        if len(args) != 1:
            raise _refuse(name, f"called with {len(args)} arguments")
        return decimal.Decimal(_text(name, args[0], 1000))

    return check


_FRACTION = re.compile(r"-?\d{1,1000}(/\d{1,1000})?")


def _fraction(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        # what Fraction.__reduce__ writes: its str(), digits only (an exponent would make
        # the constructor compute 10**exponent)
        if len(args) != 1 or type(args[0]) is not str or not _FRACTION.fullmatch(args[0]):
            raise _refuse(name, "of anything but 'p/q' in at most 1,000 digits")
        return fractions.Fraction(args[0])

    return check


def _path(name: str) -> Callable[..., Any]:
    real = getattr(pathlib, name.rsplit(".", 1)[1])

    def check(*args: Any) -> Any:
        for a in args:
            _text(name, a)
        return standin.CallValue(name, real, args)

    return check


def _namespace(name: str) -> Callable[..., Any]:
    def check(*args: Any) -> Any:
        if args:
            raise _refuse(name, "called with arguments")
        if name == "types.SimpleNamespace":
            return types.SimpleNamespace()
        module, _, qualname = name.rpartition(".")
        return standin.made_by(standin.standin_class(module, qualname), "call")

    return check


_BUILDERS: dict[str, Callable[[str], Callable[..., Any]]] = {
    "tensor_v2": _tensor_v2, "tensor": _tensor_v1, "parameter": _parameter,
    "parameter_with_state": _parameter_with_state, "from_type_v2": _from_type_v2,
    "meta_tensor": _meta_tensor, "layout": _layout, "size": _size, "device": _device,
    **{r: (lambda rule: lambda name: _containers(rule, name))(r)
       for r in ("ordered_dict", "counter", "deque", "set", "frozenset")},
    "defaultdict": _defaultdict,
    **{r: (lambda rule: lambda name: _bytes_like(rule, name))(r) for r in ("bytes", "bytearray")},
    "complex": _complex, "slice": _slice, "getattr": _getattr, "reconstructor": _reconstructor,
    "encode": _encode, "np_reconstruct": _np_reconstruct, "np_scalar": _np_scalar,
    "np_dtype": _np_dtype, "datetime": _datetime, "decimal": _decimal, "fraction": _fraction,
    "path": _path, "namespace": _namespace,
}
assert set(_BUILDERS) == set(policy.CALLS.values()), "every rule needs its guard"

_CACHE: dict[str, Any] = {}


def find(module: str, name: str) -> Any:
    """What the unpickler gets for GLOBAL module.name (policy first; cached per process)."""
    module, name = policy.resolve(module, name, proto=policy.HIGHEST)
    full = f"{module}.{name}"
    hit = _CACHE.get(full)
    if hit is not None:
        return hit
    k = policy.kind(full)
    obj: Any
    if k == "call":
        obj = Guard(full, _BUILDERS[policy.CALLS[full]](full))
    elif k == "value":
        obj = getattr(torch, name, None)
        if not isinstance(obj, (torch.dtype, torch.memory_format)):
            raise NotACheckpoint(f"{full} is not a dtype in this torch")
    elif k == "persid":
        if name == "UntypedStorage":
            obj = StorageType(full, torch.uint8)
        else:
            to_dtype: Any = torch.storage._get_dtype_from_pickle_storage_type
            try:  # what torch.load uses: the class's own `dtype` warns of its deprecation
                dtype = to_dtype(name)
            except KeyError:
                dtype = None
            if not isinstance(dtype, torch.dtype):
                raise NotACheckpoint(f"{full} is not a storage type in this torch")
            obj = StorageType(full, dtype)
    elif k == "token":
        obj = Token(full)
    else:
        if module.startswith("torch."):
            # torch's layers are stood in for by name; the name must be a layer class of this
            # torch (torch.nn.modules.conv.F is the functional module, not a layer)
            real = getattr(sys.modules.get(module), name, None)
            if not (isinstance(real, type) and issubclass(real, torch.nn.Module)):
                raise UnsafePickle(full)
        obj = standin.standin_class(module, name)
    _CACHE[full] = obj
    return obj
