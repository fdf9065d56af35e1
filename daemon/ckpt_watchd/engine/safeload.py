"""The safe loader: read a torch checkpoint without importing or running anything it names.

It owns the restricted unpickler (an allowlist of real globals, a refusal for anything that could run
code, and inert stand-ins for the trainer's own classes), the pickler that writes stand-ins back under
their original names, and the cheap pre-flight that tells a torn write from a foreign file. It must
never call `torch.load` without its own `pickle_module`, never follow a symlink and never execute a
callable that did not pass `find_class`. Imported only in worker processes and one-shot commands.
"""

from __future__ import annotations

import collections
import contextlib
import copyreg
import datetime
import decimal
import fractions
import importlib
import io
import os
import pathlib
import pickle
import stat
import sys
import types
import uuid
import warnings
import zipfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt_watchd.engine import zipwrite
from ckpt_watchd.errors import (
    EmptyFile,
    NotACheckpoint,
    NotARegularFile,
    TornWrite,
    UnreadableFile,
    UnsafePickle,
)

# --------------------------------------------------------------------------------------- stand-ins


class StandIn:
    """An inert object standing for an instance of a class we refuse to import.

    It records how the pickle built it (`cls(*args)` or `cls.__new__(cls, *args)`), its state and any
    list/dict items, and pickles back the same way, so the trainer finds its own class on load.
    Attribute access works like the original's `__dict__`, and like `nn.Module` for submodules,
    parameters and buffers.
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Only reached when the pickle *called* the class (REDUCE); NEWOBJ skips __init__.
        object.__setattr__(self, "_sw_how", "call")
        object.__setattr__(self, "_sw_args", (args, kwargs))

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_sw_state", state)
        if isinstance(state, dict):
            object.__setattr__(self, "__dict__", state)
        elif (
            isinstance(state, tuple)
            and len(state) == 2
            and isinstance(state[0], (dict, type(None)))
            and isinstance(state[1], dict)
        ):
            merged = dict(state[0] or {})
            object.__setattr__(self, "__dict__", merged)

    # list/dict subclasses are rebuilt with APPENDS/SETITEMS after the object exists
    def append(self, item: Any) -> None:
        self.extend([item])

    def extend(self, items: Any) -> None:
        if self._sw_items is None:
            object.__setattr__(self, "_sw_items", [])
        self._sw_items.extend(items)

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
        if self._sw_how == "call":
            if kwargs:
                raise pickle.PicklingError(f"cannot re-pickle {cls.__qualname__} called with kwargs")
            return (cls, tuple(args), state, items, dictitems)
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


_STANDIN_CLASSES: dict[tuple[str, str], type[StandIn]] = {}


def standin_class(module: str, name: str) -> type[StandIn]:
    """One stand-in class per (module, name), so identical globals stay identical objects."""
    key = (module, name)
    cls = _STANDIN_CLASSES.get(key)
    if cls is None:
        cls = type(
            name.rsplit(".", 1)[-1],
            (StandIn,),
            {"__module__": module, "__qualname__": name, "__slots__": (), "_sw_origin": key},
        )
        _STANDIN_CLASSES[key] = cls
    return cls


def is_standin_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, StandIn) and obj is not StandIn


def class_name(obj: Any) -> str:
    """`module.qualname` of an object's class, the same for a stand-in and the real thing."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------------------- policy

def _latin1_only_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # numpy pickles raw bytes as _codecs.encode(str, 'latin1'); other codecs could import modules.
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1", "utf-8", "utf8"):
        raise UnsafePickle(f"_codecs.encode with codec {encoding!r}")
    return str(obj).encode(encoding, errors)


def _numpy_global(name: str) -> Any:
    import numpy  # numpy ships with torch's dependencies of this project

    core = getattr(numpy, "_core", None) or numpy.core
    table: dict[str, Callable[[], Any]] = {
        "_reconstruct": lambda: core.multiarray._reconstruct,
        "scalar": lambda: core.multiarray.scalar,
        "ndarray": lambda: numpy.ndarray,
        "dtype": lambda: numpy.dtype,
    }
    return table[name]()


def _attr(owner: Any, name: str) -> Callable[[], Any]:
    return lambda: getattr(owner, name)


def _const(value: Any) -> Callable[[], Any]:
    return lambda: value


def _no_size(kind: type, args: tuple[Any, ...]) -> Any:
    if args and not isinstance(args[0], (str, bytes, bytearray)):
        raise UnsafePickle(f"builtins.{kind.__name__} with a {type(args[0]).__name__} argument")
    return kind(*args)


