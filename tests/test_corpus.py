"""The strip engine on real checkpoints written by YOLOv5 and Ultralytics 8.4 (the shared corpus).

Interrupted runs' `last.pt` files are stripped (copies: the corpus is read-only) and compared with
what each project's own `strip_optimizer` made of them; finished runs must be skipped untouched.
The same files renamed to save-period snapshots (`epoch<N>.pt`) are stripped by the daemon itself.
Both sides are read with ckpt-watchd's safe loader. Skips cleanly when the corpus is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ckpt_watchd.engine import safeload
from ckpt_watchd.worker import StripJob, inspect_boundary, run_job
from fixtures import summary
from fixtures.daemon_io import clean_env, read_audit
from fixtures.harness import FileState, temp_files

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no corpus at {CORPUS}")

INTERRUPTED = {
    "yolov5": ("yolov5/runs/train/v5n_interrupted/weights/last.pt",
               "yolov5/reference/v5n_interrupted.last.stripped.pt"),
    "ultralytics": ("ultralytics/runs/detect/v8n_interrupted/weights/last.pt",
                    "ultralytics/reference/v8n_interrupted.last.stripped.pt"),
}
FINISHED = ["ultralytics/runs/detect/v8n_finished/weights/last.pt",
            "ultralytics/runs/detect/v8n_finished/weights/best.pt"]
PROFILE_OF = {
    "yolov5/runs/train/v5n_interrupted/weights/last.pt": ("yolov5", False),
    "yolov5/runs/train/v5n_interrupted/weights/best.pt": ("yolov5", False),
    "yolov5/reference/v5n_interrupted.last.stripped.pt": ("yolov5", True),
    "ultralytics/runs/detect/v8n_interrupted/weights/last.pt": ("ultralytics", False),
    "ultralytics/reference/v8n_interrupted.last.stripped.pt": ("ultralytics", True),
    "ultralytics/runs/detect/v8n_finished/weights/last.pt": ("ultralytics", True),
    "ultralytics/runs/detect/v8n_finished/weights/best.pt": ("ultralytics", True),
}


def _corpus_file(rel: str) -> Path:
    path = CORPUS / rel
    if not path.is_file():
        pytest.skip(f"corpus file missing: {rel}")
    return path


@pytest.fixture(scope="module")
def stripped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each interrupted last.pt stripped by ckpt-watchd, next to its reference (both summarised)."""
    out: dict[str, dict[str, Any]] = {}
    work = tmp_path_factory.mktemp("corpus")
    for trainer, (src_rel, ref_rel) in INTERRUPTED.items():
        src, ref = CORPUS / src_rel, CORPUS / ref_rel
        if not (src.is_file() and ref.is_file()):
            continue
        copy = work / trainer / "last.pt"
        copy.parent.mkdir()
        shutil.copyfile(src, copy)
        outcome = run_job(StripJob(path=str(copy)))
        out[trainer] = {"outcome": outcome, "path": copy,
                        "ours": summary.summarize(safeload.load(copy).obj),
                        "ref": summary.summarize(safeload.load(ref).obj)}
    return out


def _get(stripped: dict[str, dict[str, Any]], trainer: str) -> dict[str, Any]:
    if trainer not in stripped:
        pytest.skip(f"corpus files for {trainer} missing")
    return stripped[trainer]


@pytest.mark.parametrize("trainer", list(INTERRUPTED))
def test_interrupted_last_matches_the_trainers_own_strip(stripped: dict[str, dict[str, Any]],
                                                         trainer: str) -> None:
    """Keys, order, values (but date), class names and every tensor equal the reference file."""
    s = _get(stripped, trainer)
    assert s["outcome"].status == "stripped", s["outcome"]
    assert s["outcome"].profile == trainer
    assert s["ours"]["keys"] == s["ref"]["keys"]
    assert summary.module_classes(s["ours"]) == summary.module_classes(s["ref"])
    assert summary.diff(s["ours"], s["ref"], ignore=("$['date']",)) == []
    assert temp_files(s["path"].parent) == []


