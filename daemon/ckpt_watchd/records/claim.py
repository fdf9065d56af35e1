"""NFS-safe claims, so that several daemons on one shared root strip each checkpoint once.

It owns the claim file next to a checkpoint (`.ckpt-watchd-claim.<name>.lock`, created with
O_CREAT|O_EXCL, which NFSv3+ servers honour; JSON {host, pid, time, token, pidns}), stale takeover
and safe release. It knows nothing about checkpoints or clocks: the caller passes `now`. Every name
it creates starts with `.ckpt-watchd-`, so the watcher ignores it.

A claim is abandoned when it is older than `stale_after`, or at once when it was made on this host
in this PID namespace by a process that no longer exists (a daemon killed with -9 and restarted).

Takeover of a stale claim goes through a second exclusive file, the breaker, so that of many
daemons that see the same stale claim only one removes it; and a claim file is only ever removed by
renaming it to a unique name first and checking that what was moved is what was meant to go (an
owner's own claim on release, the stale claim on takeover). A claim moved by mistake is put back.
A grave's name says who made it, so that the debris of a daemon killed mid-removal (a grave or a
breaker) is swept by the next start-up: `sweep`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckpt_watchd.watch.runfiles import NotRegular

CLAIM_PREFIX = ".ckpt-watchd-claim."
_MAX_CLAIM_BYTES = 4096
_GRAVE = ".gone"
_BREAKER = ".break"


def claim_path(path: Path) -> Path:
    """The claim file for checkpoint `path`."""
    return path.parent / f"{CLAIM_PREFIX}{path.name}.lock"


@dataclass(frozen=True, slots=True)
class _Seen:
    """One read of a claim file: enough to tell later whether a file is that same claim."""

    ino: int
    dev: int
    mtime: float
    body: bytes

    def record(self) -> dict[str, object]:
        try:
            data = json.loads(self.body)
        except ValueError:  # empty or torn: its creator has not written it yet, or died doing so
            return {}
        return data if isinstance(data, dict) else {}

    def time(self) -> float:
        t = self.record().get("time")
        return float(t) if isinstance(t, int | float) else self.mtime

    def token(self) -> object:
        return self.record().get("token")

    def abandoned(self, now: float, stale_after: float, host: str) -> bool:
        if now - self.time() > stale_after:
            return True
        r, pidns = self.record(), _pid_namespace()
        pid = r.get("pid")
        # Only a pid from our own host and PID namespace can be looked up; anything else (another
        # node, another container with the same host name) waits for the timeout.
        return (pidns is not None and r.get("host") == host and r.get("pidns") == pidns
                and isinstance(pid, int) and not _pid_alive(pid))


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim this process holds on `path` until release()."""

    path: Path
    lock: Path
    host: str
    pid: int
    time: float
    token: str
    taken_over: bool = False

    def release(self) -> bool:
        """Remove the claim file if it is still ours; False if someone has taken it over."""
        try:
            seen = _read(self.lock)
            if seen is None or seen.token() != self.token:
                return False
            return _remove_if(self.lock, lambda moved: moved.token() == self.token)
        except OSError:  # something else sits under our claim's name now: not ours to remove
            return False


def try_claim(path: Path, *, host: str, pid: int, now: float, stale_after: float) -> Claim | None:
    """Claim checkpoint `path`; None if another live claim holds it.

    A claim whose recorded time is more than `stale_after` seconds before `now`, or whose process
    is known to be gone (same host, same PID namespace), is taken over.
    OSErrors other than "exists" (a read-only or unwritable folder) propagate: the strip would fail
    there too, and the caller should record it as such.
    """
    lock = claim_path(path)
    token = uuid.uuid4().hex
    body = json.dumps({"host": host, "pid": pid, "time": now, "token": token,
                       "pidns": _pid_namespace()}).encode()

    def claim(taken_over: bool = False) -> Claim | None:
        if not _create(lock, body):
            return None
        return Claim(path, lock, host, pid, now, token, taken_over)

    got = claim()
    if got is not None:
        return got
    seen = _read(lock)
    if seen is None:  # released between our create and our read
        return claim()
    if not seen.abandoned(now, stale_after, host):
        return None
    breaker = lock.with_name(lock.name + _BREAKER)
    if not _create(breaker, body):
        # Another daemon is taking it over right now, or crashed doing so long ago.
        held = _read(breaker)
        if held is None or not held.abandoned(now, stale_after, host):
            return None
        if not _remove_if(breaker, lambda moved: _same(moved, held)) or not _create(breaker, body):
            return None
    try:
        # Re-read under the breaker: the claim we saw may have been taken over and renewed since.
        current = _read(lock)
        if current is not None and (
                not _same(current, seen) or not _remove_if(lock, lambda m: _same(m, current))):
            return None
        return claim(taken_over=True)
    finally:
        _remove_if(breaker, lambda moved: moved.body == body)


