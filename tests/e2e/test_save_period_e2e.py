"""End-to-end: a run that writes save-period snapshots (`epoch<N>.pt`) beside last.pt and best.pt,
the way YOLOv5 (`--save-period`) and Ultralytics (`save_period`) do, with and without
`--strip-superseded`, and a superseded checkpoint the trainer deletes while the daemon strips it.

The simulated trainer waits between epochs for the test (`--steps`), so every comparison is made
while it holds still: what it wrote is compared by bytes, inode and mtime, and "while the run is
live" means while the trainer process waits for its next epoch. It keeps a TensorBoard file open,
as both trainers do, so a quiet run whose trainer still runs is `run.busy`, never finished, however
long the test holds it. Waits are polls with deadlines on the trainer's status and the audit.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from fixtures import harness
from fixtures.daemon_io import clean_env

from .conftest import (
    E2E_DIR,
    TRAINER,
    Daemon,
    Templates,
    is_valid_stripped,
    make_run,
    proc_stat,
    sha256_file,
    temp_files,
    wait_until,
)
from .test_daemon_e2e import trainer_lines

pytestmark = pytest.mark.e2e
Daemons = Callable[..., Daemon]
STOP_HOOK = E2E_DIR / "stop_hook"  # its sitecustomize stops one strip with its copy written

Ident = tuple[str, int, int]  # sha256, inode, mtime_ns: what "untouched" means


def ident(path: Path) -> Ident:
    st = os.stat(path)
    return sha256_file(path), st.st_ino, st.st_mtime_ns


class Trainer:
    """`trainer_sim.py --steps --save-period 1 --tensorboard`: the test starts each epoch.

    `written` holds each file as the trainer last left it, taken while it waits for its next step.
    """

    def __init__(self, weights: Path, sources: Sequence[Path], tmp: Path, *args: str) -> None:
        self.weights = weights
        self.status = tmp / "trainer.status"
        fifo = tmp / "trainer.steps"
        os.mkfifo(fifo)
        # read-write: opening never blocks, and the trainer sees the end only when we close it
        self.fd: int | None = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
        argv = [sys.executable, str(TRAINER), "--weights", str(weights), "--status",
                str(self.status), "--steps", str(fifo), "--save-period", "1", "--tensorboard",
                "--chunk-delay", "0.001", *[a for s in sources for a in ("--source", str(s))],
                *args]
        self.proc = subprocess.Popen(argv, env=clean_env(), stdin=subprocess.DEVNULL)
        self.written: dict[str, Ident] = {}

    def epoch(self, n: int) -> dict[str, Any]:
        """Wait until epoch `n` is saved, and take what the trainer left in each file it wrote."""
        def saved() -> dict[str, Any] | None:
            line = next((x for x in trainer_lines(self.status) if x.get("epoch") == n), None)
            if line is None:
                assert self.proc.poll() is None, f"the trainer exited ({self.proc.returncode})"
            return line

        line = wait_until(saved, 60, f"the trainer to save epoch {n}")
        for name in line["files"]:
            self.written[name] = ident(self.weights / name)
            assert self.written[name][0] == line["sha256"]
        return line

    def untouched(self, *, but: Sequence[str] = ()) -> dict[str, tuple[Ident, Ident]]:
        """The files (but those named) that are not as the trainer left them: name -> (now, then)."""
        out = {}
        for name, then in self.written.items():
            now = ident(self.weights / name)
            if name not in but and now != then:
                out[name] = (now, then)
        return out

    def send(self, command: str) -> None:
        assert self.fd is not None
        os.write(self.fd, f"{command}\n".encode())

    def next(self) -> None:
        self.send("next")

    def rm(self, name: str) -> None:
        """The trainer deletes weights/NAME (a rotation), and says so."""
        self.send(f"rm {name}")
        wait_until(lambda: {"removed": name} in trainer_lines(self.status), 30,
                   f"the trainer to delete {name}")

    def finish(self, timeout: float = 60) -> int:
        """End the run (end of its steps) and wait for the trainer to exit."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def ultralytics_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unstripped Ultralytics-shaped checkpoint (tests/fixtures/generate.py)."""
    out = tmp_path_factory.mktemp("ultralytics-ckpt")
    harness.generate(out, ["ultralytics"])
    return out / "ultralytics.pt"


