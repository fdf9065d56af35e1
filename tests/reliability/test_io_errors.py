"""Disk full, read-only folders and filesystems, file-size limits: through the real daemon.

Each failure is made real: a 2 MB tmpfs filled to the brim, a weights folder without write
permission (for a daemon that cannot bypass permissions although we are root), a read-only bind
mount. The daemon must keep the original byte for byte, audit `ckpt.failed` with the cause, retry
with backoff up to --max-attempts, and meanwhile go on stripping healthy runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reliability.conftest import (
    Daemon,
    can_drop_privileges,
    clean_env,
    is_valid_stripped,
    set_age,
    temp_files,
)

RETRY = ("--settle", "1", "--retry-backoff", "1", "--max-attempts", "3", "--workers", "2",
         "--job-timeout", "60", "--rescan-interval", "3600")


def _mount(*args: str) -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount at teardown (lazily, should a daemon still hold a file open)."""
    made: list[Path] = []
    yield made
    for m in reversed(made):
        if subprocess.run(["umount", str(m)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(m)], capture_output=True, timeout=30)


def place(root: Path, name: str, template: Path) -> Path:
    """`root/train/<name>/weights/last.pt`, a copy of `template` last written an hour ago."""
    path = root / "train" / name / "weights" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    path.chmod(0o644)
    set_age(path, 3600)
    return path


def full_disk(root: Path, template: Path, mounts: list[Path]) -> Path:
    """A run on its own 2 MB tmpfs, filled so that the stripped copy cannot be written."""
    run = root / "train" / "full"
    run.mkdir(parents=True)
    if not _mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(run)):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    mounts.append(run)
    path = place(root, "full", template)
    st = os.statvfs(run)
    free = st.f_bavail * st.f_frsize
    # leave a few pages: room for the daemon's claim file, not for the ~75 KB stripped copy
    (run / "filler.bin").write_bytes(b"\0" * max(0, free - 16 * 1024))
    return path


def read_only_dir(root: Path, template: Path, mounts: list[Path]) -> Path:
    if not can_drop_privileges():
        pytest.skip("needs root and prctl to run the daemon with file permissions enforced")
    path = place(root, "rodir", template)
    path.parent.chmod(0o555)
    return path


def read_only_mount(root: Path, template: Path, mounts: list[Path]) -> Path:
    path = place(root, "romount", template)
    weights = path.parent
    if not _mount("--bind", str(weights), str(weights)):
        pytest.skip("cannot bind-mount here (needs root and CAP_SYS_ADMIN)")
    mounts.append(weights)
    if not _mount("-o", "remount,bind,ro", str(weights)):
        pytest.skip("cannot remount a bind mount read-only here")
    return path


CASES: dict[str, tuple[Callable[[Path, Path, list[Path]], Path], str]] = {
    "disk-full": (full_disk, "disk full (no space left on device)"),
    "read-only-dir": (read_only_dir, "permission denied (cannot write to the directory)"),
    "read-only-mount": (read_only_mount, "read-only filesystem"),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", sorted(CASES))
def test_failed_writes_keep_the_original_retry_and_the_daemon_serves_on(
        ckpts: Path, root: Path, tmp_path: Path, mounts: list[Path],
        daemons: Callable[..., Daemon], case: str) -> None:
    """Attempts 1..3 fail with the cause, the original is intact, healthy runs are stripped."""
    make, cause = CASES[case]
    template = ckpts / "yolov5.pt"
    broken = make(root, template, mounts)
    healthy = place(root, "healthy", template)
    original = broken.read_bytes()

    d = daemons(root, *RETRY, privileged=case != "read-only-dir")
    failed = d.wait_events("ckpt.failed", 3, timeout=150, path=str(broken))
    assert [(e["attempt"], e["final"]) for e in failed] == [(1, False), (2, False), (3, True)]
    assert all(e["error_type"] == "write" and cause in e["error"] for e in failed), failed
    assert [e["retry_in_s"] for e in failed[:2]] == [1.0, 2.0]
    assert d.events("ckpt.stripped", path=str(healthy)) and is_valid_stripped(healthy)

    # still serving after the last attempt: a run that appears now is found and stripped
    staged = place(tmp_path / "staging", "late", template)
    os.rename(staged.parent.parent, root / "train" / "late")  # one event: the folder moved in
    late = root / "train" / "late" / "weights" / "last.pt"
    d.wait_events("ckpt.stripped", 1, timeout=60, path=str(late))
    assert is_valid_stripped(late)

    assert d.terminate() == 0
    assert d.events("daemon.stopped")
    assert broken.read_bytes() == original
    assert temp_files(root) == []


# Strips one file in a fresh interpreter under RLIMIT_FSIZE, as a daemon started with a file-size
# limit would: CPython ignores SIGXFSZ, so the write fails with EFBIG instead of killing the worker.
_UNDER_FSIZE = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
from ckpt_watchd.worker import StripJob, run_job
o = run_job(StripJob(path=sys.argv[1]))
print(json.dumps({"status": o.status, "error_type": o.error_type, "error": o.error}))
"""


@pytest.mark.timeout(120)
def test_file_size_limit_fails_the_strip_cleanly(ckpts: Path, tmp_path: Path) -> None:
    """Under RLIMIT_FSIZE below the stripped size: 'file too large', no temp, original intact."""
    path = tmp_path / "weights" / "last.pt"
    path.parent.mkdir()
    shutil.copyfile(ckpts / "yolov5.pt", path)
    original = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _UNDER_FSIZE, str(path), str(16 * 1024)],
                          capture_output=True, text=True, timeout=100, env=clean_env())
    assert proc.returncode == 0, f"the worker died: {proc.returncode}\n{proc.stderr[-2000:]}"
    result = json.loads(proc.stdout)
    assert result == {"status": "failed", "error_type": "write",
                      "error": "write failed: file too large for this filesystem or limit"}
    assert path.read_bytes() == original and temp_files(path.parent) == []
