"""The `--on-stripped` hook: run one user command after a run's checkpoints were stripped.

It owns the command's argv (shlex-split, never a shell unless asked), its environment variables,
its timeout (the whole process group is killed) and turning every way it can go wrong into a
HookResult. It never raises and never touches the checkpoints: a failed hook is audited by the
service, the strip stands.

Environment the command sees, on top of the daemon's own:
  CKPT_STRIPPED_RUN           the run's folder (the one holding weights/); also the hook's cwd
  CKPT_STRIPPED_FILES_JSON    the stripped files, a JSON list of absolute paths (exact, any name)
  CKPT_STRIPPED_FILES         the same, one per line, control characters escaped (\n, \x1b):
                              a name with a newline cannot forge a line; for exact names use
                              the _JSON list or CKPT_STRIPPED_FILE_<n>
  CKPT_STRIPPED_FILE_COUNT    how many files; then for n = 1..COUNT:
  CKPT_STRIPPED_FILE_<n>, CKPT_STRIPPED_FILE_<n>_BYTES_BEFORE, CKPT_STRIPPED_FILE_<n>_BYTES_AFTER
  CKPT_STRIPPED_BYTES_BEFORE, CKPT_STRIPPED_BYTES_AFTER   totals over the files, in bytes
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ckpt_watchd.ops import display

SHELL = "/bin/sh"


@dataclass(frozen=True, slots=True)
class HookResult:
    ok: bool
    returncode: int | None
    error: str | None
    duration_s: float


def hook_env(run_dir: str, files: list[tuple[str, int, int]],
             base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The hook's environment: `base` (default: ours) plus the CKPT_WATCHD_* variables above."""
    env = dict(os.environ if base is None else base)
    env["CKPT_STRIPPED_RUN"] = run_dir
    env["CKPT_STRIPPED_FILES"] = "\n".join(display.printable(path) for path, _, _ in files)
    env["CKPT_STRIPPED_FILES_JSON"] = json.dumps([path for path, _, _ in files])
    env["CKPT_STRIPPED_FILE_COUNT"] = str(len(files))
    env["CKPT_STRIPPED_BYTES_BEFORE"] = str(sum(before for _, before, _ in files))
    env["CKPT_STRIPPED_BYTES_AFTER"] = str(sum(after for _, _, after in files))
    for n, (path, before, after) in enumerate(files, start=1):
        env[f"CKPT_STRIPPED_FILE_{n}"] = path
        env[f"CKPT_STRIPPED_FILE_{n}_BYTES_BEFORE"] = str(before)
        env[f"CKPT_STRIPPED_FILE_{n}_BYTES_AFTER"] = str(after)
    return env


def hook_argv(cmd: str, *, shell: bool) -> list[str]:
    """The argv run_hook executes; ValueError for an empty command or unbalanced quotes."""
    if shell:
        if not cmd.strip():
            raise ValueError("empty command")
        return [SHELL, "-c", cmd]
    argv = shlex.split(cmd)
    if not argv:
        raise ValueError("empty command")
    return argv


def run_hook(cmd: str, *, shell: bool, timeout: float, run_dir: str,
             files: list[tuple[str, int, int]]) -> HookResult:
    """Run the hook in the run's folder and wait for it, at most `timeout` seconds."""
    started = time.monotonic()

    def result(ok: bool, returncode: int | None, error: str | None) -> HookResult:
        return HookResult(ok, returncode, error, time.monotonic() - started)

    try:
        argv = hook_argv(cmd, shell=shell)
    except ValueError as e:
        return result(False, None, f"bad --on-stripped command {cmd!r}: {e}")
    try:
        # Its own session, so a timeout can kill everything it started, and a SIGINT sent to the
        # daemon's terminal does not reach it. stdout goes to our stderr: our stdout is not a log.
        proc = subprocess.Popen(argv, cwd=run_dir, env=hook_env(run_dir, files),
                                stdin=subprocess.DEVNULL, stdout=2, start_new_session=True)
    except FileNotFoundError as e:
        if e.filename == run_dir:
            return result(False, None, f"cannot run the hook in {run_dir}: no such folder")
        return result(False, None, f"cannot run {argv[0]!r}: command not found")
    except OSError as e:
        return result(False, None, f"cannot run {argv[0]!r}: {e.strerror or e}")
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.wait()
        return result(False, None, f"timed out after {timeout:g} s; killed its process group")
    except BaseException:
        # Interrupted while waiting (KeyboardInterrupt): leave no orphaned hook behind.
        _kill_group(proc.pid)
        proc.wait()
        raise
    if returncode == 0:
        return result(True, 0, None)
    if returncode < 0:
        return result(False, returncode, f"killed by {_signame(-returncode)}")
    return result(False, returncode, f"exited with status {returncode}")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
