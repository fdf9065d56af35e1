"""The strip engine on generated YOLOv5, Ultralytics, plain-PyTorch and Lightning checkpoints.

ckpt-watchd strips here, in the pytest process, where the trainer classes cannot be imported; the
results are then loaded where they can (a subprocess with the fake trainers) and compared with a
reference strip written from each trainer's published `strip_optimizer`.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures import harness, summary
from fixtures.harness import FileState, View, run_cli, temp_files

PROFILES = {
    "yolov5": "yolov5", "yolov5_fp32": "yolov5", "yolov5_noema": "yolov5",
    "ultralytics": "ultralytics", "ultralytics_fp32": "ultralytics",
    "ultralytics_nometa": "ultralytics",
}
HEAD_ATTRS = {"yolov5": ("stride", "grid", "anchor_grid"),
              "ultralytics": ("stride", "anchors", "strides")}


@pytest.fixture(scope="module")
def views(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, View]:
    """Every profile fixture stripped here, its reference strip there, all three summarised."""
    return harness.strip_and_compare(generated, tmp_path_factory.mktemp("profiles"), PROFILES)


def _date_missing(view: View) -> bool:
    return "'date'" not in (view.input["keys"] or [])


@pytest.mark.parametrize("kind", list(PROFILES))
def test_strip_matches_the_trainers_own_strip(views: dict[str, View], kind: str) -> None:
    """Keys, order, values, classes and tensors equal the reference strip, loaded in the trainer."""
    v = views[kind]
    assert v.outcome.status == "stripped", v.outcome
    assert v.outcome.profile == PROFILES[kind]
    ignore = ("$['date']",) if _date_missing(v) else ()
    assert summary.diff(v.ours, v.ref, ignore=ignore) == []
    assert v.ours["state_dict_check"] == "ok"
    assert v.ours["ckpt_watchd_modules"] == []
    assert summary.module_classes(v.ours) == summary.module_classes(v.ref)


@pytest.mark.parametrize("kind", list(PROFILES))
def test_stripped_model_is_fp16_and_frozen(views: dict[str, View], kind: str) -> None:
    """Parameters, buffers and head tensors are FP16; no parameter requires grad."""
    v = views[kind]
    tensors = summary.model_tensors(v.ours)
    params = {p: d for p, d in tensors.items() if d["param"]}
    assert params and not any(d["requires_grad"] for d in params.values())
    registered = [d for p, d in tensors.items() if "._parameters[" in p or "._buffers[" in p]
    floating = [d for d in registered if d["dtype"] not in ("torch.int64", "torch.bool")]
    assert floating and all(d["dtype"] == "torch.float16" for d in floating)
    layers = "$['model']._modules['model']._modules"
    head = f"{layers}[{v.ours['tree'][layers]['keys'][-1]}]"
    for attr in HEAD_ATTRS[PROFILES[kind]]:
        head_tensors = [d for p, d in tensors.items() if p.startswith(f"{head}.{attr}")]
        assert head_tensors and all(d["dtype"] == "torch.float16" for d in head_tensors), attr


@pytest.mark.parametrize("kind", ["yolov5_fp32", "yolov5_noema", "ultralytics_fp32"])
def test_fp32_inputs_exercise_the_half_conversion(views: dict[str, View], kind: str) -> None:
    """These inputs hold FP32 weights that require grad, so the strip really converted them."""
    source = "$['ema']" if kind != "yolov5_noema" else "$['model']"
    before = summary.model_tensors(views[kind].input, source)
    assert any(d["dtype"] == "torch.float32" and d["param"] for d in before.values())
    assert any(d["requires_grad"] for d in before.values())


@pytest.mark.parametrize("kind", list(PROFILES))
def test_optimizer_side_is_cleared(views: dict[str, View], kind: str) -> None:
    """epoch -1 and optimizer, best_fitness, ema, updates None (plus scaler/stopper on Ultralytics)."""
    tree = views[kind].ours["tree"]
    cleared = ["optimizer", "best_fitness", "ema", "updates"]
    if PROFILES[kind] == "ultralytics":
        cleared += ["scaler", "stopper"]
    if kind == "yolov5_fp32":
        cleared += ["training_results", "wandb_id"]
    assert {k: tree[f"$[{k!r}]"] for k in cleared} == {k: {"v": None} for k in cleared}
    assert tree["$['epoch']"] == {"v": -1}


@pytest.mark.parametrize("kind", ["ultralytics", "ultralytics_fp32", "ultralytics_nometa"])
def test_ultralytics_specifics(views: dict[str, View], kind: str) -> None:
    """Metadata first, args a plain dict, criterion None, runtime-only train_args dropped."""
    v = views[kind]
    assert v.ours["keys"][:4] == ["'date'", "'version'", "'license'", "'docs'"]
    assert v.ours["args_type"] == "dict"
    assert v.ours["tree"]["$['model'].criterion"] == {"v": None}
    train_args = v.ours["tree"]["$['train_args']"]["keys"]
    assert "'save_dir'" not in train_args and "'imgsz'" in train_args
    date = v.ours["tree"]["$['date']"]["v"]
    assert datetime.datetime.fromisoformat(date)
    if not _date_missing(v):
        assert date == v.input["tree"]["$['date']"]["v"]


def test_the_engine_never_imports_trainer_code(views: dict[str, View]) -> None:
    """Stripping used stand-ins: no `models` or `ultralytics` module was imported here."""
    assert all(v.outcome.status == "stripped" for v in views.values())
    assert not {"models", "ultralytics"} & set(sys.modules)


# ------------------------------------------------------------------------------ file behaviour


def test_dry_run_changes_nothing(checkpoint: Callable[..., Path], capsys: Any) -> None:
    """--dry-run reports 'would strip' and leaves bytes, mtime and inode as they were."""
    path = checkpoint("yolov5")
    before = FileState.of(path)
    code, lines, _ = run_cli(["strip", "--dry-run", str(path)], capsys)
    assert code == 0
    assert lines == [lines[0]] and "would strip (yolov5)" in lines[0]
    assert FileState.of(path) == before
    assert temp_files(path.parent) == []


def test_output_option_leaves_the_input_untouched(checkpoint: Callable[..., Path],
                                                  tmp_path: Path, capsys: Any) -> None:
    """-o writes the stripped file elsewhere; the input keeps its bytes and mtime."""
    path = checkpoint("ultralytics")
    before = FileState.of(path)
    out = tmp_path / "out" / "small.pt"
    out.parent.mkdir()
    code, lines, _ = run_cli(["strip", str(path), "-o", str(out)], capsys)
    assert code == 0 and lines[0].endswith(f"-> {out}")
    assert FileState.of(path) == before
    code, lines, _ = run_cli(["inspect", "--json", str(out)], capsys)
    report = json.loads("\n".join(lines))
    assert (code, report["profile"], report["stripped"]) == (0, "ultralytics", True)
    assert temp_files(path.parent) == [] and temp_files(out.parent) == []


@pytest.mark.parametrize("kind", ["yolov5_stripped", "ultralytics_stripped"])
def test_already_stripped_is_skipped_untouched(checkpoint: Callable[..., Path], capsys: Any,
                                               kind: str) -> None:
    """An already stripped file is reported as skipped and not rewritten (bytes, mtime, inode)."""
    path = checkpoint(kind)
    before = FileState.of(path)
    code, lines, _ = run_cli(["strip", str(path)], capsys)
    assert code == 0
    assert lines == [f"{path}: skipped (already stripped)"]
    assert FileState.of(path) == before


def test_stripping_twice_skips_the_second_time(checkpoint: Callable[..., Path],
                                               capsys: Any) -> None:
    """The engine's own output counts as already stripped."""
    path = checkpoint("yolov5")
    assert run_cli(["strip", str(path)], capsys)[0] == 0
    after_first = FileState.of(path)
    code, lines, _ = run_cli(["strip", str(path)], capsys)
    assert (code, lines) == (0, [f"{path}: skipped (already stripped)"])
    assert FileState.of(path) == after_first


