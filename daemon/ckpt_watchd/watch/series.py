"""Which checkpoints of a live run a newer one has superseded: pure, from the units alone.

Contract: `superseded(units, keep)` takes a run's units as discovery reports them (each with its
series and its index in it, e.g. `checkpoint-400` is series "checkpoint", index (400,)) and
returns the paths a trainer will never write again: every member of a series but the newest
`keep`. Never a unit the trainer writes again (`last.pt`, `last.ckpt`, `best.pt`,
`model_best.pth.tar`), never a unit of no series, never a file that is also one of those under
another name (timm's hard links). No clock, no I/O: the caller decides when a superseded unit has
been quiet long enough, with a settle tracker of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True, slots=True)
class Member:
    """What the rule needs of one unit."""

    path: str
    series: str | None
    index: tuple[int, ...]
    rewritten: bool = False
    # the other names of the same file (hard links); a file behind a rewritten name is kept
    also: tuple[str, ...] = ()


def superseded(units: Iterable[Member], keep: int) -> set[str]:
    """The paths of the units a newer one of the same series has replaced, beyond `keep`."""
    members = list(units)
    protected = {m.path for m in members if m.rewritten}
    groups: dict[tuple[str, str], list[Member]] = {}
    for m in members:
        if m.series is None or m.rewritten:
            continue
        groups.setdefault((str(PurePosixPath(m.path).parent), m.series), []).append(m)
    out: set[str] = set()
    for group in groups.values():
        group.sort(key=lambda m: (m.index, m.path))
        old = group[:-keep] if keep > 0 else group
        out.update(m.path for m in old if not protected.intersection(m.also))
    return out
