"""NFS-safe claims: exclusive create, stale takeover, safe release, and real processes racing."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ckpt_watchd.records import claim as claim_mod
from ckpt_watchd.records.claim import Claim, claim_path, try_claim
from fixtures.daemon_io import read_audit

HOUR = 3600.0


def ckpt(tmp_path: Path, run: str = "exp") -> Path:
    d = tmp_path / run / "weights"
    d.mkdir(parents=True, exist_ok=True)
    p = d / "last.pt"
    p.write_bytes(b"checkpoint")
    return p


def test_claim_file_sits_next_to_the_checkpoint_with_our_prefix(tmp_path: Path) -> None:
    """The claim is `.ckpt-watchd-claim.<name>.lock` in the checkpoint's folder, JSON host/pid/time."""
    p = ckpt(tmp_path)
    c = try_claim(p, host="gpu-1", pid=42, now=1000.0, stale_after=HOUR)
    assert c is not None
    assert c.lock == p.parent / ".ckpt-watchd-claim.last.pt.lock" == claim_path(p)
    assert c.lock.name.startswith(".ckpt-watchd-")
    record = json.loads(c.lock.read_text())
    assert (record["host"], record["pid"], record["time"]) == ("gpu-1", 42, 1000.0)
    assert record["token"] == c.token


def test_second_claim_on_a_held_path_is_refused(tmp_path: Path) -> None:
    """While one claim is fresh, another host's try_claim returns None and changes nothing."""
    p = ckpt(tmp_path)
    first = try_claim(p, host="gpu-1", pid=1, now=1000.0, stale_after=HOUR)
    assert first is not None
    before = first.lock.read_bytes()
    assert try_claim(p, host="gpu-2", pid=2, now=1000.0 + HOUR, stale_after=HOUR) is None
    assert first.lock.read_bytes() == before


def test_release_frees_the_path(tmp_path: Path) -> None:
    """After release() the claim file is gone and the next claim succeeds."""
    p = ckpt(tmp_path)
    first = try_claim(p, host="gpu-1", pid=1, now=1000.0, stale_after=HOUR)
    assert first is not None and first.release() is True
    assert not first.lock.exists()
    second = try_claim(p, host="gpu-2", pid=2, now=1001.0, stale_after=HOUR)
    assert second is not None and not second.taken_over
    assert sorted(x.name for x in p.parent.iterdir()) == [
        ".ckpt-watchd-claim.last.pt.lock", "last.pt"]


def test_stale_claim_is_taken_over(tmp_path: Path) -> None:
    """A claim older than stale_after (by its recorded time) is replaced by the new claimant's."""
    p = ckpt(tmp_path)
    dead = try_claim(p, host="gpu-1", pid=1, now=1000.0, stale_after=HOUR)
    assert dead is not None
    new = try_claim(p, host="gpu-2", pid=2, now=1000.0 + HOUR + 1, stale_after=HOUR)
    assert new is not None and new.taken_over
    assert json.loads(new.lock.read_text())["host"] == "gpu-2"
    # No breaker or moved-aside file is left behind.
    assert sorted(x.name for x in p.parent.iterdir()) == [
        ".ckpt-watchd-claim.last.pt.lock", "last.pt"]


def test_release_of_a_taken_over_claim_keeps_the_new_owners_file(tmp_path: Path) -> None:
    """The old owner's late release() returns False and leaves the new owner's claim in place."""
    p = ckpt(tmp_path)
    old = try_claim(p, host="gpu-1", pid=1, now=1000.0, stale_after=HOUR)
    assert old is not None
    new = try_claim(p, host="gpu-2", pid=2, now=1000.0 + 2 * HOUR, stale_after=HOUR)
    assert new is not None
    assert old.release() is False
    assert json.loads(new.lock.read_text())["token"] == new.token
    assert new.release() is True
    assert not new.lock.exists()


