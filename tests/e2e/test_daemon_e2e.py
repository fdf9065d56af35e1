"""End-to-end behaviour of `python -m ckpt_watchd` as a subprocess: live runs, restarts, modes.

Each test drives the real CLI with real files and a simulated trainer process and judges it by its
audit trail, exit code and the bytes on disk; waits are polls with deadlines, never bare sleeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    TRAINER,
    Daemon,
    Templates,
    clean_env,
    is_valid_stripped,
    make_run,
    sha256_file,
    temp_files,
    wait_until,
)

pytestmark = pytest.mark.e2e
Daemons = Callable[..., Daemon]


def trainer_lines(status: Path) -> list[dict[str, Any]]:
    try:
        text = status.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def start_trainer(weights: Path, templates: Templates, status: Path, *args: str
                  ) -> subprocess.Popen[bytes]:
    sources = [a for t in templates.medium for a in ("--source", str(t.path))]
    return subprocess.Popen([sys.executable, str(TRAINER), "--weights", str(weights), *sources,
                             "--status", str(status), *args], env=clean_env(),
                            stdin=subprocess.DEVNULL)


def snapshot(weights: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime_ns of each checkpoint: what "untouched" means."""
    return {p.name: (sha256_file(p), p.stat().st_mtime_ns) for p in sorted(weights.glob("*.pt"))}


def test_live_trainer_is_left_alone_then_stripped_after_sigkill(
        root: Path, tmp_path: Path, templates: Templates, daemons: Daemons) -> None:
    """A trainer rewriting last.pt every second is never stripped; after SIGKILL both files are."""
    d = daemons(root, settle=2, notify=True)
    d.wait_ready()
    weights = root / "train" / "exp" / "weights"
    run = str(weights.parent)
    status, park = tmp_path / "trainer.status", tmp_path / "trainer.park"
    sources = [t.data for t in templates.medium]
    trainer = start_trainer(weights, templates, status, "--park", str(park))
    try:
        started = time.monotonic()

        def ran_ten_seconds_untouched() -> bool:
            assert trainer.poll() is None, "the simulated trainer died"
            early = [e for e in d.events() if e["event"] in (
                "run.finished", "ckpt.stripped", "ckpt.failed", "ckpt.would_strip")]
            assert not early, f"the daemon acted on a live run: {early}"
            for name in ("last.pt", "best.pt"):
                try:
                    data = (weights / name).read_bytes()
                except FileNotFoundError:
                    continue
                # mid-write the file is a prefix of what the trainer writes; a strip never is
                assert any(s.startswith(data) for s in sources), f"{name} is not the trainer's"
            return len(trainer_lines(status)) >= 11 and time.monotonic() - started >= 10

        wait_until(ran_ten_seconds_untouched, 90, "the trainer to run 11 epochs over 10+ s",
                   interval=0.2, detail=d.stderr_tail)
        park.touch()
        wait_until(lambda: any(x.get("parked") for x in trainer_lines(status)), 30,
                   "the trainer to park between two epochs")
        trainer.kill()
        trainer.wait(timeout=10)
        epochs = [x for x in trainer_lines(status) if "epoch" in x]
        expected = {"last.pt": epochs[-1]["sha256"],
                    "best.pt": next(x["sha256"] for x in reversed(epochs)
                                    if "best.pt" in x["files"])}
        assert {n: sha256_file(weights / n) for n in expected} == expected

        stripped = d.wait_events("ckpt.stripped", 2, timeout=30, run=run)
        finished = d.events("run.finished", run=run)
        assert len(finished) == 1
        assert finished[0]["cadence_s"] >= 0.5, "the trainer's epoch time was not learned"
        assert finished[0]["quiet_s"] >= 2
        assert sorted(e["path"] for e in stripped) == sorted(str(weights / n) for n in expected)
        for e in stripped:
            assert e["sha256_before"] == expected[Path(e["path"]).name]
            assert e["bytes_after"] < e["bytes_before"]
            assert sha256_file(Path(e["path"])) == e["sha256_after"]
            assert is_valid_stripped(Path(e["path"]))
        assert d.terminate() == 0
        assert len(d.events("ckpt.stripped", run=run)) == 2
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()