def test_json_output_is_one_object_per_file(checkpoint: Callable[..., Path],
                                            capsys: Any) -> None:
    """--json prints one parseable object per input, in order, with status and sizes."""
    a, b = checkpoint("yolov5"), checkpoint("ultralytics_stripped")
    size_a = a.stat().st_size
    code, lines, _ = run_cli(["strip", "--json", str(a), str(b)], capsys)
    records = [json.loads(line) for line in lines]
    assert code == 0
    assert [(r["path"], r["status"]) for r in records] == [(str(a), "stripped"),
                                                         (str(b), "skipped")]
    assert records[0]["bytes_before"] == size_a > records[0]["bytes_after"] == a.stat().st_size
    assert records[0]["profile"] == "yolov5" and records[1]["reason"] == "already stripped"


def test_exit_code_is_one_when_any_file_failed(checkpoint: Callable[..., Path], tmp_path: Path,
                                               capsys: Any) -> None:
    """One bad file makes the exit code 1; the good one is still stripped."""
    good = checkpoint("yolov5")
    bad = tmp_path / "empty.pt"
    bad.touch()
    code, lines, _ = run_cli(["strip", str(bad), str(good)], capsys)
    assert code == 1
    assert lines[0].startswith(f"{bad}: failed: ") and "stripped (yolov5)" in lines[1]


@pytest.mark.e2e
def test_usage_error_exits_two(tmp_path: Path) -> None:
    """-o with two inputs is a usage error: exit 2, nothing touched."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    proc = subprocess.run([sys.executable, "-m", "ckpt_watchd", "strip", str(a), str(b), "-o",
                           str(tmp_path / "c.pt")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "-o/--output takes exactly one input" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


def test_mode_is_kept(checkpoint: Callable[..., Path], capsys: Any) -> None:
    """The replaced file keeps the original's permission bits (here 0640)."""
    path = checkpoint("yolov5")
    os.chmod(path, 0o640)
    ino = path.stat().st_ino
    assert run_cli(["strip", str(path)], capsys)[0] == 0
    st = path.stat()
    assert st.st_ino != ino  # it really was replaced
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert temp_files(path.parent) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owner_and_group_are_kept(checkpoint: Callable[..., Path], capsys: Any) -> None:
    """A file owned by another uid/gid keeps that owner and group after the strip."""
    path = checkpoint("ultralytics")
    os.chown(path, 1234, 2345)
    os.chmod(path, 0o604)
    assert run_cli(["strip", str(path)], capsys)[0] == 0
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 2345, 0o604)