def test_empty_claim_file_counts_as_fresh_until_its_mtime_is_old(tmp_path: Path) -> None:
    """A claim file not written yet (or torn by a crash) is judged by its mtime."""
    p = ckpt(tmp_path)
    lock = claim_path(p)
    lock.touch()
    mtime = lock.stat().st_mtime
    assert try_claim(p, host="gpu-2", pid=2, now=mtime + 10, stale_after=HOUR) is None
    c = try_claim(p, host="gpu-2", pid=2, now=mtime + HOUR + 10, stale_after=HOUR)
    assert c is not None and c.taken_over


def test_a_crashed_takeover_does_not_block_the_path_forever(tmp_path: Path) -> None:
    """A breaker left by a daemon that died mid-takeover is itself taken over once stale."""
    p = ckpt(tmp_path)
    assert try_claim(p, host="gpu-1", pid=1, now=1000.0, stale_after=HOUR) is not None
    breaker = claim_path(p).with_name(claim_path(p).name + ".break")
    breaker.write_text(json.dumps({"host": "gpu-3", "pid": 3, "time": 1000.0 + HOUR + 5}))
    # The breaker is fresh: someone is taking over right now, so we stand back.
    assert try_claim(p, host="gpu-2", pid=2, now=1000.0 + HOUR + 10, stale_after=HOUR) is None
    c = try_claim(p, host="gpu-2", pid=2, now=1000.0 + 3 * HOUR, stale_after=HOUR)
    assert c is not None and c.taken_over
    assert not breaker.exists()


_KILLED_MID_RELEASE = """
import os, signal, sys
from pathlib import Path
from ckpt_watchd.records import claim
c = claim.try_claim(Path(sys.argv[1]), host="gpu-1", pid=os.getpid(), now=1000.0, stale_after=3600.0)
os.unlink = lambda path: os.kill(os.getpid(), signal.SIGKILL)  # dies between rename and unlink
c.release()
"""


def test_sweep_removes_the_grave_of_a_daemon_killed_mid_release(tmp_path: Path) -> None:
    """kill -9 between a claim's rename and unlink leaves a grave; the next start-up sweep removes it."""
    p = ckpt(tmp_path)
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_RELEASE, str(p)], timeout=60)
    assert done.returncode == -signal.SIGKILL
    graves = [x for x in p.parent.iterdir() if x.name.endswith(".gone")]
    assert len(graves) == 1 and not claim_path(p).exists()
    # an hour is not over, yet the grave's maker is provably gone
    assert claim_mod.sweep(p.parent, host="gpu-1", now=time.time(), stale_after=HOUR) == graves
    assert sorted(x.name for x in p.parent.iterdir()) == ["last.pt"]


def test_sweep_leaves_a_live_or_foreign_grave_until_it_is_stale(tmp_path: Path) -> None:
    """A grave whose maker runs, or was made elsewhere, may be mid-check: it stays until stale."""
    p = ckpt(tmp_path)
    live = p.parent / f"{claim_path(p).name}.{claim_mod._maker()}.{os.getpid()}.{'a' * 32}.gone"
    foreign = p.parent / f"{claim_path(p).name}.0123456789ab.{_dead_pid()}.{'b' * 32}.gone"
    for g in (live, foreign):
        g.write_text("{}")
    now = time.time()
    assert claim_mod.sweep(p.parent, host="gpu-1", now=now, stale_after=HOUR) == []
    assert live.exists() and foreign.exists()
    assert sorted(claim_mod.sweep(p.parent, host="gpu-1", now=now + 2 * HOUR, stale_after=HOUR)) == \
        sorted([live, foreign])


def test_sweep_removes_an_abandoned_breaker_and_keeps_a_fresh_one(tmp_path: Path) -> None:
    """A breaker whose claim is long gone is removed once abandoned; a fresh one is respected."""
    p = ckpt(tmp_path)
    breaker = claim_path(p).with_name(claim_path(p).name + ".break")
    breaker.write_text(json.dumps({"host": "gpu-3", "pid": 3, "time": 1000.0}))
    assert claim_mod.sweep(p.parent, host="gpu-1", now=1000.0 + 60, stale_after=HOUR) == []
    assert breaker.exists()
    assert claim_mod.sweep(p.parent, host="gpu-1", now=1000.0 + 2 * HOUR, stale_after=HOUR) == [breaker]
    assert not breaker.exists()


