"""A simulated YOLOv5 trainer: rewrites weights/last.pt in place (truncate, flushed chunks, same
inode, like torch.save) every epoch and best.pt every few, logging each finished epoch to --status.

Training never imports torch (bytes come from --source files that `make-checkpoints` writes once);
`--park FILE` makes it stop between epochs so a test can SIGKILL it with no file half written.
`--save-period N` also writes the `epoch<N>.pt` snapshots both YOLO trainers write; `--steps FIFO`
makes it wait between epochs for the test's commands (`next`, `rm NAME`) instead of its interval.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TextIO


def write_in_place(path: Path, data: bytes, chunk: int, chunk_delay: float) -> None:
    """open(path, 'wb') keeps the inode and truncates; then chunked writes, each flushed."""
    with open(path, "wb") as f:
        for i in range(0, len(data), chunk):
            f.write(data[i:i + chunk])
            f.flush()
            if chunk_delay:
                time.sleep(chunk_delay)  # a slow disk: readers see the file torn for a while


def follow_steps(steps: TextIO, weights: Path, status: TextIO) -> bool:
    """The test's commands between two epochs; False when it closed its end (the run ends)."""
    for line in steps:
        command, _, name = line.strip().partition(" ")
        if command == "next":
            return True
        if command == "rm":  # the trainer's own rotation of an old checkpoint
            (weights / name).unlink()
            status.write(json.dumps({"removed": name}) + "\n")
        else:
            raise SystemExit(f"trainer_sim: unknown step command {line!r}")
    return False


def make_checkpoints(out: Path) -> None:
    """Unstripped YOLOv5-shaped checkpoints whose pickles name `models.yolo`/`models.common`.

    The classes are registered under those module names in this process only, so the daemon sees
    exactly the globals a real YOLOv5 checkpoint names, and the test process never defines them.
    """
    import copy
    import types

    import numpy as np
    import torch
    from torch import nn

    pkg, yolo, common = (types.ModuleType(n) for n in ("models", "models.yolo", "models.common"))
    pkg.yolo, pkg.common = yolo, common  # type: ignore[attr-defined]
    sys.modules.update({"models": pkg, "models.yolo": yolo, "models.common": common})

    class Conv(nn.Module):
        def __init__(self, c1: int, c2: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(c2)
            self.act = nn.SiLU()

    class Detect(nn.Module):
        def __init__(self, nc: int, ch: tuple[int, ...]) -> None:
            super().__init__()
            self.nc, self.no, self.nl, self.na = nc, nc + 5, len(ch), 3
            self.grid = [torch.zeros(1, 3, 4, 4, 2) for _ in ch]
            self.anchor_grid = [torch.rand(1, 3, 4, 4, 2) for _ in ch]
            self.register_buffer("anchors", torch.rand(len(ch), 3, 2))
            self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
            self.stride = torch.tensor([8.0, 16.0][: len(ch)])

    class DetectionModel(nn.Module):
        def __init__(self, w: int) -> None:
            super().__init__()
            self.yaml = {"nc": 2, "depth_multiple": 0.33, "width_multiple": 0.25}
            self.model = nn.Sequential(Conv(3, w), Conv(w, 2 * w), Conv(2 * w, 4 * w),
                                       Conv(4 * w, 4 * w), Detect(2, (4 * w, 4 * w)))
            self.names = {0: "a", 1: "b"}
            self.stride = torch.tensor([8.0, 16.0])

    for mod, cls in ((common, Conv), (yolo, Detect), (yolo, DetectionModel)):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)

    def checkpoint(width: int, epoch: int) -> dict[str, object]:
        torch.manual_seed(1000 * width + epoch)
        model = DetectionModel(width)
        ema = copy.deepcopy(model).eval()
        with torch.no_grad():
            for p in ema.parameters():
                p.add_(torch.randn(p.shape) * 0.01)
        state = {i: {"momentum_buffer": torch.randn(p.shape)}
                 for i, p in enumerate(model.parameters())}
        ids = list(state)
        group = {"lr": 0.01, "momentum": 0.937, "nesterov": True, "weight_decay": 0.0}
        # the keys and dtypes of YOLOv5's train.py save: FP16 model and EMA, FP32 optimizer
        return {"epoch": epoch, "best_fitness": np.array([0.1 * epoch]), "model": model.half(),
                "ema": ema.half(), "updates": 10 * (epoch + 1),
                "optimizer": {"state": state, "param_groups": [{**group, "params": ids[0::2]},
                                                               {**group, "params": ids[1::2]}]},
                "opt": {"epochs": 50, "batch_size": 4, "save_dir": "runs/train/exp"},
                "git": None, "date": "2026-11-28T00:00:00"}

    for name, width, epoch in (("medium-0", 32, 0), ("medium-1", 32, 1), ("medium-2", 32, 2),
                               ("small-0", 12, 0)):
        torch.save(checkpoint(width, epoch), out / f"{name}.pt")


