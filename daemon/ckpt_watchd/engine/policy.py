"""The safety policy: which globals a checkpoint's pickle may name, in which role, after the name
pickle would really resolve.

Pure data and functions, no torch: the static scan (`opscan`, before anything is unpickled, and
again on the pickle about to be written) and the runtime guards (`guards`, inside the unpickler)
both decide by it, so there is one policy. It must only ever grow by a named, narrow rule with a
reason (docs/security.md lists each); nothing here may open a general call.

A name is resolved as CPython's unpickler resolves it: Python 2 names through `_compat_pickle`
(`__builtin__.set` is `builtins.set`, `commands.call` is `subprocess.call`), then torch's own
module rename (`torch.tensor` -> `torch._tensor`). Modules and names must be plain dotted
identifiers: no newline can ever reach a GLOBAL opcode we write.
"""

from __future__ import annotations

import _compat_pickle
import sys
from typing import Final

from ckpt_watchd.errors import UnsafePickle, Unsupported

# The roles a global can play in a pickle (what `opscan` reports, what `check` accepts):
CALL: Final = "call"  # the callable of REDUCE
NEW: Final = "new"  # the class of NEWOBJ / NEWOBJ_EX: an instance is made, nothing is called
VALUE: Final = "value"  # anywhere else: an item, a state, a generic argument, the result
PERSID: Final = "persid"  # the storage type inside torch's persistent id
ARG: Final = "arg"  # ("arg", callee, position): an argument a narrow rule gives meaning to

Role = str | tuple[str, str, int]

# ------------------------------------------------------------------------------ real objects

# Globals that are called (REDUCE) to build plain data, by rule id. The runtime guard of each rule
# (guards.py) checks the arguments' types and sizes before it calls the real function.
CALLS: Final[dict[str, str]] = {
    "torch._utils._rebuild_tensor_v2": "tensor_v2",
    "torch._utils._rebuild_tensor": "tensor",
    "torch._utils._rebuild_parameter": "parameter",
    "torch._utils._rebuild_parameter_with_state": "parameter_with_state",
    "torch._tensor._rebuild_from_type_v2": "from_type_v2",
    "torch._utils._rebuild_meta_tensor_no_storage": "meta_tensor",
    "torch.serialization._get_layout": "layout",
    "torch.Size": "size",
    "torch.device": "device",
    "collections.OrderedDict": "ordered_dict",
    "collections.Counter": "counter",
    "collections.deque": "deque",
    "collections.defaultdict": "defaultdict",
    "builtins.set": "set",
    "builtins.frozenset": "frozenset",
    "builtins.bytes": "bytes",
    "builtins.bytearray": "bytearray",
    "builtins.complex": "complex",
    "builtins.slice": "slice",
    "builtins.getattr": "getattr",
    "copyreg._reconstructor": "reconstructor",
    "_codecs.encode": "encode",
    "numpy.core.multiarray._reconstruct": "np_reconstruct",
    "numpy._core.multiarray._reconstruct": "np_reconstruct",
    "numpy.core.multiarray.scalar": "np_scalar",
    "numpy._core.multiarray.scalar": "np_scalar",
    "numpy.dtype": "np_dtype",
    "datetime.datetime": "datetime",
    "datetime.date": "datetime",
    "datetime.time": "datetime",
    "datetime.timedelta": "datetime",
    "datetime.timezone": "datetime",
    "decimal.Decimal": "decimal",
    "fractions.Fraction": "fraction",
    # pathlib's __reduce__ calls the class with the path's parts: only strings, an inert value
    **{f"pathlib.{n}": "path" for n in (
        "Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")},
    # SimpleNamespace's __reduce__ is `cls()` then BUILD: only with no arguments, and only these
    # named classes (Ultralytics' model.args); never "any class called with no arguments"
    "types.SimpleNamespace": "namespace",
    "ultralytics.utils.IterableSimpleNamespace": "namespace",
}
TENSOR_RULES: Final = frozenset({"tensor_v2", "tensor"})

# MMEngine's message_hub pickles `getattr(HistoryBuffer, 'min')` (its statistics methods): the
# one class getattr may be applied to, and only for a public method name.
GETATTR_TARGETS: Final = frozenset({"mmengine.logging.history_buffer.HistoryBuffer"})

# Immutable values a pickle names directly (torch.float16 pickles as GLOBAL torch float16).
TORCH_VALUES: Final = frozenset({
    "bfloat16", "bit", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "bool", "cdouble",
    "cfloat", "chalf", "complex128", "complex32", "complex64", "double", "float", "float16",
    "float32", "float4_e2m1fn_x2", "float64", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
    "float8_e5m2fnuz", "float8_e8m0fnu", "half", "int", "int1", "int16", "int2", "int3", "int32",
    "int4", "int5", "int6", "int64", "int7", "int8", "long", "qint32", "qint8", "quint2x4",
    "quint4x2", "quint8", "short", "uint1", "uint16", "uint2", "uint3", "uint32", "uint4", "uint5",
    "uint6", "uint64", "uint7", "uint8",
    "channels_last", "channels_last_3d", "contiguous_format", "legacy_contiguous_format",
    "preserve_format",
})

# Storage types, only ever inside torch's persistent id ("storage", type, key, location, numel).
STORAGE_TYPES: Final = frozenset({
    "BFloat16Storage", "BoolStorage", "ByteStorage", "CharStorage", "ComplexDoubleStorage",
    "ComplexFloatStorage", "DoubleStorage", "FloatStorage", "HalfStorage", "IntStorage",
    "LongStorage", "QInt32Storage", "QInt8Storage", "QUInt2x4Storage", "QUInt4x2Storage",
    "QUInt8Storage", "ShortStorage", "UntypedStorage",
})

