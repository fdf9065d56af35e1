"""The Lightning, timm and MMEngine profiles on real checkpoints (the shared corpus), and their rules.

Copies of the trainers' files are stripped through the worker's entry point and compared with the
trainer's own weights-only save of the same training state (`reference/`): same keys in the same
order, every tensor `torch.equal` with its dtype and shape, every other value equal, but for the
values listed in BY_NATURE, which differ between two runs of the trainer whatever we do. Both
sides are read with ckpt-watchd's safe loader. What a kill mid-save leaves is built from corpus
files only (a prefix of a real file, a 0-byte file, an older file under a newer name). Tests that
need the corpus skip cleanly without it; the rule tests at the end use small dicts.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
import torch

from ckpt_watchd import settings
from ckpt_watchd.engine import safeload, standin, strip
from ckpt_watchd.engine.profiles import common, lightning, mmengine, registry, timm
from ckpt_watchd.errors import UnrecognisedLayout
from ckpt_watchd.worker import StripJob, inspect_boundary, run_job
from fixtures.harness import FileState, temp_files

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no corpus at {CORPUS}")

L_INT = "lightning/interrupted/lightning_logs/version_0/checkpoints"
L_FIN = "lightning/finished/lightning_logs/version_0/checkpoints"
L_REF = "lightning/reference/lightning_logs/version_0/checkpoints"
T_INT = "timm/interrupted/output/train/tiny-test_resnet-32"
T_REF = "timm/reference"
M_INT = "mmengine/interrupted/work_dirs/tiny_mlp"
M_FIN = "mmengine/finished/work_dirs/tiny_mlp"
M_REF = "mmengine/reference/work_dirs/tiny_mlp"

# (trainer, a fat checkpoint, the trainer's weights-only save of the same training state)
PAIRS = [
    ("lightning", f"{L_INT}/epoch=0-step=3.ckpt", f"{L_REF}/epoch=0-step=3.ckpt"),
    ("lightning", f"{L_INT}/epoch=1-step=6.ckpt", f"{L_REF}/epoch=1-step=6.ckpt"),
    ("lightning", f"{L_INT}/last.ckpt", f"{L_REF}/epoch=1-step=6.ckpt"),  # written at epoch 1
    *[("lightning", f"{L_FIN}/epoch={e}-step={3 * e + 3}.ckpt",
       f"{L_REF}/epoch={e}-step={3 * e + 3}.ckpt") for e in range(4)],
    ("lightning", f"{L_FIN}/last.ckpt", f"{L_REF}/last.ckpt"),
    ("timm", f"{T_INT}/checkpoint-1.pth.tar", f"{T_REF}/checkpoint-1-ema.pth"),
    ("timm", f"{T_INT}/last.pth.tar", f"{T_REF}/checkpoint-1-ema.pth"),  # checkpoint-1's hard link
    *[("mmengine", f"{M_INT}/epoch_{e}.pth", f"{M_REF}/epoch_{e}.pth") for e in (1, 2)],
    *[("mmengine", f"{M_FIN}/epoch_{e}.pth", f"{M_REF}/epoch_{e}.pth") for e in (1, 2, 3, 4)],
]
PAIR_IDS = [src.split("/", 1)[0] + ":" + src.split("/")[1] + "/" + src.rsplit("/", 1)[1]
            for _, src, _ in PAIRS]

# Values that differ between two runs of the trainer by nature, with the reason. Lightning's
# callback state holds absolute paths too, but the strip drops it (as the trainer's save does).
BY_NATURE: dict[str, dict[str, str]] = {
    "lightning": {},
    "timm": {},
    "mmengine": {
        "$['meta']['experiment_name']": "the config name and the run's start time",
        "$['meta']['time']": "the wall-clock time of the save",
        "$['message_hub']['runtime_info']['experiment_name']": "the same name, kept for resuming",
        "$['message_hub']['runtime_info']['eta']": "seconds left, estimated from measured times",
        "$['message_hub']['runtime_info']['last_ckpt']":
            "the absolute path of the run's folder on the machine that trained (.../interrupted/ "
            "vs .../reference/)",
        "$['message_hub']['log_scalars']['train/time'].__dict__['_log_history']":
            "the measured seconds of each iteration",
        "$['message_hub']['log_scalars']['train/data_time'].__dict__['_log_history']":
            "the measured seconds of each data load",
    },
}

# Every checkpoint of the three trainers in the corpus: (profile detection picks, stripped)
DETECTED = {
    **{f"{L_INT}/{n}": ("lightning", False)
       for n in ("epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt")},
    **{f"{d}/{n}": ("lightning", d == L_REF) for d in (L_FIN, L_REF)
       for n in ("epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "epoch=2-step=9.ckpt",
                 "epoch=3-step=12.ckpt", "last.ckpt")},
    **{f"{T_INT}/{n}": ("timm", False)
       for n in ("checkpoint-0.pth.tar", "checkpoint-1.pth.tar", "last.pth.tar",
                 "model_best.pth.tar")},
    # timm's clean_checkpoint.py writes a bare state dict: nothing marks it as timm's
    **{f"{T_REF}/{n}": ("generic", True) for n in ("checkpoint-1-ema.pth", "checkpoint-1.pth")},
    **{f"{M_INT}/epoch_{e}.pth": ("mmengine", False) for e in (1, 2)},
    **{f"{d}/epoch_{e}.pth": ("mmengine", d == M_REF) for d in (M_FIN, M_REF) for e in (1, 2, 3, 4)},
}


def corpus_file(rel: str) -> Path:
    path = CORPUS / rel
    if not path.is_file():
        pytest.skip(f"corpus file missing: {rel}")
    return path


def corpus_dir(rel: str) -> Path:
    path = CORPUS / rel
    if not path.is_dir():
        pytest.skip(f"corpus folder missing: {rel}")
    return path


# ------------------------------------------------------------------------------ comparison


def differences(ours: Any, ref: Any, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Where two loaded checkpoints differ, by path; paths in `ignore` must exist and are skipped."""
    out: list[str] = []
    ignored: set[str] = set()
    stack: list[tuple[str, Any, Any]] = [("$", ours, ref)]
    while stack:
        path, a, b = stack.pop()
        if path in ignore:
            ignored.add(path)
            continue
        if standin.class_name(a) != standin.class_name(b):
            out.append(f"{path}: {standin.class_name(a)} != {standin.class_name(b)}")
        elif isinstance(a, torch.Tensor):
            if (a.dtype, a.shape) != (b.dtype, b.shape) or not torch.equal(a, b):
                out.append(f"{path}: {a.dtype} {tuple(a.shape)} != {b.dtype} {tuple(b.shape)} "
                           "or values differ")
        elif isinstance(a, dict):
            if list(a) != list(b):
                out.append(f"{path}: keys {list(a)} != {list(b)}")
            stack.extend((f"{path}[{k!r}]", a[k], b[k]) for k in reversed(list(a)) if k in b)
        elif isinstance(a, (list, tuple)):
            if len(a) != len(b):
                out.append(f"{path}: length {len(a)} != {len(b)}")
                continue
            pairs = list(enumerate(zip(a, b, strict=True)))
            stack.extend((f"{path}[{i}]", x, y) for i, (x, y) in reversed(pairs))
        elif isinstance(a, np.ndarray):
            if (a.dtype, a.shape) != (b.dtype, b.shape) or not np.array_equal(a, b):
                out.append(f"{path}: arrays differ")
        elif isinstance(a, standin.StandIn):  # a trainer class: how it was built, and its state
            stack.append((f"{path}.__dict__", a.__dict__, b.__dict__))
            stack.extend((f"{path}.{slot}", getattr(a, slot), getattr(b, slot))
                         for slot in ("_sw_args", "_sw_state", "_sw_items", "_sw_dictitems"))
        elif a != b and repr(a) != repr(b):  # repr: getattr(HistoryBuffer, 'min') and the like
            out.append(f"{path}: {a!r:.80} != {b!r:.80}")
    out += [f"{p}: listed as differing by nature, but not found" for p in sorted(ignore - ignored)]
    return out