def sweep(folder: Path, *, host: str, now: float, stale_after: float) -> list[Path]:
    """Remove the graves and breakers that killed daemons left in `folder`; return what went.

    A grave made on this host and PID namespace by a process that is gone goes at once; any other
    grave only once its last change (the rename) is `stale_after` old, since a live daemon on
    another node may be about to read it. A breaker goes when it is abandoned, as a claim would.
    """
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(CLAIM_PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if entry.name.endswith(_GRAVE):
            if _grave_abandoned(entry, now, stale_after):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed.append(path)
        elif entry.name.endswith(_BREAKER):
            try:
                seen = _read(path)
                if (seen is not None and seen.abandoned(now, stale_after, host)
                        and _remove_if(path, functools.partial(_same, seen))):
                    removed.append(path)
            except OSError:  # not a breaker of ours (a FIFO under its name): left alone
                continue
    return removed


def _grave_abandoned(entry: os.DirEntry[str], now: float, stale_after: float) -> bool:
    # name: <lock>.<maker>.<pid>.<uuid>.gone
    parts = entry.name[:-len(_GRAVE)].split(".")
    maker, pid = (parts[-3], parts[-2]) if len(parts) >= 3 else ("", "")
    if maker == _maker() and pid.isdigit() and not _pid_alive(int(pid)):
        return True
    try:
        return now - entry.stat(follow_symlinks=False).st_ctime > stale_after
    except FileNotFoundError:
        return False


@functools.lru_cache(maxsize=1)
def _maker() -> str:
    """This host and PID namespace, short: pids in a grave's name are only comparable within it."""
    return hashlib.sha1(f"{socket.gethostname()}|{_pid_namespace()}".encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def _pid_namespace() -> str | None:
    """Our PID namespace (device:inode of /proc/self/ns/pid), in which recorded pids are valid."""
    try:
        st = os.stat("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def _pid_alive(pid: int) -> bool:
    """False only when `pid` surely names no running process; when in doubt, alive."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"])  # a zombie is dead


def _create(path: Path, body: bytes) -> bool:
    """Exclusive create with `body`; False if the file exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, body)
    except OSError:
        # An empty claim would block the checkpoint until it went stale.
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return True


def _read(path: Path) -> _Seen | None:
    """The claim file at `path`, or None if there is none.

    Never blocks and never follows a link: a FIFO, a symlink or a device planted under a claim's
    name raises OSError (runfiles.NotRegular), which `try_claim` passes on (the strip then goes
    ahead without a claim) and the sweep skips.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(f"{path} is not a regular file")
        return _Seen(st.st_ino, st.st_dev, st.st_mtime, os.read(fd, _MAX_CLAIM_BYTES))
    finally:
        os.close(fd)


def _same(a: _Seen, b: _Seen) -> bool:
    return (a.ino, a.dev, a.body) == (b.ino, b.dev, b.body)


def _remove_if(path: Path, expected: Callable[[_Seen], bool]) -> bool:
    """Remove `path` if it is the file `expected` accepts; put back anything else it moved."""
    grave = path.with_name(f"{path.name}.{_maker()}.{os.getpid()}.{uuid.uuid4().hex}{_GRAVE}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return False
    moved = _read(grave)
    if moved is not None and expected(moved):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(grave)
        return True
    # We moved a file that replaced the one we meant (a fresh claim made after our read). Put its
    # content back unless yet another claim was made meanwhile; an owner whose claim is not put back
    # sees a foreign token on release and leaves the file alone.
    if moved is not None:
        _create(path, moved.body)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(grave)
    return False
