"""Unit tests of the safe loader: the global policy, stand-ins and their round trip, fuzzed input.

Pure tests of `ckpt_watchd.engine.safeload`: tables for `resolve_global`, hand-made pickles for the ways a
pickle builds objects (REDUCE, NEWOBJ, APPENDS), a round trip through `torch.save` with the
stand-in pickler, and a hypothesis test that damaged checkpoints only raise `CheckpointError`s.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pathlib
import pickletools
import resource
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_watchd.engine import safeload
from ckpt_watchd.errors import CheckpointError, UnsafePickle
from fixtures import summary

REAL = [
    ("collections", "OrderedDict", collections.OrderedDict),
    ("__builtin__", "set", set),
    ("builtins", "frozenset", frozenset),
    ("torch._utils", "_rebuild_tensor_v2", torch._utils._rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter", torch._utils._rebuild_parameter),
    ("torch", "Size", torch.Size),
    ("torch", "float16", torch.float16),
    ("torch.nn.modules.conv", "Conv2d", torch.nn.Conv2d),
    ("torch.nn.modules.container", "Sequential", torch.nn.Sequential),
    ("numpy", "dtype", np.dtype),
    ("numpy", "ndarray", np.ndarray),
    ("pathlib", "PosixPath", pathlib.PosixPath),
]


@pytest.mark.parametrize(("module", "name", "expected"), REAL)
def test_allowlisted_globals_are_the_real_objects(module: str, name: str, expected: Any) -> None:
    """Allowlisted names resolve to the genuine object, not a stand-in."""
    assert safeload.resolve_global(module, name) is expected


REFUSED = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"),
    ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
    ("builtins", "open"), ("__builtin__", "eval"), ("__builtin__", "getattr"),
    ("subprocess", "Popen"), ("subprocess", "check_output"), ("importlib", "import_module"),
    ("runpy", "run_path"), ("torch", "load"), ("torch.serialization", "load"),
    ("torch.nn.modules.conv", "F"), ("torch.hub", "load"), ("numpy", "load"),
    ("numpy.testing._private.utils", "runstring"), ("pickle", "loads"), ("_pickle", "loads"),
    ("shutil", "rmtree"), ("ctypes", "CDLL"), ("webbrowser", "open"), ("sys", "modules"),
    ("operator", "attrgetter"), ("functools", "partial"), ("code", "InteractiveInterpreter"),
    ("models.yolo", "__reduce__"), ("", "x"),
]


@pytest.mark.parametrize(("module", "name"), REFUSED)
def test_dangerous_globals_are_refused_by_name(module: str, name: str) -> None:
    """Anything that could run code is refused with UnsafePickle naming the global."""
    with pytest.raises(UnsafePickle) as info:
        safeload.resolve_global(module, name)
    assert name in info.value.message and "nothing was executed" in info.value.message


def test_protocol_2_builtin_names_map_to_builtins() -> None:
    """`__builtin__.set` (protocol 2) loads as a set; `__builtin__.eval` is refused as builtins.eval."""
    data = b"\x80\x02c__builtin__\nset\n]K\x01a\x85R."
    assert safeload.SAFE_PICKLE.loads(data) == {1}
    with pytest.raises(UnsafePickle) as info:
        safeload.SAFE_PICKLE.loads(b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R.")
    assert info.value.global_name == "builtins.eval"


def test_codecs_encode_allows_only_plain_text_codecs() -> None:
    """numpy's `_codecs.encode(s, 'latin1')` works; a codec that could import modules does not."""
    encode = safeload.resolve_global("_codecs", "encode")
    assert encode("\x00\xff", "latin1") == b"\x00\xff"
    for codec in ("zlib_codec", "rot13", "hex", "base64"):
        with pytest.raises(UnsafePickle):
            encode("abc", codec)


def test_trainer_classes_become_inert_stand_ins() -> None:
    """Unknown classes keep module and name, are one class per name, and import nothing."""
    cls = safeload.resolve_global("models.yolo", "DetectionModel")
    assert safeload.is_standin_class(cls)
    assert (cls.__module__, cls.__qualname__) == ("models.yolo", "DetectionModel")
    assert safeload.resolve_global("models.yolo", "DetectionModel") is cls
    assert safeload.resolve_global("models.common", "DetectionModel") is not cls
    assert "models" not in sys.modules and "models.yolo" not in sys.modules
    obj = cls.__new__(cls)
    assert safeload.class_name(obj) == "models.yolo.DetectionModel"


# ------------------------------------------------------------------------------ how objects are built


def _globals_of(data: bytes) -> list[str]:
    return [str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]


def _ops(data: bytes) -> list[str]:
    return [op.name for op, _, _ in pickletools.genops(data)]


