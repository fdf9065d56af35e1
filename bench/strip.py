"""Strip benchmark: ckpt-watchd's strip vs YOLOv5's own `strip_optimizer` vs the physical floor.

It owns the driver: generate the inputs once, run the contenders alternately, each in a fresh
`bench/strip_child.py` process, and tabulate. Not a test, not part of the package: it never imports
torch itself and uses the engine as is. `python bench/strip.py [--quick] [--out FILE]`.
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

from strip_child import BASE, CW, FLOOR, MiB

BENCH = Path(__file__).resolve().parent
CHILD = BENCH / "strip_child.py"
TRAINER = BENCH / "_trainer"
DAEMON_SRC = BENCH.parent / "daemon"
SIZES = ("n", "s", "m", "l")
TARGETS = {"time": 0.5, "memory": 0.5, "floor": 3.0}

# ------------------------------------------------------------------------------ driver side


def _env(trainer_importable: bool) -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and "_trainer" not in p]
    paths.insert(0, str(TRAINER) if trainer_importable else str(DAEMON_SRC))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_child(mode: str, file: Path, work: Path, *, warm: Path | None = None,
              nbytes: int = 0) -> dict[str, Any]:
    """One fresh interpreter; `wall_s` is its whole life, start to exit."""
    result_file = work / "result.json"
    cmd = [sys.executable, str(CHILD), mode, str(file), "--result", str(result_file),
           "--bytes", str(nbytes)]
    if warm is not None:
        cmd += ["--warm", str(warm)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=_env(mode.startswith(BASE)), capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(result_file.read_text())
    result_file.unlink()
    result["wall_s"] = wall
    return result


EVICT = False  # --evict: start each strip with the input out of the page cache (a run that ended long ago)


def fresh_copy(src: Path, dst: Path) -> None:
    """Copy and fsync outside the timed region, so no writeback of the copy lands inside it."""
    dst.unlink(missing_ok=True)
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
        if EVICT:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def generate(size: str, dest: Path) -> int:
    """Write one input in a process that can import the stand-in trainer; returns its params."""
    cmd = [sys.executable, str(TRAINER / "make_checkpoint.py"), size, str(dest)]
    out = subprocess.run(cmd, cwd=dest.parent, env=_env(True), capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


def bench_size(size: str, src: Path, tiny: Path, work: Path, repeats: int) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    target, warm = work / "weights" / "last.pt", work / "weights" / "warm.pt"
    target.parent.mkdir(exist_ok=True)
    for rep in range(repeats):
        order = (CW, BASE) if rep % 2 == 0 else (BASE, CW)
        out_bytes = 0
        for kind in order:
            fresh_copy(src, target)
            fresh_copy(tiny, warm)
            r = run_child(kind, target, work, warm=warm)
            r.update(kind=kind, size=size, rep=rep, out_bytes=target.stat().st_size)
            out_bytes = r["out_bytes"] if kind == CW else out_bytes
            runs.append(r)
        r = run_child(FLOOR, target.with_name("floor.bin"), work, nbytes=out_bytes)
        runs.append(dict(r, kind=FLOOR, size=size, rep=rep, out_bytes=out_bytes))
        for kind in order:
            fresh_copy(src, target)
            r = run_child(f"{kind}-cold", target, work)
            runs.append({"kind": f"{kind}-cold", "size": size, "rep": rep, "wall_s": r["wall_s"]})
        leftovers = [p.name for p in target.parent.iterdir()
                     if p.name not in (target.name, warm.name)]
        if leftovers:
            raise SystemExit(f"files left behind after a strip: {leftovers}")
        print(f"  {size} round {rep + 1}/{repeats} done", file=sys.stderr, flush=True)
    return runs


# ------------------------------------------------------------------------------ report


def _vals(runs: list[dict[str, Any]], kind: str, key: str) -> list[float]:
    return [float(r[key]) for r in sorted(runs, key=lambda r: r["rep"]) if r["kind"] == kind]


def _cell(xs: list[float], scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    xs = [x / scale for x in xs]
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def _ratio(a: list[float], b: list[float]) -> tuple[float, str]:
    """Ratio of medians, and the range of the per-round ratios (each pair ran back to back)."""
    med = statistics.median(a) / statistics.median(b) if statistics.median(b) else float("inf")
    paired = [x / y for x, y in zip(a, b, strict=True) if y]
    return med, f"**{med:.2f}** ({min(paired):.2f}-{max(paired):.2f})"


def _mark(value: float, target: float) -> str:
    return "met" if value <= target else "MISSED"


def _machine(load: tuple[float, ...]) -> str:
    from importlib.metadata import version

    return (f"Python {sys.version.split()[0]}, torch {version('torch')}, {os.cpu_count()} CPUs; "
            f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")


def report(results: dict[str, dict[str, Any]], repeats: int, command: str,
           load: tuple[float, ...]) -> str:
    resets = {r.get("peak_reset") for res in results.values() for r in res["runs"] if r["kind"] == CW}
    peak_note = ("" if resets == {True} else
                 " VmHWM could not be reset here, so peaks may include the warm-up.")
    lines = [
        _machine(load),
        f"Medians of {repeats} alternating rounds, (min-max) in brackets; ratios are ratios of "
        f"medians with the range of the per-round ratios in brackets. MiB = 2^20 bytes.{peak_note}",
        "",
        "**Time** (seconds)",
        "",
        "| size | params | input MiB | output MiB | warm strip: ckpt-watchd | baseline | floor | "
        "ckpt-watchd / baseline | ckpt-watchd / floor | whole process: ckpt-watchd | baseline | "
        "ckpt-watchd / baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mem_lines = [
        "**Memory and I/O** (MiB; peak RSS above the RSS after `import torch` and the warm-up; "
        "rchar/wchar count read()/write() calls, not mmap page faults)",
        "",
        "| size | extra peak RSS: ckpt-watchd | baseline | ckpt-watchd / baseline | "
        "rchar: ckpt-watchd | baseline | wchar: ckpt-watchd | baseline | "
        "disk write_bytes: ckpt-watchd | baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for size, res in results.items():
        runs = res["runs"]
        t_cw, t_b, t_f = (_vals(runs, k, "strip_s") for k in (CW, BASE, FLOOR))
        w_cw, w_b = _vals(runs, f"{CW}-cold", "wall_s"), _vals(runs, f"{BASE}-cold", "wall_s")
        m_cw, m_b = _vals(runs, CW, "extra_peak"), _vals(runs, BASE, "extra_peak")
        rt, rt_s = _ratio(t_cw, t_b)
        rf, rf_s = _ratio(t_cw, t_f)
        rm, rm_s = _ratio(m_cw, m_b)
        _, rw_s = _ratio(w_cw, w_b)
        outs = _vals(runs, CW, "out_bytes")
        lines.append(
            f"| {size} | {res['params'] / 1e6:.2f}M | {res['bytes'] / MiB:.1f} | "
            f"{statistics.median(outs) / MiB:.1f} | {_cell(t_cw)} | {_cell(t_b)} | {_cell(t_f)} | "
            f"{rt_s} | {rf_s} | {_cell(w_cw)} | {_cell(w_b)} | {rw_s} |")
        io = [_cell(_vals(runs, kind, key), MiB, "{:.0f}")
              for key in ("rchar", "wchar", "write_bytes") for kind in (CW, BASE)]
        mem_lines.append(f"| {size} | {_cell(m_cw, MiB, '{:.0f}')} | {_cell(m_b, MiB, '{:.0f}')} | "
                         f"{rm_s} | " + " | ".join(io) + " |")
        verdicts.append(
            f"- {size}: time {rt:.2f}x baseline ({_mark(rt, TARGETS['time'])}), extra memory "
            f"{rm:.2f}x ({_mark(rm, TARGETS['memory'])}), {rf:.2f}x the floor "
            f"({_mark(rf, TARGETS['floor'])})")
    targets = (f"Targets: warm strip <= {TARGETS['time']}x the baseline's time, extra memory <= "
               f"{TARGETS['memory']}x the baseline's, <= {TARGETS['floor']}x the floor.")
    return "\n".join([*lines, "", *mem_lines, "", targets, "", *verdicts, "",
                      f"Command: `{command}`", ""])


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated subset of n,s,m,l")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds per size (>= 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: n and s, 3 rounds")
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    p.add_argument("--raw", type=Path, help="also write every run's measurements here (JSON)")
    p.add_argument("--tmpdir", type=Path, help="where to put inputs (default: the system temp dir)")
    p.add_argument("--evict", action="store_true",
                   help="drop each input copy from the page cache before the strip (cold cache)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = "n,s", 3
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if (not set(args.sizes) <= set(SIZES) or args.repeats < 1):
        p.error(f"--sizes must be a subset of {','.join(SIZES)} and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    global EVICT
    args = parse_args(argv)
    EVICT = args.evict
    command = "python bench/strip.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="ckpt-watchd-bench-", dir=args.tmpdir))
    results: dict[str, dict[str, Any]] = {}
    try:
        print(f"generating inputs in {root} ...", file=sys.stderr, flush=True)
        tiny = root / "tiny.pt"
        generate("tiny", tiny)
        inputs = {s: root / f"yolov5{s}.pt" for s in args.sizes}
        params = {s: generate(s, path) for s, path in inputs.items()}
        work = root / "run"
        work.mkdir()
        for size, src in inputs.items():
            runs = bench_size(size, src, tiny, work, args.repeats)
            results[size] = {"params": params[size], "bytes": src.stat().st_size, "runs": runs}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = report(results, args.repeats, command.strip(), load)
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.raw:
        args.raw.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
