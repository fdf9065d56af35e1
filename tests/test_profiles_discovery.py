"""Discovery of the Lightning, timm and MMEngine profiles as pure tables: a `Look` in, a `Found` out.

The folders are the ones the real trainers leave (the shared corpus' layouts, and what the corpus
README says a kill mid-save leaves); no file is read. Discovery is name-based, so timm's hard links
(checkpoint-N, last and model_best one inode) are three units, one per name.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import PurePosixPath

import pytest

from ckpt_watchd import settings
from ckpt_watchd.engine.profiles import common, lightning, mmengine, registry, timm

F, D = False, True  # a regular file, a folder


def look(rel: str, **entries: bool) -> common.Look:
    return common.Look(PurePosixPath(rel), entries)


def names(*pairs: tuple[str, bool]) -> dict[str, bool]:
    return dict(pairs)


def unit(rel: str, profile: str, series: str | None = None, index: tuple[int, ...] = (),
         rewritten: bool = False) -> common.Unit:
    return common.Unit(rel, common.FILE, profile, series, index, rewritten)


V0 = "lightning_logs/version_0/checkpoints"
TIMM = "output/train/tiny-test_resnet-32"
MM = "work_dirs/tiny_mlp"

LIGHTNING = [
    pytest.param(  # the corpus' interrupted run
        common.Look(PurePosixPath(V0), names(("epoch=0-step=3.ckpt", F), ("epoch=1-step=6.ckpt", F),
                                             ("last.ckpt", F))),
        common.Found("lightning_logs/version_0", (
            unit(f"{V0}/epoch=0-step=3.ckpt", "lightning", "epoch-step", (0, 3)),
            unit(f"{V0}/epoch=1-step=6.ckpt", "lightning", "epoch-step", (1, 6)),
            unit(f"{V0}/last.ckpt", "lightning", rewritten=True))),
        id="version_N"),
    pytest.param(  # a custom dirpath, metrics in the name, a version suffix, a last-v1
        common.Look(PurePosixPath("exp/run1/checkpoints"), names(
            ("epoch=12-step=3900-val_loss=0.25.ckpt", F), ("epoch=3-step=12-v1.ckpt", F),
            ("last-v1.ckpt", F), ("best.ckpt", F), ("notes.txt", F), ("old.ckpt", D))),
        common.Found("exp/run1", (
            unit("exp/run1/checkpoints/best.ckpt", "lightning"),
            unit("exp/run1/checkpoints/epoch=12-step=3900-val_loss=0.25.ckpt", "lightning",
                 "epoch-step", (12, 3900)),
            unit("exp/run1/checkpoints/epoch=3-step=12-v1.ckpt", "lightning", "epoch-step", (3, 12)),
            unit("exp/run1/checkpoints/last-v1.ckpt", "lightning", rewritten=True))),
        id="custom-dirpath"),
    pytest.param(look("checkpoints", **{"last.ckpt": F}),
                 common.Found("", (unit("checkpoints/last.ckpt", "lightning", rewritten=True),)),
                 id="checkpoints-at-the-root"),
    pytest.param(look("lightning_logs/version_0", **{"last.ckpt": F, "checkpoints": D}), None,
                 id="ckpt-outside-checkpoints"),
    pytest.param(look("runs/checkpoints", **{"last.pt": F, "model.pth": F}), None,
                 id="checkpoints-without-ckpt"),
    pytest.param(look(".", **{"last.ckpt": F}), None, id="the-root-itself"),
]

TIMM_CORPUS = names(("args.yaml", F), ("checkpoint-0.pth.tar", F), ("checkpoint-1.pth.tar", F),
                    ("last.pth.tar", F), ("model_best.pth.tar", F), ("summary.csv", F))
TIMM_UNITS = (
    unit(f"{TIMM}/checkpoint-0.pth.tar", "timm", "checkpoint", (0,)),
    unit(f"{TIMM}/checkpoint-1.pth.tar", "timm", "checkpoint", (1,)),
    unit(f"{TIMM}/last.pth.tar", "timm", rewritten=True),
    unit(f"{TIMM}/model_best.pth.tar", "timm", rewritten=True),
)
TIMM_TABLE = [
    pytest.param(common.Look(PurePosixPath(TIMM), TIMM_CORPUS), common.Found(TIMM, TIMM_UNITS),
                 id="corpus-hard-links-are-three-names"),
    pytest.param(common.Look(PurePosixPath(TIMM), {**TIMM_CORPUS, "tmp.pth.tar": F}),
                 common.Found(TIMM, TIMM_UNITS, (f"{TIMM}/tmp.pth.tar",)),
                 id="tmp-left-by-a-kill"),
    pytest.param(  # between `os.unlink(last)` and `os.rename(tmp, last)`
        look(TIMM, **{"args.yaml": F, "checkpoint-0.pth.tar": F, "model_best.pth.tar": F,
                      "tmp.pth.tar": F}),
        common.Found(TIMM, (TIMM_UNITS[0], TIMM_UNITS[3]), (f"{TIMM}/tmp.pth.tar",)),
        id="mid-rename-no-last"),
    pytest.param(look(TIMM, **{"args.yaml": F, "tmp.pth.tar": F}), None,
                 id="only-tmp-is-no-run-yet"),
    pytest.param(look(".", **{"checkpoint-12.pth.tar": F}),
                 common.Found("", (unit("checkpoint-12.pth.tar", "timm", "checkpoint", (12,)),)),
                 id="the-root-itself"),
    pytest.param(look("out", **{"last.pth": F, "checkpoint-1.pth": F, "model_best.pth.tar": D,
                                "recovery-1-100.pth.tar": F, "checkpoint-x.pth.tar": F}), None,
                 id="not-timm-names"),
]

MM_INTERRUPTED = names(("20261201_203920", D), ("20261201_203920.py", F), ("epoch_1.pth", F),
                       ("epoch_2.pth", F), ("last_checkpoint", F))
MM_UNITS = (unit(f"{MM}/epoch_1.pth", "mmengine", "epoch", (1,)),
            unit(f"{MM}/epoch_2.pth", "mmengine", "epoch", (2,)))
MMENGINE = [
    pytest.param(common.Look(PurePosixPath(MM), MM_INTERRUPTED), common.Found(MM, MM_UNITS),
                 id="corpus-interrupted"),
    pytest.param(  # a torn epoch_3.pth is a unit by its name: its strip fails "torn"
        common.Look(PurePosixPath(MM), {**MM_INTERRUPTED, "epoch_3.pth": F}),
        common.Found(MM, (*MM_UNITS, unit(f"{MM}/epoch_3.pth", "mmengine", "epoch", (3,)))),
        id="torn-epoch-3"),
    pytest.param(  # a kill between the first checkpoint and last_checkpoint: the log folder tells
        common.Look(PurePosixPath(MM), {k: v for k, v in MM_INTERRUPTED.items()
                                        if k != "last_checkpoint"}),
        common.Found(MM, MM_UNITS), id="no-last-checkpoint-but-a-log-folder"),
    pytest.param(  # by iteration, save_best, a published copy, a DeepSpeed folder
        look("work_dirs/rtm", **{"last_checkpoint": F, "iter_500.pth": F, "iter_1000.pth": F,
                                 "best_coco_bbox_mAP_iter_1000.pth": F, "iter_1000-1a2b3c4d.pth": F,
                                 "iter_1500.pth": D, "rtm.py": F}),
        common.Found("work_dirs/rtm", (
            unit("work_dirs/rtm/best_coco_bbox_mAP_iter_1000.pth", "mmengine"),
            unit("work_dirs/rtm/iter_1000.pth", "mmengine", "iter", (1000,)),
            unit("work_dirs/rtm/iter_500.pth", "mmengine", "iter", (500,)))),
        id="iters-best-published-deepspeed"),
    pytest.param(look(MM, **{"epoch_1.pth": F, "epoch_2.pth": F, "tiny_mlp.py": F}), None,
                 id="epoch-files-without-a-sign"),
    pytest.param(look(MM, **{"epoch_1.pth": F, "20261201_203920.py": F}), None,
                 id="a-config-dump-is-no-sign"),
    pytest.param(look(MM, **{"last_checkpoint": D, "epoch_1.pth": F}), None,
                 id="last-checkpoint-folder-is-no-sign"),
    pytest.param(look(MM, **{"last_checkpoint": F, "model.pth": F}), None,
                 id="marker-without-checkpoints"),
]


@pytest.mark.parametrize(("folder", "expected"), LIGHTNING)
def test_lightning_discovery(folder: common.Look, expected: common.Found | None) -> None:
    """Lightning's units are the .ckpt files of a `checkpoints` folder; the run is its parent."""
    assert lightning.discover(folder) == expected