def assert_matches_reference(ours: Path, ref_rel: str, trainer: str) -> None:
    ref = corpus_file(ref_rel)
    got = differences(safeload.load(ours).obj, safeload.load(ref).obj,
                      frozenset(BY_NATURE[trainer]))
    assert got == []
    # a strip writes what the trainer wrote, give or take the zip's folder names
    assert abs(ours.stat().st_size - ref.stat().st_size) < 0.05 * ref.stat().st_size


def look_at(root: Path, folder: Path) -> common.Look:
    """What discovery is shown of a real folder (default settings): files and folders, no symlinks."""
    entries = {}
    with os.scandir(folder) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False):
                entries[e.name] = e.is_dir(follow_symlinks=False)
    return common.Look(PurePosixPath(folder.relative_to(root).as_posix()), entries,
                       settings.DEFAULT_PATTERNS, settings.DEFAULT_FILES)


def found_in(root: Path, folder: Path) -> common.Found:
    found = registry.discover(look_at(root, folder))
    assert len(found) == 1, found
    return found[0]


def unit_names(found: common.Found) -> list[str]:
    return [PurePosixPath(u.rel).name for u in found.units]


# ------------------------------------------------------------------------------ the corpus


@pytest.fixture(scope="module")
def stripped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    """Each fat checkpoint of PAIRS copied and stripped once: source -> (outcome, output)."""
    out: dict[str, tuple[Any, Path]] = {}
    work = tmp_path_factory.mktemp("profiles")
    for i, (_, src_rel, _) in enumerate(PAIRS):
        src = CORPUS / src_rel
        if not src.is_file():
            continue
        copy = work / str(i) / src.name
        copy.parent.mkdir()
        shutil.copyfile(src, copy)
        out[src_rel] = (run_job(StripJob(path=str(copy))), copy)
    return out


