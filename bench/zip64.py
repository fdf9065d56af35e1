"""Zip64 benchmark: ckpt-watchd's strip of a 13.5 GB Lightning checkpoint vs load + strip + save.

It owns the driver: generate a Lightning-shaped checkpoint (FP32 weights and twice that in Adam
state) with `torch.save`, then alternate, each in a fresh process on a fresh, fsync-ed copy with
its pages in the page cache, ckpt-watchd's strip (`worker.run_job`, the daemon's per-file entry)
and the baseline (`torch.load` + drop the training state + `torch.save`), and tabulate medians.
Not a test, not part of the package. `python bench/zip64.py FOLDER [--rounds 3] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from strip_child import FLOOR, _measure, _status_bytes, floor_write

BENCH = Path(__file__).resolve().parent
DAEMON_SRC = BENCH.parent / "daemon"
CW, BASE = "ckpt-watchd", "baseline"
GB, MiB = 10**9, 1 << 20
# the keys a weights-only Lightning save leaves out (ModelCheckpoint(save_weights_only=True))
TRAINING_STATE = ("callbacks", "optimizer_states", "lr_schedulers")
TARGETS = {"time": 0.5, "extra_mb": 300}


# ------------------------------------------------------------------------------ the input


def make_checkpoint(dest: Path, weights_bytes: int, tensors: int, seed: int = 0) -> dict[str, Any]:
    """A Lightning 2.x `trainer.save_checkpoint` file: FP32 weights, Adam's two moments per weight."""
    import torch

    torch.manual_seed(seed)
    # a stack of identical blocks, like a transformer: per block a (4h, h) and an (h, 4h) matrix
    # with their biases and a LayerNorm; `h` chosen so that `tensors` tensors hold the weights
    blocks = max(1, tensors // 6)
    h = max(8, int((weights_bytes / 4 / blocks / 8) ** 0.5))
    state: dict[str, torch.Tensor] = {}
    for b in range(blocks):
        p = f"model.blocks.{b}."
        state[p + "fc1.weight"] = torch.empty(4 * h, h).uniform_(-0.05, 0.05)
        state[p + "fc1.bias"] = torch.empty(4 * h).uniform_(-0.05, 0.05)
        state[p + "fc2.weight"] = torch.empty(h, 4 * h).uniform_(-0.05, 0.05)
        state[p + "fc2.bias"] = torch.empty(h).uniform_(-0.05, 0.05)
        state[p + "norm.weight"] = torch.ones(h)
        state[p + "norm.bias"] = torch.zeros(h)
    adam = {i: {"step": torch.tensor(1200.0), "exp_avg": torch.empty_like(t).normal_(0, 1e-3),
                "exp_avg_sq": torch.empty_like(t).uniform_(0, 1e-6)}
            for i, t in enumerate(state.values())}
    ckpt = {
        "epoch": 11,
        "global_step": 1200,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 1200},
                               "epoch_progress": {"total": {"ready": 12, "completed": 11},
                                                  "current": {"ready": 12, "completed": 11}}},
                  "validate_loop": {"state_dict": {}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                "monitor": "val_loss", "best_model_score": torch.tensor(0.4321),
                "best_model_path": "/runs/lightning_logs/version_0/checkpoints/epoch=10.ckpt",
                "current_score": torch.tensor(0.45), "dirpath": "/runs/lightning_logs/version_0"},
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 1, "stopped_epoch": 0, "best_score": torch.tensor(0.4321),
                "patience": 3}},
        "optimizer_states": [{"state": adam, "param_groups": [{
            "lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
            "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
            "fused": None, "initial_lr": 3e-4, "params": list(range(len(state)))}]}],
        "lr_schedulers": [{"T_max": 100, "eta_min": 0.0, "base_lrs": [3e-4], "last_epoch": 11,
                           "_step_count": 12, "_get_lr_called_within_step": False,
                           "_last_lr": [2.9e-4]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 3e-4, "hidden": h, "blocks": blocks},
    }
    torch.save(ckpt, dest)
    kept = sum(t.nbytes for t in state.values())
    return {"tensors": len(state), "weights_bytes": kept,
            "adam_bytes": sum(v.nbytes for s in adam.values() for v in s.values())}


# ------------------------------------------------------------------------------ child side


def baseline_strip(f: str) -> None:
    """What one writes without ckpt-watchd: load it all, drop the training state, save in place."""
    import torch

    x = torch.load(f, map_location="cpu", weights_only=False)
    for k in TRAINING_STATE:
        x.pop(k, None)
    torch.save(x, f)


