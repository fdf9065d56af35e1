"""The static pickle scan: walk a pickle opcode by opcode, without unpickling it, and say which
globals it names, in which role each is used, and how deep and big what it builds would be.

It runs on a checkpoint's data.pkl before anything is unpickled (so a refused global, a tuple-hash
bomb, a memo-index bomb or a 2M-deep nesting never reaches the unpickler), and again on the pickle
about to be written, independently of the stand-in machinery. It is an abstract interpreter of
CPython's C unpickler (`Modules/_pickle.c`): the same stack, marks, fence and memo, with abstract
values instead of objects. Where CPython is lenient it may be stricter, never the other way round.
Pure: no torch, no I/O; the policy decides every (global, role) pair it meets.
"""

from __future__ import annotations

import codecs
import collections
import struct
from dataclasses import dataclass
from typing import Any

from ckpt_watchd.engine import policy
from ckpt_watchd.errors import LimitExceeded, NotACheckpoint, UnsafePickle, Unsupported

MAX_DEPTH = 400  # a pickler recursion stays far below Python's limit of 1000
MAX_HASH_SIZE = 1 << 22  # a tuple's size, counting shared parts each time: what hashing it costs

_u1 = struct.Struct("<B").unpack_from
_u2 = struct.Struct("<H").unpack_from
_i4 = struct.Struct("<i").unpack_from
_u4 = struct.Struct("<I").unpack_from
_u8 = struct.Struct("<Q").unpack_from
# attributes an OrderedDict's instance __dict__ must not shadow (BUILD writes straight into it)
_ODICT_ATTRS = frozenset(dir(collections.OrderedDict))


# ------------------------------------------------------------------------------ abstract values


class _V:
    """An abstract value: how deep it nests, what hashing it costs, whether globals are inside."""

    __slots__ = ()
    depth = 0
    size = 1
    has_g = False


class _Scalar(_V):
    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what


_S = _Scalar("scalar")
_NONE = _Scalar("None")


class _Str(_V):
    __slots__ = ("s",)

    def __init__(self, s: str) -> None:
        self.s = s


class _G(_V):
    __slots__ = ("name",)
    has_g = True

    def __init__(self, name: str) -> None:
        self.name = name


class _Tup(_V):
    __slots__ = ("depth", "has_g", "items", "size", "valued")

    def __init__(self, items: list[_V] | tuple[_V, ...]) -> None:
        self.items = tuple(items)
        depth, size, has_g = 0, 1, False
        for x in self.items:
            if x.depth > depth:
                depth = x.depth
            size += x.size
            has_g = has_g or x.has_g
        self.depth = depth + 1
        self.size = size
        self.has_g = has_g
        self.valued = False
        if size > MAX_HASH_SIZE:
            raise LimitExceeded(f"a tuple of {size}+ elements counted through shared parts "
                                "(a hash bomb)")
        if depth + 1 > MAX_DEPTH:
            raise LimitExceeded(f"the pickle nests deeper than {MAX_DEPTH} levels")


# what may follow a box of each kind: items (APPEND/SETITEM/ADDITEMS), BUILD, use as a dict key
_APPENDABLE = frozenset({"list", "obj", "deque"})
_SETTABLE = frozenset({"dict", "odict", "obj"})
_UNHASHABLE = frozenset({"list", "dict", "set", "odict", "deque"})


class _Box(_V):
    """A mutable container or an object built by REDUCE/NEWOBJ, shared between stack and memo."""

    __slots__ = ("bad_keys", "depth", "keys", "kind")

    def __init__(self, kind: str, depth: int = 1) -> None:
        self.kind = kind
        self.depth = depth
        self.keys: set[str] | None = set() if kind == "dict" else None
        self.bad_keys = False


# ------------------------------------------------------------------------------ the result


