"""The static pickle scan, as tables: what a pickle names, in which role, and what it refuses.

Pure tests of `engine.opscan` on hand-assembled pickles (nothing is unpickled), plus the output
check of `checkpoint.verify`: a written file whose pickle names a global or a role its source
did not is refused before any replace.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt_watchd.engine import atomic, opscan, policy, safeload, strip
from ckpt_watchd.engine import checkpoint as engine
from ckpt_watchd.errors import LimitExceeded, NotACheckpoint, UnsafePickle, Unsupported, VerifyFailed
from fixtures.payloads import pglobal, pstr

P2 = b"\x80\x02"
MARK, TUPLE, REDUCE, BUILD, NEWOBJ, STOP = b"(", b"t", b"R", b"b", b"\x81", b"."
EMPTY_DICT, EMPTY_TUPLE, EMPTY_LIST, SETITEM, APPEND = b"}", b")", b"]", b"s", b"a"


def _put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def _get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


def _sglobal(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4): module and name pushed as strings."""
    return pstr(module) + pstr(name) + b"\x93"


def _storage(key: str = "0") -> bytes:
    return (MARK + pstr("storage") + pglobal("torch", "FloatStorage") + pstr(key) + pstr("cpu")
            + b"K\x04" + TUPLE + b"Q")


def _tensor() -> bytes:
    return (pglobal("torch._utils", "_rebuild_tensor_v2") + MARK + _storage() + b"K\x00"
            + b"K\x04\x85" + b"K\x01\x85" + b"\x89" + pglobal("collections", "OrderedDict")
            + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE)


def uses(body: bytes, proto: bytes = P2) -> set[tuple[str, Any]]:
    return set(opscan.scan(proto + body + STOP).uses)


ROLES: list[tuple[str, bytes, set[tuple[str, Any]]]] = [
    ("a state dict", EMPTY_DICT + pstr("w") + _tensor() + SETITEM, {
        ("torch._utils._rebuild_tensor_v2", policy.CALL), ("torch.FloatStorage", policy.PERSID),
        ("collections.OrderedDict", policy.CALL)}),
    ("a module built by NEWOBJ + BUILD", pglobal("models.yolo", "Detect") + EMPTY_TUPLE + NEWOBJ
     + EMPTY_DICT + pstr("nc") + b"K\x02" + SETITEM + BUILD,
     {("models.yolo.Detect", policy.NEW)}),
    ("a dtype as a value", EMPTY_DICT + pstr("dtype") + pglobal("torch", "float16") + SETITEM,
     {("torch.float16", policy.VALUE)}),
    ("protocol 2 spelling of set", pglobal("__builtin__", "set") + EMPTY_LIST + b"\x85" + REDUCE,
     {("builtins.set", policy.CALL)}),
    ("MMEngine's getattr(HistoryBuffer, 'min')", pglobal("__builtin__", "getattr")
     + pglobal("mmengine.logging.history_buffer", "HistoryBuffer") + pstr("min") + b"\x86" + REDUCE,
     {("builtins.getattr", policy.CALL),
      ("mmengine.logging.history_buffer.HistoryBuffer", (policy.ARG, "builtins.getattr", 0))}),
    ("a memoised global used twice", pglobal("models.yolo", "Conv") + _put(0) + EMPTY_TUPLE
     + NEWOBJ + b"0" + _get(0) + EMPTY_TUPLE + NEWOBJ, {("models.yolo.Conv", policy.NEW)}),
    ("a nested class at protocol 4", _sglobal("lib", "Thing.Inner") + EMPTY_TUPLE + NEWOBJ,
     {("lib.Thing.Inner", policy.NEW)}),
]


@pytest.mark.parametrize(("what", "body", "expected"), ROLES, ids=[r[0] for r in ROLES])
def test_each_global_is_reported_with_the_role_it_plays(what: str, body: bytes,
                                                        expected: set[tuple[str, Any]]) -> None:
    """The scan names every global with its role: call, new, value, storage type or argument."""
    proto = b"\x80\x04" if "protocol 4" in what else P2
    assert uses(body, proto) == expected


