"""End-to-end harness: checkpoint templates, the daemon as a subprocess, its audit, waiting.

Owns the session's YOLOv5-shaped templates (made by `trainer_sim.py make-checkpoints` in a
subprocess, so this process never defines trainer classes), `Daemon` and the sd_notify listener;
reading the audit and polling with a deadline are shared with the reliability suite
(`fixtures.daemon_io`). It never sleeps except as a poll period.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.daemon_io import TEMP_PREFIX as TEMP_PREFIX
from fixtures.daemon_io import DaemonOutput, clean_env, read_audit
from fixtures.daemon_io import temp_files as temp_files  # re-exported to the tests
from fixtures.daemon_io import wait_until as wait_until  # re-exported to the tests

E2E_DIR = Path(__file__).resolve().parent
TRAINER = E2E_DIR / "trainer_sim.py"


@dataclass(frozen=True)
class Template:
    """One unstripped YOLOv5-shaped checkpoint: the bytes a trainer would have written."""

    path: Path
    data: bytes
    sha256: str


@dataclass(frozen=True)
class Templates:
    medium: tuple[Template, ...]  # ~2 MB each, three epochs with different weights
    small: Template  # ~0.3 MB, for tests that need hundreds of files


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    """Generate the checkpoint templates once per session (one torch import, a few seconds)."""
    out = tmp_path_factory.mktemp("ckpt-templates")
    subprocess.run([sys.executable, str(TRAINER), "make-checkpoints", str(out)], check=True,
                   timeout=120, env=clean_env())

    def load(name: str) -> Template:
        path = out / f"{name}.pt"
        data = path.read_bytes()
        return Template(path, data, hashlib.sha256(data).hexdigest())

    return Templates(medium=tuple(load(f"medium-{i}") for i in range(3)), small=load("small-0"))


# ---------------------------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_run(root: Path, rel: str, template: Template, *, files: Sequence[str] = ("last.pt",
             "best.pt"), age_s: float = 3600.0) -> Path:
    """A run folder `root/rel/weights` holding copies of `template`, last written `age_s` ago."""
    weights = root / rel / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    when = time.time() - age_s
    for name in files:
        target = weights / name
        shutil.copyfile(template.path, target)
        os.utime(target, (when, when))
    return weights




def is_valid_stripped(path: Path) -> bool:
    """Loads through the daemon's safe loader and is what a strip makes: epoch -1, no optimizer."""
    from ckpt_watchd.engine import safeload  # torch: fine in the test process, never in the daemon's
    from ckpt_watchd.errors import CheckpointError

    try:
        obj = safeload.load(path).obj
    except CheckpointError:
        return False
    return isinstance(obj, dict) and obj.get("epoch") == -1 and obj.get("optimizer") is None \
        and obj.get("ema") is None


# ---------------------------------------------------------------------------------- waiting


# ---------------------------------------------------------------------------------- processes


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3, the state, is index 0)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def is_gone(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (workers and multiprocessing's resource tracker)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = proc_stat(int(entry.name))
        if fields is not None and fields[0] not in ("Z", "X"):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class NotifyListener:
    """A systemd-style NOTIFY_SOCKET: collects the daemon's READY=1 / STATUS= datagrams.

    Drained on a thread, because a notify sender blocks once the receiver's queue is full.
    """

    def __init__(self) -> None:
        self.address = f"@ckpt-watchd-e2e-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(b"\0" + self.address[1:].encode())
        self._sock.settimeout(0.2)
        self._lock = threading.Lock()
        self.messages: list[str] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data.decode(errors="replace"))

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._sock.close()


class Daemon(DaemonOutput):
    """`python -m ckpt_watchd --root ROOT --log-format json ...` as a subprocess."""

    counter = 0

    def __init__(self, root: Path, logs: Path, *args: str, settle: float = 2.0,
                 notify: NotifyListener | None = None) -> None:
        Daemon.counter += 1
        logs.mkdir(parents=True, exist_ok=True)
        config = logs / "empty.toml"  # shields the tests from a real /etc/ckpt-watchd/config.toml
        config.touch()
        self.root = root
        self.audit_path = root / ".ckpt-watchd" / "audit.jsonl"
        self.notify = notify
        self.argv = [sys.executable, "-m", "ckpt_watchd", "--root", str(root), "--log-format",
                     "json", "--config", str(config), "--settle", f"{settle:g}", *args]
        self.stderr_path = logs / f"daemon-{Daemon.counter}.stderr"
        self.audit_offset = len(read_audit(self.audit_path))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        env = clean_env(**({"NOTIFY_SOCKET": self.notify.address} if self.notify else {}))
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, env=env,
                                         cwd=self.stderr_path.parent)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0, status: str = "") -> str:
        """READY=1, then a STATUS= line containing `status`: start-up and a first round are done.

        The daemon sends STATUS= at the end of every round of its loop ("watching N runs, S
        settling, Q queued; ..."), so waiting for a given text waits for a state, not a time.
        """
        assert self.notify is not None, "start the daemon with notify=True to wait for READY"
        notify = self.notify

        def ready() -> str | None:
            msgs = notify.snapshot()
            if "READY=1" not in msgs:
                assert self.alive(), f"daemon exited before READY\n{self.stderr_tail()}"
                return None
            return next((m for m in msgs[msgs.index("READY=1"):]
                         if m.startswith("STATUS=") and status in m), None)

        return wait_until(ready, timeout, f"READY=1 and a STATUS with {status!r}",
                          detail=lambda: f"notify: {notify.snapshot()[-3:]}\n{self.stderr_tail()}")

    def workers(self) -> list[int]:
        return [p for p in descendants(self.pid) if "multiprocessing.spawn" in cmdline(p)]

    def kill9(self) -> None:
        """SIGKILL the daemon and wait until every process it had started is gone too."""
        assert self.proc is not None
        below = descendants(self.pid)
        self.proc.kill()
        self.proc.wait(timeout=30)
        wait_until(lambda: all(is_gone(p) for p in below), 30,
                   f"the killed daemon's workers {below} to die")

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()




@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """A factory for Daemon objects; any still running at the end of the test is killed."""
    made: list[Daemon] = []
    listeners: list[NotifyListener] = []

    def make(root: Path, *args: str, settle: float = 2.0, notify: bool = False) -> Daemon:
        listener = NotifyListener() if notify else None
        listeners.extend([listener] if listener else [])
        made.append(Daemon(root, tmp_path / "logs", *args, settle=settle, notify=listener))
        return made[-1].start()

    yield make
    for d in made:
        with contextlib.suppress(Exception):
            d.cleanup()
    for listener in listeners:
        listener.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "runs"
    r.mkdir()
    return r