@dataclass(frozen=True, slots=True)
class Scan:
    """What one pickle names and builds."""

    proto: int  # the protocol it declares (its first PROTO opcode; 0 without one)
    needs: int  # the lowest protocol its names can be written at (4 for dotted, 3 for non-ASCII)
    uses: frozenset[tuple[str, policy.Role]]  # (resolved global, role) pairs
    ops: int
    max_depth: int
    containers: int

    @property
    def globals(self) -> frozenset[str]:
        return frozenset(name for name, _role in self.uses)


# rules whose arguments are plain data, and the kind of what they return
_PLAIN_RULES = {"ordered_dict": "odict", "counter": "odict", "deque": "deque", "set": "set",
                "frozenset": "frozenset", "np_dtype": "npdtype", "meta_tensor": "tensor",
                "layout": "value", "size": "value", "device": "value", "bytes": "value",
                "bytearray": "value", "complex": "value", "slice": "value", "datetime": "value",
                "decimal": "value", "fraction": "value", "np_scalar": "value"}
_EMPTY = _Tup(())


def _arity(name: str, items: tuple[_V, ...], *allowed: int) -> None:
    if len(items) not in allowed:
        raise UnsafePickle(name, why=f"called with {len(items)} arguments")


def _named(name: str, items: tuple[_V, ...], i: int, use: Any) -> None:
    x = items[i]
    if type(x) is not _G:
        raise UnsafePickle(name, why=f"needs a named class as argument {i}")
    use(x.name, (policy.ARG, name, i))


def _corrupt(why: str) -> NotACheckpoint:
    return NotACheckpoint(f"corrupt pickle: {why}")


def _line(data: bytes, pos: int) -> tuple[bytes, int]:
    end = data.find(b"\n", pos)
    if end < 0:
        raise _corrupt("a text opcode without its newline")
    return data[pos:end], end + 1


