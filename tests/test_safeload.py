"""Unit tests of the safe loader: the policy's runtime objects, stand-ins and their round trip.

Pure tests of `engine.policy`, `engine.guards`, `engine.standin` and `engine.safeload`: tables of
names and what the unpickler is given for each, hand-made pickles for the ways a pickle builds
objects (REDUCE, NEWOBJ, APPENDS, BUILD), a round trip through the stand-in pickler, and a
hypothesis test that damaged checkpoints only raise `CheckpointError`s.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import pickletools
import resource
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_watchd.engine import guards, policy, safeload, standin
from ckpt_watchd.errors import CheckpointError, UnsafePickle, Unsupported
from fixtures import summary

# (module, name, what the unpickler gets, what calling it with these arguments builds)
BUILDERS = [
    ("collections", "OrderedDict", (), collections.OrderedDict()),
    ("__builtin__", "set", ([1, 2],), {1, 2}),
    ("builtins", "frozenset", ([3],), frozenset({3})),
    ("torch", "Size", ((2, 3),), torch.Size([2, 3])),
    ("_codecs", "encode", ("\x00\xff", "latin1"), b"\x00\xff"),
    ("fractions", "Fraction", ("3/4",), __import__("fractions").Fraction(3, 4)),
]


@pytest.mark.parametrize(("module", "name", "args", "built"), BUILDERS)
def test_data_constructors_are_guards_that_build_the_real_value(module: str, name: str,
                                                                args: tuple[Any, ...],
                                                                built: Any) -> None:
    """A global that builds data is a guard, never the real function; called, it builds the value."""
    obj = guards.find(module, name)
    assert isinstance(obj, guards.Guard)
    assert obj(*args) == built and type(obj(*args)) is type(built)


def test_dtypes_are_the_real_immutable_values() -> None:
    """`torch.float16` is the real dtype (immutable, nothing to change or call)."""
    assert guards.find("torch", "float16") is torch.float16


def test_torch_layers_and_trainer_classes_are_inert_stand_ins() -> None:
    """torch.nn classes and unknown classes keep module and name, one class per name, import nothing."""
    conv = guards.find("torch.nn.modules.conv", "Conv2d")
    assert standin.is_standin_class(conv) and conv is not torch.nn.Conv2d
    cls = guards.find("models.yolo", "DetectionModel")
    assert standin.is_standin_class(cls)
    assert (cls.__module__, cls.__qualname__) == ("models.yolo", "DetectionModel")
    assert guards.find("models.yolo", "DetectionModel") is cls
    assert guards.find("models.common", "DetectionModel") is not cls
    assert "models" not in sys.modules and "models.yolo" not in sys.modules
    assert standin.class_name(cls.__new__(cls)) == "models.yolo.DetectionModel"


REFUSED = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"),
    ("builtins", "exec"), ("builtins", "__import__"), ("builtins", "open"),
    ("__builtin__", "eval"), ("subprocess", "Popen"), ("subprocess", "check_output"),
    ("commands", "getoutput"), ("importlib", "import_module"), ("runpy", "run_path"),
    ("torch", "load"), ("torch.serialization", "load"), ("torch.nn.modules.conv", "F"),
    ("torch.hub", "load"), ("numpy", "load"), ("numpy.testing._private.utils", "runstring"),
    ("pickle", "loads"), ("_pickle", "loads"), ("cPickle", "loads"), ("shutil", "rmtree"),
    ("ctypes", "CDLL"), ("webbrowser", "open"), ("sys", "modules"), ("operator", "attrgetter"),
    ("functools", "partial"), ("code", "InteractiveInterpreter"), ("models.yolo", "__reduce__"),
    ("", "x"), ("models\nyolo", "X"), ("models.yolo", "X\nc"), ("models.yolo", "a b"),
]


@pytest.mark.parametrize(("module", "name"), REFUSED)
def test_dangerous_globals_are_refused_by_name(module: str, name: str) -> None:
    """Anything that could run code, or a name that is not a plain identifier, is refused."""
    with pytest.raises(UnsafePickle) as info:
        guards.find(module, name)
    assert "nothing was executed" in info.value.message


@pytest.mark.parametrize(("raw", "resolved"), [
    (("__builtin__", "set"), ("builtins", "set")),
    (("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")),
    (("commands", "call"), ("subprocess", "call")),
    (("exceptions", "OSError"), ("builtins", "OSError")),
    (("UserDict", "UserDict"), ("collections", "UserDict")),
    (("torch.tensor", "_rebuild_from_type_v2"), ("torch._tensor", "_rebuild_from_type_v2")),
])
def test_names_resolve_as_pickle_resolves_them(raw: tuple[str, str],
                                               resolved: tuple[str, str]) -> None:
    """Python 2 names map through _compat_pickle (fix_imports), and torch's own rename applies."""
    assert policy.resolve(*raw, proto=2) == resolved


