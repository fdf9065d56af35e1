"""Stand-ins for YOLOv5's `models` package, used only by the strip benchmark's baseline and inputs.

The classes are named and laid out like YOLOv5's (`models.common.Conv`, `models.yolo.Detect...`), so
a checkpoint pickled from them names the same globals as a real YOLOv5 file. They must never be
importable on the ckpt-watchd side of the benchmark, which shows the strip works without them.
"""