def main() -> int:
    if sys.argv[1:2] == ["make-checkpoints"]:
        make_checkpoints(Path(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, required=True, help="the run's weights folder")
    p.add_argument("--source", type=Path, action="append", required=True,
                   help="checkpoint bytes to write; epoch N writes source N mod count")
    p.add_argument("--interval", type=float, default=1.0, help="seconds per epoch")
    p.add_argument("--best-every", type=int, default=3, help="write best.pt every N epochs "
                   "(0: never)")
    p.add_argument("--epochs", type=int, default=0, help="stop after N epochs (0: run until "
                   "killed)")
    p.add_argument("--chunk", type=int, default=256 << 10)
    p.add_argument("--chunk-delay", type=float, default=0.005)
    p.add_argument("--status", type=Path, required=True)
    p.add_argument("--park", type=Path, default=None)
    p.add_argument("--slow-epoch", type=int, default=-1,
                   help="this epoch takes --slow-factor times --interval (irregular epochs)")
    p.add_argument("--slow-factor", type=float, default=5.0)
    p.add_argument("--save-period", type=int, default=0,
                   help="also write weights/epoch<E>.pt every N epochs, after last.pt and best.pt, "
                   "as YOLOv5 --save-period and Ultralytics save_period do (0: never)")
    p.add_argument("--steps", type=Path, default=None,
                   help="a FIFO: between epochs read commands from it instead of sleeping "
                   "--interval: 'next' starts the next epoch, 'rm NAME' deletes weights/NAME (a "
                   "rotation, like save_total_limit); end of file ends the run")
    p.add_argument("--tensorboard", action="store_true",
                   help="hold an events.out.tfevents.* file open for writing in the run folder "
                   "for the whole run, as YOLOv5's SummaryWriter does")
    a = p.parse_args()

    sources = [s.read_bytes() for s in a.source]
    a.weights.mkdir(parents=True, exist_ok=True)
    run_dir = a.weights.parent
    (run_dir / "opt.yaml").write_text("epochs: 50\nbatch_size: 4\n")
    (run_dir / "results.csv").write_text("epoch,train/box_loss\n")
    status = open(a.status, "a", buffering=1)  # noqa: SIM115  (open for the whole run)
    events = (open(run_dir / f"events.out.tfevents.{int(time.time())}.sim.{os.getpid()}.0", "ab")  # noqa: SIM115
              if a.tensorboard else None)
    # opened before the first epoch: the test holds the other end for the whole run
    steps = open(a.steps) if a.steps is not None else None  # noqa: SIM115
    epoch = 0
    while a.epochs == 0 or epoch < a.epochs:
        started = time.monotonic()
        index = epoch % len(sources)
        data = sources[index]
        written = ["last.pt"]
        write_in_place(a.weights / "last.pt", data, a.chunk, a.chunk_delay)
        if a.best_every and epoch % a.best_every == 0:
            write_in_place(a.weights / "best.pt", data, a.chunk, a.chunk_delay)
            written.append("best.pt")
        if a.save_period and epoch % a.save_period == 0:
            write_in_place(a.weights / f"epoch{epoch}.pt", data, a.chunk, a.chunk_delay)
            written.append(f"epoch{epoch}.pt")
        with open(run_dir / "results.csv", "a") as f:
            f.write(f"{epoch},0.1\n")
        if events is not None:
            events.write(b"scalar record\n")
            events.flush()
        status.write(json.dumps({"epoch": epoch, "source": index, "files": written,
                                 "sha256": hashlib.sha256(data).hexdigest(),
                                 "time": time.time()}) + "\n")
        epoch += 1
        if a.park is not None and a.park.exists():
            status.write(json.dumps({"parked": True}) + "\n")
            while True:
                signal.pause()
        if steps is not None:
            if (a.epochs and epoch >= a.epochs) or not follow_steps(steps, a.weights, status):
                break
            continue
        # the next epoch's compute time: the simulated trainer's cadence, not a synchronisation
        length = a.interval * (a.slow_factor if epoch == a.slow_epoch else 1.0)
        time.sleep(max(0.0, length - (time.monotonic() - started)))
    status.close()
    if steps is not None:
        steps.close()
    if events is not None:
        events.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
