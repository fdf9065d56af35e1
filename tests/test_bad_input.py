"""Bad input: one test per row of the issue's table.

Each asserts the one-line message (naming the file), exit code 1, and that nothing was modified:
the file's bytes (and, where it matters, its mtime and the directory) are as they were, and no temp
file is left behind. Malicious pickles also prove that the file their payload would create never
appears.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_watchd.engine import atomic, safeload, zipwrite
from ckpt_watchd.engine import checkpoint as engine
from fixtures import payloads
from fixtures.harness import FileState, run_cli, run_cli_as_plain_user, temp_files


class CallLog:
    """Calls counted in a file: a monkeypatched function runs in the strip's forked process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, name: str) -> int:
        with open(self.path, "a") as f:
            f.write(name + "\n")
        return len(self.read())

    def read(self) -> list[str]:
        return self.path.read_text().split() if self.path.exists() else []


def _strip_fails(path: Path, capsys: Any, *extra: str) -> str:
    """Run `strip PATH`, check exit 1 and the one line naming the file; return the message."""
    code, lines, _ = run_cli(["strip", *extra, str(path)], capsys)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(f"{path}: failed: "), lines
    return lines[0].removeprefix(f"{path}: failed: ")


def _assert_rejected(path: Path, capsys: Any, expected: str) -> None:
    before = FileState.of(path)
    assert expected in _strip_fails(path, capsys)
    assert FileState.of(path) == before
    assert temp_files(path.parent) == []


def test_missing_path(tmp_path: Path, capsys: Any) -> None:
    """A path that does not exist: 'no such file', and nothing is created."""
    path = tmp_path / "last.pt"
    assert "no such file" in _strip_fails(path, capsys)
    assert list(tmp_path.iterdir()) == []


def test_directory(tmp_path: Path, capsys: Any) -> None:
    """A directory is refused as such and left as it was."""
    path = tmp_path / "weights"
    path.mkdir()
    (path / "inner.txt").write_text("x")
    assert "is a directory" in _strip_fails(path, capsys)
    assert [p.name for p in path.iterdir()] == ["inner.txt"]
    assert temp_files(tmp_path) == []


def test_symlink_is_never_followed(checkpoint: Callable[..., Path], tmp_path: Path,
                                   capsys: Any) -> None:
    """A symlink to a real checkpoint is refused; the link and its target are untouched."""
    target = checkpoint("yolov5")
    link = tmp_path / "last.pt"
    link.symlink_to(target)
    before = FileState.of(target)
    assert "symlink (never followed)" in _strip_fails(link, capsys)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert FileState.of(target) == before
    assert temp_files(tmp_path) == []


@pytest.mark.timeout(30)
def test_fifo_does_not_hang(tmp_path: Path, capsys: Any) -> None:
    """A FIFO with no writer is refused at once instead of blocking on open."""
    path = tmp_path / "last.pt"
    os.mkfifo(path)
    assert "is a FIFO" in _strip_fails(path, capsys)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


def test_character_device(tmp_path: Path, capsys: Any) -> None:
    """A character device (like /dev/null) is refused without being opened."""
    path = tmp_path / "last.pt"
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a device node here: {e}")
    assert "character device" in _strip_fails(path, capsys)
    assert stat.S_ISCHR(os.lstat(path).st_mode)


def test_empty_file(tmp_path: Path, capsys: Any) -> None:
    """A 0-byte file (a trainer that just opened it) is 'empty', not corrupt."""
    path = tmp_path / "last.pt"
    path.touch()
    _assert_rejected(path, capsys, "empty file")


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.999])
def test_truncated_file_is_a_torn_write(generated: Path, tmp_path: Path, capsys: Any,
                                        fraction: float) -> None:
    """A prefix of a valid checkpoint is reported as an incomplete or torn write."""
    data = (generated / "yolov5.pt").read_bytes()
    path = tmp_path / "last.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    _assert_rejected(path, capsys, "incomplete or torn write")


