"""Prometheus metrics and the /metrics + /healthz HTTP endpoint (`--metrics-addr`).

It owns the metric names, the daemon's own CollectorRegistry and a small threaded HTTP server.
It imports prometheus_client (a dependency) only when metrics are turned on, never puts a path
in a label, and decides nothing about health: the service passes `health()`.
`python -m ckpt_watchd.ops.metrics probe` is the container HEALTHCHECK (no curl in slim images).
"""

from __future__ import annotations

import os
import socket
import socketserver
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ckpt_watchd.errors import StartupError
from ckpt_watchd.outcome import FAILED, SKIPPED, STRIPPED, WOULD_STRIP, Outcome

# Strips take from a fraction of a second (a small model) to many minutes (a big one on NFS).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
HealthCheck = Callable[[], tuple[bool, str]]


class Metrics:
    """Every ckpt_watchd_* metric, registered in a registry of its own (not the global one)."""

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError as e:
            raise StartupError(f"--metrics-addr: cannot import prometheus_client ({e}): this "
                               "installation of ckpt-watchd is broken (prometheus_client is a "
                               "dependency); reinstall ckpt-watchd with its dependencies") from None
        self._prom: Any = prom
        self.registry: Any = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "ckpt_watchd_"
        self.stripped = prom.Counter(p + "checkpoints_stripped", "Checkpoints stripped", registry=r)
        self.skipped = prom.Counter(p + "checkpoints_skipped",
                                    "Checkpoints left alone (already stripped, kept, unrecognised)",
                                    registry=r)
        self.failed = prom.Counter(p + "checkpoints_failed", "Strip attempts that failed",
                                   registry=r)
        self.would_strip = prom.Counter(p + "checkpoints_would_strip",
                                        "Checkpoints a --dry-run would have stripped", registry=r)
        self.bytes_before = prom.Counter(p + "bytes_before", "Size of stripped checkpoints before "
                                         "the strip, in bytes", registry=r)
        self.bytes_after = prom.Counter(p + "bytes_after", "Size of stripped checkpoints after "
                                        "the strip, in bytes", registry=r)
        self.duration = prom.Histogram(p + "strip_duration_seconds", "Seconds one successful strip "
                                       "took in its worker", buckets=DURATION_BUCKETS, registry=r)
        self.runs_watched = prom.Gauge(p + "runs_watched", "Runs the daemon is watching",
                                       registry=r)
        self.runs_settling = prom.Gauge(p + "runs_settling", "Runs written to recently, waiting "
                                        "for their quiet period", registry=r)
        self.queue_depth = prom.Gauge(p + "queue_depth", "Checkpoints waiting for a worker",
                                      registry=r)
        self.worker_restarts = prom.Counter(p + "worker_restarts", "Times the worker pool was "
                                            "rebuilt after a crash or a hung job", registry=r)
        self.hooks = prom.Counter(p + "hooks", "--on-stripped commands run, by result",
                                  ["result"], registry=r)
        self.last_scan = prom.Gauge(p + "last_scan_timestamp_seconds", "Unix time the last full "
                                    "scan of the root completed", registry=r)

    def record_outcome(self, outcome: Outcome) -> None:
        if outcome.status == STRIPPED:
            self.stripped.inc()
            if outcome.bytes_before is not None and outcome.bytes_after is not None:
                self.bytes_before.inc(outcome.bytes_before)
                self.bytes_after.inc(outcome.bytes_after)
            self.duration.observe(outcome.duration_s)
        elif outcome.status == SKIPPED:
            self.skipped.inc()
        elif outcome.status == FAILED:
            self.failed.inc()
        elif outcome.status == WOULD_STRIP:
            self.would_strip.inc()

    def set_gauges(self, runs_watched: int, runs_settling: int, queue_depth: int) -> None:
        self.runs_watched.set(runs_watched)
        self.runs_settling.set(runs_settling)
        self.queue_depth.set(queue_depth)

    def worker_restarted(self) -> None:
        self.worker_restarts.inc()

    def hook_finished(self, ok: bool) -> None:
        self.hooks.labels(result="ok" if ok else "failed").inc()

    def scan_completed(self, unix_time: float) -> None:
        self.last_scan.set(unix_time)

    def exposition(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its Content-Type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


def parse_addr(addr: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' (all interfaces) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise StartupError(f"--metrics-addr: must be HOST:PORT (got {addr!r})")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 metrics: Metrics, health: HealthCheck) -> None:
        self.address_family = family
        self.metrics = metrics
        self.health = health
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup of the address (getfqdn), which can hang
        # for many seconds on a node without DNS; nothing here needs the name.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "ckpt-watchd"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype = self.server.metrics.exposition()
            self._reply(200, body, ctype)
        elif path == "/healthz":
            try:
                ok, reason = self.server.health()
            except Exception as e:  # a broken check must read as unhealthy, not as a 500 page
                ok, reason = False, f"health check raised {type(e).__name__}: {e}"
            self._reply(200 if ok else 503, ((reason or "ok") if ok else reason).encode() + b"\n")
        else:
            self._reply(404, b"not found: try /metrics or /healthz\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Every scrape would otherwise print a line to stderr, drowning the daemon's own log.
        pass


class MetricsServer:
    """The HTTP endpoint, serving on a daemon thread until close()."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self.port: int = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="ckpt-watchd-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(addr: str, metrics: Metrics, health: HealthCheck) -> MetricsServer:
    """Listen on addr and serve /metrics and /healthz; StartupError if it cannot bind."""
    host, port = parse_addr(addr)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"--metrics-addr {addr}: cannot resolve {host!r}: "
                           f"{e.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    try:
        server = _Server((str(sockaddr[0]), int(sockaddr[1])), family, metrics, health)
    except OSError as e:
        raise StartupError(f"--metrics-addr {addr}: cannot listen: {e.strerror or e}") from None
    return MetricsServer(server)


def probe(addr: str | None = None, timeout: float = 5.0) -> int:
    """GET /healthz on the metrics address: 0 if healthy, else 1 (HEALTHCHECK exit codes)."""
    addr = addr or os.environ.get("CKPT_WATCHD_METRICS_ADDR") or ""
    try:
        host, port = parse_addr(addr)
    except StartupError:
        print(f"ckpt-watchd probe: CKPT_WATCHD_METRICS_ADDR is not HOST:PORT ({addr!r})",
              file=sys.stderr)
        return 1
    # A wildcard listen address is reachable on loopback.
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url_host = f"[{host}]" if ":" in host else host
    # No proxy: an http_proxy in the container's environment must not route a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{url_host}:{port}/healthz", timeout=timeout) as r:
            print(r.read().decode(errors="replace").strip())
            return 0
    except urllib.error.HTTPError as e:
        with e:
            reason = e.read().decode(errors="replace").strip()
        print(f"unhealthy ({e.code}): {reason}", file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"unreachable: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if sys.argv[1:] != ["probe"]:
        print("usage: python -m ckpt_watchd.ops.metrics probe", file=sys.stderr)
        sys.exit(2)
    sys.exit(probe())
