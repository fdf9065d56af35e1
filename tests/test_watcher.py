"""Path rules, discovery and the watchdog adapter on a real filesystem (a real inotify observer)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from ckpt_watchd.watch import discover, paths, watcher

PATTERNS = ("train/*/weights", "*/*/weights")
FILES = ("last.pt", "best.pt", "epoch*.pt")


def where(root: Path, **kw: object) -> discover.Where:
    return discover.Where(root, PATTERNS, FILES, **kw)  # type: ignore[arg-type]

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


def test_double_star_matches_any_number_of_folders() -> None:
    """`**` in a pattern matches zero or more whole folders (YOLO runs anywhere below the root)."""
    deep = ("**/runs/train/*/weights",)
    assert paths.is_weights_dir("runs/train/exp/weights", deep)
    assert paths.is_weights_dir("team/a/runs/train/exp/weights", deep)
    assert not paths.is_weights_dir("team/a/runs/train/exp", deep)


def test_exclude_rules() -> None:
    """--exclude matches a run or any parent of it; our own names are recognised."""
    assert paths.is_excluded("train/keep-1", ["train/keep-*"])
    assert paths.is_excluded("segment/x", ["segment"])
    assert not paths.is_excluded("train/exp", ["train/keep-*"])
    assert paths.is_own_file(".ckpt-watchd-last.pt.1234.tmp")


def test_discovery_finds_runs_without_following_symlinks(tmp_path: Path) -> None:
    """Runs of both layouts are found, our state dir is skipped, a symlink is never followed."""
    root = tmp_path / "runs"
    for rel in ("train/a/weights", "detect/b/weights", ".ckpt-watchd/x/weights"):
        (root / rel).mkdir(parents=True)
        (root / rel / "last.pt").write_bytes(b"x")
    outside = tmp_path / "outside" / "c" / "weights"
    outside.mkdir(parents=True)
    (outside / "last.pt").write_bytes(b"x")
    (root / "segment").symlink_to(tmp_path / "outside")
    found = set(discover.find_runs(where(root, skip=(root / ".ckpt-watchd",))))
    assert found == {root / "train/a", root / "detect/b"}
    below = set(discover.find_runs(where(root), below=root / "detect"))
    assert below == {root / "detect/b"}
    assert set(discover.find_runs(where(root), below=root / "train/a/weights", depth=0)) == {
        root / "train/a"}


def test_a_weights_folder_without_checkpoints_is_no_run(tmp_path: Path) -> None:
    """A run is found by what it holds: an empty weights folder is not a run (yet)."""
    root = tmp_path / "runs"
    (root / "train/empty/weights").mkdir(parents=True)
    assert discover.find_runs(where(root)) == {}


def test_probe_reports_every_file_the_units_and_the_keep_marker(tmp_path: Path) -> None:
    """probe() stats every file of the run. A folder named last.pt is a unit (the worker refuses
    it with one clear error, tests/reliability/test_hostile_inputs.py) but no file of the run."""
    root = tmp_path / "runs"
    run = root / "train/a"
    wdir = run / "weights"
    wdir.mkdir(parents=True)
    (wdir / "best.pt").write_bytes(b"x" * 10)
    (wdir / "epoch3.pt").write_bytes(b"x" * 12)
    (wdir / "last.pt").mkdir()
    (run / "results.csv").write_text("epoch\n")
    p = discover.probe(run, where(root))
    assert sorted((f[0], f[3]) for f in p.files) == [
        ("results.csv", 6), ("weights/best.pt", 10), ("weights/epoch3.pt", 12)]
    units = {u.path.name: u for u in p.units}
    assert sorted(units) == ["best.pt", "epoch3.pt", "last.pt"]
    assert units["last.pt"].fingerprint is not None and units["last.pt"].also == ()
    assert units["best.pt"].unit.rewritten and not units["epoch3.pt"].unit.rewritten
    assert (units["epoch3.pt"].unit.series, units["epoch3.pt"].unit.index) == ("epoch", (3,))
    assert units["best.pt"].fingerprint is not None and units["best.pt"].fingerprint[1] == 10
    assert set(p.folders) == {run, wdir, wdir / "last.pt"} and not p.kept  # every folder
    (run / paths.KEEP_MARKER).touch()
    assert discover.probe(run, where(root)).kept


def test_probe_knows_which_names_share_an_inode(tmp_path: Path) -> None:
    """Hard links in a run are reported with each other, so one strip serves every name."""
    root = tmp_path / "runs"
    wdir = root / "train/a/weights"
    wdir.mkdir(parents=True)
    (wdir / "last.pt").write_bytes(b"x")
    os.link(wdir / "last.pt", wdir / "epoch4.pt")
    units = {u.path.name: u for u in discover.probe(root / "train/a", where(root)).units}
    assert units["last.pt"].also == (wdir / "epoch4.pt",)
    assert units["epoch4.pt"].also == (wdir / "last.pt",)


def test_cadence_hint_from_run_records(tmp_path: Path) -> None:
    """Epoch time estimate: (last write - args.yaml time) / rows of results.csv."""
    run = tmp_path / "exp"
    run.mkdir()
    (run / "args.yaml").write_text("x: 1\n")
    os.utime(run / "args.yaml", (1000.0, 1000.0))
    (run / "results.csv").write_text("epoch,loss\n0,1\n1,1\n2,1\n3,1\n")
    assert watcher.cadence_hint(run, 1400.0) == 100.0
    assert watcher.cadence_hint(tmp_path / "nothing", 1400.0) is None


def test_observer_hints_the_changed_folder_and_ignores_own_files(tmp_path: Path) -> None:
    """A file written hints its folder; our temp files and the state dir hint nothing."""
    root = tmp_path / "runs"
    wdir = root / "train/exp/weights"
    wdir.mkdir(parents=True)
    (root / ".ckpt-watchd").mkdir()
    wake = threading.Event()
    hints = watcher.Hints(wake)
    w = watcher.Watcher(root, hints, ignore=[root / ".ckpt-watchd"], warn=lambda m: None)
    w.start()
    try:
        assert w.mode == "inotify" and w.alive()
        (root / ".ckpt-watchd" / "audit.jsonl").write_text("x")
        (wdir / ".ckpt-watchd-last.pt.ab.tmp").write_text("x")
        (wdir / "last.pt").write_bytes(b"data")
        collected: set[Path] = set()

        def got() -> bool:
            folders, _ = hints.drain()
            collected.update(folders)
            return wdir in collected

        assert wait_for(got)
        assert collected == {wdir}
        new = root / "detect" / "v8"
        new.mkdir(parents=True)
        assert wait_for(lambda: new in hints.drain()[1] or False)
    finally:
        w.stop()


def test_every_run_folder_is_really_watched(tmp_path: Path) -> None:
    """With inotify's limit not reached, the kernel's own list covers every run folder."""
    root = tmp_path / "runs"
    for i in range(20):
        (root / f"train/r{i}/weights").mkdir(parents=True)
        (root / f"train/r{i}/weights/last.pt").write_bytes(b"x")
    w = watcher.Watcher(root, watcher.Hints(threading.Event()), ignore=[], warn=lambda m: None)
    w.start()
    try:
        watched = watcher.watched_inodes()
        assert watched is not None
        runs = list(discover.find_runs(where(root)))
        assert len(runs) == 20 and watcher.unwatched(runs, watched) == []
        assert watcher.unwatched(runs, set()) == runs
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
