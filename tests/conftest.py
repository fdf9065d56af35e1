"""Shared fixtures: generated checkpoints (once per session) and per-test copies of them.

Generation runs in a subprocess where the fake trainer packages import; the pytest process, where
ckpt-watchd strips, never has them on `sys.path`. Helpers live in `fixtures/harness.py`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fixtures import harness


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding one `KIND.pt` per kind of `fixtures/generate.py` (read-only: copy first)."""
    out = tmp_path_factory.mktemp("generated")
    harness.generate(out)
    return out


@pytest.fixture
def checkpoint(generated: Path, tmp_path: Path) -> Callable[..., Path]:
    """`checkpoint(kind, name=None)`: a fresh copy of a generated file in this test's tmp_path."""

    def copy(kind: str, name: str | None = None, directory: Path | None = None) -> Path:
        dest = (directory or tmp_path) / (name or f"{kind}.pt")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(generated / f"{kind}.pt", dest)
        return dest

    return copy


@pytest.fixture
def load_in_trainer() -> Callable[[Path], dict[str, Any]]:
    """Load a file where the trainer classes import and return its JSON summary."""
    return harness.load_in_trainer