REFUSED: list[tuple[str, bytes, type[Exception], str]] = [
    ("os.system called", pglobal("os", "system") + pstr("x") + b"\x85" + REDUCE,
     UnsafePickle, "'os.system'"),
    ("commands.call is subprocess.call", pglobal("commands", "call") + pstr("x") + b"\x85"
     + REDUCE, UnsafePickle, "'subprocess.call'"),
    ("a newline in a STACK_GLOBAL name", _sglobal("models.yolo", "Detect\ncos\nsystem")
     + EMPTY_TUPLE + NEWOBJ, UnsafePickle, "Detect"),
    ("a trainer class called with REDUCE", pglobal("models.yolo", "Detect") + EMPTY_TUPLE
     + REDUCE, UnsafePickle, "called with REDUCE"),
    ("a torch layer called with arguments", pglobal("torch.nn.modules.linear", "Linear")
     + b"M\x40\x1fM\x40\x1f\x86" + REDUCE, UnsafePickle, "called with REDUCE"),
    ("a class as a plain value", EMPTY_DICT + pstr("k") + pglobal("models.yolo", "Detect")
     + SETITEM, UnsafePickle, "plain value"),
    ("BUILD on a class", pglobal("pathlib", "PurePath") + b"N" + EMPTY_DICT + pstr("_str")
     + pstr("/evil") + SETITEM + b"\x86" + BUILD, UnsafePickle, "BUILD on the global"),
    ("BUILD setting __class__", pglobal("models.yolo", "Detect") + EMPTY_TUPLE + NEWOBJ
     + EMPTY_DICT + pstr("__class__") + b"K\x01" + SETITEM + BUILD, UnsafePickle, "__class__"),
    ("BUILD shadowing OrderedDict.items", pglobal("collections", "OrderedDict") + EMPTY_TUPLE
     + REDUCE + EMPTY_DICT + pstr("items") + b"K\x01" + SETITEM + BUILD, UnsafePickle, "items"),
    ("REDUCE of a computed callable", pglobal("__builtin__", "getattr")
     + pglobal("mmengine.logging.history_buffer", "HistoryBuffer") + pstr("min") + b"\x86"
     + REDUCE + EMPTY_TUPLE + REDUCE, UnsafePickle, "not a named function"),
    ("getattr of another class", pglobal("__builtin__", "getattr") + pglobal("models.yolo", "X")
     + pstr("min") + b"\x86" + REDUCE, UnsafePickle, "models.yolo.X"),
    ("getattr of a private name", pglobal("__builtin__", "getattr")
     + pglobal("mmengine.logging.history_buffer", "HistoryBuffer") + pstr("_data") + b"\x86"
     + REDUCE, UnsafePickle, "public method"),
    ("_reconstructor over dict", pglobal("copy_reg", "_reconstructor")
     + pglobal("models.yolo", "X") + pglobal("__builtin__", "dict") + b"N\x87" + REDUCE,
     UnsafePickle, "builtins.dict"),
    ("SETITEM on a tensor", _tensor() + pstr("k") + b"K\x01" + SETITEM, UnsafePickle, "tensor"),
    ("APPEND on a dict", EMPTY_DICT + b"K\x01" + APPEND, UnsafePickle, "APPEND"),
    ("a tensor over no storage", pglobal("torch._utils", "_rebuild_tensor_v2") + MARK + b"K\x00"
     + TUPLE + REDUCE, UnsafePickle, "storage"),
    ("INST", b"(imodels.yolo\nDetect\n", Unsupported, "INST"),
    ("EXT1", b"\x82\x01", Unsupported, "EXT"),
    ("a text persistent id", b"P0\n", Unsupported, "persistent id"),
    ("an out-of-band buffer", b"\x97", Unsupported, "out-of-band"),
    ("a memo index bomb", EMPTY_LIST + _put(1 << 28), LimitExceeded, "memo index"),
    ("a 100k-deep tuple", EMPTY_TUPLE + b"\x85" * 100_000, LimitExceeded, "deeper"),
    ("a tuple-hash bomb", EMPTY_TUPLE + b"".join(_put(i) + b"0" + _get(i) + _get(i) + b"\x86"
                                                 for i in range(40)), LimitExceeded, "hash bomb"),
    ("a GET of nothing", _get(7), NotACheckpoint, "memo value not found"),
    ("a stack underflow", REDUCE, NotACheckpoint, "underflow"),
]