def test_a_dotted_name_needs_protocol_4() -> None:
    """`Thing.Inner` resolves only from protocol 4 on, as in CPython; before that it is unsupported."""
    assert policy.resolve("lib", "Thing.Inner", proto=4) == ("lib", "Thing.Inner")
    with pytest.raises(Unsupported):
        policy.resolve("lib", "Thing.Inner", proto=2)


@pytest.mark.parametrize(("name", "role", "ok"), [
    ("torch._utils._rebuild_tensor_v2", policy.CALL, True),
    ("torch._utils._rebuild_tensor_v2", policy.VALUE, False),
    ("models.yolo.DetectionModel", policy.NEW, True),
    ("models.yolo.DetectionModel", policy.CALL, False),
    ("models.yolo.DetectionModel", policy.VALUE, False),
    ("ultralytics.utils.IterableSimpleNamespace", policy.CALL, True),
    ("torch.float16", policy.VALUE, True),
    ("torch.float16", policy.CALL, False),
    ("torch.HalfStorage", policy.PERSID, True),
    ("torch.HalfStorage", policy.VALUE, False),
    ("builtins.object", (policy.ARG, "copyreg._reconstructor", 1), True),
    ("builtins.object", policy.VALUE, False),
    ("mmengine.logging.history_buffer.HistoryBuffer", (policy.ARG, "builtins.getattr", 0), True),
    ("models.yolo.DetectionModel", (policy.ARG, "builtins.getattr", 0), False),
    ("numpy.ndarray", (policy.ARG, "numpy._core.multiarray._reconstruct", 0), True),
    ("collections.OrderedDict", policy.NEW, False),
])
def test_each_global_may_play_only_its_roles(name: str, role: policy.Role, ok: bool) -> None:
    """The policy table: a role a global may not play is refused, naming the global."""
    if ok:
        policy.check(name, role)
    else:
        with pytest.raises(UnsafePickle) as info:
            policy.check(name, role)
        assert name in info.value.message


def test_codecs_encode_allows_only_latin1() -> None:
    """numpy's `_codecs.encode(s, 'latin1')` works; a codec that could import modules does not."""
    encode = guards.find("_codecs", "encode")
    assert encode("\x00\xff", "latin1") == b"\x00\xff"
    for codec in ("zlib_codec", "rot13", "hex", "base64", "utf-8"):
        with pytest.raises(UnsafePickle):
            encode("abc", codec)


def test_guards_and_stand_in_classes_refuse_build_and_calls() -> None:
    """BUILD on a shared object (a guard, a token, a stand-in class) and calling a class are refused."""
    for shared in (guards.find("collections", "OrderedDict"), guards.find("builtins", "object"),
                   guards.find("models.yolo", "Detect")):
        with pytest.raises(UnsafePickle):
            shared.__setstate__({"x": 1})
    with pytest.raises(UnsafePickle):
        guards.find("models.yolo", "Detect")(1, 2)
    with pytest.raises(UnsafePickle):
        guards.find("builtins", "object")()


# ------------------------------------------------------------------------------ how objects are built


def _globals_of(data: bytes) -> list[str]:
    return [str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]


def _ops(data: bytes) -> list[str]:
    return [op.name for op, _, _ in pickletools.genops(data)]