def _repickle(obj: Any, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    safeload.StandInPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


# lib.ns.NS() then BUILD {'a': 1, 'b': 'x'}: how SimpleNamespace-like classes pickle
REDUCE_BUILT = (b"\x80\x02clib.ns\nNS\n)R}(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00b"
                b"X\x01\x00\x00\x00xub.")
# lib.ns.Point(1, 2): called with arguments, no state
REDUCE_ARGS = b"\x80\x02clib.ns\nPoint\nK\x01K\x02\x86R."
# copyreg.__newobj__: cls.__new__(cls) then BUILD {'w': 3}: how nn.Module subclasses pickle
NEWOBJ_BUILT = b"\x80\x02clib.ns\nObj\n)\x81}X\x01\x00\x00\x00wK\x03sb."
# a list subclass: NEWOBJ then APPENDS
LIST_BUILT = b"\x80\x02clib.ns\nMyList\n)\x81(K\x01K\x02e."


def test_reduce_built_stand_in_pickles_back_with_reduce() -> None:
    """An object the pickle *called* into being is written back as a call, with its state."""
    obj = safeload.SAFE_PICKLE.loads(REDUCE_BUILT)
    assert vars(obj) == {"a": 1, "b": "x"}
    assert dict(obj) == {"a": 1, "b": "x"}  # Ultralytics' strip does dict(model.args)
    data = _repickle(obj)
    assert "REDUCE" in _ops(data) and "NEWOBJ" not in _ops(data)
    assert _globals_of(data) == ["lib.ns NS"]
    assert vars(safeload.SAFE_PICKLE.loads(data)) == {"a": 1, "b": "x"}


def test_reduce_with_arguments_keeps_them() -> None:
    """`Point(1, 2)` comes back as `Point(1, 2)`."""
    obj = safeload.SAFE_PICKLE.loads(REDUCE_ARGS)
    data = _repickle(obj)
    again = safeload.SAFE_PICKLE.loads(data)
    assert again._sw_args == ((1, 2), {}) and again._sw_how == "call"
    assert _repickle(again) == data


def test_newobj_built_stand_in_pickles_back_with_newobj() -> None:
    """An object built with `cls.__new__` is written back the same way, never called."""
    obj = safeload.SAFE_PICKLE.loads(NEWOBJ_BUILT)
    assert vars(obj) == {"w": 3}
    data = _repickle(obj)
    assert "NEWOBJ" in _ops(data) and "REDUCE" not in _ops(data)
    assert vars(safeload.SAFE_PICKLE.loads(data)) == {"w": 3}


def test_list_subclass_stand_in_keeps_its_items() -> None:
    """Items added with APPENDS survive the round trip."""
    obj = safeload.SAFE_PICKLE.loads(LIST_BUILT)
    assert obj[0] == 1 and obj[1] == 2
    again = safeload.SAFE_PICKLE.loads(_repickle(obj))
    assert again._sw_items == [1, 2]


@pytest.mark.parametrize("protocol", [2, 4])
def test_stand_ins_round_trip_through_torch_save(generated: Path, protocol: int) -> None:
    """A loaded YOLOv5 checkpoint saved with SAVE_PICKLE reloads identical, under the real names."""
    loaded = safeload.load(generated / "yolov5.pt").obj
    buf = io.BytesIO()
    torch.save(loaded, buf, pickle_module=safeload.SAVE_PICKLE, pickle_protocol=protocol)
    raw = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        data_pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    assert b"models.yolo" in data_pkl and b"DetectionModel" in data_pkl
    assert b"ckpt_watchd" not in data_pkl
    if protocol == 2:
        assert "models.yolo DetectionModel" in _globals_of(data_pkl)
    back = torch.load(io.BytesIO(raw), pickle_module=safeload.SAFE_PICKLE, weights_only=False)
    assert summary.diff(summary.summarize(back), summary.summarize(loaded)) == []


def test_plain_objects_round_trip_unchanged() -> None:
    """Allowlisted values (OrderedDict, Path, numpy, Size, set) pickle back as themselves."""
    value = {"od": collections.OrderedDict(a=1), "p": pathlib.PosixPath("/x/y"),
             "arr": np.array([0.5, 1.5]), "size": torch.Size([2, 3]), "s": {1, 2}}
    back = safeload.SAFE_PICKLE.loads(_repickle(value))
    assert back["od"] == value["od"] and type(back["od"]) is collections.OrderedDict
    assert back["p"] == value["p"] and back["size"] == value["size"] and back["s"] == {1, 2}
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
    """Cap this process's address space at its current size plus `headroom`, then restore.

    A damaged LONG_BINPUT can ask the C unpickler for a memo of billions of slots, which it
    zero-fills: without a cap that is an OOM kill (of this process, or of a trainer). Under a cap it
    is a MemoryError, which the loader must report as a CheckpointError like any other damage.
    """
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


def test_a_huge_memo_index_is_a_checkpoint_error(tmp_path: Path) -> None:
    """LONG_BINPUT 0x0fffffff (a 2 GiB memo) fails as a CheckpointError under a memory cap."""
    path = tmp_path / "last.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}r\xff\xff\xff\x0f.")
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError) as info, _address_space_cap(headroom=1 << 30):
        safeload.load(path)
    assert "memory" in info.value.message