def warm_daemon(daemons: Daemons, root: Path, templates: Templates, *args: str) -> Daemon:
    """A daemon (--settle 1) that has stripped a finished run first, so its worker is up.

    The test holds the trainer until a superseded checkpoint is stripped; with a cold worker that
    wait would include torch's import, making the trainer's cadence, and so the run's quiet
    period at the end, that much longer.
    """
    warm_up = make_run(root, "train/warm-up", templates.small, files=("last.pt",))
    d = daemons(root, *args, settle=1)
    d.wait_events("ckpt.stripped", 1, timeout=60, run=str(warm_up.parent))
    return d


def live_actions(d: Daemon, run: str) -> list[dict[str, Any]]:
    """What the daemon did to the run's files, or decided about it, so far."""
    return [e for e in d.events() if e.get("run") == run and (
        e["event"].startswith("ckpt.") or e["event"] == "run.finished")]


def test_save_period_run_is_untouched_while_it_trains_then_every_file_is_stripped(
        root: Path, tmp_path: Path, ultralytics_pt: Path, daemons: Daemons) -> None:
    """Without --strip-superseded: epochN.pt, last.pt and best.pt stay as written while the
    trainer runs (also once the run looked quiet); when it has ended, each of them is stripped."""
    d = daemons(root, settle=1, notify=True)
    d.wait_ready()
    weights = root / "detect" / "train" / "weights"  # Ultralytics' layout
    run = str(weights.parent)
    t = Trainer(weights, [ultralytics_pt], tmp_path, "--best-every", "2")
    try:
        for epoch in range(4):
            t.epoch(epoch)
            if epoch == 2:
                # epoch0/1.pt are superseded and quiet for --settle, the run quiet for its quiet
                # period: the daemon looked, found the trainer alive, and left the run alone
                busy = d.wait_events("run.busy", 1, timeout=60, run=run)
                assert busy[0]["pid"] == t.proc.pid
            assert t.untouched() == {}
            assert live_actions(d, run) == []
            if epoch < 3:
                t.next()
        assert t.finish() == 0
        names = ["best.pt", "epoch0.pt", "epoch1.pt", "epoch2.pt", "epoch3.pt", "last.pt"]
        finished = d.wait_events("run.finished", 1, timeout=60, run=run)
        assert finished[0]["files"] == [str(weights / n) for n in names]
        stripped = d.wait_events("ckpt.stripped", len(names), timeout=60, run=run)
        assert sorted(e["path"] for e in stripped) == [str(weights / n) for n in names]
        events = d.events()
        assert events.index(finished[0]) < min(events.index(e) for e in stripped)
        for e in stripped:
            name = Path(e["path"]).name
            assert e["profile"] == "ultralytics"
            assert e["sha256_before"] == t.written[name][0]
            assert e["bytes_after"] < e["bytes_before"]
            assert sha256_file(weights / name) == e["sha256_after"]
            assert is_valid_stripped(weights / name)
        assert not d.events("ckpt.superseded") and not d.events("ckpt.failed")
        assert temp_files(root) == []
        assert d.terminate() == 0
    finally:
        t.close()


