"""The settle tracker: decides when a run has finished, from observations and `now` alone.

Contract: the caller feeds `observe(run, obs, now)` whenever it has looked at a run's checkpoint files
and asks `due(now)` for runs whose quiet period is over. A run is finished when its files have not
changed for max(settle, factor x the longest gap seen between two writes). No clock, no I/O, no
threads: `now` is any monotonic float the caller chooses.

Phases: WATCHING (no checkpoint yet) -> SETTLING -> HANDED (the caller is stripping it) -> DONE.
A change in any phase after SETTLING starts the run again from scratch (a resume or a reused folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field

WATCHING = "watching"
SETTLING = "settling"
HANDED = "handed"
DONE = "done"


@dataclass(frozen=True, slots=True)
class Observation:
    """What the checkpoint files look like now: `key` changes whenever any of them is rewritten."""

    key: tuple[object, ...]
    mtime_ns: int  # newest mtime among the files; gaps between writes are measured with it

    @property
    def empty(self) -> bool:
        return not self.key


@dataclass(slots=True)
class _Run:
    obs: Observation
    last_change: float
    cadence: float = 0.0
    phase: str = SETTLING


@dataclass(frozen=True, slots=True)
class RunView:
    phase: str
    quiet_s: float
    cadence_s: float
    seconds_left: float | None


@dataclass(slots=True)
class Tracker:
    settle: float
    factor: float = 3.0
    _runs: dict[str, _Run] = field(default_factory=dict)

    # ------------------------------------------------------------------ inputs

    def observe(self, run: str, obs: Observation, now: float, *, age: float | None = None,
                cadence_hint: float | None = None) -> bool:
        """Record what the files look like. Returns True if this counts as new activity.

        `age` (first sighting only): seconds since the files were last written, so a run that ended
        while we were down does not wait a whole quiet period again. `cadence_hint`: an estimate of
        the epoch time from the run's own records, used until two writes have been seen.
        """
        r = self._runs.get(run)
        if r is None:
            seed = max(0.0, min(age, 10 * 365 * 86400.0)) if age is not None else 0.0
            self._runs[run] = _Run(obs=obs, last_change=now - seed,
                                   cadence=max(0.0, cadence_hint or 0.0),
                                   phase=WATCHING if obs.empty else SETTLING)
            return True
        if obs.key == r.obs.key or r.phase == HANDED:
            # while HANDED our own replace changes the files; the worker reports real activity
            # ("changed while stripping") and the caller hands the run back with look_again()
            return False
        if r.phase == DONE:
            # written again after we finished: a resumed run or a new run in the same folder
            r.cadence = 0.0
        elif not r.obs.empty and not obs.empty:
            gap = (obs.mtime_ns - r.obs.mtime_ns) / 1e9
            if gap <= 0:
                gap = now - r.last_change
            r.cadence = max(r.cadence, gap)
        r.obs = obs
        r.last_change = now
        r.phase = WATCHING if obs.empty else SETTLING
        return True

    def forget(self, run: str) -> None:
        self._runs.pop(run, None)

    def finished(self, run: str, key: tuple[object, ...]) -> None:
        """The caller is done with the run; files with this `key` are the result, not new activity."""
        r = self._runs.get(run)
        if r is None or r.phase != HANDED:
            return
        r.phase = DONE
        r.obs = Observation(key, r.obs.mtime_ns)

    def own_write(self, run: str, key: tuple[object, ...]) -> None:
        """The caller itself changed some of the files (a superseded checkpoint stripped in a
        live run): files with this `key` are the current state, not the trainer's activity."""
        r = self._runs.get(run)
        if r is not None and r.phase in (WATCHING, SETTLING):
            r.obs = Observation(key, r.obs.mtime_ns)

    def hand(self, run: str) -> bool:
        """Take a DONE run back for one more try (a retry after a failure); False if not DONE."""
        r = self._runs.get(run)
        if r is None or r.phase != DONE:
            return False
        r.phase = HANDED
        return True

    def look_again(self, run: str, now: float) -> None:
        """Give a handed run back (a torn file, a claim held elsewhere): due after another quiet period."""
        r = self._runs.get(run)
        if r is not None and r.phase == HANDED:
            r.phase = SETTLING
            r.last_change = now

    # ------------------------------------------------------------------ outputs

    def quiet_period(self, run: str) -> float:
        r = self._runs[run]
        return max(self.settle, self.factor * r.cadence)

    def due(self, now: float) -> list[str]:
        """Runs whose quiet period is over; they move to HANDED and are not returned again."""
        out = []
        for run, r in self._runs.items():
            if r.phase == SETTLING and now >= r.last_change + max(self.settle, self.factor * r.cadence):
                r.phase = HANDED
                out.append(run)
        return out

    def next_deadline(self) -> float | None:
        deadlines = [r.last_change + max(self.settle, self.factor * r.cadence)
                     for r in self._runs.values() if r.phase == SETTLING]
        return min(deadlines) if deadlines else None

    def view(self, run: str, now: float) -> RunView | None:
        r = self._runs.get(run)
        if r is None:
            return None
        quiet = max(self.settle, self.factor * r.cadence)
        left = max(0.0, r.last_change + quiet - now) if r.phase == SETTLING else None
        return RunView(r.phase, quiet, r.cadence, left)

    def observed_key(self, run: str) -> tuple[object, ...] | None:
        r = self._runs.get(run)
        return None if r is None else r.obs.key

    def runs(self) -> list[str]:
        return list(self._runs)

    def count(self, phase: str) -> int:
        return sum(1 for r in self._runs.values() if r.phase == phase)