def test_random_bytes(tmp_path: Path, capsys: Any) -> None:
    """Random bytes are 'not a PyTorch checkpoint'."""
    rng = random.Random(7)
    data = bytes([0x42]) + bytes(rng.getrandbits(8) for _ in range(4095))
    path = tmp_path / "last.pt"
    path.write_bytes(data)
    _assert_rejected(path, capsys, "not a PyTorch checkpoint")


def test_legacy_format_is_refused_as_unsupported(checkpoint: Callable[..., Path],
                                                 capsys: Any) -> None:
    """A legacy (pre-1.6, non-zip) file is refused before torch's legacy loader could run."""
    path = checkpoint("yolov5_legacy")
    assert path.read_bytes()[:2] == b"\x80\x02"
    _assert_rejected(path, capsys, "unsupported: the legacy (pre-1.6) torch format")


def test_top_level_not_a_dict(checkpoint: Callable[..., Path], capsys: Any) -> None:
    """A checkpoint whose top level is a list is an unrecognised layout."""
    _assert_rejected(checkpoint("toplevel_list"), capsys, "unrecognised checkpoint layout")


def test_torchscript_archive_is_refused(tmp_path: Path, capsys: Any) -> None:
    """A TorchScript archive (torch.jit.save) is refused, not unpickled."""
    path = tmp_path / "last.pt"
    with warnings.catch_warnings():  # making the archive: torch deprecates jit, the test does not
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    _assert_rejected(path, capsys, "TorchScript")


def test_compressed_zip_record_is_refused(generated: Path, tmp_path: Path, capsys: Any) -> None:
    """A zip with a deflated record (torch never writes one; zip bombs do) is refused."""
    path = tmp_path / "last.pt"
    payloads.rezip(generated / "generic.pt", path, compress="data.pkl")
    _assert_rejected(path, capsys, "is compressed")


# ------------------------------------------------------------------------------ malicious pickles


def test_crafted_archive_loads_when_the_pickle_is_harmless(generated: Path,
                                                           tmp_path: Path) -> None:
    """Control for the tests below: the same hand-made archive with a plain dict loads fine."""
    path = tmp_path / "last.pt"
    harmless = payloads.whole(b"}" + payloads.pstr("epoch") + b"K\x03s")  # {'epoch': 3}
    payloads.rezip(generated / "generic.pt", path, data_pkl=harmless)
    assert safeload.load(path).obj == {"epoch": 3}


NAMES = ["os.system", "posix.system", "builtins.eval", "builtins.exec", "builtins.getattr",
         "builtins.__import__", "subprocess.Popen", "importlib.import_module", "runpy.run_path",
         "torch.load"]


@pytest.mark.parametrize("name", NAMES)
def test_dangerous_global_is_refused(generated: Path, tmp_path: Path, capsys: Any,
                                     name: str) -> None:
    """A zip checkpoint whose pickle calls a dangerous global is refused by name; nothing runs."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "last.pt"
    body = payloads.would_touch(marker, tmp_path)[name]
    payloads.rezip(generated / "generic.pt", path, data_pkl=payloads.whole(body))
    before = FileState.of(path)
    message = _strip_fails(path, capsys)
    assert f"refused unsafe global '{name}'" in message
    assert not marker.exists()
    assert FileState.of(path) == before and temp_files(tmp_path) == []
    code, _, err = run_cli(["inspect", str(path)], capsys)
    assert code == 1 and f"'{name}'" in err and not marker.exists()


def test_dangerous_global_in_a_legacy_file(tmp_path: Path, capsys: Any) -> None:
    """A bare pickle (the legacy container) is refused as legacy; nothing of it runs."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "last.pt"
    path.write_bytes(payloads.whole(payloads.would_touch(marker, tmp_path)["os.system"]))
    _assert_rejected(path, capsys, "legacy (pre-1.6) torch format")
    assert not marker.exists()


