"""Pure path rules: which folders are a run's weights folder, which files are ours, what is excluded.

Everything here works on path strings relative to the root and never touches the filesystem, so the
watcher, the scan and the tests share one definition. Patterns are globs whose `*` never crosses a
`/` (like `Path.glob`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from ckpt_watchd.engine.atomic import TEMP_PREFIX

KEEP_MARKER = ".ckpt-watchd-keep"


def _parts(rel: str | PurePosixPath) -> tuple[str, ...]:
    parts = PurePosixPath(rel).parts
    return tuple(p for p in parts if p not in ("", "."))


def _match_parts(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Glob match by path segment; `**` matches zero or more whole segments."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match_parts(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _match_parts(parts[1:], rest)


def is_weights_dir(rel: str | PurePosixPath, patterns: Iterable[str]) -> bool:
    """Does this folder (relative to the root) match one of the weights-folder patterns?"""
    parts = _parts(rel)
    if not parts or any(p.startswith(TEMP_PREFIX) for p in parts):
        return False
    return any(_match_parts(parts, _parts(p)) for p in patterns)


def could_contain_weights_dir(rel: str | PurePosixPath, patterns: Iterable[str]) -> bool:
    """Is this folder a proper prefix of some pattern (a task or run folder that may gain weights/)?"""
    parts = _parts(rel)
    for pattern in patterns:
        pp = _parts(pattern)
        if len(parts) < len(pp) and _match_parts(parts, pp[: len(parts)]):
            return True
    return False


def remaining_patterns(rel: str | PurePosixPath, patterns: Iterable[str]) -> list[str]:
    """The rest of each pattern below `rel`, for scanning a new subtree without a full rescan."""
    parts = _parts(rel)
    rest = []
    for pattern in patterns:
        pp = _parts(pattern)
        if len(parts) < len(pp) and _match_parts(parts, pp[: len(parts)]):
            rest.append("/".join(pp[len(parts):]))
    return rest


def run_of_weights_dir(weights_dir: Path) -> Path:
    return weights_dir.parent


def is_own_file(name: str) -> bool:
    """Temp files, claims and markers the daemon itself writes; they never count as activity."""
    return name.startswith(TEMP_PREFIX)


def is_excluded(run_rel: str | PurePosixPath, exclude: Iterable[str]) -> bool:
    """`--exclude` globs match the run folder relative to the root (or any of its parents)."""
    parts = _parts(run_rel)
    for pattern in exclude:
        pp = _parts(pattern)
        for n in range(1, len(parts) + 1):
            if _match_parts(parts[:n], pp):
                return True
    return False


def relative_to(path: Path, root: Path) -> PurePosixPath | None:
    """`path` relative to `root`, or None when it is outside (a symlink escaping the root, say)."""
    try:
        return PurePosixPath(path.relative_to(root).as_posix())
    except ValueError:
        return None


def is_inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    return path == folder or folder in path.parents