def cw_strip(f: str) -> None:
    from ckpt_watchd.worker import StripJob, run_job

    outcome = run_job(StripJob(path=f))
    if outcome.status != "stripped":
        raise SystemExit(f"ckpt-watchd did not strip {f}: {outcome}")


def child(mode: str, file: str, warm: str) -> dict[str, Any]:
    if mode == FLOOR:  # `warm` is the byte count here
        block = os.urandom(MiB)  # random, so no filesystem can cheat by compressing
        result = _measure(floor_write, file, int(warm), block)
        os.unlink(file)
        return result

    import torch  # noqa: F401  (the memory baseline is taken with torch loaded)

    strip = cw_strip if mode == CW else baseline_strip
    strip(warm)  # lazy imports and first calls, paid before the clock starts
    result = _measure(strip, file)
    result["rss_before"] = _status_bytes("VmRSS")
    result["hwm"] = _status_bytes("VmHWM")
    return result


def check(output: str, source: str) -> dict[str, Any]:
    """The stripped file: zip64 end records, every reader, every tensor equal to the source's."""
    import zipfile

    import torch

    from ckpt_watchd.engine import zipread

    facts: dict[str, Any] = {}
    with open(output, "rb") as f:
        f.seek(-(zipread.END.size + zipread.END64_LOCATOR.size), os.SEEK_END)
        tail = f.read()
    _sig, _disk, _dcd, _here, n_all, cd_size, cd_offset, _comment = zipread.END.unpack_from(
        tail, zipread.END64_LOCATOR.size)
    facts["plain end record"] = f"entries {n_all:#x}, cd_size {cd_size:#x}, cd_offset {cd_offset:#x}"
    facts["zip64 locator"] = tail[:4] == b"PK\x06\x07"
    fd = os.open(output, os.O_RDONLY)
    try:
        archive = zipread.read_archive(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    facts["records"] = len(archive.records)
    facts["records_past_4GiB"] = sum(r.header_offset >= 1 << 32 for r in archive.records)
    with zipfile.ZipFile(output) as zf:
        facts["zipfile_records"] = len(zf.infolist())
    src = torch.load(source, mmap=True, map_location="cpu", weights_only=True)["state_dict"]
    for mmap in (True, False):
        t0 = time.perf_counter()
        back = torch.load(output, mmap=mmap, map_location="cpu", weights_only=True)
        ok = (list(back["state_dict"]) == list(src)
              and all(torch.equal(back["state_dict"][k], v) for k, v in src.items())
              and not any(k in back for k in TRAINING_STATE))
        facts[f"torch.load(mmap={mmap}, weights_only=True)"] = (
            f"{'equal' if ok else 'DIFFERENT'} ({time.perf_counter() - t0:.1f} s)")
        del back
    facts["keys"] = list(torch.load(output, mmap=True, weights_only=True))
    return facts


def isolated(file: str) -> dict[str, Any]:
    """One strip through the daemon's own worker path: a forked job process with its limits."""
    import gc
    import resource

    import torch

    from ckpt_watchd import worker
    from ckpt_watchd.engine import checkpoint  # noqa: F401  (as `worker_main` does, uncapped)

    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    real = worker._real_bytes(file)
    wall = worker.inner_deadline(1800.0)  # the daemon's default --job-timeout
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    outcome = worker.run_isolated(worker.StripJob(path=file), wall=wall)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"status": outcome.status, "error": outcome.error, "wall_s": time.perf_counter() - t0,
            "cpu_budget_s": worker.cpu_budget(real), "cpu_used_s":
            (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "child_max_rss_mb": after.ru_maxrss / 1024, "deadline_s": wall, "real_bytes": real}


# ------------------------------------------------------------------------------ driver side


def _env(src: Path = DAEMON_SRC) -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(src), *paths])
    return env


def run(*args: str, src: Path = DAEMON_SRC, timeout: float = 3600) -> dict[str, Any]:
    """This script again, in a fresh interpreter; its JSON answer and its whole wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          env=_env(src), capture_output=True, text=True, check=False,
                          timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{args[:2]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    return result


def resident(path: Path) -> float:
    """Fraction of the file's pages in the page cache (util-linux fincore), or -1."""
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True,
                             text=True, check=True).stdout.split()
        return int(out[0]) / max(1, path.stat().st_size)
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return -1.0


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def fresh_copy(src: Path, dst: Path, *, cold: bool) -> float:
    """Copy, fsync and warm (or evict) outside every timing; the fraction cached at the start."""
    dst.unlink(missing_ok=True)
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())
    # and everything else: the generated input, the previous contender's output (the baseline
    # does not fsync) must not be written back during the next one's timing
    os.sync()
    with open(dst, "rb") as f:
        if cold:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if cold:
        drop_caches()
    else:
        # the copy's pages are mostly cached already; read it once so that what fits is
        with open(dst, "rb", buffering=0) as f:
            while f.readinto(_BUF):
                pass
    return resident(dst)


