"""The settle tracker, purely: observations and `now` in, due runs and deadlines out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_watchd.watch.tracker import DONE, HANDED, SETTLING, WATCHING, Observation, Tracker

NS = 1_000_000_000


def obs(i: int, t: float) -> Observation:
    """The files as written by write number `i` at time `t` (mtime follows the write)."""
    return Observation(((("last.pt", "f", 1, 100 + i, int(t * NS))),), int(t * NS))


EMPTY = Observation((), 0)


def test_run_without_checkpoint_is_only_watched() -> None:
    """A weights folder with no checkpoint yet has nothing to settle and no deadline."""
    t = Tracker(settle=60)
    t.observe("r", EMPTY, 0.0)
    assert t.view("r", 0.0).phase == WATCHING  # type: ignore[union-attr]
    assert t.next_deadline() is None
    assert t.due(10_000.0) == []


def test_due_exactly_after_settle_when_no_cadence_is_known() -> None:
    """With one write seen, the quiet period is --settle."""
    t = Tracker(settle=60)
    t.observe("r", obs(0, 0), 0.0)
    assert t.due(59.9) == []
    assert t.next_deadline() == 60.0
    assert t.due(60.0) == ["r"]
    assert t.view("r", 60.0).phase == HANDED  # type: ignore[union-attr]
    assert t.due(61.0) == []


def test_quiet_period_is_three_times_the_longest_gap() -> None:
    """Writes every 10 s with settle 5: the run must stay quiet 30 s after the last write."""
    t = Tracker(settle=5)
    for i, at in enumerate((0.0, 10.0, 20.0)):
        t.observe("r", obs(i, at), at)
    assert t.quiet_period("r") == 30.0
    assert t.due(49.9) == []
    assert t.due(50.0) == ["r"]


def test_one_slow_epoch_raises_the_quiet_period() -> None:
    """An epoch 2.9x longer than the others is not an end, and the next quiet period covers 3x it.

    The first gap is covered by --settle alone (nothing is known yet), hence settle > the first epoch.
    """
    t = Tracker(settle=12)
    times = [0.0, 10.0, 20.0, 49.0]
    for i, at in enumerate(times):
        assert t.due(at - 0.01) == []
        t.observe("r", obs(i, at), at)
    assert t.quiet_period("r") == 87.0
    assert t.due(49.0 + 86.9) == []
    assert t.due(49.0 + 87.0) == ["r"]


def test_unchanged_observation_is_not_activity() -> None:
    """Seeing the same files again (a rescan) does not restart the quiet period."""
    t = Tracker(settle=60)
    t.observe("r", obs(0, 0), 0.0)
    assert t.observe("r", obs(0, 0), 30.0) is False
    assert t.due(60.0) == ["r"]


def test_age_at_first_sight_counts_towards_quiet() -> None:
    """A run found at start-up whose files are an hour old is due at once."""
    t = Tracker(settle=600)
    t.observe("r", obs(0, 0), 1000.0, age=3600.0)
    assert t.due(1000.0) == ["r"]


def test_cadence_hint_protects_a_run_seen_once() -> None:
    """A run found mid-training with 20-minute epochs (from its own records) is not due after 10 min."""
    t = Tracker(settle=600)
    t.observe("r", obs(0, 0), 0.0, age=700.0, cadence_hint=1200.0)
    assert t.quiet_period("r") == 3600.0
    assert t.due(0.0) == []
    assert t.due(3600.0 - 700.0) == ["r"]


def test_handed_run_ignores_our_own_rewrite_and_finishes() -> None:
    """While a run is being stripped its changing files are not activity; finished() marks it done."""
    t = Tracker(settle=10)
    t.observe("r", obs(0, 0), 0.0)
    assert t.due(10.0) == ["r"]
    assert t.observe("r", obs(1, 11), 11.0) is False
    t.finished("r", obs(1, 11).key)
    assert t.view("r", 12.0).phase == DONE  # type: ignore[union-attr]
    assert t.observe("r", obs(1, 11), 100.0) is False
    assert t.due(10_000.0) == []


def test_look_again_settles_a_handed_run_once_more() -> None:
    """A torn file or a claim elsewhere gives the run back: due again after another quiet period."""
    t = Tracker(settle=10)
    t.observe("r", obs(0, 0), 0.0)
    assert t.due(10.0) == ["r"]
    t.look_again("r", 12.0)
    assert t.view("r", 12.0).phase == SETTLING  # type: ignore[union-attr]
    assert t.due(21.9) == []
    assert t.due(22.0) == ["r"]


def test_writes_after_done_start_from_scratch() -> None:
    """A resumed run (or a new run in the same folder) is tracked again, its old cadence forgotten."""
    t = Tracker(settle=5)
    for i, at in enumerate((0.0, 100.0)):
        t.observe("r", obs(i, at), at)
    assert t.due(400.0) == ["r"]
    t.finished("r", obs(1, 100).key)
    t.observe("r", obs(2, 1000), 1000.0)
    view = t.view("r", 1000.0)
    assert view is not None and view.phase == SETTLING and view.cadence_s == 0.0
    assert t.due(1005.0) == ["r"]


def test_finished_is_ignored_unless_handed() -> None:
    """An outcome arriving after the run was written again does not mark it done."""
    t = Tracker(settle=5)
    t.observe("r", obs(0, 0), 0.0)
    t.finished("r", obs(0, 0).key)
    assert t.view("r", 1.0).phase == SETTLING  # type: ignore[union-attr]


def test_hand_takes_back_only_done_runs() -> None:
    """A retry may hand a DONE run back; a settling run is not taken."""
    t = Tracker(settle=5)
    t.observe("r", obs(0, 0), 0.0)
    assert t.hand("r") is False
    assert t.due(5.0) == ["r"]
    t.finished("r", obs(0, 0).key)
    assert t.hand("r") is True
    assert t.view("r", 6.0).phase == HANDED  # type: ignore[union-attr]


def test_next_deadline_is_the_earliest_settling_run() -> None:
    """The service sleeps until the first run can be due."""
    t = Tracker(settle=10)
    t.observe("a", obs(0, 0), 5.0)
    t.observe("b", obs(0, 0), 2.0)
    assert t.next_deadline() == 12.0
    t.forget("b")
    assert t.next_deadline() == 15.0
    assert t.count(SETTLING) == 1


@settings(max_examples=300, deadline=None)
@given(
    settle=st.floats(min_value=0.5, max_value=50),
    gaps=st.lists(st.floats(min_value=0.01, max_value=100), min_size=1, max_size=25),
)
def test_live_trainer_is_never_due_between_writes(settle: float, gaps: list[float]) -> None:
    """Against a naive model: a gap no longer than max(settle, 3x every earlier gap) is never ended early.

    The model: after writes at t0..tn the run may be due only once now - tn >= max(settle, 3 * max gap).
    """
    t = Tracker(settle=settle)
    at = 0.0
    t.observe("r", obs(0, at), at)
    longest = 0.0
    for i, gap in enumerate(gaps, start=1):
        allowed = max(settle, 3 * longest)
        just_before = at + min(gap, allowed) - 1e-5
        due = t.due(just_before)
        assert due == [], (i, gap, allowed)
        if gap > allowed:
            # the trainer really was quiet for a whole quiet period: the model says it may end here
            assert t.due(at + allowed + 1e-5) == ["r"]
            return
        at += gap
        longest = max(longest, gap)
        t.observe("r", obs(i, at), at)
    quiet = max(settle, 3 * longest)
    assert t.due(at + quiet - 1e-5) == []
    assert t.due(at + quiet + 1e-5) == ["r"]
