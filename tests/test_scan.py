"""`ckpt-watchd scan`: the table a new user reads first. Changes nothing; estimates within 2%.

The estimates are checked against real strips of the same files: the trainers' own files of the
shared corpus where it is present, and generated checkpoints always.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon_io import clean_env
from reliability.conftest import CORPUS

# run folders of every trainer, laid out under one root as a mixed GPU box has them
CORPUS_RUNS = {
    "yolov5/runs/train/v5n_interrupted": "train/v5n_interrupted",
    "ultralytics/runs/detect/v8n_interrupted": "detect/v8n_interrupted",
    "ultralytics/runs/detect/v8n_finished": "detect/v8n_finished",
    "lightning/interrupted/lightning_logs": "lightning_logs",
    "timm/interrupted/output": "output",
    "mmengine/interrupted/work_dirs": "work_dirs",
    "transformers/interrupted": "hf/gpt2-tiny",
    "accelerate/interrupted": "accelerate/project",
}


def scan(root: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "ckpt_watchd", "scan", str(root), "--json",
                           *args], capture_output=True, text=True, timeout=240, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # not a terminal: no progress bar, nothing else
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root: (mtime_ns, sha256)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def age(root: Path, seconds: float) -> None:
    when = time.time() - seconds
    for p in [root, *root.rglob("*")]:
        os.utime(p, (when, when), follow_symlinks=False)


def real_after(unit: dict[str, Any], root: Path) -> int:
    """What stripping this unit really leaves (a copy of it, stripped by the real strip)."""
    from ckpt_watchd.worker import StripJob, run_job

    if unit["kind"] == "folder":
        from ckpt_watchd.engine import folder

        copy = root.parent / "copies" / Path(unit["path"]).name
        shutil.copytree(unit["path"], copy)
        outcome = folder.strip_folder(copy, profile=unit["profile"])
        return sum(p.stat().st_size for p in copy.iterdir() if p.is_file()) \
            if outcome.status == "stripped" else unit["bytes"]
    copy = root.parent / "copies" / hashlib.sha1(unit["path"].encode()).hexdigest()[:8] / \
        Path(unit["path"]).name
    copy.parent.mkdir(parents=True)
    shutil.copyfile(unit["path"], copy)
    outcome = run_job(StripJob(path=str(copy)))
    assert outcome.status in ("stripped", "skipped"), outcome
    return copy.stat().st_size


def _assert_estimates_within_2_percent(result: dict[str, Any], root: Path) -> None:
    off = []
    for run in result["runs"]:
        for unit in run["units"]:
            if unit["incomplete"] or unit["error"]:
                continue
            real = real_after(unit, root)
            if abs(unit["bytes_after"] - real) > 0.02 * real:
                off.append((unit["path"], unit["bytes_after"], real))
    assert off == []


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no real checkpoints in {CORPUS}")
@pytest.mark.timeout(280)
def test_scan_of_every_trainer_estimates_each_file_within_2_percent(tmp_path: Path) -> None:
    """One root with runs of all seven trainers: each one found, each estimate within 2%."""
    root = tmp_path / "runs"
    for src, dest in CORPUS_RUNS.items():
        shutil.copytree(CORPUS / src, root / dest)
    for p in root.rglob("*"):
        p.chmod(p.stat().st_mode | 0o200)
    age(root, 7200)
    before = tree(root)
    result = scan(root)
    assert tree(root) == before  # scan changes nothing (and writes no state)
    trainers = {r["trainer"] for r in result["runs"]}
    assert trainers == {"yolov5", "ultralytics", "lightning", "timm", "mmengine", "transformers",
                        "accelerate"}
    states = {r["run"]: r["state"] for r in result["runs"]}
    assert states["detect/v8n_finished"] == "already stripped"
    assert states["train/v5n_interrupted"] == "finished"
    _assert_estimates_within_2_percent(result, root)


@pytest.fixture
def generated_root(tmp_path: Path, checkpoint: Any) -> Path:
    root = tmp_path / "runs"
    for i, kind in enumerate(("yolov5", "yolov5_fp32", "ultralytics")):
        for name in ("last.pt", "best.pt"):
            checkpoint(kind, name=name, directory=root / "train" / f"{kind}-{i}" / "weights")
    checkpoint("ultralytics_stripped", name="last.pt", directory=root / "detect/done/weights")
    checkpoint("lightning", name="epoch=0-step=3.ckpt",
               directory=root / "lightning_logs/version_0/checkpoints")
    age(root, 7200)
    return root


@pytest.mark.timeout(280)
def test_scan_estimates_generated_checkpoints_within_2_percent(generated_root: Path) -> None:
    """The suite's own checkpoints (no corpus needed): every estimate within 2% of a real strip."""
    before = tree(generated_root)
    result = scan(generated_root)
    assert tree(generated_root) == before
    assert len(result["runs"]) == 5
    _assert_estimates_within_2_percent(result, generated_root)