@pytest.mark.parametrize(("folder", "expected"), TIMM_TABLE)
def test_timm_discovery(folder: common.Look, expected: common.Found | None) -> None:
    """timm's units are its three names; tmp.pth.tar is incomplete, never a unit."""
    assert timm.discover(folder) == expected


@pytest.mark.parametrize(("folder", "expected"), MMENGINE)
def test_mmengine_discovery(folder: common.Look, expected: common.Found | None) -> None:
    """MMEngine's work dir is told by last_checkpoint, or by its log folder when that is missing."""
    assert mmengine.discover(folder) == expected


CORPUS_FOLDERS = [
    (names(("epoch=0-step=3.ckpt", F), ("last.ckpt", F)), V0, "lightning"),
    ({**TIMM_CORPUS, "tmp.pth.tar": F}, TIMM, "timm"),
    (MM_INTERRUPTED, MM, "mmengine"),
]


@pytest.mark.parametrize(("entries", "rel", "profile"), CORPUS_FOLDERS,
                         ids=[p for _, _, p in CORPUS_FOLDERS])
def test_each_trainers_folder_is_claimed_by_its_profile_alone(entries: dict[str, bool], rel: str,
                                                              profile: str) -> None:
    """Across the registry (YOLO's default patterns set), only the trainer's profile finds units."""
    folder = common.Look(PurePosixPath(rel), entries, settings.DEFAULT_PATTERNS, settings.DEFAULT_FILES)
    found = registry.discover(folder)
    assert [{u.profile for u in f.units} for f in found] == [{profile}]


