"""Fuzz the safe loader with mutated real checkpoints: only the project's named errors come out.

Hypothesis flips bits, truncates, inserts, duplicates and deletes chunks of real `torch.save` output
(biased toward the zip structure and the pickle), and separately mutates only `data.pkl` inside an
otherwise valid zip so the unpickler itself is reached. `safeload.load` must succeed or raise a
`CheckpointError`; the worker boundary must never report an "internal" error. Opcode-level
mutations insert GLOBAL/REDUCE/BUILD/NEWOBJ/INST sequences into real pickles and strip the result
through the worker boundary: each case ends refused by name with the file untouched, or stripped
into an output whose own pickle passes the scan and names nothing new. Each load runs under the
worker's own per-job memory cap, so a mutated size field cannot take the machine's memory. Legacy
and tar files are refused before anything is unpickled, mutated or not.
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import os
import pickle
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ckpt_watchd.engine import checkpoint, opscan, safeload
from ckpt_watchd.errors import CheckpointError
from ckpt_watchd.outcome import FAILED, SKIPPED, STRIPPED
from ckpt_watchd.worker import StripJob, memory_cap, run_job
from fixtures import opfuzz
from reliability.conftest import CORPUS

FAST = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(FAST, max_examples=10_000, derandomize=False)


def _kinds(cls: type[CheckpointError]) -> set[str]:
    return {cls.kind}.union(*(_kinds(sub) for sub in cls.__subclasses__()))


# every kind a per-file refusal may have; run_job's "memory", "os" and "internal" are not among
# them: none of these small files may exhaust the cap or hit an OS error, and a bug is a bug
NAMED_KINDS = frozenset(_kinds(CheckpointError) - {CheckpointError.kind})


@pytest.fixture(scope="module")
def generated(ckpts: Path) -> dict[str, bytes]:
    """Every generated checkpoint (zip and legacy containers, three trainers)."""
    return {p.stem: p.read_bytes() for p in sorted(ckpts.iterdir())}


@pytest.fixture(scope="module")
def seeds(generated: dict[str, bytes]) -> dict[str, bytes]:
    """The real checkpoints mutations that need a loadable seed start from: the zip ones."""
    return {n: d for n, d in generated.items() if d.startswith(b"PK\x03\x04")}


def _torch_tar(marker: Path) -> bytes:
    """torch's pre-1.0 tar layout; its main pickle would run `touch marker` if anything read it."""
    payload = opfuzz.glob("os", "system") + opfuzz.tup(opfuzz.text(f"touch {marker}")) \
        + opfuzz.REDUCE
    members = {"sys_info": pickle.dumps({"protocol_version": 1001, "little_endian": True}, 2),
               "storages": pickle.dumps(0, 2), "tensors": pickle.dumps(0, 2),
               "pickle": b"\x80\x02" + payload + opfuzz.STOP}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def refused_seeds(generated: dict[str, bytes], scratch: Path) -> dict[str, bytes]:
    """The containers refused before any unpickling: torch's legacy stream and its tar."""
    legacy = {n: d for n, d in generated.items() if not d.startswith(b"PK\x03\x04")}
    assert legacy, "the generated seeds lost their legacy file"
    return {**legacy, "tar": _torch_tar(scratch / "MARKER")}


_names = itertools.count()


def load_kind(scratch: Path, data: bytes) -> tuple[str, str]:
    """Write `data` to a fresh file and load it: ("loaded", "") or a CheckpointError's kind and
    message; anything else propagates."""
    # a new name each time: the previous load may still map the previous file
    path = scratch / f"case-{next(_names)}.pt"
    path.write_bytes(data)
    try:
        with memory_cap() as cap:  # the cap a worker puts on each job
            safeload.load(path, need=cap.need)
        return "loaded", ""
    except CheckpointError as e:
        return e.kind, e.message
    finally:
        path.unlink()


def load_must_be_named(scratch: Path, data: bytes) -> str:
    """`load_kind` inside a hypothesis test, recording what it saw."""
    kind, message = load_kind(scratch, data)
    event(f"{kind}: {message[:50]}" if message else kind)
    return kind


# ------------------------------------------------------------------------------ mutations


