"""How paths, messages and sizes are shown to people: one line each, whatever a name contains.

A run folder may be named with a newline or an escape sequence; printed raw it would forge lines
in `status`, in `strip`'s output or in a hook's file list. Everything a person reads goes through
`printable`. No torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(text: object) -> str:
    """`text` on one line: control characters (and backslashes) escaped, nothing else changed."""
    s = str(text)
    if s.isprintable() and "\\" not in s:
        return s
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif not ch.isprintable():
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def size(n: int | None) -> str:
    """Bytes for people: 1.5 GB, 3.7 MB, 12.0 kB, 512 B."""
    if n is None:
        return "?"
    for unit, step in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} B"


def duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    return f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def table(header: Sequence[str], body: Sequence[Sequence[str]], total: Sequence[str] | None = None,
          *, right: Sequence[int] = ()) -> list[str]:
    """Lines of a plain-text table: columns padded, those in `right` right-aligned, a rule above
    the `total` row. Cells are shown as `printable`."""
    rows = [[printable(c) for c in r] for r in (header, *body, *([total] if total else []))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    lines = [line(r) for r in rows]
    if total:
        lines.insert(len(lines) - 1, "-" * max(len(x) for x in lines))
    return lines
