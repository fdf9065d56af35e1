"""One measured strip in a fresh interpreter: ckpt-watchd, the YOLOv5 baseline, or the write floor.

Started by `bench/strip.py`, once per measurement. It owns what is measured inside the process (strip
time after imports and a warm-up, peak RSS above that point, /proc/self/io deltas) and writes it as
JSON. It must stay light at import: the `-cold` modes time this whole process from start to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

CW, BASE, FLOOR = "ckpt-watchd", "baseline", "floor"
MiB = 1 << 20


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def _reset_peak() -> bool:
    # Linux >= 4.0 resets VmHWM to the current RSS; without it the peak may include the warm-up.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(fn: Any, *args: Any) -> dict[str, Any]:
    """Run fn(*args) once, after the caller's imports and warm-up, and report what it cost."""
    rss0, reset, io0 = _status_bytes("VmRSS"), _reset_peak(), _io()
    t0 = time.perf_counter()
    fn(*args)
    dt = time.perf_counter() - t0
    io1, hwm = _io(), _status_bytes("VmHWM")
    return {"strip_s": dt, "extra_peak": max(0, hwm - rss0), "peak_reset": reset,
            **{k: io1[k] - io0[k] for k in ("rchar", "wchar", "read_bytes", "write_bytes")}}


def yolov5_strip_in_memory(x: dict[str, Any]) -> None:
    """The in-memory part of YOLOv5's `utils.general.strip_optimizer`."""
    if x.get("ema"):
        x["model"] = x["ema"]
    for k in ("optimizer", "best_fitness", "ema", "updates"):
        x[k] = None
    x["epoch"] = -1
    x["model"].half()
    for p in x["model"].parameters():
        p.requires_grad = False


def baseline_strip(f: str) -> None:
    """What YOLOv5's `utils.general.strip_optimizer(f)` does, with its classes importable."""
    import torch

    x = torch.load(f, map_location="cpu", weights_only=False)
    yolov5_strip_in_memory(x)
    torch.save(x, f)


def cw_strip(f: str) -> None:
    from ckpt_watchd.engine.checkpoint import strip_file

    outcome = strip_file(Path(f))
    if outcome.status != "stripped":
        raise SystemExit(f"ckpt-watchd did not strip {f}: {outcome}")


def floor_write(f: str, nbytes: int, block: bytes) -> None:
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)


def child(mode: str, file: str, warm: str | None, nbytes: int) -> dict[str, Any]:
    import importlib.util

    if mode.startswith(CW) and importlib.util.find_spec("models") is not None:
        raise SystemExit("YOLOv5's `models` is importable; ckpt-watchd must run without it")
    if mode == f"{CW}-cold":
        cw_strip(file)
        return {}
    if mode == f"{BASE}-cold":
        baseline_strip(file)
        return {}
    if mode == FLOOR:
        block = os.urandom(MiB)  # random, so no filesystem can cheat by compressing
        result = _measure(floor_write, file, nbytes, block)
        os.unlink(file)
        return result
    import torch  # noqa: F401  (the memory baseline is taken with torch loaded)

    strip = cw_strip if mode == CW else baseline_strip
    assert warm is not None
    strip(warm)  # first calls import lazily and fill caches; time only the steady state
    return _measure(strip, file)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=[CW, BASE, FLOOR, f"{CW}-cold", f"{BASE}-cold"])
    p.add_argument("file")
    p.add_argument("--warm", help="tiny checkpoint stripped once before the measured strip")
    p.add_argument("--bytes", type=int, default=0, help="floor: how many bytes to write")
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args()
    args.result.write_text(json.dumps(child(args.mode, args.file, args.warm, args.bytes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
