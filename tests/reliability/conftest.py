"""Harness of the reliability suite: small generated checkpoints, the daemon as a bounded subprocess,
the audit trail, polling with deadlines, and children that file permissions apply to although we
are root.

Checkpoints come from `tests/fixtures` (generated in a subprocess, so the fake trainer classes never
load here). Every daemon this harness starts has a hard wall-clock bound and is killed at teardown.
Nothing here edits the code under test.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixtures import harness
from fixtures.daemon_io import TEMP_PREFIX as TEMP_PREFIX
from fixtures.daemon_io import DaemonOutput, clean_env
from fixtures.daemon_io import temp_files as temp_files  # re-exported to the tests
from fixtures.daemon_io import wait_until as wait_until  # re-exported to the tests

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"  # /work/shared/corpus
# what `ckpts` generates: small, real torch.save output of each layout the daemon strips
KINDS = ("yolov5", "yolov5_legacy", "generic", "ultralytics")


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only folder with one small `KIND.pt` per kind in `KINDS` (copy before modifying)."""
    out = tmp_path_factory.mktemp("reliability-ckpts")
    harness.generate(out, KINDS)
    for p in out.iterdir():
        p.chmod(0o444)
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "runs"
    r.mkdir()
    return r


# ---------------------------------------------------------------------------------- files


def set_age(path: Path, seconds: float) -> None:
    """Make `path` (never its symlink target) look last written `seconds` ago."""
    when = time.time() - seconds
    os.utime(path, (when, when), follow_symlinks=False)




def snapshot(paths: Sequence[Path]) -> dict[Path, bytes]:
    """The bytes of each regular file among `paths` (symlinks, FIFOs and folders are left out)."""
    return {p: p.read_bytes() for p in paths if p.is_file() and not p.is_symlink()}


def stripped_facts(path: Path) -> dict[str, Any] | None:
    """(epoch, optimizer, ema) of a file that loads through the safe loader; None if it does not."""
    from ckpt_watchd.engine import safeload  # torch: fine in the test process, never in the daemon's
    from ckpt_watchd.errors import CheckpointError

    try:
        obj = safeload.load(path).obj
    except CheckpointError:
        return None
    if not isinstance(obj, dict):
        return None
    return {k: obj.get(k) for k in ("epoch", "optimizer", "ema")}


def is_valid_stripped(path: Path) -> bool:
    facts = stripped_facts(path)
    return facts is not None and facts["epoch"] == -1 and facts["optimizer"] is None


# ---------------------------------------------------------------------------------- waiting


# ---------------------------------------------------------------------------------- privileges

_PR_CAPBSET_DROP = 24
# CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: what lets root ignore file modes
_DAC_CAPS = (0, 1, 2, 3)


def drop_dac_caps() -> None:
    """preexec_fn: drop root's permission bypass from the bounding set, so modes apply after exec.

    The child keeps uid 0 (the interpreter under /root stays reachable, unlike after setuid), but
    a file or folder without the owner's permission bit is refused to it like to anyone else.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in _DAC_CAPS:
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def can_drop_privileges() -> bool:
    """True if a child can be made subject to file modes (we are root and prctl works)."""
    if os.geteuid() != 0:
        return False
    probe = subprocess.run([sys.executable, "-c", "open('/proc/self/status').read()"],
                           preexec_fn=drop_dac_caps, capture_output=True, timeout=60)
    return probe.returncode == 0


# ---------------------------------------------------------------------------------- the daemon


@dataclass
class Daemon(DaemonOutput):
    """`python -m ckpt_watchd --root ROOT --log-format json ...` as a subprocess."""

    stderr_lines = 40
    root: Path
    logs: Path
    args: tuple[str, ...]
    privileged: bool = True
    memory_cap: int | None = None  # RLIMIT_AS for the daemon and (inherited) its workers
    proc: subprocess.Popen[bytes] | None = None

    @property
    def audit_path(self) -> Path:
        return self.root / ".ckpt-watchd" / "audit.jsonl"

    @property
    def stderr_path(self) -> Path:
        return self.logs / f"daemon-{id(self)}.stderr"

    def start(self) -> Daemon:
        self.logs.mkdir(parents=True, exist_ok=True)
        config = self.logs / "empty.toml"  # shields the tests from a real /etc/ckpt-watchd config
        config.touch()
        argv = [sys.executable, "-m", "ckpt_watchd", "--root", str(self.root), "--config",
                str(config), "--log-format", "json", *self.args]
        privileged, cap = self.privileged, self.memory_cap

        def preexec() -> None:
            if cap is not None:
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            if not privileged:
                drop_dac_caps()

        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                env=clean_env(), cwd=self.logs,
                preexec_fn=preexec if (cap is not None or not privileged) else None)
        return self

    def wait(self, timeout: float) -> int:
        """Wait for a `--once` daemon to exit; kill it and fail if it is still running then."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon still running after {timeout:g}s (hung?)\n"
                                 f"{self.stderr_tail()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """`daemons(root, *args, privileged=True, memory_cap=None)`: a started Daemon; any left running
    is killed at teardown."""
    made: list[Daemon] = []

    def make(root: Path, *args: str, privileged: bool = True,
             memory_cap: int | None = None) -> Daemon:
        d = Daemon(root, tmp_path / "logs", tuple(args), privileged=privileged,
                   memory_cap=memory_cap)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        with contextlib.suppress(Exception):
            d.kill()