@pytest.mark.parametrize("trainer", list(INTERRUPTED))
def test_interrupted_last_shrinks_to_about_the_reference_size(
        stripped: dict[str, dict[str, Any]], trainer: str) -> None:
    """The stripped file is within 5% of the trainer's own stripped file (and 3x+ smaller)."""
    s = _get(stripped, trainer)
    ours = s["path"].stat().st_size
    ref = (CORPUS / INTERRUPTED[trainer][1]).stat().st_size
    assert abs(ours - ref) < 0.05 * ref
    assert ours * 3 < s["outcome"].bytes_before


@pytest.mark.parametrize("rel", FINISHED)
def test_finished_files_are_skipped_byte_identical(tmp_path: Path, rel: str) -> None:
    """A run the trainer finished (and stripped) is 'already stripped': not rewritten at all."""
    copy = tmp_path / "last.pt"
    shutil.copyfile(_corpus_file(rel), copy)
    before = FileState.of(copy)
    outcome = run_job(StripJob(path=str(copy)))
    assert (outcome.status, outcome.reason, outcome.profile) == (
        "skipped", "already stripped", "ultralytics")
    assert FileState.of(copy) == before
    assert copy.read_bytes() == (CORPUS / rel).read_bytes()


@pytest.mark.parametrize("rel", list(PROFILE_OF))
def test_inspect_reports_the_trainer(rel: str) -> None:
    """inspect names the trainer and whether the file is stripped (read-only, in place)."""
    path = _corpus_file(rel)
    report, error = inspect_boundary(path)
    assert error is None and report is not None
    assert (report["profile"], report["stripped"]) == PROFILE_OF[rel]
    if not report["stripped"]:
        assert report["bytes_after_strip"] < report["bytes"] / 3


# each trainer's run folder, as it lays it out (both write epoch<N>.pt with --save-period)
RUN_OF = {"yolov5": "train/v5n_interrupted", "ultralytics": "detect/v8n_interrupted"}


@pytest.mark.e2e
def test_interrupted_checkpoints_as_epochN_snapshots_strip_to_the_references_with_once(
        tmp_path: Path) -> None:
    """Each interrupted last.pt (epoch 2) copied to its run as epoch2.pt: `--once` finds the
    snapshots by the default --files and strips them to what the trainer's strip_optimizer made."""
    root, when = tmp_path / "runs", time.time() - 3600
    expected: dict[Path, tuple[str, Path]] = {}
    for trainer, (src_rel, ref_rel) in INTERRUPTED.items():
        src, ref = _corpus_file(src_rel), _corpus_file(ref_rel)
        weights = root / RUN_OF[trainer] / "weights"
        weights.mkdir(parents=True)
        shutil.copyfile(src, weights / "epoch2.pt")
        os.utime(weights / "epoch2.pt", (when, when))  # the run ended an hour ago
        expected[weights / "epoch2.pt"] = (trainer, ref)
    config = tmp_path / "empty.toml"  # shields the test from a real /etc/ckpt-watchd/config.toml
    config.touch()
    r = subprocess.run([sys.executable, "-m", "ckpt_watchd", "--root", str(root), "--once",
                        "--settle", "1", "--config", str(config), "--log-format", "json"],
                       capture_output=True, timeout=300, env=clean_env(), cwd=tmp_path,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    audit = read_audit(root / ".ckpt-watchd" / "audit.jsonl")
    stripped = {e["path"]: e for e in audit if e["event"] == "ckpt.stripped"}
    assert sorted(stripped) == sorted(str(p) for p in expected)
    assert [e for e in audit if e["event"] in ("ckpt.failed", "daemon.warning")] == []
    for path, (trainer, ref) in expected.items():
        assert stripped[str(path)]["profile"] == trainer
        ours, theirs = (summary.summarize(safeload.load(p).obj) for p in (path, ref))
        assert ours["keys"] == theirs["keys"]
        assert summary.module_classes(ours) == summary.module_classes(theirs)
        assert summary.diff(ours, theirs, ignore=("$['date']",)) == [], path
        assert temp_files(path.parent) == []