def stripped_copy(stripped: dict[str, tuple[Any, Path]], src_rel: str) -> tuple[Any, Path]:
    if src_rel not in stripped:
        pytest.skip(f"corpus file missing: {src_rel}")
    return stripped[src_rel]


@needs_corpus
@pytest.mark.parametrize(("trainer", "src", "ref"), PAIRS, ids=PAIR_IDS)
def test_strip_equals_the_trainers_weights_only_save(stripped: dict[str, tuple[Any, Path]],
                                                     trainer: str, src: str, ref: str) -> None:
    """A stripped copy equals the trainer's weights-only save: keys, order, tensors, values."""
    outcome, path = stripped_copy(stripped, src)
    assert (outcome.status, outcome.profile, outcome.error) == ("stripped", trainer, None)
    assert outcome.bytes_after < outcome.bytes_before / 2
    assert_matches_reference(path, ref, trainer)
    assert temp_files(path.parent) == []


@needs_corpus
@pytest.mark.parametrize(("trainer", "src", "ref"), PAIRS, ids=PAIR_IDS)
def test_a_second_strip_skips_the_output_untouched(stripped: dict[str, tuple[Any, Path]],
                                                   trainer: str, src: str, ref: str) -> None:
    """Stripping an output again is 'skipped (already stripped)' and leaves it byte-identical."""
    _, path = stripped_copy(stripped, src)
    before = FileState.of(path)
    again = run_job(StripJob(path=str(path)))
    assert (again.status, again.reason) == ("skipped", "already stripped")
    assert again.profile == ("generic" if trainer == "timm" else trainer)
    assert FileState.of(path) == before


@needs_corpus
@pytest.mark.parametrize(("trainer", "src", "ref"), PAIRS, ids=PAIR_IDS)
def test_outputs_and_references_are_stripped_by_their_trainers_rule(
        stripped: dict[str, tuple[Any, Path]], trainer: str, src: str, ref: str) -> None:
    """`is_stripped` is true of every output and reference, by its profile and by the trainer's."""
    _, path = stripped_copy(stripped, src)
    for file in (path, corpus_file(ref)):
        loaded = safeload.load(file)
        profile = strip.detect_profile(loaded.obj, loaded.globals_seen)
        assert strip.is_stripped(loaded.obj, profile)
        assert registry.BY_NAME[trainer].is_stripped(loaded.obj)


@needs_corpus
@pytest.mark.parametrize("rel", list(DETECTED))
def test_detection_picks_the_trainer_of_every_corpus_file(rel: str) -> None:
    """inspect names the right profile for each Lightning, timm and MMEngine file, and its state."""
    report, error = inspect_boundary(corpus_file(rel))
    assert error is None and report is not None
    assert (report["profile"], report["stripped"]) == DETECTED[rel]


@needs_corpus
def test_the_detection_table_lists_every_checkpoint_of_the_three_trainers() -> None:
    """No checkpoint of the three trainers' corpus folders is missing from the detection table."""
    on_disk = {p.relative_to(CORPUS).as_posix()
               for trainer in ("lightning", "timm", "mmengine")
               for p in (CORPUS / trainer).rglob("*")
               if p.is_file() and p.name.endswith((".ckpt", ".pth", ".pth.tar"))}
    assert on_disk == set(DETECTED)