def _weights(path: Path) -> dict[str, Any]:
    # the real plain-PyTorch loader: a generic result must not need anything but weights
    obj: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return obj


@pytest.mark.parametrize(("kind", "weights_key", "dropped"), [
    ("generic", "model_state_dict", ["optimizer_state_dict"]),
    # Lightning's own weights-only save also leaves out the callbacks' state
    ("lightning", "state_dict", ["callbacks", "optimizer_states", "lr_schedulers"]),
])
def test_drops_optimizer_state_keeps_weights(checkpoint: Callable[..., Path], capsys: Any,
                                             kind: str, weights_key: str,
                                             dropped: list[str]) -> None:
    """Optimizer/scheduler keys go; weights, dtypes, metadata and key order stay."""
    path = checkpoint(kind)
    before = _weights(path)
    assert set(dropped) <= set(before)
    code, lines, _ = run_cli(["strip", str(path)], capsys)
    assert code == 0 and f"stripped ({kind})" in lines[0]
    after = _weights(path)
    assert list(after) == [k for k in before if k not in dropped]
    for k in after:
        if k != weights_key:
            assert repr(after[k]) == repr(before[k])
    assert list(after[weights_key]) == list(before[weights_key])
    for name, t in before[weights_key].items():
        assert after[weights_key][name].dtype == t.dtype
        assert torch.equal(after[weights_key][name], t)
    assert temp_files(path.parent) == []


def test_half_casts_generic_weights(checkpoint: Callable[..., Path], capsys: Any) -> None:
    """--half turns floating weights FP16 (values as `.half()`), integer buffers untouched."""
    path = checkpoint("generic")
    before = _weights(path)["model_state_dict"]
    assert run_cli(["strip", "--half", str(path)], capsys)[0] == 0
    after = _weights(path)["model_state_dict"]
    for name, t in before.items():
        want = t.half() if t.is_floating_point() else t
        assert after[name].dtype == want.dtype and torch.equal(after[name], want), name
    assert any(not t.is_floating_point() for t in before.values())


def test_inspect_reports_where_the_bytes_go(checkpoint: Callable[..., Path],
                                            capsys: Any) -> None:
    """inspect --json: profile, per-key tensors/bytes/dtypes, not stripped, a smaller estimate."""
    path = checkpoint("yolov5")
    code, lines, _ = run_cli(["inspect", "--json", str(path)], capsys)
    r = json.loads("\n".join(lines))
    assert code == 0
    assert (r["profile"], r["stripped"], r["format"], r["epoch"]) == ("yolov5", False, "zip", 2)
    assert r["bytes"] == path.stat().st_size
    keys = {k["key"]: k for k in r["keys"]}
    assert list(keys) == ["epoch", "best_fitness", "model", "ema", "updates", "optimizer", "opt",
                          "git", "date"]
    assert keys["optimizer"]["dtypes"] == ["float32"] and keys["optimizer"]["tensors"] > 0
    assert "float16" in keys["ema"]["dtypes"] and keys["ema"]["bytes"] > 0
    assert keys["date"] == {"key": "date", "type": "str", "tensors": 0, "bytes": 0, "dtypes": []}
    assert sum(k["bytes"] for k in r["keys"]) < r["bytes"]
    assert r["bytes_after_strip"] < r["bytes"]
    assert run_cli(["strip", str(path)], capsys)[0] == 0
    actual = path.stat().st_size
    assert 0.5 * actual < r["bytes_after_strip"] < 2 * actual
    code, lines, _ = run_cli(["inspect", "--json", str(path)], capsys)
    after = json.loads("\n".join(lines))
    assert (after["stripped"], after["bytes_after_strip"], after["epoch"]) == (True, actual, -1)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's clear_refs")
def test_peak_memory_grows_with_the_output_not_the_input(generated: Path,
                                                         tmp_path: Path) -> None:
    """Stripping never reads the dropped optimizer storages: extra RSS stays far below their size."""
    src = generated / "yolov5_bigopt.pt"
    target, control = tmp_path / "last.pt", tmp_path / "control.pt"
    shutil.copyfile(src, target)
    shutil.copyfile(src, control)
    proc = subprocess.run([sys.executable, str(harness.FIXTURES / "peak_rss.py"), str(target),
                           str(control)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout)
    optimizer_bytes = 60e6
    assert m["status"] == "stripped"
    assert target.stat().st_size < 0.15 * src.stat().st_size
    assert m["strip_extra"] < 0.5 * optimizer_bytes, m
    # the measure is sensitive: reading everything costs at least the optimizer's bytes
    assert m["control_extra"] > 0.8 * optimizer_bytes, m
