"""Who last wrote a run: fanotify event parsing, the writer registry, and the real listener."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt_watchd.watch import writers
from ckpt_watchd.watch.writers import Writers, WriterWatch, parse, process_start
from fixtures.daemon_io import wait_until


def _event(mask: int, fd: int, pid: int) -> bytes:
    return struct.pack("=IBBHQii", 24, 3, 0, 24, mask, fd, pid)


def test_parse_reads_every_event_of_a_read() -> None:
    buf = _event(writers.FAN_CLOSE_WRITE, 7, 1234) + _event(writers.FAN_Q_OVERFLOW, -1, 0)
    assert parse(buf) == [writers.Event(writers.FAN_CLOSE_WRITE, 7, 1234),
                          writers.Event(writers.FAN_Q_OVERFLOW, -1, 0)]
    assert parse(b"") == []


def test_parse_refuses_a_metadata_version_it_does_not_know() -> None:
    with pytest.raises(ValueError, match="version 2"):
        parse(struct.pack("=IBBHQii", 24, 2, 0, 24, 8, 3, 1))


def _stat(tmp_path: Path, pid: int, comm: str, state: str, start: int) -> None:
    (tmp_path / str(pid)).mkdir()
    rest = " ".join(["1"] * 18)  # fields 4..21
    (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) {state} {rest} {start} 0 0\n")


def test_process_start_reads_field_22_even_when_the_name_has_spaces_and_parens(
        tmp_path: Path) -> None:
    _stat(tmp_path, 10, "python train.py) x", "S", 98765)
    _stat(tmp_path, 11, "dead", "Z", 5)
    assert process_start(10, tmp_path) == 98765
    assert process_start(11, tmp_path) is None  # a zombie no longer trains
    assert process_start(12, tmp_path) is None  # gone


def test_process_start_of_this_process_is_stable() -> None:
    me = process_start(os.getpid())
    assert me is not None and me == process_start(os.getpid())


class Procs:
    """A fake process table: pid -> start time."""

    def __init__(self) -> None:
        self.table: dict[int, int] = {}

    def start_of(self, pid: int) -> int | None:
        return self.table.get(pid)


def test_the_last_writer_keeps_its_folder_live_until_it_exits() -> None:
    procs, reg = Procs(), Writers()
    procs.table[100] = 1
    reg.saw("/r/a/weights", 100, procs.start_of)
    assert reg.live("/r/a/weights", procs.start_of) == 100
    del procs.table[100]
    assert reg.live("/r/a/weights", procs.start_of) is None
    assert len(reg) == 0  # forgotten once seen gone


def test_a_reused_pid_is_not_the_writer() -> None:
    procs, reg = Procs(), Writers()
    procs.table[100] = 1
    reg.saw("/r/a/weights", 100, procs.start_of)
    procs.table[100] = 2  # the trainer died and another process got its pid
    assert reg.live("/r/a/weights", procs.start_of) is None


def test_a_writer_that_moved_on_to_another_run_no_longer_keeps_the_first_live() -> None:
    """A sweep trains run a, then run b, in one process: a is over once b is written."""
    procs, reg = Procs(), Writers()
    procs.table[100] = 1
    reg.saw("/r/a/weights", 100, procs.start_of)
    reg.saw("/r/b/weights", 100, procs.start_of)
    assert reg.live("/r/a/weights", procs.start_of) is None
    assert reg.live("/r/b/weights", procs.start_of) == 100
    reg.saw("/r/a/weights", 100, procs.start_of)  # ... and back to a (two runs at once)
    assert reg.live("/r/a/weights", procs.start_of) == 100


def test_a_writer_gone_before_its_event_was_read_is_not_recorded() -> None:
    procs, reg = Procs(), Writers()
    procs.table[100] = 1
    reg.saw("/r/a/weights", 100, procs.start_of)
    reg.saw("/r/a/weights", 200, procs.start_of)  # pid 200 wrote and exited before we looked
    assert reg.live("/r/a/weights", procs.start_of) is None
    reg.forget("/r/a/weights")
    assert len(reg) == 0


def test_an_unreadable_event_stream_stops_the_listener_without_raising(tmp_path: Path) -> None:
    """Events it cannot parse: it says why, forgets what it knew and answers 'not live' after."""
    import ctypes

    r, w = os.pipe()
    os.set_blocking(r, False)
    watch = WriterWatch(r, ctypes.CDLL(None, use_errno=True))
    watch.writers.saw(str(tmp_path), os.getpid(), process_start)  # as if learnt earlier
    os.write(w, struct.pack("=IBBHQii", 24, 9, 0, 24, 8, -1, 1))
    try:
        watch.drain()
        assert watch.error is not None and "version 9" in watch.error
        assert watch.live(tmp_path) is None
        os.write(w, _event(writers.FAN_CLOSE_WRITE, -1, 1))
        watch.drain()  # no longer reads
        assert os.read(r, 100) == _event(writers.FAN_CLOSE_WRITE, -1, 1)
    finally:
        watch.close()
        os.close(w)


# ----------------------------------------------------------------------- the real listener

_WRITER = r"""
import sys
with open(sys.argv[1], "wb") as f:
    f.write(b"epoch")