def test_runs_finished_while_down_are_stripped_at_start_and_never_again(
        root: Path, templates: Templates, daemons: Daemons) -> None:
    """Three runs that ended before start-up are stripped; a second start strips nothing."""
    runs = [make_run(root, f"train/exp{i}", templates.medium[i]) for i in range(3)]
    originals = {str(w / n): t.sha256 for w, t in zip(runs, templates.medium, strict=True)
                 for n in ("last.pt", "best.pt")}
    d = daemons(root, settle=2)
    stripped = d.wait_events("ckpt.stripped", 6, timeout=60)
    assert d.terminate() == 0
    assert sorted(e["path"] for e in stripped) == sorted(originals)
    assert all(e["sha256_before"] == originals[e["path"]] for e in stripped)
    assert all(is_valid_stripped(Path(p)) for p in originals)
    before = {str(w): snapshot(w) for w in runs}

    again = daemons(root, settle=2, notify=True)
    # every run went through its quiet period and was found done: nothing settling or queued
    again.wait_ready(status="watching 3 runs, 0 settling, 0 queued")
    assert again.terminate() == 0
    assert {str(w): snapshot(w) for w in runs} == before
    assert not again.events("ckpt.stripped") and not again.events("run.finished")
    stopped = again.events("daemon.stopped")
    assert len(stopped) == 1 and stopped[0]["stripped"] == 0


def test_once_strips_quiet_runs_and_exits_0(
        tmp_path: Path, root: Path, templates: Templates, daemons: Daemons) -> None:
    """`--once` strips every quiet run and exits 0; a second `--once` rewrites nothing."""
    runs = [make_run(root, f"train/exp{i}", templates.medium[i]) for i in range(3)]
    d = daemons(root, "--once", settle=0.2)
    assert d.proc is not None and d.proc.wait(timeout=120) == 0, d.stderr_tail()
    stripped = d.events("ckpt.stripped")
    assert sorted(e["path"] for e in stripped) == sorted(
        str(w / n) for w in runs for n in ("last.pt", "best.pt"))
    assert d.events("daemon.stopped")[0]["stripped"] == 6
    assert all(is_valid_stripped(w / n) for w in runs for n in ("last.pt", "best.pt"))
    before = {str(w): snapshot(w) for w in runs}
    newest = max(m for s in before.values() for _sha, m in s.values()) / 1e9
    # the second pass must see the runs as quiet, or "it stripped nothing" would prove nothing
    wait_until(lambda: time.time() - newest > 0.5, 10, "the stripped files to age past --settle")

    again = daemons(root, "--once", settle=0.2)
    assert again.proc is not None and again.proc.wait(timeout=120) == 0, again.stderr_tail()
    assert not again.events("ckpt.stripped")
    assert again.events("daemon.stopped")[0]["stripped"] == 0
    assert {str(w): snapshot(w) for w in runs} == before


@pytest.mark.parametrize("drain", [30.0, 0.2], ids=["drained", "cancelled"])
def test_sigterm_with_a_strip_in_flight_exits_0_and_leaves_no_temp(
        root: Path, templates: Templates, daemons: Daemons, drain: float) -> None:
    """SIGTERM mid-strip: exit 0 within the drain timeout, daemon.stopped, no temp, files whole.

    A job still queued at SIGTERM is not in flight: it is handed back (the next start strips it).
    """
    weights = make_run(root, "train/exp", templates.medium[0])
    d = daemons(root, "--drain-timeout", f"{drain:g}", settle=2)
    d.wait_events("run.finished", 1, timeout=30)  # both jobs are now with the pool
    wait_until(lambda: temp_files(root) or d.events("ckpt.stripped"), 60,
               "a strip to be in flight (its temp file) or done", interval=0.002)
    assert d.terminate(timeout=drain + 20) == 0, d.stderr_tail()
    assert len(d.events("daemon.stopped")) == 1
    assert temp_files(root) == []
    outcomes = {e["path"]: e for e in d.events() if e["event"].startswith("ckpt.")}
    for name in ("last.pt", "best.pt"):
        path = weights / name
        if sha256_file(path) == templates.medium[0].sha256:
            assert outcomes.get(str(path), {}).get("event") in (None, "ckpt.failed")
        else:
            assert is_valid_stripped(path)
            assert outcomes[str(path)]["event"] == "ckpt.stripped"
    if drain == 30.0:  # in-flight strips are allowed to finish: none is cancelled
        assert d.events("ckpt.stripped") and not d.events("ckpt.failed")