@pytest.mark.timeout(200)
def test_the_table_is_sorted_by_reclaimable_bytes_with_totals_and_states(
        generated_root: Path, checkpoint: Any) -> None:
    """Most reclaimable first; totals add up; kept, live, already-stripped and incomplete runs."""
    (generated_root / "train/yolov5-0/.ckpt-watchd-keep").touch()
    live = checkpoint("yolov5", name="last.pt", directory=generated_root / "train/live/weights")
    torn = generated_root / "train/torn/weights/last.pt"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(live.read_bytes()[:5000])
    os.utime(torn, (time.time() - 7200, time.time() - 7200))
    result = scan(generated_root)
    runs = result["runs"]
    assert [r["reclaimable"] for r in runs] == sorted((r["reclaimable"] for r in runs), reverse=True)
    for key in ("bytes", "bytes_after", "reclaimable", "checkpoints"):
        assert result["totals"][key] == sum(r[key] for r in runs)
    states = {r["run"]: r["state"] for r in runs}
    assert states["train/yolov5-0"] == "kept"
    assert states["train/live"] == "live"
    assert states["detect/done"] == "already stripped"
    assert states["train/torn"] == "incomplete"
    assert states["train/yolov5_fp32-1"] == "finished"
    text = subprocess.run([sys.executable, "-m", "ckpt_watchd", "scan", str(generated_root)],
                          capture_output=True, text=True, timeout=240, env=clean_env())
    assert text.returncode == 0 and text.stderr == ""
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["run", "trainer", "state", "ckpts", "now", "after", "reclaimable"]
    assert lines[-1].startswith("total") and f"{len(runs)} runs" in lines[-1]


@pytest.mark.timeout(200)
def test_a_hostile_file_is_one_note_and_the_rest_is_estimated(generated_root: Path,
                                                              tmp_path: Path) -> None:
    """A file the policy refuses costs one 'not estimated' note; nothing of it runs."""
    from fixtures import payloads

    marker = tmp_path / "MARKER"
    evil = generated_root / "train/evil/weights/last.pt"
    evil.parent.mkdir(parents=True)
    payloads.rezip(generated_root / "train/yolov5-0/weights/last.pt", evil, data_pkl=payloads.whole(
        payloads.would_touch(marker, tmp_path)["os.system"]))
    result = scan(generated_root)
    errors = [u for r in result["runs"] for u in r["units"] if u["error"]]
    assert [Path(u["path"]).parent.parent.name for u in errors] == ["evil"]
    assert "os.system" in errors[0]["error"] and not marker.exists()
    assert sum(1 for r in result["runs"] if r["reclaimable"] > 0) >= 3


@pytest.mark.timeout(200)
def test_progress_goes_to_a_terminal_only(generated_root: Path) -> None:
    """On a terminal stderr shows a progress bar; piped (the other tests) it shows nothing."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "ckpt_watchd", "scan", str(generated_root),
                               "--json"], stdout=subprocess.PIPE, stderr=follower, timeout=240,
                              env=clean_env())
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0
    assert b"estimating [" in seen
    json.loads(proc.stdout)  # stdout stays clean JSON
