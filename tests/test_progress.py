"""The progress display of long one-shot commands: drawn only on a terminal, never inside
another line, and nothing at all when stderr is a file or a pipe."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from ckpt_watchd.ops.progress import Progress
from fixtures.daemon_io import clean_env


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_off_writes_nothing() -> None:
    """Not a terminal (a StringIO, a pipe, a file): not one byte, whatever is called."""
    out = io.StringIO()
    p = Progress(out)
    assert not p.on
    p.start(3, "stripping")
    p.note("last.pt: 1.0 GB written")
    p.advance()
    p.log_stream().write("a log line\n")
    p.done()
    assert out.getvalue() == "a log line\n"


def test_bar_counts_and_redraws_at_most_ten_times_a_second() -> None:
    """Each draw clears the line; a note between redraw slots waits for the next one."""
    out, clock = io.StringIO(), Clock()
    p = Progress(out, enabled=True, clock=clock)
    p.start(4, "stripping")
    assert out.getvalue().endswith("stripping [" + " " * 30 + "] 0/4")
    p.note("a.pt")
    assert "a.pt" not in out.getvalue()  # too soon after the last draw
    clock.t = 0.5
    p.note("a.pt: 1.2 GB written")
    assert out.getvalue().endswith("] 0/4  a.pt: 1.2 GB written")
    clock.t = 1.0
    p.advance()
    p.advance()  # the clock did not move: not drawn
    assert out.getvalue().endswith("] 1/4, 3s left")
    clock.t = 2.0
    p.advance(2)  # the last one always draws
    assert out.getvalue().endswith("[" + "#" * 30 + "] 4/4")
    p.done()
    assert out.getvalue().endswith("\r\x1b[2K")


def test_lines_printed_meanwhile_never_land_inside_the_bar() -> None:
    """Output and log lines first clear the bar; the bar comes back after them."""
    err, stdout, clock = io.StringIO(), io.StringIO(), Clock()
    p = Progress(err, enabled=True, clock=clock)
    p.start(2, "stripping")
    p.print("a.pt: stripped", file=stdout)
    assert stdout.getvalue() == "a.pt: stripped\n"
    logs = p.log_stream()
    print("a log line", file=logs, flush=True)
    text = err.getvalue()
    assert "\r\x1b[2Ka log line\n" in text
    assert text.endswith("] 0/2")  # drawn again below the line
    p.done()
    before = err.getvalue()
    p.advance()
    assert err.getvalue() == before  # done is done


def test_log_stream_serves_structlog() -> None:
    """The stderr log of `--once` writes through the stream: whole lines above the bar."""
    err = io.StringIO()
    p = Progress(err, enabled=True)
    p.start(1, "stripping")
    log = structlog.PrintLogger(p.log_stream())
    log.msg("ckpt.stripped path=a.pt")
    assert "\r\x1b[2Kckpt.stripped path=a.pt\n" in err.getvalue()
    assert err.getvalue().endswith("] 0/1")


def _on_a_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run argv with stderr on a pseudo-terminal (stdout a pipe): (code, stdout, stderr)."""
    master, slave = pty.openpty()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, env=clean_env()) as proc:
        os.close(slave)
        chunks = []
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            if not ready:
                proc.kill()
                pytest.fail("no output on the terminal for 120 s")
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        return proc.wait(timeout=60), out, b"".join(chunks).decode(errors="replace")


def test_strip_of_many_files_shows_progress_on_a_terminal_only(
        checkpoint: Callable[..., Path]) -> None:
    """stderr a terminal: the bar; stdout keeps one clean line per file. A pipe: nothing."""
    paths = [checkpoint("yolov5", name=f"{i}.pt") for i in range(2)]
    code, out, err = _on_a_terminal([sys.executable, "-m", "ckpt_watchd", "strip",
                                     *map(str, paths)])
    assert code == 0, err
    assert [line.split(": ")[1].split(" (")[0] for line in out.splitlines()] == ["stripped"] * 2
    assert "stripping [" in err and "] 2/2" in err
    assert err.endswith("\r\x1b[2K")  # cleared at the end
    again = subprocess.run([sys.executable, "-m", "ckpt_watchd", "strip", *map(str, paths)],
                           capture_output=True, text=True, env=clean_env(), timeout=240)
    assert again.returncode == 0 and again.stderr == ""
    assert [line.split(": ")[1] for line in again.stdout.splitlines()] == \
        ["skipped (already stripped)"] * 2


def test_once_over_a_root_shows_progress_above_which_the_log_scrolls(
        tmp_path: Path, checkpoint: Callable[..., Path]) -> None:
    """`--once` on a terminal: a bar of jobs done, with every log line whole above it."""
    root = tmp_path / "runs"
    files = [checkpoint("yolov5", name=n, directory=root / "train" / f"exp{i}" / "weights")
             for i in range(2) for n in ("last.pt", "best.pt")]
    old = 1_000_000_000
    for f in files:
        os.utime(f, (old, old))
    code, _out, err = _on_a_terminal([sys.executable, "-m", "ckpt_watchd", "--root", str(root),
                                      "--once", "--settle", "0.2", "--workers", "1",
                                      "--no-follow-writers"])
    assert code == 0, err
    assert "stripping [" in err and "] 4/4" in err
    assert err.count("ckpt.stripped") == 4
    # after a bar, the next thing on the terminal is always the clearing of its line
    after_bars = re.findall(r"\] \d+/\d+(?:, \d+s left)?(.|$)", err, re.DOTALL)
    assert after_bars and set(after_bars) <= {"\r", ""}
    assert "\r\x1b[2K" in err.split("daemon.stopped")[0][-400:]  # the bar gone before the last line


def test_scan_on_a_terminal_shows_progress_and_keeps_json_clean(
        tmp_path: Path, checkpoint: Callable[..., Path]) -> None:
    """`scan --json` with stderr a terminal: the bar there, stdout only the JSON document."""
    root = tmp_path / "runs"
    for i in range(2):
        f = checkpoint("yolov5", name="last.pt", directory=root / "train" / f"exp{i}" / "weights")
        os.utime(f, (1_000_000_000, 1_000_000_000))
    code, out, err = _on_a_terminal([sys.executable, "-m", "ckpt_watchd", "scan", str(root),
                                     "--json"])
    assert code == 0, err
    assert "estimating [" in err and "] 2/2" in err and err.endswith("\r\x1b[2K")
    assert json.loads(out)["totals"]["checkpoints"] == 2
