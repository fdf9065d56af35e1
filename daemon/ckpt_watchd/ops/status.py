"""`ckpt-watchd status`: each run the state store knows, and what state it is in.

It only reads the store (opened read-only, so it is safe while the daemon runs) and formats; it
never changes state and never touches a checkpoint. No torch here.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ckpt_watchd.errors import StartupError
from ckpt_watchd.ops import display
from ckpt_watchd.outcome import STRIPPED
from ckpt_watchd.records.state import GIVEN_UP, CkptRow, RunRow, StateStore
from ckpt_watchd.settings import Settings


def print_status(root: Path, state_dir: Path | None, as_json: bool, *,
                 clock: Callable[[], float] = time.time) -> int:
    """Print one line per run (or a JSON list); a missing state dir raises StartupError."""
    settings = Settings(root=root, state_dir=state_dir if state_dir is not None else Path())
    root, state_dir = settings.root, settings.state_dir
    if not state_dir.is_dir():
        raise StartupError(f"no state in {state_dir}: ckpt-watchd has not run on {root} yet "
                           "(or pass the --state-dir it used)")
    db = settings.state_db
    if not db.is_file():
        raise StartupError(f"no state store in {state_dir} (expected {db.name})")
    store = StateStore.open(db, readonly=True)
    try:
        now = clock()
        reports = [run_report(r, store.checkpoints_of(r.run), root, now) for r in store.runs()]
    finally:
        store.close()
    if as_json:
        print(json.dumps(reports, indent=2))
    elif not reports:
        print(f"no runs recorded yet under {root}")
    else:
        width = max(len(display.printable(r["run"])) for r in reports)
        for r in reports:
            print(f"{display.printable(r['run']):<{width}}  {display.printable(describe(r))}")
    return 0


def run_report(run: RunRow, ckpts: list[CkptRow], root: Path, now: float) -> dict[str, Any]:
    """A plain dict for one run: what --json prints and what the text line is made from."""
    rel = os.path.relpath(run.run, root)
    failures = [c for c in ckpts if c.status in ("failed", GIVEN_UP)]
    saved = sum(c.bytes_before - c.bytes_after for c in ckpts
                if c.status == STRIPPED and c.bytes_before is not None
                and c.bytes_after is not None)
    reason = run.reason
    if reason is None and failures:
        reason = failures[0].error
    return {
        "run": run.run if rel.startswith("..") else rel,
        "path": run.run,
        "state": run.state,
        "seconds_left": (max(0.0, round(run.due_at - now, 1))
                         if run.state == "settling" and run.due_at is not None else None),
        "bytes_saved": saved,
        "reason": reason,
        "cadence_s": run.cadence_s,
        "since": _iso(run.changed_at),
        "checkpoints": [
            {"path": c.path, "status": c.status, "bytes_before": c.bytes_before,
             "bytes_after": c.bytes_after, "attempts": c.attempts, "error_type": c.error_type,
             "error": c.error, "next_retry_at": _iso(c.next_retry_at)}
            for c in ckpts],
    }


def describe(r: dict[str, Any]) -> str:
    state = r["state"]
    if state == "settling" and r["seconds_left"] is not None:
        text = f"settling ({display.duration(r['seconds_left'])} left)"
    elif state == "stripped":
        text = f"stripped (saved {display.size(r['bytes_saved'])})"
    elif state in ("failed", "kept", "excluded") and r["reason"]:
        text = f"{state}: {r['reason']}"
    else:
        text = state
    retrying = [c for c in r["checkpoints"] if c["status"] == "failed"]
    if retrying and state != "failed":
        text += f" ({len(retrying)} checkpoint(s) failing, retried later)"
    return text


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()
