"""The hostile corpus of the safe-loading issue: "a hostile file costs one clear error, bounded
time and memory, and nothing else".

Each case (built at run time by `fixtures.hostile`) is `last.pt` of its own run; `strip` and
`inspect` run on it as subprocesses, measured by a launcher that wait4()s them, and must: create no
marker, leave every file as it was and add none, print one `PATH: failed: ...` line and exit 1,
within 10 s and 500 MB. Then: hostile files before a good one (CLI and pool worker), and the daemon
with FIFOs in run folders. Many cases fail until the new safe loader lands; that is their purpose.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import queue
import random
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixtures import harness, summary
from fixtures import hostile as h
from fixtures.daemon_io import clean_env
from reliability.conftest import Daemon, is_valid_stripped, set_age, temp_files

WALL_LIMIT_S = 10.0  # the bound on one hostile file
RSS_LIMIT = 500 * 10**6  # bytes: the "under 500 MB", peak RSS of the command and its children
# The launcher's safety nets, not the bounds under test: past these the command is killed (the case
# has failed on time or memory by then anyway). The address-space cap is far above the 500 MB a
# hostile file may cost, so it never stands in for the daemon's own limits.
KILL_AFTER_S = 11.0
RSS_KILL = 2 << 30
AS_CAP = 12 << 30
SPARSE_SIZE = 3_900_000_000
PARALLEL = 2  # commands measured at once (each measurement is per process)


# ------------------------------------------------------------------------------ measuring

# Forks and execs one command, polls it (deadline, RSS), reaps it with wait4 and prints a JSON line.
# It runs as its own small process because Linux carries a process's RSS high-water mark across
# fork+exec: a command started from the (large) pytest process would report pytest's peak.
_LAUNCHER = r"""
import json, os, resource, signal, sys, time
spec = json.loads(sys.argv[1])
out = os.open(spec["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
started = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.setpgid(0, 0)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        resource.setrlimit(resource.RLIMIT_AS, (spec["as_cap"], spec["as_cap"]))
        os.chdir(spec["cwd"])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    finally:
        os._exit(127)
killed, status, usage = None, 0, None
while True:
    wpid, status, usage = os.wait4(pid, os.WNOHANG)
    if wpid == pid:
        break
    if killed is None:
        try:
            with open(f"/proc/{pid}/status") as f:
                rss = next((int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS")), 0)
        except OSError:
            rss = 0
        if time.monotonic() - started > spec["kill_after"]:
            killed = "time"
        elif rss > spec["rss_kill"]:
            killed = "rss"
        if killed is not None:
            os.killpg(pid, signal.SIGKILL)
    time.sleep(0.02)  # the poll period of this loop
wall = time.monotonic() - started
try:
    os.killpg(pid, signal.SIGKILL)  # whatever it left running in its group
except (ProcessLookupError, PermissionError):
    pass
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall,
                  "maxrss_kb": usage.ru_maxrss, "killed": killed}))
"""


@dataclass(frozen=True)
class Run:
    """How one command ended: exit code (negative: signal), wall time, peak RSS, its output."""

    rc: int
    wall_s: float
    maxrss_kb: int
    killed: str | None
    output: str

    @property
    def peak_bytes(self) -> int:
        return self.maxrss_kb * 1024


def launch(argv: list[str], cwd: Path, output: Path, env: dict[str, str] | None = None, *,
           kill_after: float = KILL_AFTER_S) -> Run:
    """Run `argv` in `cwd` under the launcher; stdout and stderr together land in `output`."""
    spec = {"argv": argv, "cwd": str(cwd), "env": env if env is not None else clean_env(),
            "output": str(output), "kill_after": kill_after, "rss_kill": RSS_KILL,
            "as_cap": AS_CAP}
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, json.dumps(spec)],
                          capture_output=True, text=True, timeout=kill_after + 60)
    assert proc.returncode == 0, f"launcher failed: {proc.stderr[-2000:]}"
    r = json.loads(proc.stdout)
    with open(output, "rb") as f:
        text = f.read(64 << 10).decode(errors="replace")
    return Run(r["rc"], r["wall_s"], r["maxrss_kb"], r["killed"], text)


# ------------------------------------------------------------------------------ snapshots


def _digest(path: str, st: os.stat_result) -> str:
    """sha256 of a file's bytes; for a large file, of its data runs and their offsets (a sparse
    file's holes are not read, and a write into one shows up as a new run)."""
    d = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= 64 << 20:
            while chunk := f.read(1 << 20):
                d.update(chunk)
            return d.hexdigest()
        fd, at = f.fileno(), 0
        while at < st.st_size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            d.update(f"{start}:{end}:".encode())
            f.seek(start)
            for _ in range(start, end, 1 << 20):
                d.update(f.read(min(1 << 20, end - f.tell())))
            at = end
    return f"{st.st_size}:{d.hexdigest()}"


def snapshot(*roots: Path) -> dict[str, tuple[Any, ...]]:
    """Everything under `roots`, never following a link or opening a FIFO: path -> what it is."""
    out: dict[str, tuple[Any, ...]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames, *([""] if dirpath == str(root) else [])]:
                path = os.path.join(dirpath, name) if name else dirpath
                st = os.lstat(path)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISREG(st.st_mode):
                    out[path] = ("file", mode, st.st_size, _digest(path, st))
                elif stat.S_ISLNK(st.st_mode):
                    out[path] = ("symlink", os.readlink(path))
                elif stat.S_ISDIR(st.st_mode):
                    out[path] = ("dir", mode)
                elif stat.S_ISFIFO(st.st_mode):
                    out[path] = ("fifo", mode)
                else:
                    out[path] = ("other", st.st_mode)
    return out


def tree_changes(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]
                 ) -> list[str]:
    """What appeared, disappeared or changed between two snapshots, one line each."""
    lines = [f"new: {p} {after[p][0]}" for p in sorted(set(after) - set(before))]
    lines += [f"gone: {p}" for p in sorted(set(before) - set(after))]
    lines += [f"changed: {p} {before[p][:3]} -> {after[p][:3]}"
              for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return lines


# ------------------------------------------------------------------------------ the corpus


@dataclass(frozen=True)
class Place:
    """Where one case lives inside a command's tree; every root here belongs to it alone."""

    base: Path
    name: str

    @property
    def run(self) -> Path:
        return self.base / "runs" / "train" / self.name

    @property
    def path(self) -> Path:
        return self.run / "weights" / "last.pt"

    @property
    def markers(self) -> Path:
        return self.base / "markers" / self.name

    @property
    def marker(self) -> Path:
        return self.markers / "touched"

    @property
    def cwd(self) -> Path:
        return self.base / "cwd" / self.name

    @property
    def tmp(self) -> Path:
        return self.base / "tmp" / self.name  # the command's TMPDIR

    @property
    def scratch(self) -> Path:
        return self.base / "scratch" / self.name  # FIFOs and link targets a case needs

    def roots(self) -> tuple[Path, ...]:
        return (self.run, self.markers, self.cwd, self.tmp, self.scratch)

    def make(self) -> None:
        for d in (self.path.parent, *self.roots()[1:]):
            d.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Case:
    """One hostile file: its family (the issue's numbering, or "own"), what its payload would do
    (and to which marker), and how to build it for a place."""

    name: str
    family: str
    would: str
    make: Callable[[Place], h.Blob]
    process_state: bool = False  # BUILD mutates a class or function for the whole process


def _zip(body: bytes, protocol: int = 2) -> h.Blob:
    return h.Blob.of(h.torch_zip(h.pickle(body, protocol)))


def _ride(extra: Callable[[Place], bytes], protocol: int = 2) -> Callable[[Place], h.Blob]:
    """A carrier checkpoint (which a strip would rewrite) with `extra` riding along."""
    return lambda p: _zip(h.carrier_body(extra(p)), protocol)


def _first(before: Callable[[Place], bytes]) -> Callable[[Place], h.Blob]:
    """A carrier checkpoint whose pickle first runs `before` (a BUILD on a class or function)."""
    return lambda p: _zip(h.carrier_body(h.text("after"), before=before(p)))


def _mutate(module: str, name: str, **attrs: Callable[[Place], bytes]
            ) -> Callable[[Place], bytes]:
    """BUILD `(None, {attr: value})` on the global `module.name` itself, then POP it."""
    return lambda p: h.build(h.glob(module, name),
                             h.slot_state(**{k: v(p) for k, v in attrs.items()})) + h.POP


def _model() -> bytes:
    return h.newobj(h.glob("models.yolo", "Model"))


def _legacy_patch(container: bytes, name: Callable[[Place], str]) -> Callable[[Place], h.Blob]:
    return lambda p: h.Blob.of(h.legacy_stream(h.pickle(h.carrier_body(
        h.text("x"), before=h.patch_writer(container, name(p)), legacy=True)),
        [("0", h.WEIGHTS, 4)]))


def _tar(main: Callable[[Place], bytes], **members: Callable[[Place], h.Member]
         ) -> Callable[[Place], h.Blob]:
    return lambda p: h.Blob.of(h.torch_tar(h.pickle(main(p)),
                                           **{k: m(p) for k, m in members.items()}))


def _fifo_in_scratch(p: Place) -> str:
    fifo = p.scratch / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    return str(fifo)


def _zip_of(entries: Callable[[Place], list[h.Entry]], **kw: Any) -> Callable[[Place], h.Blob]:
    return lambda p: h.raw_zip(entries(p), **kw)


def _records(data_pkl: bytes | None = None) -> list[h.Entry]:
    """torch's records for a carrier checkpoint (or for `data_pkl`)."""
    return h.torch_entries(data_pkl if data_pkl is not None else h.pickle(h.carrier_body()))


def _change(entries: list[h.Entry], suffix: str, **fields: Any) -> list[h.Entry]:
    """`entries` with the one whose name ends with `suffix` changed."""
    return [dataclasses.replace(e, **fields) if e.name.endswith(suffix) else e for e in entries]


_NINES = struct.pack("<4f", 9.0, 9.0, 9.0, 9.0)
SPARSE_BLOB = SPARSE_SIZE - 100_000_000  # bytes of BINBYTES held in a sparse file's hole


def _os_system_pkl(p: Place) -> bytes:
    return h.pickle(h.call(h.glob("os", "system"), h.shell_touch(p.marker)))


def _hash_bomb_set() -> bytes:
    return h.EMPTY_SET + h.MARK + h.tuple_hash_bomb() + h.ADDITEMS


def _cases() -> list[Case]:
    touch = h.touch_argv
    m = lambda p: str(p.marker)  # noqa: E731
    inject = lambda p: h.newline_name(p.marker)  # noqa: E731
    rng_a = random.Random(20261128).getrandbits(4_000_000) | 1
    rng_b = random.Random(20261129).getrandbits(4_000_000) | 1
    cases = [
        # 1: payloads that ride along into the stripped file (protocol 2 + fix_imports on load)
        Case("py2-commands-call-reduce", "1", "stripped output loaded by torch.load runs "
             "subprocess.call(['touch', marker])",
             _ride(lambda p: h.call(h.glob("commands", "call"), touch(p.marker)))),
        Case("py2-commands-popen-newobj", "1", "Popen(['touch', marker]) once anything "
             "constructs it", _ride(lambda p: h.newobj(h.glob("commands", "Popen"),
                                                        touch(p.marker)))),
        Case("py2-commands-call-in-build-state", "1", "subprocess.call(['touch', marker]) while "
             "the output's BUILD state loads",
             _ride(lambda p: h.build(_model(), h.sdict(hook=h.call(h.glob("commands", "call"),
                                                                   touch(p.marker)))))),
        Case("py2-commands-call-as-value", "1", "subprocess.call, stored with ['touch', marker] "
             "for whoever calls it", _ride(lambda p: h.sdict(fn=h.glob("commands", "call"),
                                                             args=h.tup(touch(p.marker))))),
        Case("py2-commands-getoutput-reduce", "1", "subprocess.getoutput('touch marker')",
             _ride(lambda p: h.call(h.glob("commands", "getoutput"), h.shell_touch(p.marker)))),
        Case("py2-cpickle-loads-reduce", "1", "pickle.loads of an os.system('touch marker') pickle",
             _ride(lambda p: h.call(h.glob("cPickle", "loads"), h.binbytes(_os_system_pkl(p))))),
        Case("py2-anydbm-open-reduce", "1", "dbm.open(marker, 'c') creates the marker",
             _ride(lambda p: h.call(h.glob("anydbm", "open"), h.text(m(p)), h.text("c")))),
        Case("py2-commands-call-inst-opcode", "1", "INST commands.call(['touch', marker])",
             _ride(lambda p: h.MARK + touch(p.marker) + h.INST + b"commands\ncall\n")),
        Case("newline-name-reduce", "1", "the re-written GLOBAL injects os.system('touch marker')",
             _ride(lambda p: h.call(h.sglobal("models.yolo", inject(p))))),
        Case("newline-name-newobj", "1", "the re-written GLOBAL injects os.system('touch marker')",
             _ride(lambda p: h.newobj(h.sglobal("models.yolo", inject(p))))),
        Case("newline-name-in-build-state", "1", "injection via a class in a BUILD state",
             _ride(lambda p: h.build(_model(), h.sdict(cls=h.sglobal("models.yolo", inject(p)))))),
        Case("newline-name-as-value", "1", "injection via a class stored as a plain value",
             _ride(lambda p: h.sdict(cls=h.sglobal("models.yolo", inject(p))))),
        Case("newline-in-module-name", "1", "injection via the module half of the GLOBAL",
             _ride(lambda p: h.newobj(h.sglobal(h.newline_module(p.marker), "DetectionModel")))),
        # 2: torch's legacy loader writing `<name>.patch` where the pickle says
        Case("legacy-patch-rebuild-tensor-v2", "2", "torch writes marker.patch",
             _legacy_patch(h.glob("torch._utils", "_rebuild_tensor_v2"), m)),
        Case("legacy-patch-codecs-encode", "2", "torch writes marker.patch",
             _legacy_patch(h.glob("_codecs", "encode"), m)),
        Case("legacy-patch-relative-name", "2", "torch writes evil.patch in the cwd",
             _legacy_patch(h.glob("torch._utils", "_rebuild_tensor_v2"), lambda p: "evil")),
        Case("legacy-patch-dotdot-name", "2", "torch writes ../../markers/<case>/touched.patch",
             _legacy_patch(h.glob("torch._utils", "_rebuild_tensor_v2"),
                           lambda p: os.path.relpath(p.marker, p.cwd))),
        Case("legacy-patch-nn-linear-class", "2", "torch writes marker.patch (Linear's source)",
             _legacy_patch(h.glob("torch.nn.modules.linear", "Linear"), m)),
        Case("tar-patch-rebuild-tensor-v2", "2", "torch writes marker.patch (tar format)",
             _tar(lambda p: h.patch_writer(h.glob("torch._utils", "_rebuild_tensor_v2"), m(p),
                                           tagged=False) + h.sdict(state_dict=h.EMPTY_DICT))),
        Case("tar-patch-codecs-encode", "2", "torch writes marker.patch (tar format)",
             _tar(lambda p: h.patch_writer(h.glob("_codecs", "encode"), m(p), tagged=False)
                  + h.sdict(state_dict=h.EMPTY_DICT))),
        Case("tar-first-byte-0x80", "2", "none (the tar is extracted into TMPDIR at all)",
             _tar(lambda p: h.sdict(state_dict=h.EMPTY_DICT, optimizer=h.EMPTY_DICT))),
        # 3: BUILD changing allowed classes and functions for the whole process
        Case("build-purepath-str", "3", "every Path in the process becomes the marker path "
             "(the strip's own writes go there)",
             _first(_mutate("pathlib", "PurePath", _str=lambda p: h.text(m(p)))),
             process_state=True),
        Case("build-ordereddict-class", "3", "none (OrderedDict changed for the process)",
             _first(_mutate("collections", "OrderedDict",
                            fromkeys=lambda p: h.glob("builtins", "dict"))), process_state=True),
        Case("build-counter-class", "3", "none (Counter.update replaced for the process)",
             _first(_mutate("collections", "Counter",
                            update=lambda p: h.glob("builtins", "dict"))), process_state=True),
        Case("build-rebuild-tensor-v2-defaults", "3", "none (every later tensor rebuilt wrong)",
             _first(_mutate("torch._utils", "_rebuild_tensor_v2",
                            __defaults__=lambda p: h.tup(h.sdict(marker=h.text(m(p)))))),
             process_state=True),
        Case("build-rebuild-tensor-v2-name", "3", "the function re-pickles as os.<marker>",
             _first(_mutate("torch._utils", "_rebuild_tensor_v2",
                            __name__=lambda p: h.text(m(p)), __qualname__=lambda p: h.text(m(p)),
                            __module__=lambda p: h.text("os"))), process_state=True),
        Case("build-codecs-encode", "3", "the encode check takes other defaults for the process",
             _first(_mutate("_codecs", "encode", __defaults__=lambda p: h.tup(
                 h.text("rot13"), h.text("strict")), __name__=lambda p: h.text(m(p)))),
             process_state=True),
        Case("build-standin-class", "3", "later DetectionModels re-pickle as commands.call",
             _first(_mutate("models.yolo", "DetectionModel", __module__=lambda p: h.text("commands"),
                            __qualname__=lambda p: h.text("call"))), process_state=True),
        Case("build-nn-linear-class", "3", "nn.Linear.forward replaced for the process",
             _first(_mutate("torch.nn.modules.linear", "Linear",
                            forward=lambda p: h.glob("builtins", "print"))), process_state=True),
        Case("build-torch-size-class", "3", "none (torch.Size changed for the process)",
             _first(_mutate("torch", "Size", __repr__=lambda p: h.glob("builtins", "str"))),
             process_state=True),
        Case("build-dunder-class-slot", "3", "the object becomes an OrderedDict",
             _ride(lambda p: h.build(_model(), h.slot_state(
                 __class__=h.glob("collections", "OrderedDict"))))),
        Case("build-dunder-class-dict", "3", "a __class__ key in the written state",
             _ride(lambda p: h.build(_model(), h.sdict(__class__=h.glob("collections",
                                                                         "OrderedDict"))))),
        Case("build-dunder-dict", "3", "the object's __dict__ replaced wholesale",
             _ride(lambda p: h.build(_model(), h.slot_state(__dict__=h.sdict(
                 _modules=h.text(m(p))))))),
        Case("build-dunder-reduce-ex", "3", "the stripped output is pickled by this callable",
             _ride(lambda p: h.build(_model(), h.sdict(__reduce_ex__=h.glob("builtins", "str"))))),
        Case("build-dunder-setstate", "3", "a second BUILD calls the planted __setstate__",
             _ride(lambda p: h.build(h.build(_model(), h.sdict(__setstate__=h.glob("builtins",
                                                                                     "set"))),
                                     h.sdict(x=h.text(m(p)))))),
        # 4: hangs, CPU burns and crashes from small files
        Case("tar-fifo-storages", "4", "none (open() of an extracted FIFO blocks forever)",
             _tar(lambda p: h.sdict(state_dict=h.EMPTY_DICT),
                  storages=lambda p: h.Member("storages", kind="fifo"))),
        Case("tar-fifo-tensors", "4", "none (open() of an extracted FIFO blocks forever)",
             _tar(lambda p: h.sdict(state_dict=h.EMPTY_DICT),
                  tensors=lambda p: h.Member("tensors", kind="fifo"))),
        Case("tar-symlink-to-fifo", "4", "none (the extracted link leads to a FIFO)",
             _tar(lambda p: h.sdict(state_dict=h.EMPTY_DICT),
                  storages=lambda p: h.Member("storages", kind="symlink",
                                              link=_fifo_in_scratch(p)))),
        Case("tuple-hash-bomb-dict-key", "4", "none (2**40 tuple hashes)",
             _ride(lambda p: h.dct((h.tuple_hash_bomb(), h.NONE)))),
        Case("tuple-hash-bomb-set", "4", "none (2**40 tuple hashes)",
             _ride(lambda p: _hash_bomb_set(), protocol=4)),
        Case("tuple-hash-bomb-frozenset", "4", "none (2**40 tuple hashes)",
             _ride(lambda p: h.MARK + h.tuple_hash_bomb() + h.FROZENSET, protocol=4)),
        Case("tuple-hash-bomb-ordereddict", "4", "none (2**40 tuple hashes)",
             _ride(lambda p: h.call(h.glob("collections", "OrderedDict"),
                                    h.lst(h.tup(h.tuple_hash_bomb(), h.NONE))))),
        Case("colliding-int-keys-dict", "4", "none (60,000 keys of one hash: quadratic inserts)",
             _ride(lambda p: h.dct(*((h.integer(k), h.NONE)
                                     for k in h.colliding_ints(60_000))))),
        Case("colliding-int-keys-set", "4", "none (60,000 members of one hash)",
             _ride(lambda p: h.EMPTY_SET + h.MARK + b"".join(map(h.integer, h.colliding_ints(
                 60_000))) + h.ADDITEMS, protocol=4)),
        Case("fraction-huge-exponent", "4", "none (Fraction('1e2000000000') computes 10**2e9)",
             _ride(lambda p: h.call(h.glob("fractions", "Fraction"), h.text("1e2000000000")))),
        Case("fraction-of-huge-decimal", "4", "none (as_integer_ratio of Decimal('1e2e9'))",
             _ride(lambda p: h.call(h.glob("fractions", "Fraction"), h.call(
                 h.glob("decimal", "Decimal"), h.text("1e2000000000"))))),
        Case("int-of-huge-decimal", "4", "none (int(Decimal('1e2000000000')))",
             _ride(lambda p: h.call(h.glob("builtins", "int"), h.call(
                 h.glob("decimal", "Decimal"), h.text("1e2000000000"))))),
        Case("fraction-huge-coprime-ints", "4", "none (gcd of two 4-Mbit ints: quadratic)",
             _ride(lambda p: h.call(h.glob("fractions", "Fraction"), h.integer(rng_a),
                                    h.integer(rng_b)))),
        Case("nn-linear-300x-8000", "4", "none (300 x 256 MB of weights, initialised)",
             _ride(lambda p: h.lst(*[h.call(h.glob("torch.nn.modules.linear", "Linear"),
                                            h.integer(8000), h.integer(8000))] * 300))),
        Case("nn-embedding-2g-rows", "4", "none (a 512 GB embedding table)",
             _ride(lambda p: h.call(h.glob("torch.nn.modules.sparse", "Embedding"),
                                    h.integer(1 << 31), h.integer(64)))),
        Case("deep-tuple-2m-value", "4", "none (2,000,000 nested tuples)",
             _ride(lambda p: h.deep_tuple(2_000_000))),
        Case("deep-tuple-2m-dict-key", "4", "none (hashing recurses 2,000,000 deep: C stack)",
             _ride(lambda p: h.dct((h.deep_tuple(2_000_000), h.NONE)))),
        Case("deep-tuple-2m-set", "4", "none (hashing recurses 2,000,000 deep: C stack)",
             _ride(lambda p: h.EMPTY_SET + h.MARK + h.deep_tuple(2_000_000) + h.ADDITEMS,
                   protocol=4)),
        Case("deep-list-2m-value", "4", "none (2,000,000 nested lists)",
             _ride(lambda p: h.EMPTY_LIST * 2_000_000 + h.APPEND * 1_999_999)),
        # (an epoch of 10**5000 is odd data, not an attack: test_odd_but_valid.py)
        # 6: limits that can be sidestepped, and two readers that disagree
        Case("sparse-legacy-memo-bomb", "6", "none (a 3.9 GB file raises the per-job memory cap; "
             "LONG_BINPUT 2**28 then takes 4 GiB)",
             lambda p: h.sparse(h.legacy_lead() + h.pickle(h.memo_index_bomb()), SPARSE_SIZE)),
        Case("sparse-zip-memo-bomb", "6", "none (same, in a zip with a 3.9 GB hole)",
             _zip_of(lambda p: _records(h.pickle(h.memo_index_bomb())), gap=SPARSE_SIZE)),
        Case("sparse-legacy-bytes-blob", "6", "none (3.8 GB of BINBYTES read into memory)",
             lambda p: h.sparse_legacy_blob(SPARSE_BLOB)),
        Case("sparse-zip-bytes-blob", "6", "none (a 3.8 GB data.pkl read into memory)",
             lambda p: h.sparse_zip_blob(SPARSE_BLOB, _records()[1:])),
        # a duplicate placed first: torch's reader takes it, Python's zipfile the last one
        Case("zip-duplicate-storage-record", "6", "none (torch reads the first data/0, zipfile "
             "the last: the output would hold other weights than torch reads)",
             _zip_of(lambda p: [h.Entry("archive/data/0", _NINES, align=True), *_records()])),
        Case("zip-duplicate-data-pkl", "6", "os.system('touch marker') in the data.pkl zipfile "
             "reads; torch reads a harmless one",
             _zip_of(lambda p: [h.Entry("archive/data.pkl", h.pickle(h.carrier_body(
                 h.text("torch reads this")))), *_change(_records(), "/data.pkl",
                                                         data=_os_system_pkl(p))])),
        Case("zip-cd-local-name-differ", "6", "none (the local header names another record)",
             _zip_of(lambda p: _change(_records(), "/data/0", local_name="archive/data/1"))),
        Case("zip-cd-local-size-differ", "6", "none (local header and directory sizes differ)",
             _zip_of(lambda p: _change(_records(), "/data/0", local_size=8))),
        Case("zip-cd-offset-overlap", "6", "none (two directory entries, one local record)",
             lambda p: h.directory_twin(_records(h.pickle(h.carrier_body(h.sdict(
                 w=h.tensor("1"))))), "archive/data/0", "archive/data/1", h.WEIGHTS)),
        Case("zip-cd-local-method-differ", "6", "none (deflated locally, stored per directory)",
             _zip_of(lambda p: _change(_records(), "/data.pkl", method=8, cd_method=0))),
        Case("zip-foreign-top-folder", "6", "none (a second data.pkl outside archive/)",
             _zip_of(lambda p: [*_records(), h.Entry("other/data.pkl", _os_system_pkl(p))])),
        Case("zip-dotdot-entry", "6", "none (a record named ../x)",
             _zip_of(lambda p: [*_records(), h.Entry("../x", b"x")])),
        Case("zip-absolute-entry", "6", "none (a record named /abs/data.pkl)",
             _zip_of(lambda p: [*_records(), h.Entry("/abs/data.pkl", h.pickle(h.carrier_body()))])),
        Case("zip-data-descriptor-lie", "6", "none (a data descriptor claims 4096 bytes)",
             _zip_of(lambda p: _change(_records(), "/data/0", descriptor=True,
                                              descriptor_size=4096))),
        Case("zip64-end-record-lie", "6", "none (zip64 end record: 2**40 entries, wild offset)",
             _zip_of(lambda p: _records(), zip64=(1 << 40, 1 << 50))),
        Case("zip-deflated-data-pkl", "own", "none (torch never compresses a record)",
             _zip_of(lambda p: _change(_records(), "/data.pkl", method=8))),
        Case("zip-bomb-data-pkl", "own", "none (a few hundred KB inflating to 256 MB of opcodes)",
             lambda p: h.raw_zip([h.deflate_bomb(), *_records()[1:]])),
        Case("storage-record-wrong-size", "own", "none (a storage claims 1000 floats of 4)",
             lambda p: _zip(h.carrier_body(h.sdict(w=h.tensor("0", (1000,)))))),
        Case("storage-missing-record", "own", "none (a storage names record 7, absent)",
             lambda p: _zip(h.carrier_body(h.sdict(w=h.tensor("7", (4,)))))),
        Case("tensor-huge-size-small-storage", "own", "none (shape 2**40 over 4 floats)",
             lambda p: _zip(h.carrier_body(h.sdict(w=h.tensor("0", (1 << 40,), numel=4))))),
        Case("tensor-stride-out-of-bounds", "own", "none (stride 2**40 over 4 floats)",
             lambda p: _zip(h.carrier_body(h.sdict(w=h.tensor("0", (4,), numel=4,
                                                              stride=(1 << 40,)))))),
        Case("numpy-reconstruct-huge-shape", "own", "none (an ndarray of 2**40 float64)",
             _ride(lambda p: h.numpy_array((1 << 40,), "f8", b"\0" * 8))),
        Case("numpy-reconstruct-huge-object-array", "own", "none (2**33 object slots)",
             _ride(lambda p: h.numpy_array((1 << 33,), "O", b""))),
        # own ideas: other opcodes and allowed callables used for something else
        Case("inst-os-system", "own", "os.system('touch marker') by INST",
             _ride(lambda p: h.MARK + h.shell_touch(p.marker) + h.INST + b"os\nsystem\n")),
        Case("obj-os-system", "own", "os.system('touch marker') by OBJ",
             _ride(lambda p: h.MARK + h.glob("os", "system") + h.shell_touch(p.marker) + h.OBJ)),
        Case("ext1-code", "own", "none (EXT1: a global by extension code)",
             _ride(lambda p: h.EXT1 + b"\x01")),
        Case("ext2-code", "own", "none (EXT2)", _ride(lambda p: h.EXT2 + b"\x01\x02")),
        Case("ext4-code", "own", "none (EXT4)", _ride(lambda p: h.EXT4 + b"\x01\x02\x03\x04")),
        Case("persid-text", "own", "none (a text persistent id)",
             _ride(lambda p: h.PERSID + f"{p.marker}\n".encode())),
        Case("next-buffer-without-buffers", "own", "none (protocol 5 out-of-band buffer)",
             _ride(lambda p: h.NEXT_BUFFER + h.READONLY_BUFFER, protocol=5)),
        Case("bytearray8-1-tib", "own", "none (BYTEARRAY8 of 2**40 bytes)",
             _ride(lambda p: h.BYTEARRAY8 + (1 << 40).to_bytes(8, "little"), protocol=5)),
        Case("memo-get-never-put", "own", "none (LONG_BINGET 12345)",
             _ride(lambda p: h.get(12345))),
        Case("frame-length-lie", "own", "none (a FRAME claiming 2**62 bytes)",
             lambda p: h.Blob.of(h.torch_zip(h.proto(4) + h.framed(
                 h.carrier_body(h.text("x")) + h.STOP, length=1 << 62)))),
        Case("getattr-posixpath-touch", "own", "getattr(PosixPath(marker), 'touch')()",
             _ride(lambda p: h.call(h.call(h.glob("builtins", "getattr"), h.call(
                 h.glob("pathlib", "PosixPath"), h.text(m(p))), h.text("touch"))))),
        Case("getattr-py2-builtin-touch", "own", "__builtin__.getattr(PosixPath(marker), 'touch')()",
             _ride(lambda p: h.call(h.call(h.glob("__builtin__", "getattr"), h.call(
                 h.glob("pathlib", "PosixPath"), h.text(m(p))), h.text("touch"))))),
        Case("getattr-historybuffer-dunder", "own", "none (getattr of HistoryBuffer.__init__, not "
             "one of its statistics methods)",
             _ride(lambda p: h.call(h.glob("builtins", "getattr"), h.glob(
                 "mmengine.logging.history_buffer", "HistoryBuffer"), h.text("__init__")))),
        Case("getattr-historybuffer-name-on-path", "own", "getattr(PosixPath(marker), 'min') "
             "(an allowed name on another object)",
             _ride(lambda p: h.call(h.glob("builtins", "getattr"), h.call(
                 h.glob("pathlib", "PosixPath"), h.text(m(p))), h.text("min")))),
        Case("codecs-encode-rot13", "own", "none (a codec other than latin1)",
             _ride(lambda p: h.call(h.glob("_codecs", "encode"), h.text(m(p)), h.text("rot13")))),
        Case("codecs-encode-zlib", "own", "none (a bytes-to-bytes codec)",
             _ride(lambda p: h.call(h.glob("_codecs", "encode"), h.binbytes(b"x" * 64),
                                    h.text("zlib_codec")))),
        Case("defaultdict-callable-factory", "own", "_rebuild_tensor_v2 runs on a missing key",
             _ride(lambda p: h.call(h.glob("collections", "defaultdict"),
                                    h.glob("torch._utils", "_rebuild_tensor_v2")))),
        Case("reconstructor-base-set-hash-bomb", "own", "set.__init__ hashes the bomb "
             "(copyreg._reconstructor with base set, not object)",
             _ride(lambda p: h.call(h.glob("copyreg", "_reconstructor"), h.glob("builtins", "set"),
                                    h.glob("builtins", "set"),
                                    h.tup(h.tuple_hash_bomb())))),
        Case("reconstructor-base-linear", "own", "nn.Linear.__init__ on a stand-in "
             "(copyreg._reconstructor with base Linear)",
             _ride(lambda p: h.call(h.glob("copyreg", "_reconstructor"),
                                    h.glob("models.yolo", "Model"),
                                    h.glob("torch.nn.modules.linear", "Linear"),
                                    h.integer(8000)))),
    ]
    return cases


CASES = _cases()
BY_NAME = {c.name: c for c in CASES}
HOSTILE = [c.name for c in CASES]
# `inspect` of all cases would double the ~60-100 s the strip of all of them takes on 2 cores, so
# the default tier inspects these ten (every family, and the cases that hit inspect's own output);
# the slow tier inspects the rest
INSPECT_SAMPLE = ["py2-commands-call-reduce", "newline-name-newobj", "legacy-patch-codecs-encode",
                  "tar-patch-rebuild-tensor-v2", "build-purepath-str", "tar-fifo-storages",
                  "tuple-hash-bomb-dict-key", "deep-tuple-2m-dict-key", "sparse-legacy-memo-bomb",
                  "zip-duplicate-storage-record"]


@pytest.mark.timeout(30)
def test_corpus_is_big_and_names_are_unique() -> None:
    """At least 60 hostile cases over families 1-4, 6 and our own, each name once."""
    assert len(HOSTILE) == len(set(HOSTILE)) >= 60
    assert {c.family for c in CASES} == {"1", "2", "3", "4", "6", "own"}
    assert set(INSPECT_SAMPLE) <= set(HOSTILE) and len(INSPECT_SAMPLE) == 10


# ------------------------------------------------------------------------------ running a case


@dataclass(frozen=True)
class Result:
    """One case through one command: the run, and the case's roots before and after."""

    case: str
    place: Place
    run: Run
    before: dict[str, tuple[Any, ...]]
    after: dict[str, tuple[Any, ...]]
    ended: float  # time.monotonic() when it was measured


def run_case(command: str, base: Path, name: str) -> Result:
    place = Place(base, name)
    place.make()
    BY_NAME[name].make(place).write(place.path)
    before = snapshot(*place.roots())
    argv = [sys.executable, "-m", "ckpt_watchd", command, str(place.path)]
    logs = base.parent / f"{base.name}-logs"
    logs.mkdir(exist_ok=True)
    run = launch(argv, place.cwd, logs / f"{name}.out", clean_env(TMPDIR=str(place.tmp)))
    return Result(name, place, run, before, snapshot(*place.roots()), time.monotonic())


def problems(r: Result) -> list[str]:
    """Which of the five promises one case broke (empty: all kept)."""
    out = []
    markers = [k for k in r.after if k.startswith(str(r.place.markers) + os.sep)]
    if markers:
        out.append(f"1. a payload ran: {markers}")
    src = str(r.place.path)
    changes = [c for c in tree_changes(r.before, r.after) if not c.startswith(f"changed: {src} ")]
    if changes:
        out.append("2. files appeared, vanished or changed: " + "; ".join(changes[:6]))
    if r.before.get(src) != r.after.get(src):
        out.append(f"3. the source changed: {r.before.get(src)} -> {r.after.get(src)}")
    text = r.run.output.removesuffix("\n")
    lines = text.split("\n") if text else []
    if (r.run.rc != 1 or len(lines) != 1 or not lines[0].startswith(f"{src}: ")
            or "failed:" not in lines[0] or "Traceback" in text):
        shown = text if len(text) < 600 else text[:300] + " ... " + text[-300:]
        out.append(f"4. exit {r.run.rc}, {len(lines)} line(s), want exit 1 and one "
                   f"'PATH: failed: ...' line: {shown!r}")
    if r.run.wall_s >= WALL_LIMIT_S or r.run.killed == "time":
        out.append(f"5. took {r.run.wall_s:.1f} s (limit {WALL_LIMIT_S:g} s"
                   + (", killed" if r.run.killed == "time" else "") + ")")
    if r.run.peak_bytes >= RSS_LIMIT or r.run.killed == "rss":
        out.append(f"5. peak RSS {r.run.peak_bytes / 1e6:.0f} MB (limit {RSS_LIMIT / 1e6:g} MB"
                   + (", killed" if r.run.killed == "rss" else "") + ")")
    return out


class Runner:
    """Runs the cases one command needs, PARALLEL at a time, in the order pytest will ask.

    On the first request it queues every case that the selected tests of this command will ask
    for (from the session's items), so two commands are always in flight.
    """

    def __init__(self, command: str, base: Path, session: pytest.Session, tests: tuple[str, ...]
                 ) -> None:
        self.command, self.base = command, base
        self.session, self.tests = session, tests
        self.pool = concurrent.futures.ThreadPoolExecutor(PARALLEL)
        self.futures: dict[str, concurrent.futures.Future[Result]] = {}
        self.started = time.monotonic()
        self.finished_at: float | None = None

    def _submit(self, name: str) -> None:
        if not self.futures:
            self.started = time.monotonic()
        if name not in self.futures:
            self.futures[name] = self.pool.submit(run_case, self.command, self.base, name)

    def result(self, name: str) -> Result:
        if not self.futures:
            for item in self.session.items:
                spec = getattr(item, "callspec", None)
                if getattr(item, "originalname", None) in self.tests and spec is not None:
                    self._submit(spec.params["case"])
        self._submit(name)
        return self.futures[name].result()

    def finish(self) -> list[Result]:
        """Wait for every queued case; leaves a JSON summary of them beside the tree."""
        results = [f.result() for f in self.futures.values()]
        self.pool.shutdown()
        if results:
            self.finished_at = max(r.ended for r in results)
        table = {r.case: {"wall_s": round(r.run.wall_s, 2), "peak_mb": round(r.run.peak_bytes / 1e6),
                          "rc": r.run.rc, "killed": r.run.killed,
                          "output": r.run.output[:300], "problems": problems(r)} for r in results}
        (self.base.parent / f"{self.base.name}-summary.json").write_text(json.dumps(table, indent=1))
        return results


def _runner(command: str, tests: tuple[str, ...], request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    r = Runner(command, tmp_path_factory.mktemp(f"hostile-{command}"), request.session, tests)
    yield r
    r.pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def strip_runner(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Runner]:
    """Runs `ckpt-watchd strip` on each hostile case the selected strip tests ask for."""
    yield from _runner("strip", ("test_hostile_file_costs_one_clear_error_under_strip",),
                       request, tmp_path_factory)


@pytest.fixture(scope="module")
def inspect_runner(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Runner]:
    """Runs `ckpt-watchd inspect` on each hostile case the selected inspect tests ask for."""
    yield from _runner("inspect", ("test_hostile_file_costs_one_clear_error_under_inspect",
                                   "test_every_other_hostile_file_costs_one_clear_error_under_inspect"),
                       request, tmp_path_factory)


def _verdict(r: Result) -> None:
    found = problems(r)
    assert found == [], (f"{r.case} ({BY_NAME[r.case].would}), "
                         f"{r.run.wall_s:.1f} s, {r.run.peak_bytes / 1e6:.0f} MB:\n  "
                         + "\n  ".join(found))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_file_costs_one_clear_error_under_strip(strip_runner: Runner, case: str) -> None:
    """`strip` of a hostile file: nothing runs or changes, one failed line, < 10 s, < 500 MB."""
    _verdict(strip_runner.result(case))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", INSPECT_SAMPLE)
def test_hostile_file_costs_one_clear_error_under_inspect(inspect_runner: Runner, case: str
                                                          ) -> None:
    """`inspect` of a hostile file (a sample of ten): the same five promises as `strip`."""
    _verdict(inspect_runner.result(case))


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", [c for c in HOSTILE if c not in INSPECT_SAMPLE])
def test_every_other_hostile_file_costs_one_clear_error_under_inspect(inspect_runner: Runner,
                                                                      case: str) -> None:
    """`inspect` of each hostile file outside the sample: the same five promises as `strip`."""
    _verdict(inspect_runner.result(case))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("command", ["strip", "inspect"])
def test_no_marker_and_no_stray_file_anywhere_after_the_corpus(
        command: str, strip_runner: Runner, inspect_runner: Runner) -> None:
    """After the corpus, the command's whole tree (markers, cwds, TMPDIRs) is what was built."""
    runner = strip_runner if command == "strip" else inspect_runner
    if not runner.futures:  # run on its own: the default tier's cases first
        for name in HOSTILE if command == "strip" else INSPECT_SAMPLE:
            runner._submit(name)
    results = runner.finish()
    # what each case's roots held afterwards (its own test reports what it changed there), and
    # the folders that hold those roots: anything else is a file nobody accounted for
    expected = {k: v for r in results for k, v in r.after.items()}
    base = runner.base
    for d in (base, base / "runs", base / "runs" / "train", *(base / n for n in (
            "markers", "cwd", "tmp", "scratch"))):
        expected[str(d)] = ("dir", stat.S_IMODE(os.lstat(d).st_mode))
    now = snapshot(base)
    stray = tree_changes(expected, now)
    markers = sorted(k for k, v in now.items() if k.startswith(str(base / "markers") + os.sep)
                     and v[0] != "dir")
    assert markers == [], f"payloads ran: {markers}"
    assert stray == [], "\n".join(stray[:20])
    took = (runner.finished_at or runner.started) - runner.started
    print(f"{command}: {len(results)} cases in {took:.0f} s")


# ------------------------------------------------------------------------------ the measure itself

_ALLOCATE = "import sys; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096])"


@pytest.mark.timeout(120)
def test_wait4_reports_the_peak_rss_of_the_command_and_of_children_it_waited_for(
        tmp_path: Path) -> None:
    """The launcher's ru_maxrss covers the command and its reaped children, not pytest's peak."""
    ballast = bytearray(600 << 20)  # this process is big: a naive measure would report that
    ballast[::4096] = b"x" * len(ballast[::4096])
    py = sys.executable

    def peak(*argv: str) -> int:
        r = launch(list(argv), tmp_path, tmp_path / "out.txt", kill_after=60)
        assert r.rc == 0, r.output
        return r.peak_bytes

    small = peak(py, "-c", "pass")
    own = peak(py, "-c", _ALLOCATE, "300")
    child = peak(py, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', "
                           f"{_ALLOCATE!r}, '300'], check=True)")
    assert small < 100 << 20, small  # not the 600 MB of the process that started it
    assert own >= 300 << 20, own
    assert child >= 300 << 20, child  # the grandchild's peak, reaped by the child
    del ballast


# ------------------------------------------------------------------------------ hostile, then good


EVIL_KINDS = [c.name for c in CASES if c.process_state]


def _evil_files(names: list[str], base: Path) -> list[Place]:
    places = []
    for name in names:
        p = Place(base, name)
        p.make()
        BY_NAME[name].make(p).write(p.path)
        places.append(p)
    return places


def _roots(places: list[Place]) -> list[Path]:
    return [r for p in places for r in p.roots()]


@dataclass(frozen=True)
class ThenGood:
    """`strip EVIL... GOOD` in one process, and how the good file looks where the trainer loads."""

    places: list[Place]
    good: Path
    proc: subprocess.CompletedProcess[str]
    changes: list[str]
    view: dict[str, Any]  # load_in_trainer of the good file after the strip


@dataclass(frozen=True)
class GoodRuns:
    reference: dict[str, Any]  # the trainer's own strip of the good file, as the trainer loads it
    template: Path
    runs: dict[str, ThenGood]


def _strip_evil_then_good(base: Path, evil: list[str], template: Path
                          ) -> tuple[list[Place], Path, subprocess.CompletedProcess[str], list[str]]:
    places = _evil_files(evil, base / "evil")
    good = base / "runs" / "train" / "good" / "weights" / "last.pt"
    good.parent.mkdir(parents=True)
    shutil.copyfile(template, good)
    cwd = base / "cwd"
    cwd.mkdir()
    before = snapshot(*_roots(places), cwd)
    proc = subprocess.run([sys.executable, "-m", "ckpt_watchd", "strip",
                           *(str(p.path) for p in places), str(good)], cwd=cwd,
                          capture_output=True, text=True, timeout=200, env=clean_env())
    return places, good, proc, tree_changes(before, snapshot(*_roots(places), cwd))


THEN_GOOD = [*EVIL_KINDS, "all-of-them"]


@pytest.fixture(scope="module")
def then_good(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> GoodRuns:
    """Each process-state evil file (and all of them) before a good YOLOv5 file in one `strip`,
    PARALLEL at a time; then every good result and the trainer's own strip, loaded in one go."""
    base = tmp_path_factory.mktemp("then-good")
    template = generated / "yolov5.pt"
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        futures = {kind: pool.submit(_strip_evil_then_good, base / kind,
                                     EVIL_KINDS if kind == "all-of-them" else [kind], template)
                   for kind in THEN_GOOD}
        done = {kind: f.result() for kind, f in futures.items()}
    ref = base / "reference.pt"
    views = harness.trainer_side(reference=[(template, ref, "yolov5")],
                                 summary=[ref, *(good for _, good, _, _ in done.values())])
    return GoodRuns(views[str(ref)], template, {
        kind: ThenGood(places, good, proc, changes, views[str(good)])
        for kind, (places, good, proc, changes) in done.items()})


def _assert_like_the_trainers_strip(view: dict[str, Any], reference: dict[str, Any]) -> None:
    assert summary.diff(view, reference) == []
    assert view["state_dict_check"] == "ok"
    assert view["ckpt_watchd_modules"] == []
    assert summary.module_classes(view) == summary.module_classes(reference)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("evil", THEN_GOOD)
def test_hostile_file_then_good_one_in_one_strip_leaves_the_good_one_stripped_correctly(
        evil: str, then_good: GoodRuns) -> None:
    """`strip EVIL... GOOD`: the evil files fail, untouched; the good one strips as the trainer's."""
    r = then_good.runs[evil]
    lines = r.proc.stdout.splitlines()
    want = [*(str(p.path) for p in r.places), str(r.good)]
    assert [ln.split(": ", 1)[0] for ln in lines] == want, r.proc.stdout + r.proc.stderr[-2000:]
    assert all(": failed: " in ln for ln in lines[:-1]), lines
    assert lines[-1].startswith(f"{r.good}: stripped (yolov5)"), lines[-1]
    assert r.proc.returncode == 1
    assert r.changes == []
    assert temp_files(r.good.parent) == []
    _assert_like_the_trainers_strip(r.view, then_good.reference)


@pytest.mark.timeout(300)
def test_hostile_files_then_good_one_through_one_pool_worker_leave_the_good_one_stripped(
        then_good: GoodRuns, tmp_path: Path) -> None:
    """One pool worker takes the evil files, then a good one: evil fails, good strips correctly."""
    from ckpt_watchd.outcome import FAILED, STRIPPED, Outcome
    from ckpt_watchd.pool import WorkerPool
    from ckpt_watchd.worker import StripJob

    places = _evil_files(EVIL_KINDS, tmp_path / "evil")
    good = tmp_path / "runs" / "train" / "good" / "weights" / "last.pt"
    good.parent.mkdir(parents=True)
    shutil.copyfile(then_good.template, good)
    before = snapshot(*_roots(places))
    done: queue.Queue[tuple[StripJob, Outcome]] = queue.Queue()
    pool = WorkerPool(1, job_timeout=60, nice=0, io_idle=False,
                      on_done=lambda job, o: done.put((job, o)))
    try:
        for path in [*(p.path for p in places), good]:
            pool.submit(StripJob(path=str(path)))
        outcomes: dict[str, Outcome] = {}
        deadline = time.monotonic() + 240
        while len(outcomes) < len(places) + 1:
            job, o = done.get(timeout=max(0.1, deadline - time.monotonic()))
            outcomes[job.path] = o
        restarts = pool.restarts  # a worker recycled after a hostile file is allowed, and shown
    finally:
        pool.shutdown(drain_timeout=10)
    evil = {str(p.path): (outcomes[str(p.path)].status, outcomes[str(p.path)].error)
            for p in places}
    assert {k: v for k, v in evil.items() if v[0] != FAILED} == {}
    assert outcomes[str(good)].status == STRIPPED, (outcomes[str(good)], restarts)
    assert tree_changes(before, snapshot(*_roots(places))) == []
    _assert_like_the_trainers_strip(harness.load_in_trainer(good), then_good.reference)


# ------------------------------------------------------------------------------ the daemon and FIFOs


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


@pytest.mark.timeout(240)
def test_daemon_strips_the_other_runs_while_fifos_sit_in_run_folders(
        ckpts: Path, root: Path, tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    """FIFOs as claim file, results.csv, args.yaml, opt.yaml: --once strips the rest and exits."""
    def run(name: str) -> Path:
        weights = root / "train" / name / "weights"
        weights.mkdir(parents=True)
        last = weights / "last.pt"
        shutil.copyfile(ckpts / "yolov5.pt", last)
        last.chmod(0o644)
        set_age(last, 3600)
        return last

    outside = _fifo(tmp_path / "outside" / "fifo")
    fifos = [
        _fifo(run("fifo-claim").parent / ".ckpt-watchd-claim.last.pt.lock"),
        _fifo(run("fifo-results").parent.parent / "results.csv"),
        _fifo(run("fifo-yaml").parent.parent / "args.yaml"),
        _fifo(root / "train" / "fifo-yaml" / "opt.yaml"),
    ]
    link = run("fifo-claim-link").parent / ".ckpt-watchd-claim.last.pt.lock"
    link.symlink_to(outside)
    ordinary = [run(f"ordinary-{i}") for i in range(4)]
    for f in [*fifos, link]:
        set_age(f, 3600)

    d = daemons(root, "--once", "--settle", "1", "--workers", "2", "--job-timeout", "60")
    code = d.wait(timeout=150)
    assert code in (0, 1), d.stderr_tail()
    stripped = {e["path"] for e in d.events("ckpt.stripped")}
    assert {str(p) for p in ordinary} <= stripped, d.stderr_tail()
    assert all(is_valid_stripped(p) for p in ordinary)
    assert all(stat.S_ISFIFO(os.lstat(f).st_mode) for f in [*fifos, outside])
    assert os.readlink(link) == str(outside)
    assert temp_files(root) == []