# Names that only ever mean something as one argument of one rule (a class handed to a rule
# that knows it); they are tokens at run time, never the real class.
ARG_TOKENS: Final[dict[str, frozenset[tuple[str, int]]]] = {
    "builtins.object": frozenset({("copyreg._reconstructor", 1)}),
    "numpy.ndarray": frozenset({("numpy.core.multiarray._reconstruct", 0),
                                ("numpy._core.multiarray._reconstruct", 0)}),
    "torch.Tensor": frozenset({("torch._tensor._rebuild_from_type_v2", 1)}),
    "torch._tensor.Tensor": frozenset({("torch._tensor._rebuild_from_type_v2", 1)}),
    **{f"builtins.{n}": frozenset({("collections.defaultdict", 0)})
       for n in ("list", "dict", "set", "int", "float", "str", "tuple", "bool")},
}

# ------------------------------------------------------------------------------ stand-ins

# Packages whose globals are code we could run by accident: nothing from them is stood in for,
# beyond what the tables above name. The standard library is added below.
REFUSED_PACKAGES: Final = frozenset({
    "torch", "numpy", "dill", "cloudpickle", "joblib", "pip", "setuptools", "pkg_resources",
    "IPython", "yaml", "pandas", "scipy", "sklearn", "sympy", "numba", "tensorflow", "keras",
    "jax", "jaxlib", "dask", "ray", "requests", "urllib3", "fsspec", "_pickle",
    "_posixsubprocess", "nt", "posix", "__builtin__", "builtins", "__main__", "site",
    "distutils", "ckpt_watchd",
}) | frozenset(getattr(sys, "stdlib_module_names", ()))

# Plain classes of refused packages that checkpoints hold as data (built by NEWOBJ + BUILD, never
# called): timm's args are an argparse.Namespace, and torch's own layers.
STANDIN_EXCEPTIONS: Final = frozenset({"argparse.Namespace", "uuid.UUID"})
_TORCH_NN: Final = "torch.nn.modules."


def _plain_identifier(part: str) -> bool:
    return part.isidentifier() and part.isprintable()


HIGHEST = 5  # the highest pickle protocol


def resolve(module: object, name: object, proto: int) -> tuple[str, str]:
    """The (module, name) pickle would really resolve, or UnsafePickle/Unsupported."""
    if type(module) is not str or type(name) is not str:
        raise UnsafePickle(f"{module!r}.{name!r}")
    if not module or not name or len(module) > 256 or len(name) > 256:
        raise UnsafePickle(f"{module[:80]}.{name[:80]}")
    # fix_imports, as CPython applies it (always: an output of ours is written at protocol 2)
    mapped = _compat_pickle.NAME_MAPPING.get((module, name))
    if mapped is not None:
        module, name = mapped
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if module == "torch.tensor":  # torch.load's own rename (pytorch#51633)
        module = "torch._tensor"
    if not all(_plain_identifier(p) for p in module.split(".")) or \
            not all(_plain_identifier(p) for p in name.split(".")):
        raise UnsafePickle(ascii(f"{module}.{name}"))
    if "." in name and proto < 4:
        # CPython resolves a dotted name only from protocol 4 on: the trainer could not load it
        raise Unsupported(f"nested class name {module}.{name} in a protocol-{proto} pickle")
    return module, name


def kind(full: str) -> str:
    """What a resolved name is: call, value, persid, token, standin; or UnsafePickle."""
    if full in CALLS:
        return "call"
    module, _, name = full.rpartition(".")
    if module == "torch" and name in TORCH_VALUES:
        return "value"
    if module == "torch" and name in STORAGE_TYPES:
        return "persid"
    if full in ARG_TOKENS:
        return "token"
    if full in STANDIN_EXCEPTIONS:
        return "standin"
    if module.startswith(_TORCH_NN) and "." not in name and not name.startswith("_"):
        return "standin"
    top = full.split(".", 1)[0]
    if top in REFUSED_PACKAGES or any(p.startswith("__") for p in full.split(".")):
        raise UnsafePickle(full)
    return "standin"


def check(full: str, role: Role) -> None:
    """Raise UnsafePickle unless `full` may play `role` (called once per distinct pair)."""
    k = kind(full)
    if role == CALL:
        ok = k == "call"
    elif role == NEW:
        ok = k == "standin"
    elif role == VALUE:
        ok = k == "value"
    elif role == PERSID:
        ok = k == "persid"
    elif isinstance(role, tuple) and role[0] == ARG:
        _, callee, position = role
        if k == "token":
            ok = (callee, position) in ARG_TOKENS[full]
        elif callee == "copyreg._reconstructor" and position == 0:
            ok = k == "standin"
        elif callee == "builtins.getattr" and position == 0:
            ok = full in GETATTR_TARGETS
        elif callee == "torch._tensor._rebuild_from_type_v2" and position == 0:
            ok = CALLS.get(full) in TENSOR_RULES
        else:
            ok = False
    else:
        ok = False
    if not ok:
        raise UnsafePickle(full, role=describe_role(role, k))


def describe_role(role: Role, k: str) -> str:
    what = {"call": "a function", "value": "a value", "persid": "a storage type",
            "token": "a class", "standin": "a class"}[k]
    if role == CALL:
        return f"{what} called with REDUCE"
    if role == NEW:
        return f"{what} instantiated with NEWOBJ"
    if role == VALUE:
        return f"{what} used as a plain value"
    if role == PERSID:
        return f"{what} used as a storage type"
    return f"{what} passed to {role[1]}"
