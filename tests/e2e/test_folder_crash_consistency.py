"""Crash consistency of folder strips: kill -9 the daemon inside transformers and accelerate strips.

Every kill lands inside a folder strip or the start-up replay of one, at a disk step picked by a
seeded random number: `step_hook/sitecustomize.py` (on the daemon's PYTHONPATH) makes the process
that reaches that step stop itself, and the test kills the daemon there. After each restart (at
its next stop, when the start-up replay is done) every folder but the one being stripped is
exactly as the trainer left it or exactly stripped, and never goes back once stripped; after a
last clean `--once` every folder is stripped and nothing of ours is left anywhere in the root.
The folders are generated (tiny torch zips and safetensors) and, with ../shared, corpus copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckpt_watchd.engine import folder as folders
from test_folder_strip import CORPUS, copy_folder, make_accelerate, make_transformers

from .conftest import Daemon, read_audit, wait_until

pytestmark = pytest.mark.e2e
Daemons = Callable[..., Daemon]

OWN = ".ckpt-watchd-"
HOOK_DIR = Path(__file__).resolve().parent / "step_hook"
SEED = 20261202
# What each trainer's weights-only save leaves out (issue 10's table): every other file is kept.
REMOVED = {"transformers": re.compile(r"optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth"),
           "accelerate": re.compile(r"(optimizer|scheduler|sampler)(_\d+)?\.bin|scaler\.pt|"
                                    r"random_states_\d+\.pkl")}
STRIPS_PER_SPAN = 3  # a kill point is drawn across the steps of this many strips
LOW_WATER = 2 * STRIPS_PER_SPAN  # fewer unstripped folders than this: a new batch arrives


@dataclass
class Watched:
    """One checkpoint folder as the trainer left it, and what its strip must leave."""

    path: Path
    profile: str
    original: dict[str, str]  # name -> sha256
    kept: frozenset[str]
    mtime_ns: int
    seen: str = "original"
    mtime_lost: bool = False  # a kill landed after the journal went, before the mtime came back


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Ledger:
    """Every folder the test made; `check` fails the test on anything but original or stripped."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folders: dict[Path, Watched] = {}
        self._hashes: dict[tuple[Path, int, int, int], str] = {}
        self.batches = 0

    def __iter__(self) -> Iterator[Watched]:
        return iter(self.folders.values())

    def add_batch(self) -> None:
        """Two transformers output dirs and two accelerate projects, three checkpoints each (plus
        the corpus' checkpoint-1/2 and step_1/2 when ../shared is here), all written an hour ago."""
        b = self.batches
        self.batches += 1
        made: list[tuple[Path, str, Path | None]] = []  # folder, profile, corpus reference
        for r in range(2):
            for k in (1, 2, 3):
                made.append((make_transformers(self.root / f"hf-{b}-{r}" / f"checkpoint-{k}", step=k,
                                               ranks=1 + (k + r) % 2, scaler=k != 2),
                             "transformers", None))
                made.append((make_accelerate(self.root / f"acc-{b}-{r}" / f"step_{k}",
                                             models=1 + k // 3, optimizers=1 + (k + r) % 2,
                                             ranks=1 + r), "accelerate", None))
        if CORPUS.is_dir():
            for kind, name, run in (("transformers", "checkpoint-{k}", "hf-corpus"),
                                    ("accelerate", "step_{k}", "acc-corpus")):
                for k in (1, 2):
                    sub = name.format(k=k)
                    made.append((copy_folder(CORPUS / kind / "interrupted" / sub,
                                             self.root / f"{run}-{b}" / sub), kind,
                                 CORPUS / kind / "reference" / sub))
        for path, profile, ref in made:
            self.add(path, profile, ref)

    def add(self, path: Path, profile: str, ref: Path | None = None) -> None:
        """Follow one folder, its files and itself (and its run) made to look written an hour ago.

        `ref`: the trainer's own weights-only save of it, whose names the strip must leave (plus
        accelerate's custom_checkpoint_0.pkl, kept as of unknown purpose)."""
        old = time.time_ns() - 3600 * 10**9
        for p in path.iterdir():
            os.utime(p, ns=(old, old))
        os.utime(path, ns=(old, old))  # after its files: writing them set it to now
        os.utime(path.parent, ns=(old, old))
        names = sorted(p.name for p in path.iterdir())
        kept = frozenset(n for n in names if not REMOVED[profile].fullmatch(n))
        if ref is not None:
            extra = {"custom_checkpoint_0.pkl"} if profile == "accelerate" else set()
            assert kept == {p.name for p in ref.iterdir()} | extra, path
        self.folders[path] = Watched(path, profile, {n: digest(path / n) for n in names}, kept,
                                     os.stat(path).st_mtime_ns)

    def unstripped(self) -> int:
        return sum(1 for w in self if w.seen != "stripped")

    def _files(self, w: Watched) -> dict[str, str]:
        out = {}
        for entry in os.scandir(w.path):
            st = entry.stat(follow_symlinks=False)
            key = (Path(entry.path), st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in self._hashes:
                self._hashes[key] = digest(Path(entry.path))
            out[entry.name] = self._hashes[key]
        return out

    def check(self, w: Watched) -> str:
        """'original' or 'stripped'; a half-stripped folder or one of our names fails here."""
        files = self._files(w)
        own = sorted(n for n in files if n.startswith(OWN))
        assert own == [], f"{w.path}: our names left: {own}"
        if files == w.original:
            verdict = "original"
        else:
            assert files == {n: h for n, h in w.original.items() if n in w.kept}, \
                f"{w.path} is half stripped: {sorted(files)} (kept files must keep their bytes)"
            verdict = "stripped"
        assert not (w.seen == "stripped" and verdict == "original"), \
            f"{w.path} was stripped and is back as the trainer left it"
        if not w.mtime_lost:  # transformers' rotate_checkpoints orders folders by mtime
            assert os.stat(w.path).st_mtime_ns == w.mtime_ns, f"{w.path} lost its mtime"
        w.seen = verdict
        return verdict


def fewest_steps(tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> int:
    """The fewest disk steps a strip of any of the test's folders takes (counted in-process)."""
    counts = []
    for w in {(w.profile, len(w.original) - len(w.kept)): w for w in ledger}.values():
        scratch = tmp_path / "scratch" / str(len(counts)) / w.path.name
        copy_folder(w.path, scratch)
        labels: list[str] = []
        monkeypatch.setattr(folders, "STEP_HOOK", labels.append)
        assert folders.strip_folder(scratch, profile=w.profile).status == "stripped"
        monkeypatch.setattr(folders, "STEP_HOOK", None)
        counts.append(len(labels))
    shutil.rmtree(tmp_path / "scratch")
    return min(counts)


def journal_state(path: Path) -> str:
    try:
        return str(json.loads((path / folders.JOURNAL).read_text())["state"])
    except FileNotFoundError:
        return "no journal"


def start_stopping_at(root: Path, tmp_path: Path, daemons: Daemons, monkeypatch: pytest.MonkeyPatch,
                      target: int, tag: str) -> tuple[Daemon, dict[str, str]]:
    """Start the daemon with the step hook; return it stopped before its `target`-th folder step
    (counted over all its processes) and what it was about to do there."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOK_DIR), *python_path()]))
    stopped = tmp_path / f"stopped-{tag}.json"
    monkeypatch.setenv("CKPT_E2E_STOP_AT", str(target))
    monkeypatch.setenv("CKPT_E2E_STEPS", str(tmp_path / f"steps-{tag}.log"))
    monkeypatch.setenv("CKPT_E2E_STOPPED", str(stopped))
    d = daemons(root, "--workers", "1", settle=1)

    def at_the_step() -> dict[str, str] | None:
        if stopped.exists():
            return dict(json.loads(stopped.read_text()))
        assert d.alive(), f"daemon exited before folder step {target}\n{d.stderr_tail()}"
        return None

    return d, wait_until(at_the_step, 120, f"start {tag} to reach folder step {target}",
                         interval=0.01, detail=d.stderr_tail)


def python_path() -> list[str]:
    """PYTHONPATH as it is, without the hook's folder."""
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(HOOK_DIR)]


def without_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    if python_path():
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(python_path()))
    else:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    for name in ("CKPT_E2E_STOP_AT", "CKPT_E2E_STEPS", "CKPT_E2E_STOPPED"):
        monkeypatch.delenv(name, raising=False)