def test_the_three_profiles_are_registered_before_generic() -> None:
    """Detection asks Lightning, MMEngine and timm before the generic fallback, which is last."""
    file_names = [p.NAME for p in registry.FILE_PROFILES]
    assert file_names[-1] == "generic"
    assert {"lightning", "mmengine", "timm"} <= set(file_names[:-1])
    assert file_names.index("timm") > max(file_names.index("lightning"), file_names.index("mmengine"))


def test_importing_the_profiles_does_not_import_torch() -> None:
    """Discovery runs in the daemon's main process: importing the three profiles imports no torch."""
    code = textwrap.dedent("""
        import sys
        from ckpt_watchd.engine.profiles import lightning, mmengine, registry, timm
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60)
    assert out.stdout.strip() == "False"


def test_profiles_never_import_one_another_or_the_dispatcher() -> None:
    """Each trainer profile stands alone: it may use the shared helpers (`common`, `files`), never
    another profile, the registry or the dispatcher (`engine.strip`)."""
    import ast
    from pathlib import Path

    folder = Path(registry.__file__).parent
    profiles = {p.NAME: Path(p.__file__).stem for p in registry.PROFILES}
    forbidden = {f"ckpt_watchd.engine.profiles.{m}" for m in (*profiles.values(), "registry")}
    forbidden.add("ckpt_watchd.engine.strip")
    for stem in profiles.values():
        tree = ast.parse((folder / f"{stem}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not imported & forbidden, (stem, imported & forbidden)
    assert set(profiles.values()) >= {"yolov5", "ultralytics", "transformers", "accelerate",
                                      "lightning", "timm", "mmengine", "generic"}


def test_a_link_is_a_unit_only_where_the_user_named_it_and_a_fifo_always_is() -> None:
    """Lightning's `save_last="link"` makes last.ckpt a symlink: not a unit. A FIFO named like a
    checkpoint is (the worker refuses it with one clear error), and so is anything in a YOLO
    weights folder named by --files: a link, a FIFO or a folder named last.pt."""
    lk = common.Look(PurePosixPath(V0), {"epoch=1-step=6.ckpt": F},
                     other={"last.ckpt": common.SYMLINK, "epoch=0-step=3.ckpt": "fifo"})
    found = lightning.discover(lk)
    assert found is not None
    assert [u.rel for u in found.units] == [f"{V0}/epoch=0-step=3.ckpt", f"{V0}/epoch=1-step=6.ckpt"]
    yolo = common.Look(PurePosixPath("train/exp/weights"), {"best.pt": D, "notes.txt": F},
                       settings.DEFAULT_PATTERNS, settings.DEFAULT_FILES,
                       other={"last.pt": common.SYMLINK, "epoch3.pt": "fifo", "x.lnk": "symlink"})
    (found_yolo,) = registry.discover(yolo)
    assert [u.rel.rsplit("/", 1)[1] for u in found_yolo.units] == ["best.pt", "epoch3.pt",
                                                                    "last.pt"]