@needs_corpus
def test_timm_without_ema_weights_strips_to_its_state_dict(tmp_path: Path) -> None:
    """Without `state_dict_ema`, the strip keeps `state_dict`: clean_checkpoint.py --no-use-ema."""
    src = safeload.load(corpus_file(f"{T_INT}/checkpoint-1.pth.tar")).obj
    # the test is trusted: the same checkpoint re-saved by torch as timm would without an EMA
    ckpt = {k: v for k, v in src.items() if k != "state_dict_ema"}
    ckpt["args"] = argparse.Namespace(**vars(src["args"]))  # the real class, for torch.save
    path = tmp_path / "checkpoint-1.pth.tar"
    torch.save(ckpt, path)
    outcome = run_job(StripJob(path=str(path)))
    assert (outcome.status, outcome.profile) == ("stripped", "timm")
    assert_matches_reference(path, f"{T_REF}/checkpoint-1.pth", "timm")


@needs_corpus
def test_timm_hard_links_each_name_strips_to_its_ema_weights(tmp_path: Path) -> None:
    """With the trainer's hard links recreated, every name is a unit and strips to the EMA weights."""
    corpus_dir(T_INT)
    run = tmp_path / "output" / "train" / "tiny-test_resnet-32"
    run.mkdir(parents=True)
    for name in ("checkpoint-0.pth.tar", "checkpoint-1.pth.tar", "args.yaml", "summary.csv"):
        shutil.copyfile(CORPUS / T_INT / name, run / name)
    os.link(run / "checkpoint-1.pth.tar", run / "last.pth.tar")
    os.link(run / "checkpoint-0.pth.tar", run / "model_best.pth.tar")
    found = found_in(tmp_path, run)
    assert found.run == "output/train/tiny-test_resnet-32"
    assert unit_names(found) == ["checkpoint-0.pth.tar", "checkpoint-1.pth.tar", "last.pth.tar",
                                 "model_best.pth.tar"]
    epoch0_ema = safeload.load(CORPUS / T_INT / "checkpoint-0.pth.tar").obj["state_dict_ema"]
    for u in found.units:
        path = tmp_path / u.rel
        assert run_job(StripJob(path=str(path))).status == "stripped"
        if path.name in ("checkpoint-1.pth.tar", "last.pth.tar"):
            assert_matches_reference(path, f"{T_REF}/checkpoint-1-ema.pth", "timm")
        else:  # epoch 0 has no reference file: its own EMA weights, as a plain dict
            assert differences(safeload.load(path).obj, dict(epoch0_ema)) == []


# ------------------------------------------------------------------------------ kill mid-save


def copy_run(rel: str, dest: Path) -> Path:
    shutil.copytree(corpus_dir(rel), dest)
    return dest


def prefix_of(rel: str, dest: Path) -> Path:
    """A torn write: the first half of a real file (a zip's local records, no central directory)."""
    data = corpus_file(rel).read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    assert dest.read_bytes()[:2] == b"PK"
    return dest


