"""Where a strip's time goes: ckpt-watchd's phases next to the baseline's, per checkpoint size.

A diagnostic companion to `bench/strip.py` (same inputs, same baseline): it replays the steps of
`ckpt_watchd.engine.checkpoint.strip_file` one by one with a clock between them. It reaches into the engine's
internals to do so and must stay read-only towards them. `python bench/strip_phases.py --sizes m`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import strip as bench  # bench/strip.py: input generation and the child environments
from strip_child import BASE, CW, yolov5_strip_in_memory

CW_PHASES = ("load (mmap)", "detect + strip", "save (C pickler, kept records copied)",
             "flush + fsync (overlaps verify in strip_file)",
             "verify (weight-free reload + CRC of written records)",
             "check + chown + replace + dir fsync",
             "release the input (unmap; the replaced file is freed)")
BASE_PHASES = ("torch.load", "strip", "torch.save (no fsync)")


def _copy(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def cw_phases(path: Path) -> list[float]:
    from ckpt_watchd.engine import atomic, checkpoint, safeload, strip

    marks = [time.perf_counter()]
    with checkpoint._gc_paused():
        loaded = safeload.load(path)
        marks.append(time.perf_counter())
        profile = strip.detect_profile(loaded.obj, loaded.globals_seen)
        assert not strip.is_stripped(loaded.obj, profile)
        stripped = strip.strip(loaded.obj, profile,
                               now=datetime.datetime.now(datetime.timezone.utc))
        marks.append(time.perf_counter())
        with atomic.temp_writer(path) as (tmp, writer):
            written = checkpoint._save(stripped, writer, path, loaded)
            marks.append(time.perf_counter())
            atomic.finish_write(writer)
            marks.append(time.perf_counter())
            checkpoint.verify(stripped, tmp, written, source=path)
            marks.append(time.perf_counter())
            checkpoint._check_unchanged(path, loaded.facts)
            atomic.copy_ownership(tmp, loaded.facts.uid, loaded.facts.gid, loaded.facts.mode)
            atomic.replace(tmp, path)
            marks.append(time.perf_counter())
        del loaded, stripped, written  # the last references to the input's mapping
        marks.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(marks)]


def base_phases(path: Path) -> list[float]:
    import torch

    t0 = time.perf_counter()
    x = torch.load(path, map_location="cpu", weights_only=False)
    t1 = time.perf_counter()
    yolov5_strip_in_memory(x)
    t2 = time.perf_counter()
    torch.save(x, path)
    return [t1 - t0, t2 - t1, time.perf_counter() - t2]


def child(kind: str, src: str, warm: str, work: str, repeats: int) -> list[list[float]]:
    fn: Callable[[Path], list[float]] = cw_phases if kind == CW else base_phases
    target = Path(work) / "last.pt"
    _copy(warm, str(target))
    fn(target)  # warm-up: lazy imports and first calls
    rounds = []
    for _ in range(repeats):
        _copy(src, str(target))
        rounds.append(fn(target))
    return rounds


def run(kind: str, src: Path, warm: Path, work: Path, repeats: int) -> list[list[float]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--src", str(src),
           "--warm", str(warm), "--work", str(work), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, cwd=work, env=bench._env(kind == BASE), capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} phases failed:\n{proc.stderr[-3000:]}")
    rounds: list[list[float]] = json.loads(proc.stdout.splitlines()[-1])
    return rounds


def table(size: str, kind: str, names: tuple[str, ...], rounds: list[list[float]]) -> list[str]:
    meds = [statistics.median(r[i] for r in rounds) * 1000 for i in range(len(names))]
    total = statistics.median(sum(r) for r in rounds) * 1000
    lines = [f"| {size} | {kind} | {name} | {m:.0f} | {m / sum(meds):.0%} |"
             for name, m in zip(names, meds, strict=True)]
    return [*lines, f"| {size} | {kind} | **total** | **{total:.0f}** | |"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="m")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--warm", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.src, args.warm, args.work, args.repeats)))
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    root = Path(tempfile.mkdtemp(prefix="ckpt-watchd-phases-"))
    lines = ["| size | contender | phase | median ms | share |", "|---|---|---|---|---|"]
    try:
        tiny = root / "tiny.pt"
        bench.generate("tiny", tiny)
        for size in sizes:
            src = root / f"yolov5{size}.pt"
            bench.generate(size, src)
            work = root / "run"
            work.mkdir(exist_ok=True)
            cw = run(CW, src, tiny, work, args.repeats)
            base = run(BASE, src, tiny, work, args.repeats)
            lines += table(size, CW, CW_PHASES, cw) + table(size, BASE, BASE_PHASES, base)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