def test_dry_run_audits_would_strip_and_changes_nothing(
        root: Path, templates: Templates, daemons: Daemons) -> None:
    """`--dry-run` audits ckpt.would_strip for each file and leaves the bytes and mtimes alone."""
    weights = make_run(root, "train/exp", templates.medium[0])
    before = snapshot(weights)
    d = daemons(root, "--dry-run", settle=2)
    would = d.wait_events("ckpt.would_strip", 2, timeout=60)
    assert d.terminate() == 0
    assert sorted(e["path"] for e in would) == [str(weights / "best.pt"), str(weights / "last.pt")]
    assert all(e["bytes_after"] < e["bytes_before"] for e in would)
    assert not d.events("ckpt.stripped")
    assert snapshot(weights) == before
    assert temp_files(root) == []


def test_keep_marker_and_exclude_glob_are_never_touched(
        root: Path, templates: Templates, daemons: Daemons) -> None:
    """A run with .ckpt-watchd-keep is audited run.kept, an --exclude'd run is ignored."""
    marked = make_run(root, "train/marked", templates.medium[0])
    (marked.parent / ".ckpt-watchd-keep").touch()
    excluded = make_run(root, "train/keep1", templates.medium[1])
    control = make_run(root, "train/normal", templates.medium[2])
    before = {w: snapshot(w) for w in (marked, excluded)}
    d = daemons(root, "--exclude", "train/keep*", settle=2)
    # the control run is stripped in the same round as the other two are decided
    d.wait_events("ckpt.stripped", 2, timeout=60, run=str(control.parent))
    kept = d.wait_events("run.kept", 1, timeout=10)
    assert d.terminate() == 0
    assert [e["run"] for e in kept] == [str(marked.parent)]
    assert {w: snapshot(w) for w in (marked, excluded)} == before
    mentions = [e for e in d.events() if str(excluded.parent) in json.dumps(e)]
    assert mentions == [], "an excluded run must not even be discovered"
    assert not [e for e in d.events() if e["event"].startswith("ckpt.")
                and str(marked.parent) in e["path"]]


def test_startup_errors_exit_2_with_one_line(tmp_path: Path, root: Path) -> None:
    """A missing root, a state dir that cannot exist, or a bad value: exit 2, one stderr line."""
    config = tmp_path / "empty.toml"
    config.touch()
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("not a folder\n")
    cases = {
        "root": (["--root", str(tmp_path / "missing")], str(tmp_path / "missing")),
        "state dir": (["--root", str(root), "--state-dir", str(blocker / "state")], "state"),
        "settle": (["--root", str(root), "--settle", "0"], "--settle"),
    }
    for what, (args, needle) in cases.items():
        r = subprocess.run([sys.executable, "-m", "ckpt_watchd", "--log-format", "json",
                            "--config", str(config), *args], capture_output=True, timeout=60,
                           env=clean_env(), cwd=tmp_path, stdin=subprocess.DEVNULL)
        lines = r.stderr.decode().strip().splitlines()
        assert r.returncode == 2, (what, r.returncode, lines)
        assert len(lines) == 1, (what, lines)
        assert lines[0].startswith("ckpt-watchd: error:") and needle in lines[0], (what, lines)
    assert not (root / ".ckpt-watchd").exists() or not os.listdir(root / ".ckpt-watchd")