_BUF = bytearray(16 * MiB)


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _cell(xs: list[float], scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    xs = [x / scale for x in xs]
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def _ratio(a: list[float], b: list[float]) -> tuple[float, str]:
    med = statistics.median(a) / statistics.median(b)
    paired = [x / y for x, y in zip(a, b, strict=True)]
    return med, f"**{med:.2f}** ({min(paired):.2f}-{max(paired):.2f})"


def report(runs: list[dict[str, Any]], meta: dict[str, Any], contenders: list[str]) -> str:
    def vals(kind: str, key: str) -> list[float]:
        return [float(r[key]) for r in runs if r["kind"] == kind]

    from importlib.metadata import version

    t_b, m_b = vals(BASE, "strip_s"), vals(BASE, "extra_peak")
    lines = [
        f"Python {sys.version.split()[0]}, torch {version('torch')}, {os.cpu_count()} CPUs, "
        f"{meta['ram_gb']:.0f} GB RAM; input {meta['input_bytes'] / GB:.2f} GB "
        f"({meta['tensors']} FP32 weight tensors, {meta['weights_bytes'] / GB:.2f} GB; Adam "
        f"state {meta['adam_bytes'] / GB:.2f} GB), output {meta['output_bytes'] / GB:.2f} GB. "
        f"{meta['rounds']} alternating rounds, page cache {meta['cache']}; medians, "
        "(min-max) in brackets; ratios of medians with the range of the per-round ratios. "
        "GB = 10^9 bytes.",
        "",
        "| | time (s) | time / baseline | extra peak RSS (MB) | extra peak / baseline | "
        "peak RSS of the process (MB) | rchar (GB) | disk write_bytes (GB) | "
        "input cached at the start |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for kind in [*contenders, BASE]:
        t, m = vals(kind, "strip_s"), vals(kind, "extra_peak")
        rt, rt_s = _ratio(t, t_b)
        _, rm_s = _ratio(m, m_b)
        lines.append(
            f"| {kind} | {_cell(t)} | {rt_s if kind != BASE else ''} | {_cell(m, 1e6, '{:.0f}')} | "
            f"{rm_s if kind != BASE else ''} | {_cell(vals(kind, 'hwm'), 1e6, '{:.0f}')} | "
            f"{_cell(vals(kind, 'rchar'), GB)} | {_cell(vals(kind, 'write_bytes'), GB)} | "
            f"{_cell(vals(kind, 'cached'), 0.01, '{:.0f}')} % |")
        if kind != BASE:
            mm = statistics.median(m) / 1e6
            verdicts.append(
                f"- {kind}: time {rt:.2f}x the baseline's (target <= {TARGETS['time']}x: "
                f"{'met' if rt <= TARGETS['time'] else 'MISSED'}), extra peak RSS {mm:.0f} MB "
                f"(target <= {TARGETS['extra_mb']} MB: "
                f"{'met' if mm <= TARGETS['extra_mb'] else 'MISSED'}); "
                f"{_ratio(t, vals(FLOOR, 'strip_s'))[0]:.2f}x the floor")
    lines.append(f"| floor: write the output's bytes + fsync | {_cell(vals(FLOOR, 'strip_s'))} | "
                 f"{_ratio(vals(FLOOR, 'strip_s'), t_b)[1]} | | | | | "
                 f"{_cell(vals(FLOOR, 'write_bytes'), GB)} | |")
    return "\n".join([*lines, "", *verdicts, ""])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, nargs="?",
                   help="where the input, its working copy and outputs go")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (>= 1)")
    p.add_argument("--weights-gb", type=float, default=4.5, help="FP32 weights (Adam: twice that)")
    p.add_argument("--tensors", type=int, default=300, help="weight tensors (about)")
    p.add_argument("--cold", action="store_true",
                   help="start each strip with the page cache dropped (both sides) instead of warm")
    p.add_argument("--keep-input", action="store_true", help="keep the generated input")
    p.add_argument("--also", type=Path, action="append", default=[], metavar="DIR",
                   help="also measure the ckpt-watchd of another source tree (DIR/daemon), "
                        "side by side in the same rounds (repeatable)")
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    p.add_argument("--raw", type=Path, help="also write every measurement here (JSON)")
    p.add_argument("--child", nargs=3, metavar=("MODE", "FILE", "WARM"), help=argparse.SUPPRESS)
    p.add_argument("--check", nargs=2, metavar=("OUTPUT", "SOURCE"), help=argparse.SUPPRESS)
    p.add_argument("--isolated", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--make", nargs=3, metavar=("DEST", "BYTES", "TENSORS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.folder is None and not (args.child or args.check or args.isolated or args.make):
        p.error("the folder is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    if args.check:
        print(json.dumps(check(*args.check)))
        return 0
    if args.isolated:
        print(json.dumps(isolated(args.isolated)))
        return 0
    if args.make:
        dest, nbytes, tensors = args.make
        print(json.dumps(make_checkpoint(Path(dest), int(float(nbytes)), int(tensors))))
        return 0
    return drive(args)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def drive(args: argparse.Namespace) -> int:
    folder: Path = args.folder
    folder.mkdir(parents=True, exist_ok=True)
    weights = int(args.weights_gb * GB)
    need = 3 * weights + (3 * weights) + weights + 2 * GB  # input, its working copy, one output
    free = free_bytes(folder)
    log(f"{free / GB:.1f} GB free in {folder}; this run needs about {need / GB:.1f} GB")
    if free < need:
        raise SystemExit(f"not enough space in {folder}: {free / GB:.1f} GB free, "
                         f"{need / GB:.1f} GB needed")
    master, tiny, work = folder / "lightning.ckpt", folder / "tiny.ckpt", folder / "work"
    work.mkdir(exist_ok=True)
    target, warm = work / "last.ckpt", work / "warm.ckpt"
    if not master.exists():
        log("generating the input ...")
        meta = run("--make", str(master), str(weights), str(args.tensors))
        (folder / "lightning.json").write_text(json.dumps(meta))
    meta = json.loads((folder / "lightning.json").read_text())
    if not tiny.exists():
        run("--make", str(tiny), str(4 << 20), "12")
    meta.update(input_bytes=master.stat().st_size, rounds=args.rounds,
                cache="dropped before each strip (both sides)" if args.cold else
                "warm (each copy read once after its fsync)",
                ram_gb=os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB)
    log(f"input: {master.stat().st_size / GB:.2f} GB, {meta['tensors']} weight tensors")
    runs: list[dict[str, Any]] = []
    checked: dict[str, Any] = {}
    sources = {CW: DAEMON_SRC, **{f"{CW} ({d})": d.resolve() / "daemon" for d in args.also}}
    contenders = list(sources)
    try:
        for rnd in range(args.rounds):
            kinds = [*contenders, BASE]
            order = kinds if rnd % 2 == 0 else kinds[::-1]
            for kind in order:
                cached = fresh_copy(master, target, cold=args.cold)
                shutil.copyfile(tiny, warm)
                mode = BASE if kind == BASE else CW
                r = run("--child", mode, str(target), str(warm), src=sources.get(kind, DAEMON_SRC))
                r.update(kind=kind, round=rnd, cached=cached, out_bytes=target.stat().st_size)
                runs.append(r)
                log(f"round {rnd + 1}/{args.rounds} {kind}: {r['strip_s']:.1f} s, extra peak "
                    f"{r['extra_peak'] / 1e6:.0f} MB, {cached:.0%} cached before")
                if kind == CW and not checked:
                    checked = run("--check", str(target), str(master))
                    meta["output_bytes"] = target.stat().st_size
                    log(f"output checked: {checked}")
            out_bytes = next(r["out_bytes"] for r in runs if r["kind"] == CW and r["round"] == rnd)
            os.sync()  # (as before each strip: no one else's writeback in the timing)
            r = run("--child", FLOOR, str(work / "floor.bin"), str(out_bytes))
            runs.append(dict(r, kind=FLOOR, round=rnd))
            log(f"round {rnd + 1}/{args.rounds} floor (write {out_bytes / GB:.2f} GB + fsync): "
                f"{r['strip_s']:.1f} s")
        iso: dict[str, dict[str, Any]] = {}
        for kind, src in sources.items():
            fresh_copy(master, target, cold=False)
            iso[kind] = run("--isolated", str(target), src=src)
            log(f"daemon worker path (run_isolated), {kind}: {iso[kind]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_input:
            master.unlink(missing_ok=True)
    table = report(runs, meta, contenders)
    extra = ["Output read back: " + "; ".join(f"{k}: {v}" for k, v in checked.items()), ""]
    for kind, res in iso.items():
        extra += [f"Daemon worker path (`worker.run_isolated`, default job timeout), {kind}: "
                  + ", ".join(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}"
                              for k, v in res.items()), ""]
    text = table + "\n".join(extra)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.raw:
        args.raw.write_text(json.dumps({"meta": meta, "runs": runs, "check": checked,
                                        "isolated": iso}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