def _numpy(name: str) -> Callable[[], Any]:
    return lambda: _numpy_global(name)


_PATH_CLASSES = {
    "Path": pathlib.Path,
    "PosixPath": pathlib.PosixPath if os.name == "posix" else None,
    "WindowsPath": pathlib.WindowsPath if os.name == "nt" else None,
    "PurePath": pathlib.PurePath,
    "PurePosixPath": pathlib.PurePosixPath,
    "PureWindowsPath": pathlib.PureWindowsPath,
}

# Real objects, by (module, name). Everything here is a constructor of plain data or one of torch's
# own tensor rebuild functions; none of them imports, opens, evaluates or looks up by name.
_SAFE: dict[tuple[str, str], Callable[[], Any]] = {
    **{("builtins", n): _attr(__import__("builtins"), n) for n in (
        "set", "frozenset", "list", "dict", "tuple", "complex", "slice", "int", "float", "str",
        "bool",
    )},
    # bytes(N) / bytearray(N) would let a few bytes of pickle allocate (and the strip write out)
    # N bytes; pickle itself only ever passes them a string and an encoding (or nothing)
    ("builtins", "bytes"): _const(lambda *a: _no_size(bytes, a)),
    ("builtins", "bytearray"): _const(lambda *a: _no_size(bytearray, a)),
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("collections", "defaultdict"): lambda: collections.defaultdict,
    ("collections", "deque"): lambda: collections.deque,
    ("collections", "Counter"): lambda: collections.Counter,
    ("copyreg", "_reconstructor"): lambda: copyreg._reconstructor,  # type: ignore[attr-defined]
    ("_codecs", "encode"): lambda: _latin1_only_encode,
    ("argparse", "Namespace"): lambda: __import__("argparse").Namespace,
    ("types", "SimpleNamespace"): lambda: types.SimpleNamespace,
    ("datetime", "datetime"): lambda: datetime.datetime,
    ("datetime", "date"): lambda: datetime.date,
    ("datetime", "time"): lambda: datetime.time,
    ("datetime", "timedelta"): lambda: datetime.timedelta,
    ("datetime", "timezone"): lambda: datetime.timezone,
    ("decimal", "Decimal"): lambda: decimal.Decimal,
    ("fractions", "Fraction"): lambda: fractions.Fraction,
    ("uuid", "UUID"): lambda: uuid.UUID,
    ("torch", "Size"): lambda: torch.Size,
    ("torch", "device"): lambda: torch.device,
    ("torch.serialization", "_get_layout"): lambda: torch.serialization._get_layout,
    ("torch._tensor", "_rebuild_from_type_v2"): lambda: torch._tensor._rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): lambda: torch.nn.Parameter,
    ("torch.nn.parameter", "Buffer"): lambda: torch.nn.parameter.Buffer,
    **{("torch._utils", n): _attr(torch._utils, n) for n in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
        "_rebuild_parameter_with_state", "_rebuild_sparse_tensor", "_rebuild_qtensor",
        "_rebuild_device_tensor_from_numpy", "_rebuild_meta_tensor_no_storage",
    ) if hasattr(torch._utils, n)},
    **{(m, n): _numpy(n) for m in (
        "numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")},
    ("numpy", "ndarray"): _numpy("ndarray"),
    ("numpy", "dtype"): _numpy("dtype"),
    **{("pathlib", n): _const(c) for n, c in _PATH_CLASSES.items() if c is not None},
}

# Packages whose globals are real code we could run by accident: anything from them that is not in
# `_SAFE` is refused outright rather than stood in for. The standard library is added below.
_REFUSED_PACKAGES = frozenset({
    "torch", "numpy", "dill", "cloudpickle", "joblib", "pip", "setuptools", "pkg_resources",
    "IPython", "yaml", "pandas", "scipy", "sklearn", "_pickle", "_posixsubprocess", "nt", "posix",
    "__builtin__", "builtins", "__main__", "site", "distutils",
}) | frozenset(getattr(sys, "stdlib_module_names", ()))

_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _torch_nn_class(module: str, name: str) -> Any:
    """A `torch.nn.modules.*` class, or None: torch's layers are plain data holders to unpickle."""
    if not module.startswith("torch.nn.modules.") or "." in name:
        return None
    mod = importlib.import_module(module)
    obj = getattr(mod, name, None)
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return obj
    return None