def leftovers(root: Path) -> list[str]:
    """Our names anywhere under the root but in the daemon's own state folder."""
    state_dir = root / ".ckpt-watchd"
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"{OWN}*")
                  if state_dir not in p.parents)


def kill_inside_folder_strips(root: Path, tmp_path: Path, daemons: Daemons,
                              monkeypatch: pytest.MonkeyPatch, *, kills: int, seed: int,
                              every_phase: bool) -> None:
    """kill -9 the daemon `kills` times, each at a seeded random step of its folder strips, then
    let a clean `--once` finish; `every_phase`: the kills must have hit strips before and after
    their commit and start-up replays (a few kills need not)."""
    rng = random.Random(seed)
    ledger = Ledger(root)
    ledger.add_batch()
    span = STRIPS_PER_SPAN * fewest_steps(tmp_path, ledger, monkeypatch)
    labels: Counter[str] = Counter()
    phases: Counter[str] = Counter()
    started = time.monotonic()
    for kill in range(kills):
        if ledger.unstripped() < LOW_WATER:
            ledger.add_batch()
        # the first `span` steps of this start hold at least STRIPS_PER_SPAN whole strips (all its
        # runs are quiet), after the replay of whatever the last kill interrupted
        target = rng.randrange(span)
        d, at = start_stopping_at(root, tmp_path, daemons, monkeypatch, target, str(kill))
        inside = Path(at["folder"])
        assert inside in ledger.folders, at
        # the start-up replay is over (it comes before any strip): every other folder is whole
        for w in ledger:
            if w.path != inside:
                ledger.check(w)
        d.kill9()
        where = "replay" if int(at["pid"]) == d.pid else "strip"
        labels[re.sub(r"\.ckpt-watchd-aside\.[0-9a-f]+\.", "", at["label"])] += 1
        phases[f"{where}, {journal_state(inside)}"] += 1
        if at["label"] == "folder mtime":
            ledger.folders[inside].mtime_lost = True
    killed_s = time.monotonic() - started

    without_hook(monkeypatch)
    final = daemons(root, "--once", "--workers", "1", settle=1)
    assert final.proc is not None and final.proc.wait(timeout=300) == 0, final.stderr_tail()
    assert {ledger.check(w) for w in ledger} == {"stripped"}
    assert leftovers(root) == [], "our files survived the daemon's clean finish"
    audit = read_audit(root / ".ckpt-watchd" / "audit.jsonl")
    stripped = Counter(e["path"] for e in audit if e["event"] == "ckpt.stripped")
    assert [p for p, n in stripped.items() if n > 1] == [], "a folder was stripped twice"
    assert {e["profile"] for e in audit if e["event"] == "ckpt.stripped"} == {"transformers",
                                                                            "accelerate"}
    assert all(ledger.folders[Path(e["path"])].profile == e["profile"]
               for e in audit if e["event"] == "ckpt.stripped")
    bad = [e for e in audit if e["event"] in ("ckpt.failed", "ckpt.incomplete")]
    assert bad == []
    if every_phase:
        assert phases["strip, begun"] and phases["strip, committed"] and \
            sum(n for p, n in phases.items() if p.startswith("replay")), phases
    print(f"{kills} kills in {killed_s:.0f}s across {len(ledger.folders)} folders "
          f"({ledger.batches} batches), span {span} steps; where: {dict(phases)}; "
          f"before: {dict(labels.most_common())}")


