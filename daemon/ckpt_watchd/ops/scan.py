"""`ckpt-watchd scan DIR`: how much would a strip give back, and from which runs. Changes nothing.

It owns the scan's table: every run under DIR found by the daemon's own discovery (every trainer
profile), its state as the daemon would judge it (live, quiet, finished, already stripped,
incomplete, kept), its checkpoints and bytes now, the bytes after a strip and what that
reclaims. Each estimate comes from the safe loader's structure pass (`engine.estimate`: no
weight is read) in worker processes of their own, in parallel. It needs no daemon and no state
store. A progress bar goes to stderr when stderr is a terminal; nothing else does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ckpt_watchd.engine.profiles import common
from ckpt_watchd.ops import display
from ckpt_watchd.ops.progress import Progress
from ckpt_watchd.watch import discover, paths, watcher

LIVE, QUIET, FINISHED = "live", "quiet", "finished"
STRIPPED, INCOMPLETE, KEPT = "already stripped", "incomplete", "kept"
_FACTOR = 3.0  # the daemon's quiet period: max(settle, 3 x the time between saves)


@dataclass(slots=True)
class UnitRow:
    path: str
    kind: str
    profile: str | None
    bytes: int
    bytes_after: int
    stripped: bool = False
    incomplete: str | None = None
    error: str | None = None


@dataclass(slots=True)
class RunRow:
    run: str
    path: str
    trainer: str
    state: str
    checkpoints: int
    bytes: int
    bytes_after: int
    units: list[UnitRow] = field(default_factory=list)

    @property
    def reclaimable(self) -> int:
        return max(0, self.bytes - self.bytes_after)


# ------------------------------------------------------------------------------ the estimates


def _estimate_unit(kind: str, profile: str, path: str) -> Callable[[Callable[[], None]],
                                                                     dict[str, Any]]:
    """The work of one worker process: an estimate of one unit (see worker.isolated_map)."""
    def work(on_torch: Callable[[], None]) -> dict[str, Any]:
        from ckpt_watchd.errors import CheckpointError

        try:
            if kind == common.FOLDER:
                from ckpt_watchd.engine.profiles import registry

                plan = registry.BY_NAME[profile].plan(Path(path))
                size = sum(f[1] for f in plan.facts.values())
                if plan.incomplete or plan.unsupported:
                    return {"bytes": size, "bytes_after": size,
                            "incomplete": plan.incomplete or plan.unsupported}
                removed = sum(plan.facts[n][1] for n in plan.remove if n in plan.facts)
                return {"bytes": size, "bytes_after": size - removed, "profile": profile,
                        "stripped": not plan.remove}
            from ckpt_watchd.worker import memory_cap

            with memory_cap() as cap:
                from ckpt_watchd.engine import source

                # refusals come before torch, as in a strip
                opened = source.open_checkpoint(path, need=cap.need, structure_only=True)
                from ckpt_watchd.engine import estimate

                on_torch()
                return estimate.estimate_file(path, need=cap.need, opened=opened)
        except CheckpointError as e:
            kind_ = "incomplete" if e.kind in ("torn", "empty") else "error"
            return {kind_: e.message}
        except MemoryError:
            return {"error": "ran out of memory while looking at it"}
    return work


# ------------------------------------------------------------------------------ the scan


def scan(where: discover.Where, *, workers: int, settle: float, exclude: tuple[str, ...] = (),
         now: float | None = None, progress: Progress | None = None,
         wall: float = 600.0) -> list[RunRow]:
    """Every run under the root with its estimate, most reclaimable first."""
    from ckpt_watchd.worker import isolated_map

    now = time.time() if now is None else now
    runs = sorted(discover.find_runs(where))
    probes = {run: discover.probe(run, where) for run in runs}
    writing = watcher.open_for_writing()
    rows: dict[Path, RunRow] = {}
    tasks = []
    for run, p in probes.items():
        rel = paths.relative_to(run, where.root)
        row = RunRow(str(rel) if rel is not None and str(rel) != "." else str(run), str(run),
                     "", "", 0, 0, 0)
        rows[run] = row
        kept = p.kept or (rel is not None and paths.is_excluded(rel, exclude))
        row.state = KEPT if kept else _state(run, p, writing, settle, now)
        seen: set[int] = set()
        for u in p.units:
            if u.fingerprint is None:
                continue
            if u.kind == common.FILE and u.fingerprint[0] in seen:
                continue  # a hard link of a file already counted
            seen.add(u.fingerprint[0])
            unit = UnitRow(str(u.path), u.kind, u.unit.profile, 0, 0)
            row.units.append(unit)
            tasks.append((unit, _estimate_unit(u.kind, u.unit.profile, str(u.path)),
                          str(u.path)))
        for rel_leftover in p.incomplete:
            row.units.append(UnitRow(str(where.root / rel_leftover), common.FILE, None, 0, 0,
                                     incomplete="a leftover of a save that did not finish"))
    if progress is not None:
        progress.start(len(tasks), "estimating")
    if tasks:  # the estimates import torch: once here, before the workers fork
        from ckpt_watchd.engine import estimate  # noqa: F401
    for unit, result in isolated_map(tasks, parallel=workers, wall=wall):
        if isinstance(result, dict):
            unit.bytes = int(result.get("bytes", 0) or _size(unit.path))
            unit.bytes_after = int(result.get("bytes_after", unit.bytes))
            unit.profile = result.get("profile", unit.profile)
            unit.stripped = bool(result.get("stripped", False))
            unit.incomplete = result.get("incomplete")
            unit.error = result.get("error")
        else:
            unit.bytes = unit.bytes_after = _size(unit.path)
            unit.error = result.message
        if progress is not None:
            progress.advance()
    if progress is not None:
        progress.done()
    for row in rows.values():
        _total(row)
        if row.state not in (KEPT, LIVE, QUIET):
            if row.units and all(u.stripped or u.incomplete for u in row.units):
                row.state = STRIPPED if any(u.stripped for u in row.units) else INCOMPLETE
            elif not row.reclaimable and any(u.incomplete for u in row.units):
                row.state = INCOMPLETE
    return sorted(rows.values(), key=lambda r: (-r.reclaimable, r.run))


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _total(row: RunRow) -> None:
    row.checkpoints = sum(1 for u in row.units if u.profile is not None or u.error)
    row.bytes = sum(u.bytes for u in row.units)
    row.bytes_after = sum(u.bytes_after for u in row.units)
    profiles = sorted({u.profile for u in row.units if u.profile})
    row.trainer = ",".join(profiles) if profiles else "?"


def _state(run: Path, p: discover.Probe, writing: dict[str, int], settle: float,
           now: float) -> str:
    """live (written lately, or held open for writing), quiet (waiting), or finished."""
    prefix = str(run).rstrip("/") + "/"
    if any(path.startswith(prefix) for path in writing):
        return LIVE
    newest = p.newest_mtime
    if newest is None:
        return FINISHED
    age = now - newest
    if age < settle:
        return LIVE
    cadence = watcher.cadence_hint(run, newest) or 0.0
    return QUIET if age < max(settle, _FACTOR * cadence) else FINISHED


# ------------------------------------------------------------------------------ output


def as_json(rows: Iterable[RunRow]) -> str:
    rows = list(rows)
    out = []
    for r in rows:
        d = asdict(r)
        d["reclaimable"] = r.reclaimable
        out.append(d)
    totals = {"runs": len(rows), "checkpoints": sum(r.checkpoints for r in rows),
              "bytes": sum(r.bytes for r in rows), "bytes_after": sum(r.bytes_after for r in rows),
              "reclaimable": sum(r.reclaimable for r in rows)}
    return json.dumps({"runs": out, "totals": totals}, indent=2)


def table(rows: Iterable[RunRow]) -> str:
    rows = list(rows)
    header = ("run", "trainer", "state", "ckpts", "now", "after", "reclaimable")
    body = [(r.run, r.trainer, r.state, str(r.checkpoints), display.size(r.bytes),
             display.size(r.bytes_after), display.size(r.reclaimable)) for r in rows]
    total = ("total", "", f"{len(rows)} runs", str(sum(r.checkpoints for r in rows)),
             display.size(sum(r.bytes for r in rows)),
             display.size(sum(r.bytes_after for r in rows)),
             display.size(sum(r.reclaimable for r in rows)))
    lines = display.table(header, body, total, right=(3, 4, 5, 6))
    notes = [f"  {display.printable(u.path)}: {display.printable(u.error)}"
             for r in rows for u in r.units if u.error]
    if notes:
        lines += ["", "not estimated (left out of 'after'):", *notes]
    return "\n".join(lines)


def print_scan(rows: list[RunRow], *, as_json_out: bool, out: TextIO = sys.stdout) -> None:
    if as_json_out:
        print(as_json(rows), file=out)
    elif not rows:
        print("no runs found", file=out)
    else:
        print(table(rows), file=out)