def resolve_global(module: str, name: str) -> Any:
    """The policy in one function: a real object, a stand-in class, or `UnsafePickle`."""
    if not isinstance(module, str) or not isinstance(name, str):
        raise UnsafePickle(f"{module!r}.{name!r}")
    module = _PY2_MODULES.get(module, module)
    key = (module, name)
    factory = _SAFE.get(key)
    if factory is not None:
        return factory()
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    nn_cls = _torch_nn_class(module, name)
    if nn_cls is not None:
        return nn_cls
    if module == "pathlib" and name in _PATH_CLASSES:
        # a WindowsPath on Linux (or the reverse) cannot be built; keep it inert and round-trip it
        return standin_class(module, name)
    top = module.split(".", 1)[0]
    if top in _REFUSED_PACKAGES or not module or not name or name.startswith("__"):
        raise UnsafePickle(f"{module}.{name}")
    return standin_class(module, name)


class SafeUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose every global goes through `resolve_global`.

    torch.load subclasses it and builds the instance itself, so the globals seen by the current load
    are collected in `_LAST_GLOBALS` (one load at a time per process, which is how workers run).
    """

    def find_class(self, module: str, name: str) -> Any:
        obj = resolve_global(module, name)
        _LAST_GLOBALS.add(f"{module}.{name}")
        return obj

    # torch assigns its own persistent_load to the instance; wrap it with the size check
    @property
    def persistent_load(self) -> Any:
        return self._ckpt_persistent_load

    @persistent_load.setter
    def persistent_load(self, fn: Callable[[Any], Any]) -> None:
        def checked(saved_id: Any) -> Any:
            rec = _check_storage(saved_id, _STORAGE_RECORDS)
            result = fn(saved_id)
            if rec is not None and rec.size and _NOTE_SOURCES[0]:
                storage = getattr(result, "_untyped_storage", result)
                if isinstance(storage, torch.UntypedStorage) and storage.device.type == "cpu":
                    _SOURCES[storage.data_ptr()] = (rec, storage)
            return result

        self._ckpt_persistent_load = checked
        pickle.Unpickler.__dict__["persistent_load"].__set__(self, checked)


# torch.load builds its own subclass of our Unpickler; this collects the globals of the current load.
_LAST_GLOBALS: set[str] = set()
# ... and these are the storage records of the file being loaded (empty for the legacy format),
_STORAGE_RECORDS: dict[str, zipwrite.SourceRecord] = {}
# ... and which loaded storage is which record: data pointer -> (record, the storage, kept alive so
# that its address cannot be reused by another allocation while the mapping is consulted).
_SOURCES: dict[int, tuple[zipwrite.SourceRecord, Any]] = {}


_NOTE_SOURCES = [False]


def _check_storage(saved_id: Any, records: dict[str, zipwrite.SourceRecord]
                   ) -> zipwrite.SourceRecord | None:
    """A storage must claim exactly the bytes its zip record holds; returns that record.

    With mmap=True torch slices each storage out of the mapped file by its claimed size, clipped at
    the end of the file: a storage claiming more than its record would read the next records'
    bytes as weights (torch.load without mmap refuses such a file).
    """
    if not records or type(saved_id) is not tuple or len(saved_id) != 5:
        return None
    _kind, storage_type, key, _location, numel = saved_id
    dtype = (torch.uint8 if storage_type is torch.UntypedStorage
             else getattr(storage_type, "dtype", None))
    size = _ELEMENT_SIZES.get(dtype)
    if size is None:
        if not isinstance(dtype, torch.dtype):
            return None
        size = _ELEMENT_SIZES[dtype] = torch._utils._element_size(dtype)  # type: ignore[no-untyped-call]
    if not isinstance(numel, int):
        return None
    rec = records.get(key if type(key) is str else str(key))
    if rec is None or numel * size != rec.size:
        raise NotACheckpoint(f"storage {key!r} claims {numel * size} bytes but its record holds "
                             f"{rec.size if rec is not None else 'none'}")
    return rec


# dtype -> bytes per element
_ELEMENT_SIZES: dict[Any, int] = {}


def _safe_load(file: Any, **kwargs: Any) -> Any:
    return SafeUnpickler(file, **kwargs).load()


def _safe_loads(data: bytes, **kwargs: Any) -> Any:
    return SafeUnpickler(io.BytesIO(data), **kwargs).load()


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
                    module = {v: k for k, v in _PY2_MODULES.items()}.get(module, module)
                me.write(pickle.GLOBAL + module.encode("utf-8") + b"\n"
                         + qualname.encode("utf-8") + b"\n")
            me.memoize(obj)
            return
        pickle._Pickler.save_global(me, obj, name)  # type: ignore[attr-defined]


@contextlib.contextmanager
def standins_importable() -> Iterator[bool]:
    """Make the stand-in classes findable under their original names while we pickle.

    The C pickler (~5x faster than `StandInPickler`) writes a class by name only after checking
    that importing that name gives the same object back. For the duration of one save, empty
    placeholder modules holding the stand-ins are put in `sys.modules`; nothing is imported and
    nothing runs. Yields False (use `StandInPickler`) when a real module of that name is loaded.
    """
    added: list[str] = []
    try:
        for (module, qualname), cls in list(_STANDIN_CLASSES.items()):
            if "." in qualname:
                yield False
                return
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                existing = sys.modules.get(name)
                if existing is None:
                    placeholder = types.ModuleType(name, "ckpt-watchd stand-in namespace")
                    placeholder.__ckpt_watchd_placeholder__ = True  # type: ignore[attr-defined]
                    sys.modules[name] = placeholder
                    added.append(name)
                    if i > 1:
                        setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], placeholder)
                elif not getattr(existing, "__ckpt_watchd_placeholder__", False):
                    yield False
                    return
            setattr(sys.modules[module], qualname, cls)
        yield True
    finally:
        for name in reversed(added):
            sys.modules.pop(name, None)


# `pickle_module` objects handed to torch.load / torch.save
SAFE_PICKLE = types.SimpleNamespace(
    Unpickler=SafeUnpickler, load=_safe_load, loads=_safe_loads, __name__="ckpt_watchd.safe_pickle"
)
SAVE_PICKLE = types.SimpleNamespace(
    Pickler=StandInPickler, dump=pickle.dump, dumps=pickle.dumps, __name__="ckpt_watchd.save_pickle"
)
FAST_SAVE_PICKLE = types.SimpleNamespace(
    Pickler=pickle.Pickler, dump=pickle.dump, dumps=pickle.dumps, __name__="ckpt_watchd.fast_pickle"
)

# --------------------------------------------------------------------------------------- pre-flight


@dataclass(frozen=True, slots=True)
class FileFacts:
    """Identity of a file at one moment: if any of these change, it is not the file we read."""

    ino: int
    size: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileFacts:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid,
                   st.st_dev)

    def same_content_as(self, other: FileFacts) -> bool:
        return (self.dev, self.ino, self.size, self.mtime_ns) == (
            other.dev, other.ino, other.size, other.mtime_ns)


def _kind_of(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink (never followed)"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def open_regular(path: os.PathLike[str] | str) -> tuple[int, FileFacts]:
    """Open a regular file for reading without following a symlink or blocking on a FIFO."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotARegularFile("no such file") from None
    except OSError as e:
        raise UnreadableFile(e.strerror or str(e)) from None
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(f"is {_kind_of(st.st_mode)}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError:
        raise UnreadableFile("permission denied (no read permission)") from None
    except FileNotFoundError:
        raise NotARegularFile("no such file (it disappeared)") from None
    except OSError as e:
        raise UnreadableFile(e.strerror or str(e)) from None
    fst = os.fstat(fd)
    if not stat.S_ISREG(fst.st_mode):  # swapped between lstat and open
        os.close(fd)
        raise NotARegularFile(f"is {_kind_of(fst.st_mode)}")
    return fd, FileFacts.of(fst)


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


@dataclass(frozen=True, slots=True)
class Container:
    """What the pre-flight learned: `zip` (torch >= 1.6) or `legacy` (the old pickle stream)."""

    format: str
    records: int
    # storage key -> its record (zip only): a storage must claim exactly the bytes it holds
    storages: dict[str, zipwrite.SourceRecord] | None = None


def _storage_records(infos: list[zipfile.ZipInfo], start_dir: int, size: int
                     ) -> dict[str, zipwrite.SourceRecord]:
    """Check a zip's directory is a torch checkpoint's; its storage records by key."""
    names = [i.filename for i in infos]
    if not any(n.endswith("data.pkl") for n in names):
        raise NotACheckpoint("a zip file, but not a torch checkpoint (no data.pkl)")
    if any(n.endswith("constants.pkl") for n in names):
        raise NotACheckpoint("a TorchScript archive (torch.jit), not a training checkpoint")
    stored = 0
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED:
            # torch.save never compresses; a compressed record is how a zip bomb hides
            raise NotACheckpoint(f"zip record {i.filename!r} is compressed; torch never writes that")
        stored += i.file_size
    if stored > size:
        raise TornWrite(f"incomplete or torn write: records claim {stored} bytes in a "
                        f"{size}-byte file")
    physical = sorted(infos, key=lambda i: i.header_offset)
    ends = [i.header_offset for i in physical[1:]] + [start_dir]
    return {i.filename.rsplit("/data/", 1)[1]:
            zipwrite.SourceRecord(i.filename, i.header_offset, end, n, i.file_size, i.CRC,
                                  i.flag_bits)
            for n, (i, end) in enumerate(zip(physical, ends, strict=True))
            if "/data/" in i.filename}


def preflight(fd: int, size: int) -> Container:
    """Classify the bytes without unpickling anything: torn write, foreign file, zip bomb."""
    if size == 0:
        raise EmptyFile("empty file (0 bytes)")
    head = os.pread(fd, 512, 0)
    if head.startswith(_ZIP_MAGIC):
        with os.fdopen(os.dup(fd), "rb") as f:
            try:
                zf = zipfile.ZipFile(f)
            except zipfile.BadZipFile:
                raise TornWrite(
                    "incomplete or torn write: zip has no central directory "
                    "(a trainer is writing it, or was killed mid-write)") from None
            except (OSError, ValueError, EOFError) as e:
                raise TornWrite(f"incomplete or torn write: {e}") from None
            except NotImplementedError as e:  # zipfile's answer to a version/feature it lacks
                raise NotACheckpoint(f"a zip file torch did not write ({e})") from None
            infos = zf.infolist()
            start_dir = zf.start_dir
        records = _storage_records(infos, start_dir, size)
        return Container("zip", len(infos), records)
    if head[:1] == bytes([_PICKLE_PROTO]):
        return Container("legacy", 0)
    if len(head) > 262 and head[257:262] == b"ustar":
        raise NotACheckpoint("the pre-1.0 torch tar format, which cannot be read safely")
    raise NotACheckpoint("not a PyTorch checkpoint (unknown format)")


@contextlib.contextmanager
def _no_fake_mode_probes() -> Iterator[None]:
    """Answer torch's "is a FakeTensorMode active?" once for the whole load instead of per tensor.

    torch.load asks three times per tensor (a third of an mmap load's time for a YOLO model). A
    worker never loads under a fake mode; if one is active after all, nothing is swapped.
    """
    guards = torch._guards
    real = guards.detect_fake_mode
    if real(None) is not None:
        yield
        return
    guards.detect_fake_mode = lambda inputs=None: None
    try:
        yield
    finally:
        guards.detect_fake_mode = real


def _fd_path(fd: int, fallback: str) -> str:
    # Loading through /proc/self/fd pins the inode we checked: a rename or symlink swap afterwards
    # cannot make torch read another file.
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else fallback


@dataclass(slots=True)
class Loaded:
    obj: Any
    facts: FileFacts
    format: str
    globals_seen: frozenset[str]
    # data pointer of each storage mapped from the file -> its record (see `_SOURCES`)
    sources: dict[int, tuple[zipwrite.SourceRecord, Any]] = field(default_factory=dict)


def load(path: os.PathLike[str] | str, *, mmap: bool = True) -> Loaded:
    """Load a checkpoint safely; storages stay on disk (mmap) until something reads them."""
    fd, facts = open_regular(path)
    try:
        container = preflight(fd, facts.size)
        _LAST_GLOBALS.clear()
        _STORAGE_RECORDS.clear()
        _SOURCES.clear()
        _STORAGE_RECORDS.update(container.storages or {})
        use_mmap = mmap and container.format == "zip"
        # only a mapped storage is the file's bytes: note those (a read-in one is a copy)
        _NOTE_SOURCES[0] = use_mmap
        target = _fd_path(fd, os.fspath(path))
        try:
            with warnings.catch_warnings():
                # legacy files carry each class's source and torch warns when a stand-in has
                # none to compare or torch's own layers changed since; we never use that source,
                # and under `-W error` either warning would fail the whole load
                warnings.filterwarnings("ignore", message="Couldn't retrieve source code",
                                        category=UserWarning)
                warnings.filterwarnings("ignore",
                                        category=torch.serialization.SourceChangeWarning)
                with _no_fake_mode_probes():
                    obj = torch.load(target, map_location="cpu", pickle_module=SAFE_PICKLE,
                                     weights_only=False, mmap=use_mmap)
        except (UnsafePickle, NotACheckpoint, TornWrite):
            raise
        except (EOFError, pickle.UnpicklingError) as e:
            if container.format == "legacy" and ("truncated" in str(e) or isinstance(e, EOFError)):
                raise TornWrite(f"incomplete or torn write: {e}") from None
            raise NotACheckpoint(f"corrupt pickle: {e}") from None
        except RecursionError:
            raise NotACheckpoint("pickle nests too deeply") from None
        except MemoryError:
            raise NotACheckpoint("pickle needs more memory than allowed") from None
        except Exception as e:  # torch's reader raises RuntimeError for damaged records
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "central directory" in msg or "truncated" in msg:
                raise TornWrite(f"incomplete or torn write: {msg}") from None
            raise NotACheckpoint(f"cannot be read as a torch checkpoint: {msg}") from None
        sources = dict(_SOURCES)
        return Loaded(obj, facts, container.format, frozenset(_LAST_GLOBALS), sources)
    finally:
        _SOURCES.clear()
        _STORAGE_RECORDS.clear()
        _NOTE_SOURCES[0] = False
        os.close(fd)


class _StructureUnpickler(SafeUnpickler):
    """Names storage types the way torch.load does (`torch.HalfStorage` -> a dtype holder)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(name, str) and name.endswith("Storage"):
            if name == "UntypedStorage":
                return torch.UntypedStorage
            try:
                return torch.serialization.StorageType(name)  # type: ignore[no-untyped-call]
            except (KeyError, AttributeError):
                raise UnsafePickle(f"torch.{name}") from None
        return super().find_class(module, name)


@dataclass(slots=True)
class Structure:
    """A checkpoint read back without its weights (see `load_structure`)."""

    obj: Any
    pickle: bytes
    # each storage as the pickle first names it: (key, dtype, bytes)
    storages: list[tuple[str, torch.dtype, int]]


def load_structure(path: os.PathLike[str] | str, *, read_through: Collection[str] = ()) -> Structure:
    """Unpickle a zip checkpoint's `data.pkl` with weight-less (meta) storages.

    The same policy as `load`, and every storage must name a record of exactly its size, but no
    storage is mapped or read: what comes back has the classes, keys, values and each tensor's
    dtype, shape, strides and offset, for comparing a freshly written file with what was meant.
    The records named in `read_through` are read whole on the way, which checks their CRC-32.
    The zip is parsed once for all of it.
    """
    fd, facts = open_regular(path)
    try:
        with os.fdopen(os.dup(fd), "rb") as f, zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            records = _storage_records(infos, zf.start_dir, facts.size)
            pkl = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pkl) != 1:
                raise NotACheckpoint("no single data.pkl record")
            data = zf.read(pkl[0])
            wanted = set(read_through)
            for info in infos:
                if info.filename in wanted and info is not pkl[0]:
                    with zf.open(info) as rec:
                        while rec.read(1 << 20):
                            pass
    except (OSError, zipfile.BadZipFile, NotImplementedError, ValueError, EOFError) as e:
        raise UnreadableFile(f"cannot read back: {e}") from None
    finally:
        os.close(fd)
    storages: dict[str, torch.UntypedStorage] = {}
    order: list[tuple[str, torch.dtype, int]] = []

    def persistent_load(saved_id: Any) -> Any:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise NotACheckpoint(f"unexpected persistent id {saved_id!r:.80}")
        _kind, storage_type, key, _location, _numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        rec = _check_storage(saved_id, records)
        if rec is None:
            raise NotACheckpoint(f"unexpected persistent id {saved_id!r:.80}")
        nbytes = rec.size
        storage = storages.get(str(key))
        if storage is None:
            storage = storages[str(key)] = torch.UntypedStorage(nbytes, device="meta")  # type: ignore[no-untyped-call]
            order.append((str(key), dtype, nbytes))
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)  # type: ignore[no-untyped-call]

    unpickler = _StructureUnpickler(io.BytesIO(data))
    # set torch's slot directly: the size check above replaces `checked`'s
    pickle.Unpickler.__dict__["persistent_load"].__set__(unpickler, persistent_load)
    try:
        with _no_fake_mode_probes():
            return Structure(unpickler.load(), data, order)
    except (UnsafePickle, NotACheckpoint):
        raise
    except (EOFError, pickle.UnpicklingError, RecursionError, MemoryError) as e:
        raise NotACheckpoint(f"corrupt pickle: {e}") from None