def test_resumed_run_is_tracked_again_and_stripped_again(
        root: Path, tmp_path: Path, templates: Templates, daemons: Daemons) -> None:
    """A stripped run whose trainer writes last.pt again is stripped again once it stops."""
    weights = make_run(root, "train/exp", templates.medium[0])
    last = str(weights / "last.pt")
    d = daemons(root, settle=2)
    d.wait_events("ckpt.stripped", 2, timeout=60)
    status = tmp_path / "resume.status"
    trainer = start_trainer(weights, templates, status, "--epochs", "3", "--best-every", "0")
    assert trainer.wait(timeout=60) == 0
    final = trainer_lines(status)[-1]["sha256"]
    assert sha256_file(weights / "last.pt") == final

    twice = d.wait_events("ckpt.stripped", 2, timeout=30, path=last)
    assert twice[0]["sha256_before"] == templates.medium[0].sha256
    assert twice[1]["sha256_before"] == final
    assert is_valid_stripped(weights / "last.pt")
    assert len(d.events("ckpt.stripped", path=str(weights / "best.pt"))) == 1
    assert len(d.events("run.finished", run=str(weights.parent))) == 2
    assert d.terminate() == 0


@pytest.mark.parametrize("args", [(), ("--no-follow-writers",)], ids=["default", "off"])
def test_the_daemon_says_whether_it_follows_writer_pids(root: Path, daemons: Daemons,
                                                        args: tuple[str, ...]) -> None:
    """daemon.started names how writers are followed: fanotify where allowed, else why not."""
    d = daemons(root, *args)
    started = d.wait_events("daemon.started", 1, timeout=30)[0]
    if args:
        assert started["writer_pids"] == "off: --no-follow-writers"
    elif os.geteuid() == 0:  # root here: CAP_SYS_ADMIN, unless a container took it away
        assert started["writer_pids"] in ("fanotify", "unavailable: fanotify needs CAP_SYS_ADMIN")
    else:
        assert started["writer_pids"] == "unavailable: fanotify needs CAP_SYS_ADMIN"
    assert started["settings"]["follow_writers"] is not bool(args)
    assert d.terminate() == 0


@pytest.mark.parametrize("tensorboard", [True, False], ids=["events-file-open", "no-open-file"])
def test_a_five_times_longer_epoch_is_not_taken_for_the_end_of_the_run(
        root: Path, tmp_path: Path, templates: Templates, daemons: Daemons,
        tensorboard: bool) -> None:
    """A trainer whose 6th epoch takes 5x as long as the others is never stripped while it runs."""
    d = daemons(root, settle=2, notify=True)
    d.wait_ready()
    writer_pids = d.events("daemon.started")[0]["writer_pids"]
    follows_writers = writer_pids == "fanotify"
    weights = root / "train" / "exp" / "weights"
    status = tmp_path / "irregular.status"
    trainer = start_trainer(weights, templates, status, "--epochs", "9", "--slow-epoch", "5",
                            "--slow-factor", "5", "--best-every", "4",
                            *(["--tensorboard"] if tensorboard else []))
    try:
        def ran_to_the_end_untouched() -> bool:
            early = [e for e in d.events() if e["event"] in (
                "run.finished", "ckpt.stripped", "ckpt.failed", "ckpt.skipped")]
            done = [x["epoch"] for x in trainer_lines(status)]
            if early and not tensorboard and not follows_writers and done and done[-1] == 4 \
                    and trainer.poll() is None:
                # quiet period = max(settle, 3 x longest gap so far) = 3 s < the 5 s epoch, this
                # trainer holds no file open, and without fanotify (CAP_SYS_ADMIN) the daemon
                # cannot learn which process wrote the run
                pytest.xfail("known design limit: a first epoch more than 3x longer than any "
                             "before (and than --settle) in a trainer without an open file in "
                             f"its run, with writer pids {writer_pids!r}, is taken for the end: "
                             f"{early[0]['event']} quiet_s={early[0].get('quiet_s')} during the "
                             "slow epoch")
            assert not early, f"the daemon acted on a live run: {early}"
            return trainer.poll() is not None

        wait_until(ran_to_the_end_untouched, 90, "the irregular trainer to finish", interval=0.1,
                   detail=d.stderr_tail)
        assert trainer.returncode == 0
        assert {e["pid"] for e in d.events("run.busy")} <= {trainer.pid}
        stripped = d.wait_events("ckpt.stripped", 2, timeout=60)
        assert sorted(e["path"] for e in stripped) == [str(weights / "best.pt"),
                                                      str(weights / "last.pt")]
        assert d.terminate() == 0
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