@needs_corpus
def test_mmengine_torn_epoch_file_fails_torn_and_the_rest_strips(tmp_path: Path) -> None:
    """A truncated epoch_3.pth fails as 'torn', untouched; the run and epochs 1-2 are unaffected."""
    run = copy_run(M_INT, tmp_path / "work_dirs" / "tiny_mlp")
    torn = prefix_of(f"{M_FIN}/epoch_3.pth", run / "epoch_3.pth")
    found = found_in(tmp_path, run)
    assert (found.run, unit_names(found)) == (
        "work_dirs/tiny_mlp", ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth"])
    before = FileState.of(torn)
    outcome = run_job(StripJob(path=str(torn)))
    assert (outcome.status, outcome.error_type) == ("failed", "torn")
    assert FileState.of(torn) == before
    for e in (1, 2):
        assert run_job(StripJob(path=str(run / f"epoch_{e}.pth"))).status == "stripped"
        assert_matches_reference(run / f"epoch_{e}.pth", f"{M_REF}/epoch_{e}.pth", "mmengine")


@needs_corpus
def test_mmengine_empty_last_checkpoint_changes_nothing(tmp_path: Path) -> None:
    """Beside a 0-byte last_checkpoint the run is found and every epoch file strips to the reference."""
    run = copy_run(M_FIN, tmp_path / "work_dirs" / "tiny_mlp")
    (run / "last_checkpoint").write_bytes(b"")
    found = found_in(tmp_path, run)
    assert unit_names(found) == [f"epoch_{e}.pth" for e in (1, 2, 3, 4)]
    for e in (1, 2, 3, 4):
        assert run_job(StripJob(path=str(run / f"epoch_{e}.pth"))).status == "stripped"
        assert_matches_reference(run / f"epoch_{e}.pth", f"{M_REF}/epoch_{e}.pth", "mmengine")


@needs_corpus
def test_mmengine_run_without_last_checkpoint_is_found_by_its_log_folder(tmp_path: Path) -> None:
    """A work dir whose last_checkpoint was never written is still an MMEngine run with its units."""
    run = copy_run(M_INT, tmp_path / "work_dirs" / "tiny_mlp")
    (run / "last_checkpoint").unlink()
    found = found_in(tmp_path, run)
    assert (found.run, unit_names(found)) == ("work_dirs/tiny_mlp", ["epoch_1.pth", "epoch_2.pth"])


@needs_corpus
@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_timm_tmp_left_by_a_kill_is_incomplete_not_a_unit(tmp_path: Path, kind: str) -> None:
    """A 0-byte or torn tmp.pth.tar is listed as incomplete and left alone; the units strip."""
    run = copy_run(T_INT, tmp_path / "output" / "train" / "tiny-test_resnet-32")
    tmp = run / "tmp.pth.tar"
    if kind == "empty":
        tmp.write_bytes(b"")
    else:
        prefix_of(f"{T_INT}/checkpoint-1.pth.tar", tmp)
    before = FileState.of(tmp)
    found = found_in(tmp_path, run)
    assert found.incomplete == ("output/train/tiny-test_resnet-32/tmp.pth.tar",)
    assert "tmp.pth.tar" not in unit_names(found)
    assert len(found.units) == 4
    for u in found.units:
        assert run_job(StripJob(path=str(tmp_path / u.rel))).status == "stripped"
    for name in ("checkpoint-1.pth.tar", "last.pth.tar"):
        assert_matches_reference(run / name, f"{T_REF}/checkpoint-1-ema.pth", "timm")
    assert FileState.of(tmp) == before


@needs_corpus
def test_lightning_last_still_the_previous_epoch_strips_to_that_epoch(tmp_path: Path) -> None:
    """When a kill leaves last.ckpt one epoch behind a complete epoch file, each strips to its own."""
    run = copy_run("lightning/interrupted/lightning_logs/version_0",
                   tmp_path / "lightning_logs" / "version_0")
    ckpts = run / "checkpoints"
    shutil.copyfile(corpus_file(f"{L_INT}/epoch=0-step=3.ckpt"), ckpts / "last.ckpt")
    found = found_in(tmp_path, ckpts)
    assert found.run == "lightning_logs/version_0"
    assert unit_names(found) == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"]
    for name, ref in (("last.ckpt", "epoch=0-step=3.ckpt"), ("epoch=1-step=6.ckpt", "epoch=1-step=6.ckpt"),
                      ("epoch=0-step=3.ckpt", "epoch=0-step=3.ckpt")):
        assert run_job(StripJob(path=str(ckpts / name))).status == "stripped"
        assert_matches_reference(ckpts / name, f"{L_REF}/{ref}", "lightning")


# ------------------------------------------------------------------------------ the rules


def t(*shape: int) -> torch.Tensor:
    return torch.arange(float(np.prod(shape) or 1)).reshape(shape)


def test_lightning_drops_the_precision_plugins_state_under_each_releases_name() -> None:
    """MixedPrecision's, an older plugin's and the pre-1.6 scaler state go; everything else stays."""
    sd = collections.OrderedDict(w=t(2))
    ckpt = {"epoch": 3, "global_step": 12, "pytorch-lightning_version": "2.6.6", "state_dict": sd,
            "loops": {}, "callbacks": {"ModelCheckpoint{}": {}}, "optimizer_states": [{}],
            "lr_schedulers": [{}], "MixedPrecision": {"scale": 65536.0},
            "NativeMixedPrecisionPlugin": {"scale": 1.0}, "native_amp_scaling_state": {},
            "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1},
            "MyDataModule": {"seen": 5}, "user_key": [1, 2]}
    assert lightning.detect(ckpt, frozenset()) and not lightning.is_stripped(ckpt)
    out = lightning.strip(ckpt)
    assert list(out) == ["epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops",
                         "hparams_name", "hyper_parameters", "MyDataModule", "user_key"]
    assert out["state_dict"] is sd and lightning.is_stripped(out)


def test_lightning_is_detected_without_its_version_key_by_loops_and_global_step() -> None:
    """A Lightning file without `pytorch-lightning_version` is told by state_dict, loops, global_step."""
    assert strip.detect_profile({"state_dict": {"w": t(1)}, "loops": {}, "global_step": 1}) == "lightning"
    assert strip.detect_profile({"state_dict": {"w": t(1)}, "global_step": 1}) == "generic"


def test_timm_prefers_ema_weights_then_model_ema_then_state_dict() -> None:
    """The strip keeps state_dict_ema, else model_ema, else state_dict: load_state_dict(use_ema=True)."""
    ema, mema, plain = {"w": t(1)}, {"w": t(2)}, {"w": t(3)}
    base = {"epoch": 1, "arch": "resnet18", "state_dict": plain, "version": 2}
    assert timm.strip({**base, "state_dict_ema": ema, "model_ema": mema})["w"] is ema["w"]
    assert timm.strip({**base, "state_dict_ema": None, "model_ema": mema})["w"] is mema["w"]
    assert timm.strip({**base, "state_dict_ema": None})["w"] is plain["w"]


def test_timm_cleans_prefixes_into_a_plain_dict_in_order() -> None:
    """`module.` then `_orig_mod.` then `module.` are removed; the result is a plain dict in order."""
    sd = collections.OrderedDict([("module.a", t(1)), ("_orig_mod.b", t(1)), ("c", t(1)),
                                  ("module._orig_mod.d", t(1)), ("_orig_mod.module.e", t(1)),
                                  ("x.module.f", t(1))])
    out = timm.strip({"arch": "vit", "state_dict": sd, "args": None})
    assert type(out) is dict
    assert list(out) == ["a", "b", "c", "d", "e", "x.module.f"]
    assert timm.is_stripped(out)


def test_timm_detection_needs_a_training_checkpoints_keys() -> None:
    """arch + state_dict alone (pytorch/examples' ImageNet) or a bare state dict are not timm's."""
    sd = {"w": t(1)}
    assert strip.detect_profile({"arch": "resnet18", "state_dict": sd, "metric": 1.0}) == "timm"
    assert strip.detect_profile({"arch": "resnet18", "state_dict": sd, "args": None}) == "timm"
    imagenet = {"epoch": 3, "arch": "resnet18", "state_dict": sd, "best_acc1": 0.5, "optimizer": {}}
    assert strip.detect_profile(imagenet) == "generic"
    assert strip.detect_profile(sd) == "generic" and timm.is_stripped(sd)


def test_timm_refuses_to_leave_a_file_without_weights() -> None:
    """An EMA key holding an empty dict or no dict at all is an unrecognised layout, not a strip."""
    not_weights: tuple[Any, ...] = ({}, [t(1)])
    for ema in not_weights:
        with pytest.raises(UnrecognisedLayout):
            timm.strip({"arch": "a", "state_dict": {"w": t(1)}, "state_dict_ema": ema})


def test_mmengine_drops_optimizer_and_schedulers_and_keeps_the_rest_in_order() -> None:
    """optimizer and param_schedulers go; meta, state_dict, message_hub and extras stay in order."""
    ckpt = {"meta": {"mmengine_version": "0.10.7", "epoch": 2}, "state_dict": {"w": t(2)},
            "message_hub": {"runtime_info": {}}, "optimizer": {"state": {}},
            "param_schedulers": [{}], "ema_state_dict": {"w": t(2)}}
    assert mmengine.detect(ckpt, frozenset()) and not mmengine.is_stripped(ckpt)
    out = mmengine.strip(ckpt)
    assert list(out) == ["meta", "state_dict", "message_hub", "ema_state_dict"]
    assert out["meta"] is ckpt["meta"] and mmengine.is_stripped(out)


def test_mmengine_detection_by_its_meta() -> None:
    """Runner's `mmengine_version` and FlexibleRunner's `mmengine` say MMEngine; mmcv's does not."""
    sd = {"w": t(1)}
    flexible = {"state_dict": sd, "optimizer": {}, "meta": {"mmengine": "0.10.7", "seed": 0}}
    assert strip.detect_profile(flexible) == "mmengine"
    assert strip.detect_profile({"meta": {"mmengine_version": "0.10.7"}, "state_dict": sd}) == "mmengine"
    assert strip.detect_profile({"meta": {"mmcv_version": "1.7"}, "state_dict": sd}) == "generic"
