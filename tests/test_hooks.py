"""The --on-stripped hook: real child processes, their environment, no shell, timeouts."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest

from ckpt_watchd.ops.hooks import hook_argv, hook_env, run_hook

PY = shlex.quote(sys.executable)
FILES = [("/runs/exp/weights/last.pt", 1000, 300), ("/runs/exp/weights/best.pt", 900, 250)]

# The hook writes what it sees as JSON: its environment (ours only), argv and working directory.
DUMP = """
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("CKPT_STRIPPED_")}
json.dump({"env": env, "argv": sys.argv[1:], "cwd": os.getcwd()}, open(sys.argv[1], "w"))
"""


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "exp"
    (d / "weights").mkdir(parents=True)
    return d


def dump_hook(tmp_path: Path) -> tuple[str, Path]:
    script = tmp_path / "dump.py"
    script.write_text(DUMP)
    out = tmp_path / "seen.json"
    return f"{PY} {shlex.quote(str(script))} {shlex.quote(str(out))}", out


def test_hook_sees_run_files_and_sizes(tmp_path: Path, run_dir: Path) -> None:
    """The hook runs in the run folder with the run, each file and the byte totals in its env."""
    cmd, out = dump_hook(tmp_path)
    res = run_hook(cmd, shell=False, timeout=60, run_dir=str(run_dir), files=FILES)
    assert res.ok, res
    assert (res.returncode, res.error) == (0, None)
    seen = json.loads(out.read_text())
    assert seen["cwd"] == str(run_dir)
    env = seen["env"]
    assert env["CKPT_STRIPPED_RUN"] == str(run_dir)
    assert env["CKPT_STRIPPED_FILES"].split("\n") == [p for p, _, _ in FILES]
    assert json.loads(env["CKPT_STRIPPED_FILES_JSON"]) == [p for p, _, _ in FILES]
    assert env["CKPT_STRIPPED_FILE_COUNT"] == "2"
    assert env["CKPT_STRIPPED_BYTES_BEFORE"] == "1900"
    assert env["CKPT_STRIPPED_BYTES_AFTER"] == "550"
    assert env["CKPT_STRIPPED_FILE_1"] == "/runs/exp/weights/last.pt"
    assert env["CKPT_STRIPPED_FILE_2_BYTES_BEFORE"] == "900"
    assert env["CKPT_STRIPPED_FILE_2_BYTES_AFTER"] == "250"


def test_a_file_name_with_a_newline_cannot_forge_a_line() -> None:
    """Control characters in a path are escaped in the line list; the JSON list keeps it exact."""
    evil = "/runs/train/x\n/etc/passwd/weights/last.pt"
    env = hook_env("/runs/train/x", [(evil, 10, 5)], base={})
    assert env["CKPT_STRIPPED_FILES"].split("\n") == ["/runs/train/x\\n/etc/passwd/weights/last.pt"]
    assert json.loads(env["CKPT_STRIPPED_FILES_JSON"]) == [evil]
    assert env["CKPT_STRIPPED_FILE_1"] == evil


def test_hook_inherits_the_daemons_environment(tmp_path: Path, run_dir: Path) -> None:
    """Credentials and PATH of the daemon reach the hook (an upload needs them)."""
    base = hook_env(str(run_dir), FILES, base={"PATH": "/usr/bin", "AWS_PROFILE": "ckpt"})
    assert base["AWS_PROFILE"] == "ckpt"
    assert base["PATH"] == "/usr/bin"
    assert base["CKPT_STRIPPED_RUN"] == str(run_dir)


def test_without_shell_metacharacters_are_literal_arguments(tmp_path: Path, run_dir: Path) -> None:
    """Without shell=True, `;`, `$VAR` and `>` reach the program as plain arguments."""
    cmd, out = dump_hook(tmp_path)
    marker = tmp_path / "injected"
    res = run_hook(f"{cmd} ; touch {marker} '$CKPT_STRIPPED_RUN' '>' x", shell=False, timeout=60,
                   run_dir=str(run_dir), files=FILES)
    assert res.ok, res
    assert json.loads(out.read_text())["argv"][1:] == [
        ";", "touch", str(marker), "$CKPT_STRIPPED_RUN", ">", "x"]
    assert not marker.exists()


def test_shell_true_runs_through_sh(tmp_path: Path, run_dir: Path) -> None:
    """With shell=True the command is a sh script: `;`, variables and redirection work."""
    out = tmp_path / "out.txt"
    res = run_hook(f'echo "$CKPT_STRIPPED_BYTES_BEFORE" > {out}; echo done >> {out}', shell=True,
                   timeout=60, run_dir=str(run_dir), files=FILES)
    assert res.ok, res
    assert out.read_text() == "1900\ndone\n"
    assert hook_argv("a; b", shell=True) == ["/bin/sh", "-c", "a; b"]


def test_nonzero_exit_is_a_failure(run_dir: Path) -> None:
    """A hook that exits 3 gives ok False, returncode 3 and says so."""
    res = run_hook(f"{PY} -c 'raise SystemExit(3)'", shell=False, timeout=60,
                   run_dir=str(run_dir), files=FILES)
    assert (res.ok, res.returncode, res.error) == (False, 3, "exited with status 3")


def test_killed_by_a_signal_is_named(run_dir: Path) -> None:
    """A hook that dies of a signal reports which one."""
    res = run_hook(f"{PY} -c 'import os, signal; os.kill(os.getpid(), signal.SIGABRT)'",
                   shell=False, timeout=60, run_dir=str(run_dir), files=FILES)
    assert (res.ok, res.returncode, res.error) == (False, -6, "killed by SIGABRT")


def _gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_timeout_kills_the_whole_process_group(tmp_path: Path, run_dir: Path) -> None:
    """On timeout the hook and everything it started are killed; ok False, "timed out"."""
    pidfile = tmp_path / "child.pid"
    # sh starts a background grandchild and waits; only killing the group reaches the grandchild.
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    res = run_hook(script, shell=True, timeout=1.0, run_dir=str(run_dir), files=FILES)
    assert res.ok is False
    assert res.returncode is None
    assert res.error is not None and "timed out" in res.error
    assert 1.0 <= res.duration_s < 60
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 30
    while not _gone_or_zombie(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling with a deadline for the kernel to finish the kill
    assert _gone_or_zombie(grandchild)


@pytest.mark.parametrize(("cmd", "error"), [
    ("", "bad --on-stripped command '': empty command"),
    ("upload 'unbalanced", "No closing quotation"),
    ("/nonexistent/ckpt-upload --now", "cannot run '/nonexistent/ckpt-upload': command not found"),
])
def test_commands_that_cannot_start_are_failures_not_exceptions(
        run_dir: Path, cmd: str, error: str) -> None:
    """An empty, unparsable or missing command is an ok=False result, never an exception."""
    res = run_hook(cmd, shell=False, timeout=60, run_dir=str(run_dir), files=FILES)
    assert res.ok is False
    assert res.returncode is None
    assert res.error is not None and error in res.error


def test_missing_run_folder_is_a_failure(tmp_path: Path) -> None:
    """A run folder that vanished before the hook ran is reported, not raised."""
    res = run_hook("true", shell=False, timeout=60, run_dir=str(tmp_path / "gone"), files=FILES)
    assert res.ok is False
    assert res.error is not None and "no such folder" in res.error


def test_hook_does_not_inherit_our_stdin(tmp_path: Path, run_dir: Path) -> None:
    """The hook reads EOF from stdin, so one waiting for input cannot hang until the timeout."""
    out = tmp_path / "stdin.txt"
    res = run_hook(f"cat > {out}", shell=True, timeout=60, run_dir=str(run_dir), files=FILES)
    assert res.ok, res
    assert out.read_text() == ""
    assert os.environ.get("CKPT_STRIPPED_RUN") is None  # the daemon's own env is left alone