def _text_int(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 12:  # stricter than CPython: plain digits only
        raise _corrupt(f"bad memo index {raw[:20]!r}")
    return int(raw)


def _decode_utf8(raw: bytes, errors: str = "strict") -> str:
    try:
        return raw.decode("utf-8", errors)
    except UnicodeDecodeError:
        raise _corrupt("a string that is not UTF-8") from None


def scan(data: bytes | memoryview) -> Scan:
    """Scan a whole pickle; raise UnsafePickle, Unsupported, LimitExceeded or NotACheckpoint."""
    data = bytes(data)
    n = len(data)
    stack: list[_V] = []
    marks: list[int] = []
    fence = 0
    memo: dict[int, _V] = {}
    uses: set[tuple[str, policy.Role]] = set()
    proto = 0
    declared: int | None = None
    needs = 2
    ops = 0
    max_depth = 0
    containers = 0
    pos = 0

    def use(name: str, role: policy.Role) -> None:
        key = (name, role)
        if key not in uses:
            policy.check(name, role)
            uses.add(key)

    def consume(x: _V) -> None:
        # `x` becomes data (an item, a state, a generic argument): globals in it are values
        if not x.has_g:
            return
        if type(x) is _G:
            use(x.name, policy.VALUE)
            return
        todo = [x]
        while todo:
            t = todo.pop()
            if type(t) is _G:
                use(t.name, policy.VALUE)
            elif type(t) is _Tup and not t.valued:
                t.valued = True
                todo.extend(i for i in t.items if i.has_g)

    def grow(box: _Box, x: _V) -> None:
        nonlocal max_depth
        if x is box:  # a container holding itself is a cycle, not nesting
            return
        d = x.depth + 1
        if d > box.depth:
            if d > MAX_DEPTH:
                raise LimitExceeded(f"the pickle nests deeper than {MAX_DEPTH} levels")
            box.depth = d
            if d > max_depth:
                max_depth = d

    def hashable(x: _V) -> None:
        if type(x) is _Box and x.kind in _UNHASHABLE:
            raise _corrupt(f"an unhashable {x.kind} used as a key")

    def marker() -> int:
        nonlocal fence
        if not marks:
            raise _corrupt("could not find MARK")
        k = marks.pop()
        fence = marks[-1] if marks else 0
        return k

    def pop() -> _V:
        if len(stack) <= fence:
            raise _corrupt("unpickling stack underflow")
        return stack.pop()

    def put(idx: int) -> None:
        if len(stack) <= fence:
            raise _corrupt("unpickling stack underflow")
        if idx > n:  # CPython would grow its memo array to twice this index, at once
            raise LimitExceeded(f"memo index {idx} in a {n}-byte pickle (a memory bomb)")
        memo[idx] = stack[-1]

    def get(idx: int) -> None:
        try:
            stack.append(memo[idx])
        except KeyError:
            raise _corrupt(f"memo value not found at index {idx}") from None

    def glob(module: str, name: str) -> None:
        nonlocal needs
        module, name = policy.resolve(module, name, proto)
        full = f"{module}.{name}"
        policy.kind(full)  # refused in every role (os.system): say so where it is named
        if not full.isascii():
            needs = max(needs, 3)
        if "." in name:
            needs = max(needs, 4)
        stack.append(_G(full))

    def set_items(target_at: int, items: list[_V]) -> None:
        if target_at < 0:
            raise _corrupt("unpickling stack underflow")
        box = stack[target_at]
        if type(box) is not _Box or box.kind not in _SETTABLE:
            raise UnsafePickle("", why=f"SETITEM on {_what(box)}")
        if len(items) % 2:
            raise _corrupt("odd number of items for SETITEMS")
        for i in range(0, len(items), 2):
            k, v = items[i], items[i + 1]
            hashable(k)
            consume(k)
            consume(v)
            if box.keys is not None:
                if type(k) is _Str:
                    box.keys.add(k.s)
                else:
                    box.bad_keys = True
            grow(box, v)

    def append_items(target_at: int, items: list[_V]) -> None:
        if target_at < 0:
            raise _corrupt("unpickling stack underflow")
        box = stack[target_at]
        if type(box) is not _Box or box.kind not in _APPENDABLE:
            raise UnsafePickle("", why=f"APPEND on {_what(box)}")
        for x in items:
            consume(x)
            grow(box, x)

    def new_box(kind: str, items: list[_V] | tuple[_V, ...] = ()) -> _Box:
        nonlocal containers, max_depth
        containers += 1
        depth = 1
        for x in items:
            if x.depth + 1 > depth:
                depth = x.depth + 1
        if depth > MAX_DEPTH:
            raise LimitExceeded(f"the pickle nests deeper than {MAX_DEPTH} levels")
        max_depth = max(max_depth, depth)
        return _Box(kind, depth)

    def tup(items: list[_V] | tuple[_V, ...]) -> _Tup:
        nonlocal containers, max_depth
        containers += 1
        t = _Tup(items)
        if t.depth > max_depth:
            max_depth = t.depth
        return t

    def reduce(fn: _V, args: _V) -> _V:
        if type(fn) is not _G:
            raise UnsafePickle("", why=f"REDUCE calls {_what(fn)}, not a named function")
        if type(args) is not _Tup:
            raise _corrupt("REDUCE arguments are not a tuple")
        name = fn.name
        use(name, policy.CALL)
        rule = policy.CALLS[name]
        items = args.items
        if rule in _PLAIN_RULES:  # the common case: plain data in, plain data out
            for x in items:
                if x.has_g:
                    consume(x)
            return new_box(_PLAIN_RULES[rule], items)
        if rule in policy.TENSOR_RULES or rule in ("parameter", "parameter_with_state"):
            want = "storage" if rule in policy.TENSOR_RULES else "tensor"
            if not items or type(items[0]) is not _Box or items[0].kind != want:
                raise UnsafePickle(name, why=f"without a {want} of this file")
            for x in items[1:]:
                consume(x)
            return new_box("tensor", items)
        if rule == "from_type_v2":
            _arity(name, items, 4)
            _named(name, items, 0, use)
            _named(name, items, 1, use)
            consume(items[2])
            consume(items[3])
            return new_box("tensor", items)
        if rule == "getattr":
            _arity(name, items, 2)
            _named(name, items, 0, use)
            attr = items[1]
            if type(attr) is not _Str or not attr.s.isidentifier() or attr.s.startswith("_"):
                raise UnsafePickle(name, why="of a name that is not a public method")
            return new_box("func")
        if rule == "reconstructor":
            _arity(name, items, 3)
            _named(name, items, 0, use)
            _named(name, items, 1, use)
            if items[2] is not _NONE:
                raise UnsafePickle(name, why="with a state")
            return new_box("obj")
        if rule == "np_reconstruct":
            _arity(name, items, 3)
            _named(name, items, 0, use)
            consume(items[1])
            consume(items[2])
            return new_box("ndarray", items)
        if rule == "defaultdict":
            _arity(name, items, 0, 1, 2)
            if items and items[0] is not _NONE:
                _named(name, items, 0, use)
            for x in items[1:]:
                consume(x)
            return new_box("odict", items)
        if rule == "path":
            if not all(type(x) is _Str for x in items):
                raise UnsafePickle(name, why="with arguments that are not strings")
            return new_box("value", items)
        if rule == "namespace":
            _arity(name, items, 0)
            return new_box("obj")
        if rule == "encode":
            _arity(name, items, 2)
            if type(items[0]) is not _Str or type(items[1]) is not _Str:
                raise UnsafePickle(name, why="of something not a string")
            return _S
        raise AssertionError(f"rule {rule!r} has no scan")  # pragma: no cover - table mismatch

    def check_keys(d: _Box, odict: bool) -> None:
        if d.bad_keys:
            raise UnsafePickle("", why="BUILD with a state whose keys are not strings")
        assert d.keys is not None
        for k in d.keys:
            if k.startswith("__") and k.endswith("__"):
                raise UnsafePickle("", why=f"BUILD sets the special attribute {k!r}")
            if odict and k in _ODICT_ATTRS:
                raise UnsafePickle("", why=f"BUILD shadows OrderedDict.{k}")

    def build(target: _V, state: _V) -> None:
        kind = target.kind if type(target) is _Box else None
        if kind in ("ndarray", "npdtype"):
            if type(state) is not _Tup:
                raise UnsafePickle("", why=f"BUILD of a numpy {kind} with {_what(state)}")
        elif kind == "odict":
            # an OrderedDict's own attributes (a state_dict's _metadata), never slots
            if type(state) is not _Box or state.kind != "dict":
                raise UnsafePickle("", why=f"BUILD of a dict with {_what(state)}")
            check_keys(state, odict=True)
        elif kind == "obj":
            parts = [state]
            if type(state) is _Tup and len(state.items) == 2:  # (dict state, slot state)
                parts = [x for x in state.items if x is not _NONE]
            dicts = [x for x in parts if type(x) is _Box and x.kind == "dict"]
            if len(parts) == 2 and len(dicts) != 2 and type(state) is _Tup:
                parts = [state]  # a plain pair the class's own __setstate__ reads
                dicts = []
            for d in dicts:
                check_keys(d, odict=False)
        else:
            raise UnsafePickle("", why=f"BUILD on {_what(target)}")
        consume(state)
        assert type(target) is _Box
        grow(target, state)

    while pos < n:
        op = data[pos]
        pos += 1
        ops += 1
        # ordered by how often torch checkpoints use them
        if op == 0x68:  # BINGET
            if pos >= n:
                raise _corrupt("truncated")
            hit = memo.get(data[pos])
            if hit is None:
                get(data[pos])  # raises
            else:
                stack.append(hit)
            pos += 1
        elif op == 0x72:  # LONG_BINPUT
            if pos + 4 > n:
                raise _corrupt("truncated")
            idx = _u4(data, pos)[0]
            if len(stack) > fence and idx <= n:
                memo[idx] = stack[-1]
            else:
                put(idx)  # raises
            pos += 4
        elif op == 0x52:  # REDUCE
            args = pop()
            fn = pop()
            stack.append(reduce(fn, args))
        elif op == 0x4B:  # BININT1
            pos += 1
            stack.append(_S)
        elif op == 0x29:  # EMPTY_TUPLE
            stack.append(_EMPTY)
        elif op == 0x28:  # MARK
            marks.append(len(stack))
            fence = len(stack)
        elif op == 0x74:  # TUPLE
            k = marker()
            items = stack[k:]
            del stack[k:]
            stack.append(tup(items))
        elif op == 0x7D:  # EMPTY_DICT
            stack.append(new_box("dict"))
        elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
            count = op - 0x84
            if len(stack) - count < fence:
                raise _corrupt("unpickling stack underflow")
            items = stack[-count:]
            del stack[-count:]
            stack.append(tup(items))
        elif op in (0x88, 0x89):  # NEWTRUE, NEWFALSE
            stack.append(_S)
        elif op == 0x58:  # BINUNICODE
            if pos + 4 > n:
                raise _corrupt("truncated")
            size = _u4(data, pos)[0]
            pos += 4
            if pos + size > n:
                raise _corrupt("truncated")
            stack.append(_Str(_decode_utf8(data[pos:pos + size], "surrogatepass")))
            pos += size
        elif op == 0x75:  # SETITEMS
            k = marker()
            items = stack[k:]
            del stack[k:]
            set_items(k - 1, items)
        elif op == 0x51:  # BINPERSID
            pid = pop()
            if type(pid) is not _Tup or len(pid.items) != 5:
                raise Unsupported("a persistent id that is not a torch storage")
            kind_, stype, key, location, _numel = pid.items
            if type(kind_) is not _Str or kind_.s != "storage" or type(stype) is not _G or \
                    type(key) is not _Str or type(location) is not _Str or _numel is not _S:
                raise Unsupported("a persistent id that is not a torch storage")
            use(stype.name, policy.PERSID)
            stack.append(new_box("storage"))
        elif op == 0x6A:  # LONG_BINGET
            if pos + 4 > n:
                raise _corrupt("truncated")
            get(_u4(data, pos)[0])
            pos += 4
        elif op == 0x5D:  # EMPTY_LIST
            stack.append(new_box("list"))
        elif op == 0x4E:  # NONE
            stack.append(_NONE)
        elif op == 0x4D:  # BININT2
            pos += 2
            stack.append(_S)
        elif op == 0x62:  # BUILD
            if len(stack) - 2 < fence:
                raise _corrupt("unpickling stack underflow")
            state = stack.pop()
            build(stack[-1], state)
        elif op == 0x81:  # NEWOBJ
            args = pop()
            cls = pop()
            if type(cls) is not _G:
                raise UnsafePickle("", why=f"NEWOBJ of {_what(cls)}")
            if type(args) is not _Tup:
                raise _corrupt("NEWOBJ expected an arg tuple")
            use(cls.name, policy.NEW)
            consume(args)
            stack.append(new_box("obj", args.items))
        elif op == 0x47:  # BINFLOAT
            pos += 8
            stack.append(_S)
        elif op == 0x71:  # BINPUT
            if pos >= n:
                raise _corrupt("truncated")
            put(data[pos])
            pos += 1
        elif op == 0x73:  # SETITEM
            if len(stack) - 2 < fence:
                raise _corrupt("unpickling stack underflow")
            items = stack[-2:]
            del stack[-2:]
            set_items(len(stack) - 1, items)
        elif op == 0x4A:  # BININT
            pos += 4
            stack.append(_S)
        elif op == 0x65:  # APPENDS
            k = marker()
            items = stack[k:]
            del stack[k:]
            append_items(k - 1, items)
        elif op == 0x61:  # APPEND
            x = pop()
            append_items(len(stack) - 1, [x])
        elif op == 0x63:  # GLOBAL
            mod_raw, pos = _line(data, pos)
            name_raw, pos = _line(data, pos)
            glob(_decode_utf8(mod_raw), _decode_utf8(name_raw))
        elif op == 0x8C:  # SHORT_BINUNICODE
            if pos >= n:
                raise _corrupt("truncated")
            size = data[pos]
            pos += 1
            if pos + size > n:
                raise _corrupt("truncated")
            stack.append(_Str(_decode_utf8(data[pos:pos + size], "surrogatepass")))
            pos += size
        elif op == 0x93:  # STACK_GLOBAL
            name = pop()
            module = pop()
            if type(name) is not _Str or type(module) is not _Str:
                raise UnsafePickle("", why="STACK_GLOBAL of names that are not plain strings")
            glob(module.s, name.s)
        elif op == 0x94:  # MEMOIZE
            put(len(memo))
        elif op == 0x80:  # PROTO
            if pos >= n:
                raise _corrupt("truncated")
            proto = data[pos]
            pos += 1
            if proto > policy.HIGHEST:
                raise _corrupt(f"unsupported pickle protocol {proto}")
            if declared is None:
                declared = proto
        elif op == 0x95:  # FRAME
            if pos + 8 > n or _u8(data, pos)[0] > n - pos - 8:
                raise _corrupt("a frame longer than the pickle")
            pos += 8
        elif op == 0x2E:  # STOP
            result = pop()
            consume(result)
            if pos != n:
                raise _corrupt(f"{n - pos} bytes after the end of the pickle")
            return Scan(declared or 0, needs, frozenset(uses), ops, max(max_depth, result.depth),
                        containers)
        elif op in (0x8A, 0x8B):  # LONG1, LONG4
            if op == 0x8A:
                if pos >= n:
                    raise _corrupt("truncated")
                size, pos = data[pos], pos + 1
            else:
                if pos + 4 > n:
                    raise _corrupt("truncated")
                size, pos = _i4(data, pos)[0], pos + 4
                if size < 0:
                    raise _corrupt("LONG pickle has negative byte count")
            if pos + size > n:
                raise _corrupt("truncated")
            pos += size
            stack.append(_S)
        elif op in (0x42, 0x43, 0x8E, 0x96):  # BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
            width = {0x42: 4, 0x43: 1, 0x8E: 8, 0x96: 8}[op]
            if pos + width > n:
                raise _corrupt("truncated")
            size = (data[pos] if width == 1 else _u4(data, pos)[0] if width == 4
                    else _u8(data, pos)[0])
            pos += width
            if size > n - pos:
                raise _corrupt("truncated")
            pos += size
            stack.append(_S)
        elif op in (0x54, 0x55):  # BINSTRING, SHORT_BINSTRING (Python 2 str, decoded as UTF-8)
            if op == 0x54:
                if pos + 4 > n:
                    raise _corrupt("truncated")
                size, pos = _i4(data, pos)[0], pos + 4
                if size < 0:
                    raise _corrupt("BINSTRING pickle has negative byte count")
            else:
                if pos >= n:
                    raise _corrupt("truncated")
                size, pos = data[pos], pos + 1
            if pos + size > n:
                raise _corrupt("truncated")
            stack.append(_Str(_decode_utf8(data[pos:pos + size])))
            pos += size
        elif op == 0x8D:  # BINUNICODE8
            if pos + 8 > n:
                raise _corrupt("truncated")
            size = _u8(data, pos)[0]
            pos += 8
            if size > n - pos:
                raise _corrupt("truncated")
            stack.append(_Str(_decode_utf8(data[pos:pos + size], "surrogatepass")))
            pos += size
        elif op == 0x8F:  # EMPTY_SET
            stack.append(new_box("set"))
        elif op == 0x90:  # ADDITEMS
            k = marker()
            items = stack[k:]
            del stack[k:]
            target = stack[k - 1] if k > 0 else None
            if type(target) is not _Box or target.kind != "set":
                raise UnsafePickle("", why="ADDITEMS on something that is not a set")
            for x in items:
                hashable(x)
                consume(x)
                grow(target, x)
        elif op == 0x91:  # FROZENSET
            k = marker()
            items = stack[k:]
            del stack[k:]
            for x in items:
                hashable(x)
                consume(x)
            stack.append(new_box("frozenset", items))
        elif op == 0x64:  # DICT
            k = marker()
            items = stack[k:]
            del stack[k:]
            box = new_box("dict")
            stack.append(box)
            set_items(len(stack) - 1, items)
        elif op == 0x6C:  # LIST
            k = marker()
            items = stack[k:]
            del stack[k:]
            box = new_box("list")
            for x in items:
                consume(x)
                grow(box, x)
            stack.append(box)
        elif op == 0x30:  # POP
            if marks and marks[-1] == len(stack):
                marker()
            else:
                pop()
        elif op == 0x31:  # POP_MARK
            k = marker()
            del stack[k:]
        elif op == 0x32:  # DUP
            if len(stack) <= fence:
                raise _corrupt("unpickling stack underflow")
            stack.append(stack[-1])
        elif op == 0x92:  # NEWOBJ_EX
            kwargs = pop()
            args = pop()
            cls = pop()
            if type(cls) is not _G:
                raise UnsafePickle("", why=f"NEWOBJ_EX of {_what(cls)}")
            if type(args) is not _Tup or type(kwargs) is not _Box or kwargs.kind != "dict" or \
                    kwargs.bad_keys:
                raise _corrupt("NEWOBJ_EX arguments are not a tuple and a dict of names")
            use(cls.name, policy.NEW)
            consume(args)
            stack.append(new_box("obj", args.items))
        elif op == 0x67:  # GET
            raw, pos = _line(data, pos)
            get(_text_int(raw))
        elif op == 0x70:  # PUT
            raw, pos = _line(data, pos)
            put(_text_int(raw))
        elif op in (0x49, 0x4C, 0x46):  # INT, LONG, FLOAT (text)
            _raw, pos = _line(data, pos)
            stack.append(_S)
        elif op == 0x53:  # STRING (text, quoted, escaped; Python 2 str decoded as UTF-8)
            raw, pos = _line(data, pos)
            raw = raw.rstrip(b" \t\r")
            if len(raw) < 2 or raw[0] != raw[-1] or raw[:1] not in (b"'", b'"'):
                raise _corrupt("the STRING opcode argument must be quoted")
            try:
                value = codecs.escape_decode(raw[1:-1])[0]
            except ValueError:
                raise _corrupt("a bad escape in a STRING") from None
            stack.append(_Str(_decode_utf8(value)))
        elif op == 0x56:  # UNICODE (text, raw-unicode-escape)
            raw, pos = _line(data, pos)
            try:
                stack.append(_Str(raw.decode("raw_unicode_escape")))
            except UnicodeDecodeError:
                raise _corrupt("a bad UNICODE string") from None
        elif op in (0x69, 0x6F):  # INST, OBJ
            raise Unsupported("INST/OBJ opcodes (protocol 0/1 instances)")
        elif op in (0x82, 0x83, 0x84):  # EXT1, EXT2, EXT4
            raise Unsupported("EXT opcodes (copyreg's extension registry)")
        elif op == 0x50:  # PERSID (text)
            raise Unsupported("a text persistent id (torch writes binary ones)")
        elif op in (0x97, 0x98):  # NEXT_BUFFER, READONLY_BUFFER
            raise Unsupported("out-of-band buffers (protocol 5)")
        else:
            raise _corrupt(f"invalid load key {bytes([op])!r} at offset {pos - 1}")
        if len(stack) > n:  # cannot happen: each opcode pushes at most one value
            raise _corrupt("stack larger than the pickle")
    raise _corrupt("pickle data was truncated (no STOP)")


def _what(x: Any) -> str:
    if type(x) is _G:
        return f"the global {x.name}"
    if type(x) is _Box:
        return {"obj": "an object", "odict": "a dict", "tensor": "a tensor", "storage": "a storage",
                "func": "a function", "value": "a value", "list": "a list", "dict": "a dict",
                "set": "a set", "frozenset": "a frozenset", "deque": "a deque",
                "ndarray": "an array", "npdtype": "a dtype"}.get(x.kind, x.kind)
    if type(x) is _Tup:
        return "a tuple"
    if type(x) is _Str:
        return "a string"
    return "a scalar"