@pytest.mark.timeout(600)  # ~3 s a restart on a quiet machine, a daemon and a worker each time
def test_kill_9_inside_folder_strips_leaves_each_folder_whole(
        root: Path, tmp_path: Path, daemons: Daemons, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 at 15 seeded disk steps of folder strips: every folder original or stripped."""
    kill_inside_folder_strips(root, tmp_path, daemons, monkeypatch, kills=15, seed=SEED,
                              every_phase=False)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_two_hundred_kills_inside_folder_strips(
        root: Path, tmp_path: Path, daemons: Daemons, monkeypatch: pytest.MonkeyPatch) -> None:
    """200 kill -9s inside folder strips and their replays: never a half-stripped folder."""
    kill_inside_folder_strips(root, tmp_path, daemons, monkeypatch, kills=200, seed=SEED + 1,
                              every_phase=True)


def test_a_kill_after_the_last_unlink_of_a_projects_last_state_folder_is_finished(
        root: Path, tmp_path: Path, daemons: Daemons, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between its last unlink and the journal's removal, a project's last state folder (no
    unit any more) is finished at the restart: journal and claim gone, the folder's mtime back."""
    ledger = Ledger(root)
    first, last = (make_accelerate(root / "project" / f"step_{k}") for k in (1, 2))
    ledger.add(first, "accelerate")
    ledger.add(last, "accelerate")
    # step_1 was stripped before: the daemon finds the project by step_2 alone
    assert folders.strip_folder(first, profile="accelerate").status == "stripped"
    labels: list[str] = []
    scratch = copy_folder(last, tmp_path / "scratch" / "step_2")
    monkeypatch.setattr(folders, "STEP_HOOK", labels.append)
    folders.strip_folder(scratch, profile="accelerate")
    monkeypatch.setattr(folders, "STEP_HOOK", None)
    assert labels[labels.index("journal remove") - 2] == "unlink optimizer.bin", labels
    d, at = start_stopping_at(root, tmp_path, daemons, monkeypatch, labels.index("journal remove"),
                              "last-unlink")
    assert (at["folder"], at["label"]) == (str(last), "journal remove")
    d.kill9()
    # what the kill left: the trainer's files are those a strip keeps, but the journal is there
    # (and the daemon's claim on it, in the project folder): no folder of the project is a unit
    assert sorted(p.name for p in last.iterdir()) == sorted(
        [folders.JOURNAL, "custom_checkpoint_0.pkl", "model.safetensors"])
    left = leftovers(root)
    assert f"project/step_2/{folders.JOURNAL}" in left, left
    assert any(p.startswith(f"project/{OWN}claim.") for p in left), left
    without_hook(monkeypatch)
    again = daemons(root, "--once", "--workers", "1", settle=1)
    assert again.proc is not None and again.proc.wait(timeout=120) == 0, again.stderr_tail()
    assert [ledger.check(w) for w in ledger] == ["stripped", "stripped"]
    assert leftovers(root) == []
