"""The value one strip job produces: stripped, skipped, would-strip (dry run) or failed.

Worker processes return it to the parent; the CLI prints it, the service records and audits it. It is
plain data (no torch), so it crosses process boundaries and reaches the JSON audit unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

STRIPPED = "stripped"
SKIPPED = "skipped"
WOULD_STRIP = "would_strip"
FAILED = "failed"
# what a kill mid-save left (a checkpoint folder without its trainer_state.json): left as it is
INCOMPLETE = "incomplete"


@dataclass(frozen=True, slots=True)
class Outcome:
    path: str
    status: str
    profile: str | None = None
    output: str | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    sha256_before: str | None = None
    sha256_after: str | None = None
    duration_s: float = 0.0
    reason: str | None = None
    error_type: str | None = None
    error: str | None = None
    # (inode, size, mtime_ns) of the file as it stands afterwards: how the daemon recognises its own
    # output and tells it from a trainer writing again.
    fingerprint: tuple[int, int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.status != FAILED

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v is not None and k != "fingerprint"}

    def to_wire(self) -> dict[str, Any]:
        """Every field, as JSON-able data: how an isolated job process hands its outcome back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Outcome:
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        fp = fields.get("fingerprint")
        fields["fingerprint"] = tuple(fp) if fp is not None else None
        return cls(**fields)