def _repickle(obj: Any, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    standin.StandInPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


# ultralytics.utils.IterableSimpleNamespace() then BUILD {'a': 1, 'b': 'x'} (SimpleNamespace's reduce)
REDUCE_BUILT = (b"\x80\x02cultralytics.utils\nIterableSimpleNamespace\n)R}(X\x01\x00\x00\x00aK\x01"
                b"X\x01\x00\x00\x00bX\x01\x00\x00\x00xub.")
# lib.ns.Point(1, 2): an unknown class called with arguments
REDUCE_ARGS = b"\x80\x02clib.ns\nPoint\nK\x01K\x02\x86R."
# copyreg.__newobj__: cls.__new__(cls) then BUILD {'w': 3}: how nn.Module subclasses pickle
NEWOBJ_BUILT = b"\x80\x02clib.ns\nObj\n)\x81}X\x01\x00\x00\x00wK\x03sb."
# a list subclass: NEWOBJ then APPENDS
LIST_BUILT = b"\x80\x02clib.ns\nMyList\n)\x81(K\x01K\x02e."


def test_a_named_namespace_call_pickles_back_as_that_call() -> None:
    """Ultralytics' IterableSimpleNamespace() + BUILD is allowed by name and written back the same."""
    obj = safeload.loads(REDUCE_BUILT)
    assert vars(obj) == {"a": 1, "b": "x"}
    assert dict(obj) == {"a": 1, "b": "x"}  # Ultralytics' strip does dict(model.args)
    data = _repickle(obj)
    assert "REDUCE" in _ops(data) and "NEWOBJ" not in _ops(data)
    assert _globals_of(data) == ["ultralytics.utils IterableSimpleNamespace"]
    assert vars(safeload.loads(data)) == {"a": 1, "b": "x"}


def test_an_unknown_class_called_with_reduce_is_refused() -> None:
    """`Point(1, 2)` would run the class's code in the trainer: refused, not stood in for."""
    with pytest.raises(UnsafePickle) as info:
        safeload.loads(REDUCE_ARGS)
    assert "lib.ns.Point" in info.value.message and "REDUCE" in info.value.message


def test_newobj_built_stand_in_pickles_back_with_newobj() -> None:
    """An object built with `cls.__new__` is written back the same way, never called."""
    obj = safeload.loads(NEWOBJ_BUILT)
    assert vars(obj) == {"w": 3}
    data = _repickle(obj)
    assert "NEWOBJ" in _ops(data) and "REDUCE" not in _ops(data)
    assert vars(safeload.loads(data)) == {"w": 3}


def test_list_subclass_stand_in_keeps_its_items() -> None:
    """Items added with APPENDS survive the round trip."""
    obj = safeload.loads(LIST_BUILT)
    assert obj[0] == 1 and obj[1] == 2
    again = safeload.loads(_repickle(obj))
    assert again._sw_items == [1, 2]


@pytest.mark.parametrize("protocol", [2, 4])
def test_stand_ins_round_trip_through_torch_save(generated: Path, tmp_path: Path,
                                                 protocol: int) -> None:
    """A loaded YOLOv5 checkpoint saved with the stand-in pickler reloads identical, real names."""
    loaded = safeload.load(generated / "yolov5.pt").obj
    module = types.SimpleNamespace(Pickler=standin.StandInPickler, dump=pickle.dump,
                                   dumps=pickle.dumps, __name__="stand_in_pickle")
    out = tmp_path / "again.pt"
    torch.save(loaded, out, pickle_module=module, pickle_protocol=protocol)
    with zipfile.ZipFile(out) as z:
        data_pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    assert b"models.yolo" in data_pkl and b"DetectionModel" in data_pkl
    assert b"ckpt_watchd" not in data_pkl
    if protocol == 2:
        assert "models.yolo DetectionModel" in _globals_of(data_pkl)
    back = safeload.load(out).obj
    assert summary.diff(summary.summarize(back), summary.summarize(loaded)) == []


def test_plain_values_round_trip_unchanged() -> None:
    """OrderedDict, a path, a numpy array, a Size and a set pickle back as themselves."""
    import pathlib

    value = {"od": collections.OrderedDict(a=1), "p": pathlib.PosixPath("/x/y"),
             "arr": np.array([0.5, 1.5]), "size": torch.Size([2, 3]), "s": {1, 2}}
    back = safeload.loads(_repickle(value))
    assert back["od"] == value["od"] and type(back["od"]) is collections.OrderedDict
    assert isinstance(back["p"], standin.CallValue) and back["p"]._sw_args == ("/", "x", "y")
    assert pickle.loads(_repickle(back["p"])) == value["p"]  # what the trainer gets back
    assert back["size"] == value["size"] and back["s"] == {1, 2}
    assert np.array_equal(back["arr"], value["arr"])


def test_load_returns_any_top_level_and_refuses_missing_files(tmp_path: Path) -> None:
    """`load` itself accepts a non-dict top level (the strip decides); a missing path is an error."""
    path = tmp_path / "x.pt"
    torch.save([1, 2, 3], path)
    assert safeload.load(path).obj == [1, 2, 3]
    with pytest.raises(CheckpointError):
        safeload.load(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------ fuzzing


def _pickle_span(raw: bytes) -> tuple[int, int]:
    """Byte range of data.pkl inside a stored (uncompressed) torch zip."""
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    n, m = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + n + m
    return start, start + info.file_size


@pytest.fixture(scope="module")
def fuzz_base(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    raw = (generated / "ultralytics_stripped.pt").read_bytes()
    return raw, tmp_path_factory.mktemp("fuzz") / "last.pt"


Edit = tuple[str, int, bytes]


@st.composite
def _edits(draw: st.DrawFn, raw: bytes) -> list[Edit]:
    """A few byte edits, mostly inside data.pkl and the zip directory at the end."""
    start, end = _pickle_span(raw)
    region = draw(st.sampled_from(["pickle", "pickle", "tail", "anywhere"]))
    lo, hi = {"pickle": (start, end), "tail": (max(0, len(raw) - 4096), len(raw)),
              "anywhere": (0, len(raw))}[region]
    kinds = st.sampled_from(["overwrite", "overwrite", "delete", "insert", "truncate"])
    return draw(st.lists(st.tuples(kinds, st.integers(lo, hi - 1),
                                   st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))


def _apply(raw: bytes, edits: list[Edit]) -> bytes:
    data = bytearray(raw)
    for kind, pos, chunk in edits:
        pos = min(pos, len(data))
        if kind == "overwrite":
            data[pos:pos + len(chunk)] = chunk
        elif kind == "delete":
            del data[pos:pos + len(chunk)]
        elif kind == "insert":
            data[pos:pos] = chunk
        else:
            del data[pos:]
    return bytes(data)


@contextlib.contextmanager
def _address_space_cap(headroom: int = 512 << 20) -> Iterator[None]:
    """Cap this process's address space at its current size plus `headroom`, then restore."""
    status = Path("/proc/self/status")
    if not status.exists():
        yield
        return
    vm = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
              if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + headroom if hard == resource.RLIM_INFINITY else min(hard, vm + headroom)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_damaged_checkpoints_raise_only_checkpoint_errors(fuzz_base: tuple[bytes, Path],
                                                          data: st.DataObject) -> None:
    """Random byte damage to a real checkpoint loads or raises a CheckpointError, nothing else."""
    raw, path = fuzz_base
    path.write_bytes(_apply(raw, data.draw(_edits(raw))))
    try:
        with _address_space_cap():
            safeload.load(path)
    except CheckpointError:
        pass


def test_a_huge_memo_index_is_refused_before_unpickling(tmp_path: Path) -> None:
    """LONG_BINPUT 0x0fffffff (a 2 GiB memo) is refused by the scan, as a memory bomb."""
    path = tmp_path / "last.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}r\xff\xff\xff\x0f.")
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError) as info:
        safeload.load(path)
    assert info.value.kind == "limit" and "memory" in info.value.message
