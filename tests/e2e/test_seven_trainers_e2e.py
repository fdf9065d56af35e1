"""One root holding an interrupted run of each of the seven trainers, stripped by the real daemon.

The corpus' runs (../shared/corpus) are copied in their trainers' own layouts under one root (timm's
hard links recreated) and made an hour old; `python -m ckpt_watchd --once` strips them. Each
checkpoint must then hold what the trainer's own weights-only save holds (compared as
tests/test_corpus.py, tests/test_profiles_corpus.py and tests/test_folder_strip.py compare), each
file the profile removes is gone, and every other file is byte for byte what it was. Skips when
the corpus is absent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ckpt_watchd.engine import safeload
from fixtures import summary
from test_folder_strip import CORPUS, safetensors_tensors
from test_profiles_corpus import BY_NATURE, differences

from .conftest import Daemon

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no corpus at {CORPUS}")]
Daemons = Callable[..., Daemon]

# corpus run -> where it goes under the root: the layout each trainer writes below its working dir
RUNS = {
    "yolov5/runs/train/v5n_interrupted": "train/v5n_interrupted",  # runs/ is the root
    "ultralytics/runs/detect/v8n_interrupted": "detect/v8n_interrupted",
    "transformers/interrupted": "gpt2-tiny",  # TrainingArguments(output_dir="gpt2-tiny")
    "accelerate/interrupted": "accelerate-project",  # save_state("accelerate-project/step_N")
    "lightning/interrupted": ".",  # lightning_logs/version_0/
    "timm/interrupted": ".",  # output/train/tiny-test_resnet-32/
    "mmengine/interrupted": ".",  # work_dirs/tiny_mlp/
}
TIMM = "output/train/tiny-test_resnet-32"
TIMM_LINKS = {"last.pth.tar": "checkpoint-1.pth.tar", "model_best.pth.tar": "checkpoint-0.pth.tar"}
LIGHTNING = "lightning_logs/version_0/checkpoints"
MMENGINE = "work_dirs/tiny_mlp"
FOLDERS = {"gpt2-tiny/checkpoint-1": "transformers", "gpt2-tiny/checkpoint-2": "transformers",
           "accelerate-project/step_1": "accelerate", "accelerate-project/step_2": "accelerate"}
# every file the daemon rewrites, the profile that owns it, and the trainer's weights-only save of
# the same training state (None: the corpus has none; checked by the trainer's rule below)
FILES: dict[str, tuple[str, str | None]] = {
    "train/v5n_interrupted/weights/last.pt": ("yolov5", "yolov5/reference/v5n_interrupted.last.stripped.pt"),
    "train/v5n_interrupted/weights/best.pt": ("yolov5", None),
    "detect/v8n_interrupted/weights/last.pt":
        ("ultralytics", "ultralytics/reference/v8n_interrupted.last.stripped.pt"),
    f"{LIGHTNING}/epoch=0-step=3.ckpt": ("lightning", f"lightning/reference/{LIGHTNING}/epoch=0-step=3.ckpt"),
    f"{LIGHTNING}/epoch=1-step=6.ckpt": ("lightning", f"lightning/reference/{LIGHTNING}/epoch=1-step=6.ckpt"),
    # last.ckpt was written at epoch 1
    f"{LIGHTNING}/last.ckpt": ("lightning", f"lightning/reference/{LIGHTNING}/epoch=1-step=6.ckpt"),
    f"{TIMM}/checkpoint-1.pth.tar": ("timm", "timm/reference/checkpoint-1-ema.pth"),
    f"{TIMM}/last.pth.tar": ("timm", "timm/reference/checkpoint-1-ema.pth"),
    f"{TIMM}/checkpoint-0.pth.tar": ("timm", None),
    f"{TIMM}/model_best.pth.tar": ("timm", None),
    f"{MMENGINE}/epoch_1.pth": ("mmengine", f"mmengine/reference/{MMENGINE}/epoch_1.pth"),
    f"{MMENGINE}/epoch_2.pth": ("mmengine", f"mmengine/reference/{MMENGINE}/epoch_2.pth"),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every regular file under the root but the daemon's state folder: (sha256, inode)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.split("/")[0] != ".ckpt-watchd" and p.is_file() and not p.is_symlink():
            out[rel] = (sha256(p), p.stat().st_ino)
    return out


def build_root(root: Path) -> None:
    for src, dest in RUNS.items():
        if not (CORPUS / src).is_dir():
            pytest.skip(f"corpus run missing: {src}")
        shutil.copytree(CORPUS / src, root / dest, copy_function=shutil.copyfile, dirs_exist_ok=True)
    for link, target in TIMM_LINKS.items():  # git stores timm's hard links as copies
        (root / TIMM / link).unlink()
        os.link(root / TIMM / target, root / TIMM / link)
    old = time.time() - 3600  # the trainers were killed an hour ago
    for folder, _subfolders, files in os.walk(root, topdown=False):
        os.chmod(folder, 0o755)  # copytree copied the corpus' read-only modes onto the folders
        for name in files:
            os.utime(os.path.join(folder, name), (old, old))
        os.utime(folder, (old, old))


def removed_files() -> set[str]:
    """What the trainer's own weights-only save of each checkpoint folder has not (accelerate's
    custom_checkpoint_0.pkl is kept: of unknown purpose)."""
    out = set()
    for rel, profile in FOLDERS.items():
        src = CORPUS / f"{profile}/interrupted" / Path(rel).name
        ref = CORPUS / f"{profile}/reference" / Path(rel).name
        keep = {p.name for p in ref.iterdir()} | {"custom_checkpoint_0.pkl"}
        out |= {f"{rel}/{p.name}" for p in src.iterdir() if p.name not in keep}
    return out


def load(path: Path) -> Any:
    return safeload.load(path).obj


def check_file(root: Path, rel: str, profile: str, ref_rel: str | None) -> None:
    """A rewritten file holds what its trainer's weights-only save holds (the corpus notes say
    which values differ by nature: Ultralytics' and YOLOv5's date, MMEngine's timestamps)."""
    ours = load(root / rel)
    if profile in ("yolov5", "ultralytics"):
        if ref_rel is not None:
            ref = load(CORPUS / ref_rel)
        else:  # best.pt: YOLOv5's strip_optimizer applied to its own fields (for last.pt this
            # is exactly the reference file)
            orig = load(CORPUS / "yolov5/runs/train/v5n_interrupted/weights" / Path(rel).name)
            ref = {**orig, "model": orig["ema"], "best_fitness": None, "ema": None, "updates": None,
                   "optimizer": None, "epoch": -1}
        assert summary.diff(summary.summarize(ours), summary.summarize(ref), ignore=("$['date']",)) == []
    elif ref_rel is not None:
        assert differences(ours, load(CORPUS / ref_rel), frozenset(BY_NATURE[profile])) == []
    else:  # timm epoch 0 (checkpoint-0 = model_best) has no reference file: its own EMA weights
        ema = load(CORPUS / "timm/interrupted" / TIMM / "checkpoint-0.pth.tar")["state_dict_ema"]
        assert differences(ours, dict(ema)) == []