print("written", flush=True)
sys.stdin.readline()  # stay alive, holding nothing open, until told to go
"""


@pytest.fixture
def watch() -> Iterator[WriterWatch]:
    w, why = WriterWatch.open()
    if w is None:
        pytest.skip(f"no fanotify here: {why}")
    yield w
    w.close()


def _writer(path: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "written\n"
    return p


def _stop(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.close()
    p.wait(timeout=30)
    p.stdout.close()


@pytest.mark.parametrize("via_symlink", [False, True], ids=["plain", "symlinked-root"])
def test_the_listener_names_the_process_that_wrote_a_checkpoint(
        watch: WriterWatch, tmp_path: Path, via_symlink: bool) -> None:
    """The writer is found under the folder name the daemon walked, even through a symlink
    (the kernel names the file by its real path), and is no longer live once it exits."""
    real = tmp_path / "data" / "train" / "exp" / "weights"
    real.mkdir(parents=True)
    given = real
    if via_symlink:
        (tmp_path / "runs").symlink_to(tmp_path / "data")
        given = tmp_path / "runs" / "train" / "exp" / "weights"
    watch.watch(given)
    trainer = _writer(real / "last.pt")
    try:
        # the trainer closed the file (it printed after the with-block) and holds nothing open
        assert wait_until(lambda: watch.live(given), 10, "the writer's event") == trainer.pid
    finally:
        _stop(trainer)
    assert watch.live(given) is None


def test_the_listener_ignores_our_temp_files_our_own_writes_and_unwatched_folders(
        watch: WriterWatch, tmp_path: Path) -> None:
    weights, other = tmp_path / "a" / "weights", tmp_path / "b" / "weights"
    weights.mkdir(parents=True)
    other.mkdir(parents=True)
    watch.watch(weights)
    (weights / "last.pt").write_bytes(b"by the daemon itself")
    temp = _writer(weights / ".ckpt-watchd-last.pt.0123abcd.tmp")  # a worker's temp
    unwatched = _writer(other / "last.pt")
    marker = _writer(weights / "best.pt")  # written last: once seen, every earlier event was read
    try:
        assert wait_until(lambda: watch.live(weights), 10, "the marker's event") == marker.pid
        assert watch.live(other) is None
        assert len(watch.writers) == 1
    finally:
        for p in (temp, unwatched, marker):
            _stop(p)


def test_forgetting_a_folder_stops_listening_to_it(watch: WriterWatch, tmp_path: Path) -> None:
    weights = tmp_path / "exp" / "weights"
    weights.mkdir(parents=True)
    watch.watch(weights)
    watch.forget(weights)
    trainer = _writer(weights / "last.pt")
    try:
        watch.drain()
        assert watch.live(weights) is None and len(watch.writers) == 0
    finally:
        _stop(trainer)