def test_protocol_2_builtin_name_is_refused(generated: Path, tmp_path: Path,
                                            capsys: Any) -> None:
    """`__builtin__.eval` (how protocol 2 spells builtins) is refused too."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "last.pt"
    payload = payloads.call(payloads.pglobal("__builtin__", "eval"),
                            payloads.pstr(f"__import__('os').system('touch {marker}')"))
    payloads.rezip(generated / "generic.pt", path, data_pkl=payloads.whole(payload))
    _assert_rejected(path, capsys, "eval")
    assert not marker.exists()


# ------------------------------------------------------------------------------ permissions


def _plain_user_strip(path: Path) -> subprocess.CompletedProcess[str]:
    try:
        return run_cli_as_plain_user(["strip", str(path)])
    except subprocess.SubprocessError as e:  # prctl refused: no way to drop root's bypass
        pytest.skip(f"cannot drop the permission-bypassing capabilities: {e}")


@pytest.mark.e2e
def test_no_read_permission(checkpoint: Callable[..., Path]) -> None:
    """A file the user cannot read: 'permission denied (no read permission)', exit 1."""
    path = checkpoint("yolov5")
    os.chmod(path, 0o200)
    before = FileState.of(path)
    proc = _plain_user_strip(path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"{path}: failed: permission denied (no read permission)"
    assert FileState.of(path) == before


@pytest.mark.e2e
def test_no_write_permission_on_the_directory(checkpoint: Callable[..., Path],
                                              tmp_path: Path) -> None:
    """A readable file in a read-only directory: the temp file cannot be made, source intact."""
    weights = tmp_path / "weights"
    path = checkpoint("yolov5", directory=weights)
    before = FileState.of(path)
    os.chmod(weights, 0o555)
    try:
        proc = _plain_user_strip(path)
    finally:
        os.chmod(weights, 0o755)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith(f"{path}: failed: cannot create a temp file")
    assert "permission denied" in line
    assert FileState.of(path) == before and temp_files(weights) == []


# ------------------------------------------------------------------------------ mid-strip failures


def test_disk_full_during_the_write(checkpoint: Callable[..., Path], capsys: Any,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC after part of the file was written: 'disk full', temp file gone, source intact."""
    path = checkpoint("yolov5")
    calls = CallLog(path.parent.parent / "calls.log")  # the strip runs in a forked process

    def failing(real: Callable[..., int]) -> Callable[..., int]:
        def call(*args: Any) -> int:
            if calls.add(real.__name__) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args)
        return call

    # zipwrite writes with pwrite and copies kept weights with copy_file_range
    monkeypatch.setattr(zipwrite.os, "pwrite", failing(os.pwrite))
    monkeypatch.setattr(zipwrite.os, "copy_file_range", failing(os.copy_file_range))
    _assert_rejected(path, capsys, "disk full")
    assert len(calls.read()) > 3  # the failure really happened mid-write
    assert "copy_file_range" in calls.read()


def test_disk_full_during_the_write_torch_save_fallback(checkpoint: Callable[..., Path],
                                                        capsys: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through the `torch.save` path used for zip64-sized files."""
    path = checkpoint("yolov5")
    monkeypatch.setattr(zipwrite, "available", lambda: False)
    real_write = atomic.RecordingWriter.write
    calls = CallLog(path.parent.parent / "calls.log")

    def write(self: atomic.RecordingWriter, data: bytes) -> int:
        if calls.add(str(len(data))) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(atomic.RecordingWriter, "write", write)
    _assert_rejected(path, capsys, "disk full")
    assert len(calls.read()) > 3


def test_source_changing_during_the_strip(checkpoint: Callable[..., Path], generated: Path,
                                          capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trainer rewriting the file mid-strip: 'changed while stripping', its bytes win."""
    path = checkpoint("yolov5")
    newer = (generated / "yolov5_fp32.pt").read_bytes()
    real_verify = engine.verify

    def verify(expected: Any, written: Path, layout: Any = None, **kwargs: Any) -> None:
        with open(path, "r+b") as f:  # in place, like torch.save / write_bytes
            f.truncate(0)
            f.write(newer)
        real_verify(expected, written, layout, **kwargs)

    monkeypatch.setattr(engine, "verify", verify)
    message = _strip_fails(path, capsys)
    assert "changed while stripping" in message
    assert path.read_bytes() == newer
    assert temp_files(path.parent) == []
