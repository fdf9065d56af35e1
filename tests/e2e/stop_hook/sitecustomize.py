"""Stops a daemon under test inside the strip of one checkpoint, its stripped copy on disk (tests only).

Put on PYTHONPATH by tests/e2e/test_save_period_e2e.py, so that every Python process of the daemon
(its spawned workers, and the job processes they fork) wraps `ckpt_watchd.engine.atomic.sha256_path`,
which a strip calls on its temp file once the copy is written and verified, before it looks at the
source a last time and renames. The first process that hashes a temp copy of CKPT_E2E_STOP_STRIP_OF
writes its pid and the temp's path to CKPT_E2E_STOPPED and stops itself (SIGSTOP), so that the test
can delete the checkpoint at exactly that point and then let the strip go on (SIGCONT). Without both
variables set it does nothing, and it never changes what a strip does.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any


def _install() -> None:
    target, stopped = os.environ.get("CKPT_E2E_STOP_STRIP_OF"), os.environ.get("CKPT_E2E_STOPPED")
    if not target or not stopped:
        return
    try:
        from ckpt_watchd.engine import atomic  # no torch: fine in the daemon's main process too
    except ImportError:  # an interpreter of the test run that is not the daemon's
        return
    real = atomic.sha256_path
    folder, name = os.path.split(target)

    def sha256_path(path: Any) -> str:
        where, base = os.path.split(os.fspath(path))
        if where == folder and atomic.is_temp_name(base) \
                and base.startswith(f"{atomic.TEMP_PREFIX}{name}."):
            try:  # only the first strip of that file stops
                fd = os.open(f"{stopped}.claimed", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return real(path)
            os.close(fd)
            tmp = f"{stopped}.tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "temp": os.fspath(path)}, f)
            os.replace(tmp, stopped)  # the test never reads half a record
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(path)

    atomic.sha256_path = sha256_path


_install()
