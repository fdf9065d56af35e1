"""The superseded rule, as tables: which checkpoints of a live run a newer one has replaced."""

from __future__ import annotations

import pytest

from ckpt_watchd.watch.series import Member, superseded


def m(path: str, series: str | None = None, *index: int, rewritten: bool = False,
      also: tuple[str, ...] = ()) -> Member:
    return Member(path, series, tuple(index), rewritten, also)


TABLE = [
    ("YOLO save-period: all but the newest epoch",
     [m("w/epoch0.pt", "epoch", 0), m("w/epoch1.pt", "epoch", 1), m("w/epoch2.pt", "epoch", 2),
      m("w/last.pt", rewritten=True), m("w/best.pt", rewritten=True)], 1,
     {"w/epoch0.pt", "w/epoch1.pt"}),
    ("order by number, not by name", [m("w/epoch10.pt", "epoch", 10), m("w/epoch9.pt", "epoch", 9)],
     1, {"w/epoch9.pt"}),
    ("keep the newest two",
     [m("o/checkpoint-400", "checkpoint", 400), m("o/checkpoint-500", "checkpoint", 500),
      m("o/checkpoint-600", "checkpoint", 600)], 2, {"o/checkpoint-400"}),
    ("keep 0: every member", [m("o/checkpoint-1", "checkpoint", 1)], 0, {"o/checkpoint-1"}),
    ("a single checkpoint supersedes nothing", [m("o/checkpoint-1", "checkpoint", 1)], 1, set()),
    ("Lightning epoch-step by (epoch, step)",
     [m("c/epoch=1-step=6.ckpt", "epoch-step", 1, 6), m("c/epoch=2-step=9.ckpt", "epoch-step", 2, 9),
      m("c/last.ckpt", rewritten=True)], 1, {"c/epoch=1-step=6.ckpt"}),
    ("two series do not supersede each other",
     [m("w/epoch_2.pth", "epoch", 2), m("w/iter_900.pth", "iter", 900)], 1, set()),
    ("the same series in two folders is two series",
     [m("a/w/epoch1.pt", "epoch", 1), m("b/w/epoch2.pt", "epoch", 2)], 1, set()),
    ("a file behind a rewritten name (timm's hard links) is kept",
     [m("t/checkpoint-0.pth.tar", "checkpoint", 0),
      m("t/checkpoint-1.pth.tar", "checkpoint", 1, also=("t/model_best.pth.tar",)),
      m("t/checkpoint-2.pth.tar", "checkpoint", 2, also=("t/last.pth.tar",)),
      m("t/last.pth.tar", rewritten=True), m("t/model_best.pth.tar", rewritten=True)], 1,
     {"t/checkpoint-0.pth.tar"}),
    ("units of no series are never superseded", [m("x/a.pt"), m("x/b.pt")], 0, set()),
]


@pytest.mark.parametrize(("what", "units", "keep", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_superseded(what: str, units: list[Member], keep: int, expected: set[str]) -> None:
    """All but the newest `keep` of each series, never a rewritten name or what it points at."""
    assert superseded(units, keep) == expected