def _dead_pid() -> int:
    """A pid no process can have: above the kernel's pid_max."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except OSError:
        return 2**22 + 1


def test_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    """Same host, same PID namespace, process gone (a kill -9'd daemon): no waiting for the timeout."""
    p = ckpt(tmp_path)
    assert try_claim(p, host="gpu-1", pid=_dead_pid(), now=1000.0, stale_after=HOUR) is not None
    c = try_claim(p, host="gpu-1", pid=os.getpid(), now=1001.0, stale_after=HOUR)
    assert c is not None and c.taken_over
    assert json.loads(c.lock.read_text())["pid"] == os.getpid()


def test_claim_of_a_live_process_on_this_host_is_respected(tmp_path: Path) -> None:
    """Same host and the recorded process is running: the claim holds until the timeout."""
    p = ckpt(tmp_path)
    assert try_claim(p, host="gpu-1", pid=os.getpid(), now=1000.0, stale_after=HOUR) is not None
    assert try_claim(p, host="gpu-1", pid=os.getpid() + 1, now=1001.0, stale_after=HOUR) is None


@pytest.mark.parametrize("change", [{"host": "gpu-2"}, {"pidns": "0:0"}, {"pidns": None}])
def test_pid_from_another_host_or_pid_namespace_is_never_looked_up(
        tmp_path: Path, change: dict[str, object]) -> None:
    """A dead-looking pid recorded on another host or in another PID namespace waits for the timeout."""
    p = ckpt(tmp_path)
    first = try_claim(p, host="gpu-1", pid=_dead_pid(), now=1000.0, stale_after=HOUR)
    assert first is not None
    record = json.loads(first.lock.read_text())
    first.lock.write_text(json.dumps({**record, **change}))
    assert try_claim(p, host="gpu-1", pid=os.getpid(), now=1001.0, stale_after=HOUR) is None
    assert try_claim(p, host="gpu-1", pid=os.getpid(), now=1001.0 + HOUR,
                     stale_after=HOUR) is not None


def test_unwritable_folder_raises_oserror(tmp_path: Path) -> None:
    """A folder where no claim can be created is an OSError, not a silent 'someone else has it'."""
    with pytest.raises(OSError):
        try_claim(tmp_path / "missing" / "last.pt", host="h", pid=1, now=0.0, stale_after=HOUR)


# ---------------------------------------------------------------------------- interleavings
# Each test below stops one taker at a chosen step and lets another daemon act right there, so the
# race that a real NFS fleet hits once a month happens every time.


def test_taker_that_lost_the_race_after_reading_does_not_remove_the_winners_claim(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A saw the stale claim, then B took it over: A backs off and B's claim survives."""
    p = ckpt(tmp_path)
    assert try_claim(p, host="dead", pid=1, now=0.0, stale_after=HOUR) is not None
    real_read = claim_mod._read
    b_claims: list[Claim | None] = []

    def read_then_let_b_in(path: Path) -> Any:
        seen = real_read(path)
        monkeypatch.setattr(claim_mod, "_read", real_read)
        b_claims.append(try_claim(p, host="B", pid=2, now=2 * HOUR, stale_after=HOUR))
        return seen

    monkeypatch.setattr(claim_mod, "_read", read_then_let_b_in)
    a = try_claim(p, host="A", pid=1, now=2 * HOUR, stale_after=HOUR)
    b = b_claims[0]
    assert b is not None and b.taken_over
    assert a is None
    assert json.loads(claim_path(p).read_text())["token"] == b.token


def test_second_taker_stands_back_while_the_breaker_is_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While A is mid-takeover (holding the breaker), B gets None instead of a second claim."""
    p = ckpt(tmp_path)
    assert try_claim(p, host="dead", pid=1, now=0.0, stale_after=HOUR) is not None
    real_remove_if = claim_mod._remove_if
    b_claims: list[Claim | None] = []

    def let_b_in_then_remove(path: Path, expected: Any) -> bool:
        if path == claim_path(p) and not b_claims:
            b_claims.append(try_claim(p, host="B", pid=2, now=2 * HOUR, stale_after=HOUR))
        return real_remove_if(path, expected)

    monkeypatch.setattr(claim_mod, "_remove_if", let_b_in_then_remove)
    a = try_claim(p, host="A", pid=1, now=2 * HOUR, stale_after=HOUR)
    assert b_claims == [None]
    assert a is not None and a.taken_over


def test_claim_made_between_the_check_and_the_removal_is_put_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stale owner releases and C claims just before A removes: A backs off, C's claim stays."""
    p = ckpt(tmp_path)
    old = try_claim(p, host="slow", pid=1, now=0.0, stale_after=HOUR)
    assert old is not None
    real_rename = os.rename
    c_claims: list[Claim | None] = []

    def release_and_claim_first(src: Any, dst: Any) -> None:
        if Path(src) == claim_path(p) and not c_claims:
            monkeypatch.setattr(os, "rename", real_rename)
            assert old.release() is True
            c_claims.append(try_claim(p, host="C", pid=3, now=2 * HOUR, stale_after=HOUR))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", release_and_claim_first)
    a = try_claim(p, host="A", pid=1, now=2 * HOUR, stale_after=HOUR)
    c = c_claims[0]
    assert a is None
    assert c is not None
    assert json.loads(claim_path(p).read_text())["token"] == c.token
    assert c.release() is True
    assert sorted(x.name for x in p.parent.iterdir()) == ["last.pt"]


def test_takeover_between_the_owners_check_and_removal_survives_the_release(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old owner checks its token, B takes over, then the owner removes: B's claim stays."""
    p = ckpt(tmp_path)
    old = try_claim(p, host="slow", pid=1, now=0.0, stale_after=HOUR)
    assert old is not None
    real_read = claim_mod._read
    b_claims: list[Claim | None] = []

    def read_then_let_b_in(path: Path) -> Any:
        seen = real_read(path)
        monkeypatch.setattr(claim_mod, "_read", real_read)
        b_claims.append(try_claim(p, host="B", pid=2, now=2 * HOUR, stale_after=HOUR))
        return seen

    monkeypatch.setattr(claim_mod, "_read", read_then_let_b_in)
    assert old.release() is False
    b = b_claims[0]
    assert b is not None
    assert json.loads(claim_path(p).read_text())["token"] == b.token


# ---------------------------------------------------------------------------- real processes


def _race(paths: list[str], host: str, now: float, barrier: Any, results: Any) -> None:
    """One contender: claim every path it can, as fast as it can, after all have started."""
    barrier.wait()
    won = []
    for path in paths:
        c = try_claim(Path(path), host=host, pid=os.getpid(), now=now, stale_after=HOUR)
        if c is not None:
            won.append(path)
    results.put((host, won))


def _run_race(paths: list[Path], now: float, contenders: int = 4) -> dict[str, list[str]]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(contenders)
    results = ctx.Queue()
    procs = [ctx.Process(target=_race, args=([str(p) for p in paths], f"host-{i}", now, barrier,
                                             results)) for i in range(contenders)]
    for proc in procs:
        proc.start()
    try:
        out = dict(results.get(timeout=120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
    assert all(proc.exitcode == 0 for proc in procs)
    return out


def _assert_each_claimed_once(paths: list[Path], won: dict[str, list[str]]) -> None:
    claimed = [p for ps in won.values() for p in ps]
    assert sorted(claimed) == sorted(str(p) for p in paths)  # every path once, none twice
    for host, ps in won.items():
        for p in ps:
            assert json.loads(claim_path(Path(p)).read_text())["host"] == host


def test_processes_racing_for_fresh_paths_claim_each_exactly_once(tmp_path: Path) -> None:
    """Four processes race for 50 unclaimed checkpoints: each is claimed by exactly one."""
    paths = [ckpt(tmp_path, f"run{i:02d}") for i in range(50)]
    _assert_each_claimed_once(paths, _run_race(paths, now=1000.0))


def test_processes_racing_to_take_over_stale_claims_claim_each_exactly_once(
        tmp_path: Path) -> None:
    """Four processes race to take over 50 stale claims: each is taken over by exactly one."""
    paths = [ckpt(tmp_path, f"run{i:02d}") for i in range(50)]
    for p in paths:
        assert try_claim(p, host="dead", pid=1, now=0.0, stale_after=HOUR) is not None
    won = _run_race(paths, now=10 * HOUR)
    _assert_each_claimed_once(paths, won)
    leftovers = [x.name for p in paths for x in p.parent.iterdir()
                 if x.name.endswith((".gone", ".break"))]
    assert leftovers == []


# ---------------------------------------------------------------------------- two daemons, one root

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


@pytest.mark.e2e
def test_two_daemons_on_one_shared_root_strip_each_checkpoint_once(tmp_path: Path) -> None:
    """Two polling daemons, one root, own state dirs: every checkpoint stripped once, none failed."""
    if not CORPUS.is_dir():
        pytest.skip(f"no checkpoint corpus at {CORPUS}")
    root = tmp_path / "runs"
    an_hour_ago = time.time() - 3600
    for i in range(3):
        for rel, src in ((f"train/v5-{i}/weights/last.pt",
                          "yolov5/runs/train/v5n_interrupted/weights/last.pt"),
                         (f"train/v5-{i}/weights/best.pt",
                          "yolov5/runs/train/v5n_interrupted/weights/best.pt")):
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(CORPUS / src, dest)
            os.utime(dest, (an_hour_ago, an_hour_ago))
    checkpoints = sorted(str(p) for p in root.rglob("*.pt"))
    config = tmp_path / "empty.toml"
    config.touch()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CKPT_WATCHD_") and k != "NOTIFY_SOCKET"}
    daemons, audits = [], []
    for name in ("host-a", "host-b"):
        state = tmp_path / f"state-{name}"
        audits.append(state / "audit.jsonl")
        with open(tmp_path / f"{name}.stderr", "wb") as err:
            daemons.append(subprocess.Popen(
                [sys.executable, "-m", "ckpt_watchd", "--root", str(root), "--config", str(config),
                 "--state-dir", str(state), "--poll", "0.5", "--settle", "1", "--workers", "1",
                 "--log-format", "json"], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err))

    def stripped() -> list[str]:
        return sorted(e["path"] for a in audits for e in read_audit(a, "ckpt.stripped"))

    def logs() -> str:
        return "\n".join((tmp_path / f"{n}.stderr").read_text()[-2000:] for n in ("host-a", "host-b"))

    try:
        deadline = time.monotonic() + 240
        # both must have started too: a SIGTERM before a daemon's handlers are in kills it (-15)
        while (sorted(set(stripped())) != checkpoints
               or not all(read_audit(a, "daemon.started") for a in audits)):
            assert all(d.poll() is None for d in daemons), logs()
            assert time.monotonic() < deadline, logs()
            time.sleep(0.1)  # the poll period of this wait, not a synchronisation guess
        for d in daemons:
            d.send_signal(signal.SIGTERM)
        codes = [d.wait(timeout=60) for d in daemons]
    finally:
        for d in daemons:
            if d.poll() is None:
                d.kill()
                d.wait()
    assert codes == [0, 0], logs()
    assert stripped() == checkpoints  # each exactly once across both daemons
    assert [e for a in audits for e in read_audit(a, "ckpt.failed")] == []
    # Without claims the loser of a race strips too and finds the file "changed while stripping";
    # with them, the other daemon only ever sees the finished result.
    skipped = [e["reason"] for a in audits for e in read_audit(a, "ckpt.skipped")]
    assert set(skipped) <= {"already stripped"}, skipped
    assert list(root.rglob(".ckpt-watchd-claim.*")) == []
