"""`DetectionModel` and `Detect`, built from the YOLOv5 v6+ model YAML as in `models/yolo.py`.

`parse_model` follows YOLOv5's channel and depth scaling, so yolov5n/s/m/l built here have YOLOv5's
parameter counts (1.87M / 7.24M / 21.17M / 46.53M with 80 classes). No forward pass: the benchmark
only needs the objects a checkpoint holds.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from models.common import C3, SPPF, Bottleneck, Concat, Conv

ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
BACKBONE: list[list[Any]] = [
    [-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
    [-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
    [-1, 9, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 3, "C3", [1024]],
    [-1, 1, "SPPF", [1024, 5]],
]
HEAD: list[list[Any]] = [
    [-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
    [[-1, 6], 1, "Concat", [1]], [-1, 3, "C3", [512, False]],
    [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
    [[-1, 4], 1, "Concat", [1]], [-1, 3, "C3", [256, False]],
    [-1, 1, "Conv", [256, 3, 2]], [[-1, 14], 1, "Concat", [1]], [-1, 3, "C3", [512, False]],
    [-1, 1, "Conv", [512, 3, 2]], [[-1, 10], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]],
    [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],
]
# (depth_multiple, width_multiple) of the published yolov5{n,s,m,l,x}.yaml
SCALES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0),
          "x": (1.33, 1.25)}


def yaml_for(scale: str, nc: int = 80) -> dict[str, Any]:
    gd, gw = SCALES[scale]
    return {"nc": nc, "depth_multiple": gd, "width_multiple": gw, "anchors": ANCHORS,
            "backbone": BACKBONE, "head": HEAD, "ch": 3}


class Detect(nn.Module):
    stride = None

    def __init__(self, nc: int, anchors: list[list[int]], ch: list[int]) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.inplace = True


def make_divisible(x: float, divisor: int = 8) -> int:
    return math.ceil(x / divisor) * divisor


def parse_model(d: dict[str, Any], ch: list[int]) -> tuple[nn.Sequential, list[int]]:
    gd, gw, nc, anchors = d["depth_multiple"], d["width_multiple"], d["nc"], d["anchors"]
    layers: list[nn.Module] = []
    save: list[int] = []
    c2 = ch[-1]
    for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
        n = max(round(n * gd), 1) if n > 1 else n
        args = list(args)
        module: nn.Module
        if m in ("Conv", "C3", "SPPF"):
            c1, c2 = ch[f], make_divisible(args[0] * gw)
            cls = {"Conv": Conv, "C3": C3, "SPPF": SPPF}[m]
            rest = args[1:]
            if m == "C3":
                module = cls(c1, c2, n, *rest)
                n = 1
            else:
                module = cls(c1, c2, *rest)
        elif m == "Concat":
            c2 = sum(ch[x] for x in f)
            module = Concat(*args)
        elif m == "Detect":
            module = Detect(nc, anchors, [ch[x] for x in f])
        else:
            module = nn.Upsample(None, 2, "nearest")
        if n > 1:
            module = nn.Sequential(*(type(module)() for _ in range(n)))  # not reached for v5 YAMLs
        module.i, module.f = i, f
        module.type = f"{type(module).__module__}.{type(module).__qualname__}"
        module.np = sum(p.numel() for p in module.parameters())
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(module)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


class DetectionModel(nn.Module):
    def __init__(self, cfg: dict[str, Any], ch: int = 3, nc: int = 80) -> None:
        super().__init__()
        self.yaml_file = "yolov5.yaml"
        self.yaml = dict(cfg, nc=nc, ch=ch)
        self.model, self.save = parse_model(self.yaml, ch=[ch])
        self.names = {i: f"class{i}" for i in range(nc)}
        self.inplace = True
        det = self.model[-1]
        assert isinstance(det, Detect)
        det.stride = torch.tensor([8.0, 16.0, 32.0])
        det.anchors /= det.stride.view(-1, 1, 1)
        self.stride = det.stride


__all__ = ["C3", "SPPF", "Bottleneck", "Concat", "Conv", "Detect", "DetectionModel", "yaml_for"]