def check_folder(root: Path, rel: str, profile: str) -> None:
    """A checkpoint folder holds the reference's files (accelerate: and its custom checkpoint)."""
    ref = CORPUS / f"{profile}/reference" / Path(rel).name
    names = {p.name for p in (root / rel).iterdir()}
    extra = {"custom_checkpoint_0.pkl"} if profile == "accelerate" else set()
    assert names == {p.name for p in ref.iterdir()} | extra
    assert safetensors_tensors(root / rel / "model.safetensors") == \
        safetensors_tensors(ref / "model.safetensors")
    # the reference is a second run with the weights-only switch on: the same bytes but for
    # transformers' training_args.bin, which pickles that switch
    for name in names - extra - {"training_args.bin"}:
        assert (root / rel / name).read_bytes() == (ref / name).read_bytes(), (rel, name)


def test_one_root_of_seven_trainers_ends_as_each_trainers_weights_only_save(
        root: Path, daemons: Daemons) -> None:
    """--once strips every run of all seven trainers as its weights-only save; nothing else changes."""
    build_root(root)
    before = tree(root)
    gone = removed_files()
    assert gone and gone <= set(before) and set(FILES) <= set(before)

    d = daemons(root, "--once", settle=1)
    assert d.proc is not None and d.proc.wait(timeout=240) == 0, d.stderr_tail()

    after = tree(root)
    assert set(after) == set(before) - gone, "only the files the profiles remove are gone"
    changed = {rel for rel in after if after[rel][0] != before[rel][0]}
    assert changed == set(FILES), "only the rewritten checkpoints differ"
    for rel, (profile, ref) in FILES.items():
        check_file(root, rel, profile, ref)
    for link, target in TIMM_LINKS.items():  # each name still points at the one stripped inode
        assert after[f"{TIMM}/{link}"][1] == after[f"{TIMM}/{target}"][1]
    for rel, profile in FOLDERS.items():
        check_folder(root, rel, profile)
    assert list(root.rglob(".ckpt-watchd-*")) == [], "our temp, journal or claim files are left"

    events = d.events()
    assert [e for e in events if e["event"] in ("ckpt.failed", "ckpt.incomplete", "daemon.warning")] == []
    stripped = {Path(e["path"]).relative_to(root).as_posix(): e for e in d.events("ckpt.stripped")}
    assert len(stripped) == len(d.events("ckpt.stripped")), "a unit was stripped twice"
    # one strip per unit: a file (each timm inode once, whichever of its names), or a folder
    groups = Counter(before[rel][1] for rel in stripped if rel in FILES)
    assert sorted(groups.values()) == [1] * len({before[rel][1] for rel in FILES})
    assert set(stripped) - set(FILES) == set(FOLDERS)
    for rel, e in stripped.items():
        profile = FOLDERS.get(rel) or FILES[rel][0]
        assert (e["profile"], e["run"]) == (profile, str(root / run_of(rel)))
        assert e["bytes_after"] < e["bytes_before"]
    assert Counter(e["profile"] for e in stripped.values()) == {
        "yolov5": 2, "ultralytics": 1, "transformers": 2, "accelerate": 2, "lightning": 3,
        "timm": 2, "mmengine": 2}
    finished = {Path(e["run"]).relative_to(root).as_posix() for e in d.events("run.finished")}
    assert finished == {run_of(rel) for rel in stripped}
    assert d.events("daemon.stopped")[0]["stripped"] == len(stripped)


def run_of(rel: str) -> str:
    """The trainer's output folder a unit belongs to (its run)."""
    parts = rel.split("/")
    if parts[-2] in ("weights", "checkpoints"):
        return "/".join(parts[:-2])
    return "/".join(parts[:-1])
