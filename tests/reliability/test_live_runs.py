"""Live-run safety: a trainer with one epoch 5x longer than the others is never stripped while alive.

The time rule alone waits max(--settle, 3 x the longest gap seen between two writes), so during
the first long epoch (5 s after 1 s epochs: quiet period 3 s) it would call the run finished. What
protects it then is either the trainer's open file (real trainers keep their TensorBoard event file
open for writing: `run.busy`) or a --settle longer than the long epoch. Both are tested with a
simulated trainer subprocess; the audit is polled, and the trainer's epoch pacing is the input.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reliability.conftest import Daemon, clean_env, is_valid_stripped, temp_files, wait_until

EPOCHS = (1.0, 1.0, 1.0, 5.0, 1.0, 1.0)  # seconds; last.pt is written at the end of each

# A trainer: every epoch rewrites weights/last.pt in place (truncate + write, like torch.save) and
# logs a JSON line to --status outside the run; with hold_open it also keeps an event file in the
# run folder open for writing from start to exit, as YOLOv5's and Ultralytics' TensorBoard writer do.
_TRAINER = r"""
import json, os, sys, time
cfg = json.loads(sys.argv[1])
weights = cfg["weights"]
data = open(cfg["template"], "rb").read()
os.makedirs(weights, exist_ok=True)
events = None
if cfg["hold_open"]:
    events = open(os.path.join(os.path.dirname(weights), "events.out.tfevents.0.host"), "ab")
status = cfg["status"]
for epoch, seconds in enumerate(cfg["epochs"]):
    time.sleep(seconds)  # the epoch's compute: this trainer's cadence
    with open(os.path.join(weights, "last.pt"), "wb") as f:
        f.write(data)
    if events is not None:
        events.write(b"epoch %d\n" % epoch)
        events.flush()
    with open(status, "a") as s:
        s.write(json.dumps({"epoch": epoch, "time": time.time()}) + "\n")
if events is not None:
    events.close()
with open(status, "a") as s:
    s.write(json.dumps({"exit": True, "time": time.time()}) + "\n")
"""


def _epoch_s(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def train(ckpts: Path, root: Path, tmp_path: Path, d: Daemon, *, hold_open: bool
          ) -> tuple[Path, float, list[dict[str, Any]]]:
    """Run the trainer to completion while the daemon watches; fail at once if it touches the run.

    Returns last.pt, the trainer's exit time (wall clock) and the audit events seen until then.
    """
    run = root / "train" / "live"
    last = run / "weights" / "last.pt"
    status = tmp_path / "trainer-status.jsonl"
    cfg = {"weights": str(last.parent), "template": str(ckpts / "yolov5.pt"),
           "epochs": list(EPOCHS), "hold_open": hold_open, "status": str(status)}
    d.wait_events("daemon.started", 1, timeout=60)
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, json.dumps(cfg)],
                               env=clean_env())
    touching = ("run.finished", "ckpt.stripped", "ckpt.failed", "ckpt.skipped")

    def trainer_done() -> bool:
        premature = [e for e in d.events() if e["event"] in touching]
        assert premature == [], f"the daemon acted on a live run: {premature}"
        assert d.alive(), d.stderr_tail()
        return trainer.poll() is not None

    try:
        wait_until(trainer_done, timeout=90, what="the trainer to finish its epochs",
                   detail=d.stderr_tail)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        trainer.wait(timeout=30)
    assert trainer.returncode == 0
    lines = [json.loads(x) for x in status.read_text().splitlines()]
    assert lines[-1].get("exit") and len(lines) == len(EPOCHS) + 1
    return last, lines[-1]["time"], d.events()


def _after_exit(d: Daemon, last: Path, exited: float) -> None:
    """After the trainer exits: its run is stripped once, and nothing happened before the exit."""
    stripped = d.wait_events("ckpt.stripped", 1, timeout=90, path=str(last))
    assert is_valid_stripped(last)
    touching = [e for e in d.events() if e["event"] in ("run.finished", "ckpt.stripped")]
    assert all(_epoch_s(e) >= exited for e in touching), touching
    assert [e["event"] for e in touching] == ["run.finished", "ckpt.stripped"]
    assert len(stripped) == 1 and temp_files(last.parent) == []


@pytest.mark.timeout(200)
def test_trainer_holding_a_log_open_is_never_stripped_mid_epoch(
        ckpts: Path, root: Path, tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    """--settle 2 is shorter than the 5 s epoch: the open event file keeps the run alive."""
    d = daemons(root, "--settle", "2", "--workers", "1")
    last, exited, seen = train(ckpts, root, tmp_path, d, hold_open=True)
    # the time rule did call the run quiet during the long epoch; the open file is what held it
    busy = [e for e in seen if e["event"] == "run.busy"]
    assert busy and busy[0]["run"] == str(last.parent.parent)
    _after_exit(d, last, exited)


@pytest.mark.timeout(200)
def test_settle_longer_than_the_long_epoch_protects_a_trainer_without_open_files(
        ckpts: Path, root: Path, tmp_path: Path, daemons: Callable[..., Daemon]) -> None:
    """A trainer that holds nothing open survives its 5 s epoch when --settle is 6 s."""
    d = daemons(root, "--settle", "6", "--workers", "1")
    last, exited, seen = train(ckpts, root, tmp_path, d, hold_open=False)
    assert not [e for e in seen if e["event"] == "run.busy"]  # the time rule alone held it
    _after_exit(d, last, exited)