def _regions(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges worth hitting more often than the tensor payload: headers and the pickle."""
    regions = [(0, min(len(data), 512)), (max(0, len(data) - 4096), len(data))]
    with contextlib.suppress(zipfile.BadZipFile, OSError, ValueError), \
            zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            if info.filename.endswith("data.pkl"):
                start = info.header_offset
                regions.append((start, min(len(data), start + 64 + info.file_size)))
    return regions


@st.composite
def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    """1-4 mutations of `data`: bit flips, truncation, insertion, duplication, deletion."""
    out = bytearray(data)
    regions = [*_regions(data), (0, len(data))]
    for _ in range(draw(st.integers(1, 4))):
        lo, hi = draw(st.sampled_from(regions))
        hi = min(hi, len(out))
        lo = min(lo, hi)
        at = draw(st.integers(lo, hi))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "duplicate", "delete",
                                   "overwrite"]))
        if op == "flip" and at < len(out):
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "duplicate":
            n = draw(st.integers(1, 4096))
            out[at:at] = out[at:at + n]
        elif op == "delete":
            del out[at:at + draw(st.integers(1, 4096))]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            out[at:at + len(chunk)] = chunk
    return bytes(out)


data_pkl = opfuzz.data_pkl
# The same torch zip with its data.pkl swapped and nothing else changed: the strict reader refuses
# duplicate names and records outside the top folder, so the re-zip keeps every record as it is.
with_data_pkl = opfuzz.swap_data_pkl


def whole_file_cases(seeds: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    return st.sampled_from(sorted(seeds)).flatmap(lambda name: mutate(seeds[name]))


def pickle_cases(seeds: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    zips = sorted(n for n, d in seeds.items() if d.startswith(b"PK\x03\x04"))
    return st.sampled_from(zips).flatmap(
        lambda name: mutate(data_pkl(seeds[name])).map(
            lambda pkl: with_data_pkl(seeds[name], pkl)))


# ------------------------------------------------------------------------------ the properties


@pytest.mark.timeout(60)
def test_unmutated_seeds_load(seeds: dict[str, bytes], scratch: Path) -> None:
    """Control: every zip seed loads as it is, so the failures below come from the mutations."""
    assert len(seeds) >= 3
    for name, data in seeds.items():
        path = scratch / f"seed-{name}.pt"
        path.write_bytes(data)
        assert isinstance(safeload.load(path).obj, dict), name
        path.unlink()


@pytest.mark.timeout(60)
def test_swapping_in_the_same_data_pkl_gives_back_the_same_bytes(seeds: dict[str, bytes]) -> None:
    """Control: the re-zip is exact, so a mutated file differs from its seed in data.pkl only."""
    corpus = [_corpus_smallest()] if _corpus_files() else []
    for data in [*seeds.values(), *(p.read_bytes() for p in corpus)]:
        assert with_data_pkl(data, data_pkl(data)) == data
        longer = data_pkl(data)[:-1] + b"N0."  # push and pop None: 2 bytes more
        with zipfile.ZipFile(io.BytesIO(data)) as zin, \
                zipfile.ZipFile(io.BytesIO(with_data_pkl(data, longer))) as zout:
            assert zout.namelist() == zin.namelist()
            assert zout.testzip() is None
            assert [zout.read(n) for n in zout.namelist()] == \
                [longer if n.endswith("/data.pkl") else zin.read(n) for n in zin.namelist()]


def _run(strategy: st.SearchStrategy[bytes], profile: settings, scratch: Path) -> None:
    @profile
    @given(data=strategy)
    def check(data: bytes) -> None:
        load_must_be_named(scratch, data)

    check()


@pytest.mark.timeout(280)
def test_mutated_checkpoints_raise_only_named_errors(seeds: dict[str, bytes],
                                                     scratch: Path) -> None:
    """Whole-file mutations of real checkpoints load or raise a CheckpointError, nothing else."""
    _run(whole_file_cases(seeds), FAST, scratch)


@pytest.mark.timeout(280)
def test_mutated_pickles_in_valid_zips_raise_only_named_errors(seeds: dict[str, bytes],
                                                               scratch: Path) -> None:
    """Mutating only data.pkl inside a valid zip reaches the unpickler: still only named errors."""
    _run(pickle_cases(seeds), FAST, scratch)


@pytest.mark.timeout(60)
def test_legacy_and_tar_seeds_are_refused_as_unsupported(refused_seeds: dict[str, bytes],
                                                         scratch: Path) -> None:
    """Control: the legacy and tar seeds themselves are refused as unsupported, never loaded."""
    assert {n: load_kind(scratch, d)[0] for n, d in refused_seeds.items()} == \
        dict.fromkeys(refused_seeds, "unsupported")


@pytest.mark.timeout(120)
def test_mutated_legacy_and_tar_files_end_only_as_named_errors(refused_seeds: dict[str, bytes],
                                                               scratch: Path) -> None:
    """Whole-file mutations of legacy and tar checkpoints end as named errors, never a load."""
    marker = scratch / "MARKER"

    @settings(FAST, max_examples=150)
    @given(data=whole_file_cases(refused_seeds))
    def check(data: bytes) -> None:
        assert load_must_be_named(scratch, data) != "loaded"
        assert not marker.exists()

    check()


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("kind", ["whole-file", "pickle-only"])
def test_ten_thousand_mutations_raise_only_named_errors(seeds: dict[str, bytes], scratch: Path,
                                                        kind: str) -> None:
    """10,000 random mutations of each kind: only CheckpointError subclasses (or success)."""
    strategy = whole_file_cases(seeds) if kind == "whole-file" else pickle_cases(seeds)
    _run(strategy, SLOW, scratch)


def _corpus_files() -> list[Path]:
    return sorted(CORPUS.rglob("*.pt")) if CORPUS.is_dir() else []


def _corpus_smallest() -> Path:
    return min(_corpus_files(), key=lambda p: p.stat().st_size)


@pytest.mark.skipif(not _corpus_files(), reason=f"no real checkpoints in {CORPUS}")
@pytest.mark.timeout(280)
def test_mutated_pickles_of_the_real_corpus_raise_only_named_errors(scratch: Path) -> None:
    """data.pkl of the trainers' own files (shared corpus), mutated: still only named errors."""
    smallest = _corpus_smallest()
    seeds = {smallest.stem: smallest.read_bytes()}
    _run(pickle_cases(seeds), settings(FAST, max_examples=100), scratch)


@pytest.mark.timeout(280)
def test_worker_boundary_never_reports_internal_errors(seeds: dict[str, bytes],
                                                       scratch: Path) -> None:
    """run_job on mutated pickles (load, strip, save, verify) ends in named error kinds only."""

    @settings(FAST, max_examples=100)
    @given(data=pickle_cases(seeds))
    def check(data: bytes) -> None:
        path = scratch / f"job-{next(_names)}" / "last.pt"
        path.parent.mkdir()
        path.write_bytes(data)
        outcome = run_job(StripJob(path=str(path)))  # capped inside, as in a worker
        assert outcome.error_type != "internal", outcome.error
        event(outcome.error_type or outcome.status)
        assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left
        path.unlink()
        os.rmdir(path.parent)

    check()


# ------------------------------------------------------------------------------ opcode insertions


def strip_must_be_safe(scratch: Path, container: bytes, pkl: bytes, marker: Path) -> str:
    """Strip `pkl` in `container` through the worker boundary; what became of it.

    Refused: by a named kind, the file byte-identical. Stripped: the output's own pickle passes
    the scan and names nothing beyond the source's uses and the writer's vocabulary. Either way
    no temp file is left and no payload ran.
    """
    data = with_data_pkl(container, pkl)
    folder = scratch / f"op-{next(_names)}"
    folder.mkdir()
    path = folder / "last.pt"
    path.write_bytes(data)
    try:
        outcome = run_job(StripJob(path=str(path)))  # capped inside, as in a worker
        ran = marker.exists()
        marker.unlink(missing_ok=True)  # so that shrinking starts clean
        assert not ran, f"a payload ran: {outcome}"
        assert sorted(os.listdir(folder)) == ["last.pt"], "a temp file was left"
        if outcome.status == FAILED:
            assert outcome.error_type in NAMED_KINDS, f"{outcome.error_type}: {outcome.error}"
            assert path.read_bytes() == data, "a refused file was changed"
            try:
                opscan.scan(pkl)
            except CheckpointError:
                return f"refused by the scan: {outcome.error_type}"
            return f"refused after the scan: {outcome.error_type}"
        assert outcome.status in (STRIPPED, SKIPPED), outcome
        try:  # the daemon took it: its own scan must pass it too
            source = opscan.scan(pkl)
        except CheckpointError as e:
            raise AssertionError(f"{outcome.status} although the scan refuses it: {e}") from None
        if outcome.status == SKIPPED:
            assert path.read_bytes() == data, "a skipped file was changed"
            return SKIPPED
        try:
            written = opscan.scan(data_pkl(path.read_bytes()))
        except CheckpointError as e:
            raise AssertionError(f"the output's own pickle fails the scan: {e}") from None
        new = written.uses - source.uses - checkpoint.WRITER_VOCABULARY
        assert not new, f"the output names what its source did not: {sorted(new, key=str)}"
        return STRIPPED
    finally:
        shutil.rmtree(folder)


def _share(seen: collections.Counter[str], prefix: str) -> float:
    return sum(v for k, v in seen.items() if k.startswith(prefix)) / max(1, seen.total())


def run_opcode_cases(seeds: dict[str, bytes], profile: settings,
                     scratch: Path) -> collections.Counter[str]:
    """Insert opcode sequences into each seed's data.pkl, strip, check; the outcomes seen."""
    walks = {n: opfuzz.walk(data_pkl(d)) for n, d in seeds.items()}
    marker = scratch / "MARKER"
    seen: collections.Counter[str] = collections.Counter()
    by_mode: collections.Counter[tuple[str, str]] = collections.Counter()

    @profile
    @given(case=opfuzz.insertions(walks, marker))
    def check(case: opfuzz.Insertion) -> None:
        result = strip_must_be_safe(scratch, seeds[case.seed], case.pickle, marker)
        event(result)
        event(f"{case.mode}: {result}")
        seen[result] += 1
        by_mode[case.mode, result.split(":")[0]] += 1

    check()
    print(f"\nopcode insertions into {', '.join(sorted(seeds))}: {seen.total()} cases")
    for result, count in seen.most_common():
        print(f"  {count:6d}  {count / seen.total():6.1%}  {result}")
    for mode in dict.fromkeys(opfuzz.MODES):
        row = {r: c for (m, r), c in by_mode.items() if m == mode}
        print(f"  {mode:>9}: " + ", ".join(f"{r} {c}" for r, c in sorted(row.items())))
    return seen


@pytest.mark.timeout(280)
def test_opcode_insertions_are_refused_by_name_or_stripped_to_a_clean_output(
        seeds: dict[str, bytes], scratch: Path) -> None:
    """Opcode sequences inserted into real pickles end refused by name or in an output that scans."""
    seen = run_opcode_cases(seeds, settings(FAST, max_examples=500), scratch)
    # the mutations must reach the strip, the scan and the unpickler's guards, not just one
    assert _share(seen, STRIPPED) >= 0.2, seen
    assert _share(seen, "refused by the scan") >= 0.2, seen
    assert _share(seen, "refused after the scan") >= 0.05, seen


@pytest.mark.skipif(not _corpus_files(), reason=f"no real checkpoints in {CORPUS}")
@pytest.mark.timeout(280)
def test_opcode_insertions_into_the_real_corpus_are_refused_by_name_or_stripped(
        scratch: Path) -> None:
    """The same for the smallest file of the shared corpus (a trainer's own pickle)."""
    smallest = _corpus_smallest()
    seen = run_opcode_cases({smallest.stem: smallest.read_bytes()},
                            settings(FAST, max_examples=150), scratch)
    assert _share(seen, "refused by the scan") >= 0.2, seen
    assert _share(seen, "refused after the scan") + _share(seen, STRIPPED) \
        + _share(seen, SKIPPED) >= 0.2, seen


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_ten_thousand_opcode_insertions_are_refused_by_name_or_stripped(
        seeds: dict[str, bytes], scratch: Path) -> None:
    """10,000 random opcode insertions (corpus seed too, when present): the same property."""
    everything = dict(seeds)
    if _corpus_files():
        smallest = _corpus_smallest()
        everything[f"corpus:{smallest.stem}"] = smallest.read_bytes()
    seen = run_opcode_cases(everything, SLOW, scratch)
    assert _share(seen, STRIPPED) >= 0.2, seen
    assert _share(seen, "refused by the scan") >= 0.2, seen
    assert _share(seen, "refused after the scan") >= 0.05, seen


@pytest.mark.timeout(60)
def test_a_pickle_cannot_give_a_tensor_backward_hooks_after_its_rebuild(
        seeds: dict[str, bytes], scratch: Path) -> None:
    """A SETITEM into a tensor's memoized hooks dict, after the rebuild, leaves it without hooks."""
    pkl = data_pkl(seeds["generic"])
    # the first tensor's args end `False, OrderedDict()` (BINGET 3 is OrderedDict), memoized
    hooks = re.search(rb"\x89h\x03\)Rq(.)t", pkl, re.DOTALL)
    assert hooks is not None
    bad = pkl[:-1] + opfuzz.get(hooks[1][0]) + opfuzz.text("hook") + opfuzz.integer(7) + b"s" \
        + opfuzz.POP + opfuzz.STOP
    assert opscan.scan(bad).uses == opscan.scan(pkl).uses
    path = scratch / "hooks.pt"
    path.write_bytes(with_data_pkl(seeds["generic"], bad))
    tensors = list(safeload.load(path).obj["model_state_dict"].values())
    assert tensors
    assert [t for t in tensors if t._backward_hooks] == []
