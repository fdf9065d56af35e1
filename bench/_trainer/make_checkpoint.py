"""Write one unstripped YOLOv5-shaped checkpoint, as YOLOv5's train.py saves `last.pt` mid-run.

Run as a script (`python bench/_trainer/make_checkpoint.py SCALE PATH`) so this folder,
and with it the stand-in `models` package, is on sys.path. Benchmark input only: nothing here is
ckpt-watchd code.
"""

from __future__ import annotations

import datetime
import pathlib
import sys
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from models.yolo import SCALES, DetectionModel, yaml_for
from torch import nn

# a network small enough that a strip of it only warms up the code paths (imports, first calls)
TINY = (0.33, 0.0625)
HYP = {"lr0": 0.01, "lrf": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "warmup_epochs": 3.0,
       "box": 0.05, "cls": 0.5, "obj": 1.0, "anchor_t": 4.0, "fliplr": 0.5, "mosaic": 1.0}


def build(scale: str, nc: int = 80) -> dict[str, Any]:
    torch.manual_seed(0)
    if scale == "tiny":
        gd, gw = TINY
        cfg = dict(yaml_for("n"), depth_multiple=gd, width_multiple=gw)
    else:
        cfg = yaml_for(scale)
    model = DetectionModel(cfg, nc=nc)
    model.nc, model.hyp = nc, dict(HYP)
    model.class_weights = torch.rand(nc)
    optimizer = smart_optimizer(model)
    # one step so that every parameter has an FP32 momentum buffer, as after any real epoch
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema = deepcopy(model).eval()
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.999).requires_grad_(False)
        for m in ema.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return {
        "epoch": 41,
        "best_fitness": np.array([0.61234]),
        "model": deepcopy(model).half(),
        "ema": deepcopy(ema).half(),
        "updates": 12345,
        "optimizer": optimizer.state_dict(),
        "opt": {"weights": "", "cfg": f"models/yolov5{scale}.yaml", "data": "data/coco.yaml",
                "hyp": dict(HYP), "epochs": 100, "batch_size": 16, "imgsz": 640,
                "evolve_population": pathlib.PosixPath("data/hyps"), "save_dir": "runs/train/exp"},
        "git": {"remote": "https://github.com/ultralytics/yolov5", "branch": "master",
                "commit": "5081342f04fb287fc2e5f2b5a4e06752b7937b1c"},
        "date": datetime.datetime.now().isoformat(),
    }


def smart_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """YOLOv5's three SGD groups: biases, weights with decay, normalisation weights without."""
    g: tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]] = ([], [], [])
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if name == "bias":
                g[2].append(p)
            elif name == "weight" and isinstance(m, nn.BatchNorm2d):
                g[1].append(p)
            else:
                g[0].append(p)
    opt = torch.optim.SGD(g[2], lr=0.01, momentum=0.937, nesterov=True)
    opt.add_param_group({"params": g[0], "weight_decay": 0.0005})
    opt.add_param_group({"params": g[1], "weight_decay": 0.0})
    for group in opt.param_groups:
        group["initial_lr"] = 0.01
        group["momentum"] = np.float64(0.937)  # YOLOv5's warm-up writes numpy floats here
    return opt


def main(argv: list[str]) -> int:
    scale, path = argv
    if scale not in SCALES and scale != "tiny":
        raise SystemExit(f"unknown scale {scale!r}")
    ckpt = build(scale)
    torch.save(ckpt, path)
    n_params = sum(p.numel() for p in ckpt["model"].parameters())
    print(n_params)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