@pytest.mark.parametrize(("what", "body", "error", "says"), REFUSED, ids=[r[0] for r in REFUSED])
def test_the_scan_refuses_before_anything_is_unpickled(what: str, body: bytes,
                                                        error: type[Exception], says: str) -> None:
    """Each of these is refused by the scan with a named error saying why."""
    with pytest.raises(error) as info:
        opscan.scan(P2 + body + STOP)
    assert says in str(info.value)


def test_bytes_after_stop_and_a_missing_stop_are_corrupt() -> None:
    """A pickle is exactly one STOP-terminated stream: trailing bytes and truncation are refused."""
    with pytest.raises(NotACheckpoint, match="after the end"):
        opscan.scan(P2 + EMPTY_DICT + STOP + b"junk")
    with pytest.raises(NotACheckpoint, match="truncated"):
        opscan.scan(P2 + EMPTY_DICT)


def test_protocol_and_needs_are_reported() -> None:
    """The declared protocol, and the protocol a nested class name needs, come with the scan."""
    assert (opscan.scan(P2 + EMPTY_DICT + STOP).proto, opscan.scan(P2 + EMPTY_DICT + STOP).needs) \
        == (2, 2)
    nested = opscan.scan(b"\x80\x04" + _sglobal("lib", "A.B") + EMPTY_TUPLE + NEWOBJ + STOP)
    assert (nested.proto, nested.needs) == (4, 4)


def test_every_pickle_python_writes_scans_clean() -> None:
    """Plain data pickled by CPython at every protocol passes the scan (no false refusal)."""
    import collections
    import datetime

    value = {"a": [1, 2.5, None, True], "b": (b"x", "y"), "c": {1, 2}, "d": frozenset({3}),
             "e": collections.OrderedDict(k=1), "f": datetime.datetime(2026, 1, 2),
             "g": bytearray(b"z"), 4: {"nested": [(1,), ()]}}
    for proto in range(2, 6):
        opscan.scan(pickle.dumps(value, protocol=proto))


# ------------------------------------------------------------------------------ the output check


def _written(path: Path) -> tuple[dict[str, Any], Path, Any, Any]:
    loaded = safeload.load(path)
    profile = strip.detect_profile(loaded.obj, loaded.globals_seen)
    stripped = strip.strip(loaded.obj, profile, now=__import__("datetime").datetime.now())
    out = path.with_name("out.pt")
    writer = atomic.RecordingWriter(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        written = engine._save(stripped, writer, path, loaded)
        atomic.finish_write(writer)
    finally:
        writer.close()
    return stripped, out, written, loaded


def test_the_output_may_name_only_what_the_source_named(checkpoint: Callable[..., Path]) -> None:
    """An output naming a global (or role) the source's pickle did not is refused by verify."""
    stripped, out, written, loaded = _written(path := checkpoint("yolov5"))
    allowed = loaded.scan.uses | engine.WRITER_VOCABULARY
    engine.verify(stripped, out, written, source=path, allowed=allowed)  # as written: accepted
    fewer = frozenset(u for u in allowed if u[0] != "models.yolo.DetectionModel")
    with pytest.raises(VerifyFailed, match=r"models\.yolo\.DetectionModel"):
        engine.verify(stripped, out, written, source=path, allowed=fewer)
    as_a_call = (allowed - {("models.yolo.Detect", policy.NEW)}) | {
        ("models.yolo.Detect", policy.CALL)}
    with pytest.raises(VerifyFailed, match="instantiated with NEWOBJ"):
        engine.verify(stripped, out, written, source=path, allowed=as_a_call)


def test_every_strip_of_the_fixtures_passes_its_own_output_scan(
        checkpoint: Callable[..., Path]) -> None:
    """The strips of each trainer layout name only what their sources named (plus torch's own)."""
    for kind in ("yolov5", "yolov5_fp32", "ultralytics", "generic", "lightning"):
        path = checkpoint(kind, directory=Path(str(checkpoint(kind)) + ".d"))
        stripped, out, written, loaded = _written(path)
        engine.verify(stripped, out, written, source=path,
                      allowed=loaded.scan.uses | engine.WRITER_VOCABULARY)
