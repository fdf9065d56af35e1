"""Prometheus metrics and the /metrics + /healthz endpoint, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import builtins
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ckpt_watchd.errors import StartupError
from ckpt_watchd.ops import metrics as metrics_mod
from ckpt_watchd.ops.metrics import Metrics, MetricsServer, parse_addr, probe, serve
from ckpt_watchd.outcome import FAILED, SKIPPED, STRIPPED, WOULD_STRIP, Outcome

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Health:
    """A health() the test flips."""

    def __init__(self) -> None:
        self.state: tuple[bool, str] = (True, "ok")

    def __call__(self) -> tuple[bool, str]:
        return self.state


@pytest.fixture
def live() -> Iterator[tuple[Metrics, Health, MetricsServer]]:
    m, h = Metrics(), Health()
    server = serve("127.0.0.1:0", m, h)
    yield m, h, server
    server.close()


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with _NO_PROXY.open(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers["Content-Type"], e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def test_outcomes_counters_bytes_and_duration(
        live: tuple[Metrics, Health, MetricsServer]) -> None:
    """Each outcome status feeds its own counter; only stripped files add bytes and a duration."""
    m, _, server = live
    m.record_outcome(Outcome(path="/r/a/weights/last.pt", status=STRIPPED, bytes_before=1000,
                             bytes_after=300, duration_s=0.2))
    m.record_outcome(Outcome(path="/r/a/weights/best.pt", status=STRIPPED, bytes_before=500,
                             bytes_after=100, duration_s=40.0))
    m.record_outcome(Outcome(path="/r/b/weights/last.pt", status=SKIPPED, reason="already",
                             bytes_before=99, bytes_after=99, duration_s=0.01))
    m.record_outcome(Outcome(path="/r/c/weights/last.pt", status=FAILED, error="torn",
                             duration_s=1.0))
    m.record_outcome(Outcome(path="/r/d/weights/last.pt", status=WOULD_STRIP, bytes_before=7,
                             bytes_after=3))
    code, ctype, text = get(server.port, "/metrics")
    assert code == 200
    assert ctype.startswith("text/plain")
    assert value(text, "ckpt_watchd_checkpoints_stripped_total") == 2
    assert value(text, "ckpt_watchd_checkpoints_skipped_total") == 1
    assert value(text, "ckpt_watchd_checkpoints_failed_total") == 1
    assert value(text, "ckpt_watchd_checkpoints_would_strip_total") == 1
    assert value(text, "ckpt_watchd_bytes_before_total") == 1500
    assert value(text, "ckpt_watchd_bytes_after_total") == 400
    assert value(text, "ckpt_watchd_strip_duration_seconds_count") == 2
    assert value(text, "ckpt_watchd_strip_duration_seconds_sum") == pytest.approx(40.2)
    assert value(text, "ckpt_watchd_strip_duration_seconds_bucket", le="0.25") == 1
    assert value(text, "ckpt_watchd_strip_duration_seconds_bucket", le="60.0") == 2


def test_gauges_restarts_hooks_and_scan_time(live: tuple[Metrics, Health, MetricsServer]) -> None:
    """Gauges hold the last values set; restarts and hooks count; the scan time is exported."""
    m, _, server = live
    m.set_gauges(runs_watched=9, runs_settling=4, queue_depth=2)
    m.set_gauges(runs_watched=7, runs_settling=3, queue_depth=1)
    m.worker_restarted()
    m.worker_restarted()
    m.hook_finished(True)
    m.hook_finished(False)
    m.hook_finished(False)
    m.scan_completed(1_700_000_000.5)
    text = get(server.port, "/metrics")[2]
    assert value(text, "ckpt_watchd_runs_watched") == 7
    assert value(text, "ckpt_watchd_runs_settling") == 3
    assert value(text, "ckpt_watchd_queue_depth") == 1
    assert value(text, "ckpt_watchd_worker_restarts_total") == 2
    assert value(text, "ckpt_watchd_hooks_total", result="ok") == 1
    assert value(text, "ckpt_watchd_hooks_total", result="failed") == 2
    assert value(text, "ckpt_watchd_last_scan_timestamp_seconds") == 1_700_000_000.5


def test_every_metric_is_ours_and_no_label_carries_a_path(
        live: tuple[Metrics, Health, MetricsServer]) -> None:
    """Only ckpt_watchd_* series, and no label value looks like a path (cardinality, privacy)."""
    m, _, server = live
    m.record_outcome(Outcome(path="/secret/run/weights/last.pt", status=STRIPPED, bytes_before=2,
                             bytes_after=1))
    m.hook_finished(True)
    text = get(server.port, "/metrics")[2]
    assert "/secret" not in text
    for (name, labels), _ in samples(text).items():
        assert name.startswith("ckpt_watchd_")
        assert all("/" not in v for _, v in labels)


def test_two_instances_do_not_share_a_registry() -> None:
    """Each Metrics has its own registry: two daemons (or tests) in one process do not collide."""
    a, b = Metrics(), Metrics()
    a.worker_restarted()
    text_b = b.exposition()[0].decode()
    assert value(text_b, "ckpt_watchd_worker_restarts_total") == 0


def test_healthz_follows_the_health_callable(live: tuple[Metrics, Health, MetricsServer]) -> None:
    """/healthz is 200 "ok" while health() says so, 503 with its reason otherwise."""
    _, health, server = live
    assert get(server.port, "/healthz")[::2] == (200, "ok\n")
    health.state = (False, "observer thread died")
    assert get(server.port, "/healthz")[::2] == (503, "observer thread died\n")
    health.state = (True, "ok")
    assert get(server.port, "/healthz")[0] == 200


def test_a_health_callable_that_raises_reads_as_unhealthy() -> None:
    """A health() that raises gives 503 naming the error, not a crashed handler."""
    def broken() -> tuple[bool, str]:
        raise RuntimeError("store closed")

    server = serve("127.0.0.1:0", Metrics(), broken)
    try:
        code, _, body = get(server.port, "/healthz")
    finally:
        server.close()
    assert code == 503
    assert "RuntimeError: store closed" in body


def test_unknown_path_is_404(live: tuple[Metrics, Health, MetricsServer]) -> None:
    """Anything but /metrics and /healthz is a 404."""
    assert get(live[2].port, "/")[0] == 404


def test_scrapes_from_many_threads_at_once(live: tuple[Metrics, Health, MetricsServer]) -> None:
    """The server answers concurrent scrapes (a threaded server: a slow client blocks nobody)."""
    m, _, server = live
    m.worker_restarted()
    slow = socket.create_connection(("127.0.0.1", server.port))  # never sends a request
    results: list[int] = []
    lock = threading.Lock()

    def scrape() -> None:
        code = get(server.port, "/metrics")[0]
        with lock:
            results.append(code)

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        slow.close()
    assert results == [200] * 8


def test_bind_conflict_is_a_startup_error(live: tuple[Metrics, Health, MetricsServer]) -> None:
    """A port already in use is a StartupError naming the address, not a traceback."""
    addr = f"127.0.0.1:{live[2].port}"
    with pytest.raises(StartupError, match=r"--metrics-addr 127\.0\.0\.1:\d+: cannot listen"):
        serve(addr, Metrics(), Health())


def test_closed_server_refuses_connections(live: tuple[Metrics, Health, MetricsServer]) -> None:
    """close() stops serving and frees the port."""
    port = live[2].port
    live[2].close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    again = serve(f"127.0.0.1:{port}", Metrics(), Health())  # the port can be reused at once
    again.close()


@pytest.mark.parametrize(("addr", "expected"), [
    ("127.0.0.1:9308", ("127.0.0.1", 9308)),
    ("[::1]:9308", ("::1", 9308)),
    (":9308", ("", 9308)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
])
def test_parse_addr(addr: str, expected: tuple[str, int]) -> None:
    """HOST:PORT, [IPv6]:PORT and :PORT (all interfaces) are understood."""
    assert parse_addr(addr) == expected


@pytest.mark.parametrize("addr", ["9308", "host:", "host:http", "host:70000"])
def test_parse_addr_rejects(addr: str) -> None:
    """Anything that is not HOST:PORT is a StartupError."""
    with pytest.raises(StartupError, match="--metrics-addr"):
        parse_addr(addr)


def test_probe_exit_codes(live: tuple[Metrics, Health, MetricsServer]) -> None:
    """The HEALTHCHECK probe exits 0 while /healthz is 200, 1 on 503 or when nothing listens."""
    _, health, server = live
    assert probe(f"127.0.0.1:{server.port}") == 0
    assert probe(f"0.0.0.0:{server.port}") == 0  # a wildcard listen address is probed on loopback
    health.state = (False, "wedged")
    assert probe(f"127.0.0.1:{server.port}") == 1
    server.close()
    assert probe(f"127.0.0.1:{server.port}", timeout=5) == 1
    assert probe("not an address") == 1


def test_missing_prometheus_client_is_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing prometheus_client (a dependency) is a StartupError saying the install is broken."""
    real_import = builtins.__import__

    def no_prometheus(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    with pytest.raises(StartupError, match=r"cannot import prometheus_client \(prometheus_client\)"
                       r".*installation of ckpt-watchd is broken") as raised:
        metrics_mod.Metrics()
    assert "[metrics]" not in str(raised.value)  # no extra to install: it is a dependency
