"""Path rules, scans and the watchdog adapter on a real filesystem (a real inotify observer)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from ckpt_watchd.watch import paths, watcher

PATTERNS = ("train/*/weights", "*/*/weights")

# watchdog 7 warns on its own observer thread when a folder is re-added after an overflow re-walk;
# under filterwarnings=error that warning would kill the observer thread mid-test
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")


def wait_for(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        threading.Event().wait(0.02)
    return bool(cond())


@pytest.mark.parametrize(("rel", "expected"), [
    ("train/exp/weights", True), ("detect/train3/weights", True), ("train/exp", False),
    ("a/b/c/weights", False), ("train/.ckpt-watchd-x/weights", False), ("weights", False)])
def test_weights_dir_rules(rel: str, expected: bool) -> None:
    """Which folders are weights folders under the default patterns; `*` never crosses `/`."""
    assert paths.is_weights_dir(rel, PATTERNS) is expected


def test_prefix_and_exclude_rules() -> None:
    """Task/run folders may still gain weights/; --exclude matches a run or any parent of it."""
    assert paths.could_contain_weights_dir("train", PATTERNS)
    assert paths.could_contain_weights_dir("train/exp", PATTERNS)
    assert not paths.could_contain_weights_dir("train/exp/weights", PATTERNS)
    assert paths.remaining_patterns("detect", PATTERNS) == ["*/weights"]
    assert paths.is_excluded("train/keep-1", ["train/keep-*"])
    assert paths.is_excluded("segment/x", ["segment"])
    assert not paths.is_excluded("train/exp", ["train/keep-*"])
    assert paths.is_own_file(".ckpt-watchd-last.pt.1234.tmp")


def test_scan_finds_weights_dirs_without_following_symlinks(tmp_path: Path) -> None:
    """The scan finds both layouts, skips our state dir, and never follows a symlink out."""
    root = tmp_path / "runs"
    for rel in ("train/a/weights", "detect/b/weights", ".ckpt-watchd/x/weights"):
        (root / rel).mkdir(parents=True)
    outside = tmp_path / "outside" / "c" / "weights"
    outside.mkdir(parents=True)
    (root / "segment").symlink_to(tmp_path / "outside")
    found = set(watcher.find_weights_dirs(root, PATTERNS, skip=[root / ".ckpt-watchd"]))
    assert found == {root / "train/a/weights", root / "detect/b/weights"}
    below = set(watcher.find_weights_dirs(root, PATTERNS, below=root / "detect"))
    assert below == {root / "detect/b/weights"}


def test_probe_reports_files_and_keep_marker(tmp_path: Path) -> None:
    """probe() stats the checkpoint files (a folder named last.pt is reported, not followed)."""
    wdir = tmp_path / "train/a/weights"
    wdir.mkdir(parents=True)
    (wdir / "best.pt").write_bytes(b"x" * 10)
    (wdir / "last.pt").mkdir()
    p = watcher.probe(wdir, ("last.pt", "best.pt"))
    assert [(f[0], f[1], f[3]) for f in p.files][1] == ("best.pt", "f", 10)
    assert p.files[0][:2] == ("last.pt", "x")
    assert not p.kept
    (wdir.parent / paths.KEEP_MARKER).touch()
    assert watcher.probe(wdir, ("last.pt",)).kept


def test_cadence_hint_from_run_records(tmp_path: Path) -> None:
    """Epoch time estimate: (last write - args.yaml time) / rows of results.csv."""
    run = tmp_path / "exp"
    run.mkdir()
    (run / "args.yaml").write_text("x: 1\n")
    os.utime(run / "args.yaml", (1000.0, 1000.0))
    (run / "results.csv").write_text("epoch,loss\n0,1\n1,1\n2,1\n3,1\n")
    assert watcher.cadence_hint(run, 1400.0) == 100.0
    assert watcher.cadence_hint(tmp_path / "nothing", 1400.0) is None


def test_observer_hints_the_weights_dir_and_ignores_own_files(tmp_path: Path) -> None:
    """A checkpoint write hints its weights folder; our temp files and the state dir hint nothing."""
    root = tmp_path / "runs"
    wdir = root / "train/exp/weights"
    wdir.mkdir(parents=True)
    (root / ".ckpt-watchd").mkdir()
    wake = threading.Event()
    hints = watcher.Hints(wake)
    w = watcher.Watcher(root, PATTERNS, ("last.pt",), hints, ignore=[root / ".ckpt-watchd"],
                        warn=lambda m: None)
    w.start()
    try:
        assert w.mode == "inotify" and w.alive()
        (root / ".ckpt-watchd" / "audit.jsonl").write_text("x")
        (wdir / ".ckpt-watchd-last.pt.ab.tmp").write_text("x")
        (wdir / "notes.txt").write_text("x")
        (wdir / "last.pt").write_bytes(b"data")
        collected: set[Path] = set()

        def got() -> bool:
            runs, _ = hints.drain()
            collected.update(runs)
            return wdir in collected

        assert wait_for(got)
        assert collected == {wdir}
        new = root / "detect" / "v8"
        new.mkdir(parents=True)
        assert wait_for(lambda: new in hints.drain()[1] or False)
    finally:
        w.stop()


def test_every_scanned_folder_is_really_watched(tmp_path: Path) -> None:
    """With inotify's limit not reached, the kernel's own list covers every weights folder."""
    root = tmp_path / "runs"
    for i in range(20):
        (root / f"train/r{i}/weights").mkdir(parents=True)
    w = watcher.Watcher(root, PATTERNS, ("last.pt",), watcher.Hints(threading.Event()), ignore=[],
                        warn=lambda m: None)
    w.start()
    try:
        watched = watcher.watched_inodes()
        assert watched is not None
        dirs = list(watcher.find_weights_dirs(root, PATTERNS))
        assert len(dirs) == 20 and watcher.unwatched(dirs, watched) == []
        assert watcher.unwatched(dirs, set()) == dirs
    finally:
        w.stop()


def test_run_in_use_sees_writers_not_readers(tmp_path: Path) -> None:
    """A child holding a file in the run open for writing marks it busy; a reader does not."""
    import subprocess
    import sys

    run = tmp_path / "exp"
    run.mkdir()
    log = run / "events.out"
    log.write_bytes(b"")
    code = "import sys,time; f=open(sys.argv[1], sys.argv[2]); print('ok', flush=True); time.sleep(60)"
    for mode, busy in (("rb", False), ("ab", True)):
        p = subprocess.Popen([sys.executable, "-c", code, str(log), mode], stdout=subprocess.PIPE)
        try:
            assert p.stdout is not None and p.stdout.readline() == b"ok\n"
            assert (watcher.run_in_use(run) == p.pid) is busy
        finally:
            p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
    assert watcher.run_in_use(run) is None
