"""Crash consistency: kill -9 the daemon again and again while it strips; no checkpoint is lost.

Seeded random fault injection across at least 200 strips (1,000 under the `slow` marker): after
every kill each checkpoint is its original bytes or a valid stripped file; after a clean restart
nothing of ours is left and each file was stripped exactly once.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import (
    TEMP_PREFIX,
    Daemon,
    Templates,
    clean_env,
    is_valid_stripped,
    make_run,
    read_audit,
    sha256_file,
    temp_files,
    wait_until,
)

pytestmark = pytest.mark.e2e
Daemons = Callable[..., Daemon]

BATCH_RUNS = 8  # two checkpoints each; a new batch arrives when few unstripped files are left
SEED = 20261128


class Ledger:
    """Every checkpoint the test created, its original sha256, and what was verified since."""

    def __init__(self) -> None:
        self.original: dict[Path, str] = {}
        self.weights: list[Path] = []
        self._verdict: dict[tuple[Path, int, int, int], str] = {}

    def add_batch(self, root: Path, templates: Templates, batch: int) -> None:
        for i in range(BATCH_RUNS):
            t = templates.medium[i % len(templates.medium)]
            w = make_run(root, f"train/b{batch}r{i}", t)
            self.weights.append(w)
            for name in ("last.pt", "best.pt"):
                self.original[w / name] = t.sha256

    def state(self, path: Path) -> str:
        """'original' or 'stripped'; anything else fails the test on the spot."""
        st = os.stat(path)
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self._verdict:
            if sha256_file(path) == self.original[path]:
                self._verdict[key] = "original"
            else:
                assert is_valid_stripped(path), f"{path} is neither its original nor stripped"
                self._verdict[key] = "stripped"
        return self._verdict[key]

    def unstripped(self) -> int:
        return sum(1 for p in self.original if self.state(p) == "original")

    def temps(self) -> list[str]:
        return [e.name for w in self.weights for e in os.scandir(w)
                if e.name.startswith(TEMP_PREFIX) and e.name.endswith(".tmp")]


def _kill_daemon_repeatedly(root: Path, templates: Templates, daemons: Daemons, *,
                            kills: int, strips: int, seed: int) -> None:
    """kill -9 the daemon at random moments until it was killed `kills` times and the test has
    handed it at least `strips` checkpoints; then a clean restart must finish every one, once."""
    rng = random.Random(seed)
    ledger = Ledger()
    batches = 0
    kills_with_temp = 0
    kill = 0
    while kill < kills or len(ledger.original) < strips:
        kill += 1
        if ledger.unstripped() < 6:
            ledger.add_batch(root, templates, batches)
            batches += 1
        stale = set(ledger.temps())  # the last kill's leftovers; the start-up scan removes them
        d = daemons(root, "--workers", "1", settle=1)

        def stripping(d: Daemon = d, stale: set[str] = stale) -> bool:
            assert d.alive(), f"daemon exited\n{d.stderr_tail()}"
            return bool(set(ledger.temps()) - stale or d.events("ckpt.stripped"))

        wait_until(stripping, 60, f"restart {kill} to start writing", interval=0.005,
                   detail=d.stderr_tail)
        assert not stale & set(ledger.temps()), "the start-up scan left the last kill's temps"
        time.sleep(rng.uniform(0.0, 0.8))  # fault injection: where the kill lands is random
        kills_with_temp += bool(set(ledger.temps()) - stale)
        d.kill9()
        for path in ledger.original:
            ledger.state(path)  # asserts original-or-stripped, after every single kill

    final = daemons(root, settle=1)
    wait_until(lambda: ledger.unstripped() == 0, 120,
               "the restarted daemon to strip every remaining checkpoint", interval=0.2,
               detail=final.stderr_tail)
    runs_of = {str(w.parent) for w in ledger.weights}

    def recorded() -> bool:
        # the last replace is on disk before its outcome is in the state store: wait for that
        out = subprocess.run([sys.executable, "-m", "ckpt_watchd", "status", "--root", str(root),
                              "--json"], capture_output=True, timeout=60, env=clean_env())
        if out.returncode != 0:
            return False
        states = {r["path"]: r["state"] for r in json.loads(out.stdout)}
        return all(states.get(r) == "stripped" for r in runs_of)

    wait_until(recorded, 120, "the state store to record every run as stripped", interval=0.5,
               detail=final.stderr_tail)
    assert final.terminate() == 0, final.stderr_tail()

    leftovers = [p for w in ledger.weights for p in w.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert leftovers == [], "temp or claim files survived a clean restart and stop"
    assert temp_files(root) == []
    audit = read_audit(root / ".ckpt-watchd" / "audit.jsonl")
    stripped = [e for e in audit if e["event"] == "ckpt.stripped"]
    twice = [p for p, n in Counter(e["path"] for e in stripped).items() if n > 1]
    assert twice == [], "a checkpoint was stripped twice"
    assert all(e["sha256_before"] == ledger.original[Path(e["path"])] for e in stripped)
    status = subprocess.run([sys.executable, "-m", "ckpt_watchd", "status", "--root", str(root),
                             "--json"], capture_output=True, timeout=60, env=clean_env(),
                            check=True)
    runs = {r["path"]: r for r in json.loads(status.stdout)}
    assert {str(w.parent) for w in ledger.weights} <= set(runs)
    for w in ledger.weights:
        r = runs[str(w.parent)]
        assert r["state"] == "stripped", r
        assert {c["status"] for c in r["checkpoints"]} <= {"stripped", "skipped"}, r
    print(f"{kill} kills, {kills_with_temp} with a temp file on disk, {batches} batches, "
          f"{len(ledger.original)} checkpoints, {len(stripped)} ckpt.stripped lines")


def test_sigkill_mid_strip_never_leaves_a_torn_or_lost_checkpoint(
        root: Path, templates: Templates, daemons: Daemons) -> None:
    """20+ kill -9s across 200+ strips: every file original or stripped; a restart finishes all."""
    _kill_daemon_repeatedly(root, templates, daemons, kills=20, strips=200, seed=SEED)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_thousand_strips_with_random_daemon_kills(
        root: Path, templates: Templates, daemons: Daemons) -> None:
    """100+ kill -9s across 1,000+ strips: no checkpoint is ever torn, lost or stripped twice."""
    _kill_daemon_repeatedly(root, templates, daemons, kills=100, strips=1000, seed=SEED + 1)
