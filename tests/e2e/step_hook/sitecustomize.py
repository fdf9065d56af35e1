"""Stops a daemon under test inside a folder strip, at a chosen disk step (tests only).

Put on PYTHONPATH by tests/e2e/test_folder_crash_consistency.py, so that every Python process of
the daemon (the main process, which replays journals at start-up, and its spawned workers, whose
forked job children strip folders) installs `ckpt_watchd.engine.folder.STEP_HOOK`: the hook the
folder strip calls before each step that changes the disk. The steps of all those processes are
counted in one file; the process that reaches step CKPT_E2E_STOP_AT writes what it was about to
do to CKPT_E2E_STOPPED and stops itself (SIGSTOP), so the test's kill -9 lands exactly there.
Without CKPT_E2E_STOP_AT set it does nothing, and it never changes what a strip does.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _install() -> None:
    stop_at = os.environ.get("CKPT_E2E_STOP_AT")
    counter, stopped = os.environ.get("CKPT_E2E_STEPS"), os.environ.get("CKPT_E2E_STOPPED")
    if stop_at is None or counter is None or stopped is None:
        return
    try:
        from ckpt_watchd.engine import folder
    except ImportError:  # an interpreter of the test run that is not the daemon's
        return
    target = int(stop_at)

    def folder_being_stripped() -> str | None:
        frame = sys._getframe(1)
        while frame is not None:
            for value in frame.f_locals.values():
                if isinstance(value, folder._Folder):
                    return str(value.path)
            frame = frame.f_back
        return None

    def hook(label: str) -> None:
        fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{os.getpid():>8} {label}\n".encode())
            # the position after our own line: one unique count per step, whoever writes
            lines = _lines_before(counter, os.lseek(fd, 0, os.SEEK_CUR))
        finally:
            os.close(fd)
        if lines != target:
            return
        tmp = f"{stopped}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"step": target, "label": label, "pid": os.getpid(),
                       "folder": folder_being_stripped()}, f)
        os.rename(tmp, stopped)
        os.kill(os.getpid(), signal.SIGSTOP)

    folder.STEP_HOOK = hook


def _lines_before(path: str, end: int) -> int:
    """How many whole lines come before the one ending at byte `end` (our own line)."""
    with open(path, "rb") as f:
        return f.read(end).count(b"\n") - 1


_install()