@pytest.mark.parametrize("keep", [1, 2])
def test_strip_superseded_strips_each_replaced_epoch_while_the_run_trains(
        root: Path, tmp_path: Path, templates: Templates, daemons: Daemons, keep: int) -> None:
    """--strip-superseded: every epochN.pt with `keep` newer ones is stripped while the trainer
    waits for its next epoch; the newest `keep`, last.pt and best.pt stay as written until the
    end, and then are stripped too. Each file is stripped once."""
    opts = ["--strip-superseded", *(["--keep-resumable", str(keep)] if keep != 1 else [])]
    d = warm_daemon(daemons, root, templates, *opts)
    weights = root / "train" / "exp" / "weights"
    run = str(weights.parent)
    epochs = 4
    t = Trainer(weights, [m.path for m in templates.medium], tmp_path, "--best-every", "2")
    try:
        for epoch in range(epochs):
            t.epoch(epoch)
            old = [f"epoch{k}.pt" for k in range(epoch - keep + 1)]
            for name in old:  # the trainer waits meanwhile: the run is live
                d.wait_events("ckpt.stripped", 1, timeout=60, path=str(weights / name))
            stripped = d.events("ckpt.stripped", run=run)
            assert sorted(Path(e["path"]).name for e in stripped) == sorted(old)
            for e in stripped:
                name = Path(e["path"]).name
                assert e["sha256_before"] == t.written[name][0]
                assert is_valid_stripped(weights / name)
            assert t.untouched(but=old) == {}
            assert t.proc.poll() is None and not d.events("run.finished", run=run)
            if epoch < epochs - 1:
                t.next()
        superseded = d.events("ckpt.superseded")
        assert [e["path"] for e in superseded] == [
            str(weights / f"epoch{k}.pt") for k in range(epochs - keep)]
        assert {(e["run"], e["keep_resumable"]) for e in superseded} == {(run, keep)}
        assert t.finish() == 0

        rest = sorted(["best.pt", "last.pt", *(f"epoch{k}.pt" for k in range(epochs - keep,
                                                                              epochs))])
        finished = d.wait_events("run.finished", 1, timeout=60, run=run)
        assert finished[0]["files"] == [str(weights / n) for n in rest]
        stripped = d.wait_events("ckpt.stripped", epochs + 2, timeout=60, run=run)
        count = collections.Counter(Path(e["path"]).name for e in stripped)
        assert count == collections.Counter([*(f"epoch{k}.pt" for k in range(epochs)),
                                             "last.pt", "best.pt"])
        for e in stripped[epochs - keep:]:  # the ones stripped at the end
            assert e["sha256_before"] == t.written[Path(e["path"]).name][0]
        assert all(is_valid_stripped(weights / n) for n in count)
        assert not d.events("ckpt.failed") and not d.events("ckpt.skipped")
        assert temp_files(root) == []
        assert d.terminate() == 0
    finally:
        t.close()


def is_stopped(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] in ("T", "t")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def test_a_superseded_epoch_the_trainer_deletes_mid_strip_is_vanished_not_failed(
        root: Path, tmp_path: Path, templates: Templates, daemons: Daemons,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer deletes epoch0.pt while its strip is stopped with the stripped copy written:
    ckpt.vanished, no failure, no temp file left, and epoch0.pt stays deleted."""
    weights = root / "train" / "exp" / "weights"
    victim = weights / "epoch0.pt"
    stopped = tmp_path / "stopped.json"
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(STOP_HOOK), *python_path]))
    monkeypatch.setenv("CKPT_E2E_STOP_STRIP_OF", str(victim))
    monkeypatch.setenv("CKPT_E2E_STOPPED", str(stopped))
    d = warm_daemon(daemons, root, templates, "--strip-superseded")
    t = Trainer(weights, [templates.medium[0].path], tmp_path, "--best-every", "0")
    job: int | None = None
    try:
        t.epoch(0)
        t.next()
        t.epoch(1)  # epoch0.pt is superseded now: its strip starts once it is quiet for --settle
        record = wait_until(lambda: read_json(stopped), 60,
                            "the strip of epoch0.pt to stop with its copy written",
                            detail=d.stderr_tail)
        job = pid = int(record["pid"])
        wait_until(lambda: is_stopped(pid), 30, f"the job process {pid} to stop")
        assert temp_files(root) == [Path(record["temp"])]
        t.rm("epoch0.pt")  # the trainer's own rotation, in the middle of the strip
        os.kill(pid, signal.SIGCONT)
        job = None

        vanished = d.wait_events("ckpt.vanished", 1, timeout=60, path=str(victim))
        assert vanished[0]["run"] == str(weights.parent)
        assert "removed" in vanished[0]["reason"]
        assert [e["event"] for e in d.events() if e.get("path") == str(victim)] == [
            "ckpt.superseded", "ckpt.vanished"]
        assert not victim.exists(), "the deleted checkpoint came back as the stripped copy"
        assert temp_files(root) == []

        assert t.finish() == 0  # the rest of the run is stripped at its end, as usual
        stripped = d.wait_events("ckpt.stripped", 2, timeout=60, run=str(weights.parent))
        assert sorted(e["path"] for e in stripped) == [str(weights / "epoch1.pt"),
                                                      str(weights / "last.pt")]
        assert not d.events("ckpt.failed") and not d.events("ckpt.skipped")
        assert sorted(p.name for p in weights.iterdir()) == ["epoch1.pt", "last.pt"]
        assert d.terminate() == 0
        counts = d.events("daemon.stopped")[0]
        assert (counts["failed"], counts["vanished"], counts["stripped"]) == (0, 1, 3)
    finally:
        if job is not None:
            os.kill(job, signal.SIGCONT)
        t.close()
