"""Fuzz the safe loader with mutated real checkpoints: only the project's named errors come out.

Hypothesis flips bits, truncates, inserts, duplicates and deletes chunks of real `torch.save` output
(biased toward the zip structure and the pickle), and separately mutates only `data.pkl` inside an
otherwise valid zip so the unpickler itself is reached. `safeload.load` must succeed or raise a
`CheckpointError`; the worker boundary must never report an "internal" error. Each load runs under
the worker's own per-job address-space cap, so a mutated size field cannot take the machine's memory.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ckpt_watchd.engine import safeload
from ckpt_watchd.errors import CheckpointError
from ckpt_watchd.worker import memory_cap
from reliability.conftest import CORPUS

FAST = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(FAST, max_examples=10_000, derandomize=False)


@pytest.fixture(scope="module")
def seeds(ckpts: Path) -> dict[str, bytes]:
    """The real checkpoints mutations start from (zip and legacy containers, three trainers)."""
    return {p.stem: p.read_bytes() for p in sorted(ckpts.iterdir())}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_names = itertools.count()


def load_must_be_named(scratch: Path, data: bytes) -> None:
    """Write `data` to a fresh file and load it: success or a CheckpointError, nothing else."""
    # a new name each time: the previous load may still map the previous file
    path = scratch / f"case-{next(_names)}.pt"
    path.write_bytes(data)
    try:
        with memory_cap(path):  # the cap a worker puts on each job
            safeload.load(path)
        event("loaded")
    except CheckpointError as e:
        event(f"{e.kind}: {e.message[:50]}")
    finally:
        path.unlink()


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


def data_pkl(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        return zf.read(name)


def with_data_pkl(data: bytes, pkl: bytes) -> bytes:
    """The same torch zip with its data.pkl swapped (records stay stored, as torch writes them)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            body = pkl if info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(zipfile.ZipInfo(info.filename), body)
    return out.getvalue()


def whole_file_cases(seeds: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    return st.sampled_from(sorted(seeds)).flatmap(lambda name: mutate(seeds[name]))


def pickle_cases(seeds: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    zips = sorted(n for n, d in seeds.items() if d.startswith(b"PK\x03\x04"))
    return st.sampled_from(zips).flatmap(
        lambda name: mutate(data_pkl(seeds[name])).map(
            lambda pkl: with_data_pkl(seeds[name], pkl)))


# ------------------------------------------------------------------------------ the properties


def test_unmutated_seeds_load(seeds: dict[str, bytes], scratch: Path) -> None:
    """Control: every seed loads as it is, so the failures below come from the mutations."""
    for name, data in seeds.items():
        path = scratch / f"seed-{name}.pt"
        path.write_bytes(data)
        assert isinstance(safeload.load(path).obj, dict), name
        path.unlink()


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


@pytest.mark.skipif(not _corpus_files(), reason=f"no real checkpoints in {CORPUS}")
@pytest.mark.timeout(280)
def test_mutated_pickles_of_the_real_corpus_raise_only_named_errors(scratch: Path) -> None:
    """data.pkl of the trainers' own files (shared corpus), mutated: still only named errors."""
    smallest = min(_corpus_files(), key=lambda p: p.stat().st_size)
    seeds = {smallest.stem: smallest.read_bytes()}
    _run(pickle_cases(seeds), settings(FAST, max_examples=100), scratch)


@pytest.mark.timeout(280)
def test_worker_boundary_never_reports_internal_errors(seeds: dict[str, bytes],
                                                       scratch: Path) -> None:
    """run_job on mutated pickles (load, strip, save, verify) ends in named error kinds only."""
    from ckpt_watchd.worker import StripJob, run_job

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
