"""Scan benchmark: `ckpt-watchd scan` over a big root, against `--once --dry-run` (the way to ask
"how much would I get back?" before `scan` existed), measured alternately in the same run.

It owns the driver: build a root of RUNS runs with `last.pt` and `best.pt` each (copies of the
corpus' YOLOv5n `last.pt`, else a generated YOLOv5n-shaped one), warm the page cache with one
untimed scan, then time rounds of: the scan of the whole root (the target: <= 0.25 s per
checkpoint on 2 cores), and the scan and the dry run of a small sub-root (the ratio). Each is a
fresh `python -m ckpt_watchd` process. Not a test; never imports torch itself.
`python bench/scan.py [--runs 1000] [--rounds 3] [--full] [--out FILE]`.

By default the copies are sparse: every byte the structure pass can read (zip headers, data.pkl,
the central directory) is copied and each weight record is a hole, so 2,000 files of 14.5 MB
need about 7 GB of disk instead of 29 GB. A scan never reads a weight, so its work is the same;
`--full` makes real copies to check that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
DAEMON_SRC = BENCH.parent / "daemon"
CORPUS_V5N = BENCH.parents[1] / "shared/corpus/yolov5/runs/train/v5n_interrupted/weights/last.pt"
sys.path.insert(0, str(DAEMON_SRC))

from ckpt_watchd.engine import zipread  # noqa: E402  (no torch: the zip reader alone)

TARGET_S_PER_CKPT = 0.25
OLD = 1_000_000_000  # the files' mtime: long finished runs


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(DAEMON_SRC), *filter(None, [env.get("PYTHONPATH")])])
    return env


def input_file(work: Path) -> tuple[Path, str]:
    if CORPUS_V5N.is_file():
        return CORPUS_V5N, "the corpus' YOLOv5n last.pt"
    out = work / "v5n.pt"
    subprocess.run([sys.executable, str(BENCH / "_trainer" / "make_checkpoint.py"), "n",
                    str(out)], check=True, env=dict(os.environ))
    return out, "a generated YOLOv5n-shaped last.pt (no ../shared corpus here)"


def weight_spans(src: Path) -> list[tuple[int, int]]:
    """(offset, size) of each weight record's data: what a sparse copy leaves as a hole."""
    fd = os.open(src, os.O_RDONLY)
    try:
        archive = zipread.read_archive(fd, os.fstat(fd).st_size)
        return sorted((r.data_offset, r.size) for r in archive.storages().values())
    finally:
        os.close(fd)


def make_copy(data: bytes, holes: list[tuple[int, int]], dest: Path, full: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        if full:
            f.write(data)
        else:
            at = 0
            for off, size in holes:
                f.write(data[at:off])
                f.seek(off + size)
                at = off + size
            f.write(data[at:])
            f.truncate(len(data))
    os.utime(dest, (OLD, OLD))


def build(root: Path, runs: int, src: Path, full: bool) -> int:
    data, holes = src.read_bytes(), ([] if full else weight_spans(src))
    for i in range(runs):
        for name in ("last.pt", "best.pt"):
            make_copy(data, holes, root / "train" / f"exp{i:04d}" / "weights" / name, full)
    return 2 * runs


def timed(cmd: list[str]) -> tuple[float, dict[str, Any] | None]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{cmd[3]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    try:
        return wall, json.loads(proc.stdout)
    except ValueError:
        return wall, None


def scan_cmd(root: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "ckpt_watchd", "scan", str(root), "--json",
            "--workers", str(workers)]


def dry_run(root: Path, workers: int, state: Path) -> float:
    shutil.rmtree(state, ignore_errors=True)
    wall, _ = timed([sys.executable, "-m", "ckpt_watchd", "--root", str(root), "--once",
                     "--dry-run", "--workers", str(workers), "--state-dir", str(state),
                     "--settle", "0.1", "--log-level", "error", "--no-follow-writers"])
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000, help="runs in the big root (default 1000)")
    p.add_argument("--small", type=int, default=25,
                   help="runs in the sub-root where scan and the dry run are compared (25)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--full", action="store_true", help="real copies instead of sparse ones")
    p.add_argument("--tmpdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    ns = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ckpt-watchd-scan-bench.", dir=ns.tmpdir))
    try:
        src, what = input_file(work)
        big, small = work / "big", work / "small"
        t0 = time.perf_counter()
        n_big = build(big, ns.runs, src, ns.full)
        n_small = build(small, ns.small, src, ns.full)
        print(f"built {n_big} + {n_small} checkpoints in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        _, warm = timed(scan_cmd(big, ns.workers))  # the page cache, untimed
        assert warm is not None and warm["totals"]["checkpoints"] == n_big, warm
        scans, small_scans, dries = [], [], []
        for r in range(ns.rounds):
            pair = [("scan", small), ("dry", small)]
            for kind, root in (pair if r % 2 == 0 else pair[::-1]):
                if kind == "scan":
                    small_scans.append(timed(scan_cmd(root, ns.workers))[0] / n_small)
                else:
                    dries.append(dry_run(root, ns.workers, work / "state") / n_small)
            wall, result = timed(scan_cmd(big, ns.workers))
            assert result is not None and result["totals"]["checkpoints"] == n_big
            scans.append(wall / n_big)
            print(f"round {r + 1}: {scans[-1]:.3f} s/ckpt", file=sys.stderr)
        med = statistics.median(scans)
        ratio = statistics.median(small_scans) / statistics.median(dries)
        totals = warm["totals"]
        report = "\n".join([
            f"# scan: {ns.runs} runs x 2 checkpoints, {ns.workers} workers, {os.cpu_count()} CPUs",
            "",
            f"input: {what}, {src.stat().st_size:,} bytes; "
            f"{'real' if ns.full else 'sparse'} copies; page cache warm (one untimed scan)",
            f"estimate: {totals['bytes']:,} -> {totals['bytes_after']:,} bytes "
            f"({totals['reclaimable']:,} reclaimable)",
            f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            "",
            "| measure | median | all rounds | target |",
            "|---|---|---|---|",
            f"| scan, s per checkpoint ({n_big}) | {med:.3f} | "
            f"{', '.join(f'{x:.3f}' for x in scans)} | <= {TARGET_S_PER_CKPT} "
            f"{'met' if med <= TARGET_S_PER_CKPT else 'MISSED'} |",
            f"| scan / `--once --dry-run`, per checkpoint ({n_small}) | {ratio:.2f}x | "
            f"{', '.join(f'{a:.3f}/{b:.3f}' for a, b in zip(small_scans, dries, strict=True))}"
            " s | |",
        ])
        print(report)
        if ns.out is not None:
            ns.out.write_text(report + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
