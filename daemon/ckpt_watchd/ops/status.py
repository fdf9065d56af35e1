"""`ckpt-watchd status`: each run the state store knows, what it saved, what failed, what waits.

The table has the scan's shape (`ckpt-watchd scan`): one row per run with its trainer, state,
checkpoints and the bytes its strips gave back, totals at the bottom; then every failing
checkpoint with its reason and when it is retried. It only reads the store (opened read-only,
so it is safe while the daemon runs) and formats; it never changes state and never touches a
checkpoint. No torch here.
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
        print("\n".join(table(reports, now)))
    return 0


def table(reports: list[dict[str, Any]], now: float) -> list[str]:
    """The text form: the runs' table with totals, then the failures with their reasons."""
    header = ("run", "trainer", "state", "ckpts", "stripped", "saved", "detail")
    body = [(r["run"], r["trainer"] or "", r["state"], str(len(r["checkpoints"])),
             str(r["stripped"]), display.size(r["bytes_saved"]), detail(r)) for r in reports]
    waiting = sum(1 for r in reports if r["state"] in ("watching", "settling"))
    failing = [(r, c) for r in reports for c in r["checkpoints"]
               if c["status"] in ("failed", GIVEN_UP)]
    summary = [f"{waiting} waiting"] + ([f"{len(failing)} failing"] if failing else [])
    total = ("total", "", f"{len(reports)} runs", str(sum(len(r["checkpoints"]) for r in reports)),
             str(sum(r["stripped"] for r in reports)),
             display.size(sum(r["bytes_saved"] for r in reports)), ", ".join(summary))
    lines = display.table(header, body, total, right=(3, 4, 5))
    if failing:
        lines += ["", "failures:"]
        for r, c in failing:
            name = os.path.relpath(c["path"], r["path"]) if c["path"].startswith(r["path"]) \
                else c["path"]
            what = f"{c['error_type'] or 'error'}: {c['error'] or 'no reason recorded'}"
            if c["status"] == GIVEN_UP:
                when = f"given up after {c['attempts']} attempt(s)"
            elif c["next_retry_at_s"] is not None:
                when = (f"attempt {c['attempts']}, retried in "
                        f"{display.duration(max(0.0, c['next_retry_at_s'] - now))}")
            else:
                when = f"attempt {c['attempts']}"
            lines.append(f"  {display.printable(r['run'] + '/' + name)}: "
                         f"{display.printable(what)} ({when})")
    return lines


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
        "trainer": ",".join(sorted({c.profile for c in ckpts if c.profile})) or None,
        "stripped": sum(1 for c in ckpts if c.status == STRIPPED),
        "bytes_saved": saved,
        "reason": reason,
        "cadence_s": run.cadence_s,
        "since": _iso(run.changed_at),
        "checkpoints": [
            {"path": c.path, "profile": c.profile, "status": c.status,
             "bytes_before": c.bytes_before,
             "bytes_after": c.bytes_after, "attempts": c.attempts, "error_type": c.error_type,
             "error": c.error, "next_retry_at": _iso(c.next_retry_at),
             "next_retry_at_s": c.next_retry_at}
            for c in ckpts],
    }


def detail(r: dict[str, Any]) -> str:
    """The last column: time left while waiting, the reason of a failed or kept run."""
    state = r["state"]
    if state == "settling" and r["seconds_left"] is not None:
        text = f"{display.duration(r['seconds_left'])} left"
    elif state in ("failed", "kept", "excluded") and r["reason"]:
        text = r["reason"]
    else:
        text = ""
    retrying = [c for c in r["checkpoints"] if c["status"] == "failed"]
    if retrying and state != "failed":
        text = (text + "; " if text else "") + f"{len(retrying)} failing, retried later"
    return text


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()
