"""The Grafana dashboard and alert rule in examples/grafana, checked against the real daemon.

Every PromQL expression they hold (panel targets, variable queries, the alert rule, and the rule
docs/deploy.md quotes) is parsed by promql_parser once Grafana's variables are substituted, and
every metric it selects must be one that a running daemon's /metrics really exports.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ckpt_watchd.settings import OPTION_BY_NAME
from e2e.conftest import Daemon
from fixtures.daemon_io import wait_until

promql = pytest.importorskip("promql_parser")

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "examples" / "grafana" / "ckpt-watchd.json"
ALERT_RULES = REPO / "examples" / "grafana" / "alert-rules.yaml"
DEPLOY_DOC = REPO / "docs" / "deploy.md"

# What Grafana puts in for its own variables; any concrete duration or number parses the same.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "30s", "__interval_ms": "30000",
                    "__range": "24h", "__range_s": "86400", "__range_ms": "86400000"}
# $name, ${name}, ${name:format} and the old [[name]]
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
# A Prometheus variable query that is not PromQL itself: the selector inside it is.
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.S)
QUERY_RESULT = re.compile(r"^\s*query_result\((.*)\)\s*$", re.S)

# What the daemon calls itself unhealthy after (Service.healthy): 3 x --rescan-interval + 60 s.
SCAN_AGE_LIMIT = 3 * OPTION_BY_NAME["rescan_interval"].default + 60
SCAN_METRIC = "ckpt_watchd_last_scan_timestamp_seconds"

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---------------------------------------------------------------------------- reading the files


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def alert_rules() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(ALERT_RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside rows (a collapsed row keeps its panels in `panels`)."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def variables(dash: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def variable_query(var: dict[str, Any]) -> str:
    query = var["query"]
    return str(query["query"] if isinstance(query, dict) else query)


@dataclass
class Expr:
    where: str  # for messages: the panel, variable or rule it comes from
    text: str  # as written, Grafana variables and all
    panel: dict[str, Any] | None = None
    ast: Any = field(default=None, repr=False)


def dashboard_exprs(dash: dict[str, Any]) -> list[Expr]:
    out = []
    for panel in all_panels(dash["panels"]):
        for t in panel.get("targets", []):
            if "expr" in t:
                out.append(Expr(f"panel {panel['title']!r} target {t['refId']}", t["expr"], panel))
    for name, var in variables(dash).items():
        if var["type"] != "query":
            continue
        query = variable_query(var)
        m = LABEL_VALUES.match(query) or QUERY_RESULT.match(query)
        out.append(Expr(f"variable ${name}", m.group(1) if m else query))
    return out


def rule_exprs(rules: list[dict[str, Any]]) -> list[Expr]:
    """The data source queries of Grafana alert rules (not the __expr__ reduce/threshold steps)."""
    return [Expr(f"alert rule {rule['title']!r} query {d['refId']}", d["model"]["expr"])
            for rule in rules for d in rule["data"] if d["datasourceUid"] != "__expr__"]


def doc_exprs() -> list[Expr]:
    """`expr:` values of the YAML blocks in docs/deploy.md (the Prometheus alerting rule)."""
    yaml = pytest.importorskip("yaml")
    out = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr":
                    out.append(Expr("docs/deploy.md", str(value)))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for body in re.findall(r"^ *```yaml\n(.*?)^ *```", DEPLOY_DOC.read_text(), re.S | re.M):
        walk(yaml.safe_load(body))
    return out


def substitute(text: str, dash: dict[str, Any]) -> str:
    """The expression as Grafana sends it with every variable at "All" (its allValue)."""
    defined = variables(dash)

    def value(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        assert name in defined, f"${name} is neither a Grafana variable nor one the dashboard defines"
        var = defined[name]
        assert var["type"] == "query" and var.get("includeAll"), f"${name} has no All value"
        return str(var["allValue"])

    return VARIABLE.sub(value, text)


def parsed(exprs: list[Expr], dash: dict[str, Any]) -> list[Expr]:
    for e in exprs:
        e.ast = promql.parse(substitute(e.text, dash))
    return exprs


def everything() -> list[Expr]:
    dash = dashboard()
    return parsed(dashboard_exprs(dash) + rule_exprs(alert_rules()) + doc_exprs(), dash)


# ---------------------------------------------------------------------------- walking the AST


def nodes(ast: Any) -> list[Any]:
    seen: list[Any] = []
    promql.walk(ast, lambda node: seen.append(node))
    return seen


def metric_names(ast: Any) -> set[str]:
    """Every metric a selector names, by name or by a `__name__="..."` matcher."""
    names = set()
    for node in nodes(ast):
        selector = node.vector_selector if isinstance(node, promql.MatrixSelector) else node
        if not isinstance(selector, promql.VectorSelector):
            continue
        name = selector.name or next((m.value for m in selector.matchers.matchers
                                      if m.name == "__name__" and m.op == promql.MatchOp.Equal),
                                     None)
        assert name, f"a selector without a metric name: {selector}"
        names.add(name)
    return names


def functions(ast: Any) -> set[str]:
    return {n.func.name for n in nodes(ast) if isinstance(n, promql.Call)}


def ranges(ast: Any) -> set[float]:
    return {n.range.total_seconds() for n in nodes(ast) if isinstance(n, promql.MatrixSelector)}


def times_sixty(ast: Any) -> bool:
    return isinstance(ast, promql.BinaryExpr) and str(ast.op) == "*" \
        and isinstance(ast.rhs, promql.NumberLiteral) and ast.rhs.val == 60


@dataclass
class Panel:
    panel: dict[str, Any]
    exprs: list[Expr]

    @property
    def metrics(self) -> set[str]:
        return set().union(*(metric_names(e.ast) for e in self.exprs))

    @property
    def functions(self) -> set[str]:
        return set().union(*(functions(e.ast) for e in self.exprs))


def panels_with_queries() -> list[Panel]:
    dash = dashboard()
    exprs = parsed(dashboard_exprs(dash), dash)
    return [Panel(p, [e for e in exprs if e.panel is p])
            for p in all_panels(dash["panels"]) if p.get("targets")]


def scan_age_panels() -> list[dict[str, Any]]:
    return [p.panel for p in panels_with_queries()
            if SCAN_METRIC in p.metrics and "time" in p.functions]


def red_thresholds(panel: dict[str, Any]) -> list[float]:
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [s["value"] for s in steps if s["color"] == "red"]


# ---------------------------------------------------------------------------- the real daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str | None:
    try:
        with _NO_PROXY.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None  # not listening yet


@pytest.fixture
def exported(tmp_path: Path) -> set[str]:
    """The sample names on a real, idle daemon's /metrics once it has finished its first scan."""
    from prometheus_client.parser import text_string_to_metric_families

    root = tmp_path / "runs"
    root.mkdir()
    port = free_port()
    # As root the daemon would also open fanotify; an empty root needs none of it.
    daemon = Daemon(root, tmp_path / "logs", "--metrics-addr", f"127.0.0.1:{port}",
                    "--state-dir", str(root / ".ckpt-watchd"), "--no-follow-writers").start()
    try:
        def after_first_scan() -> list[Any] | None:
            assert daemon.alive(), f"daemon exited\n{daemon.stderr_tail()}"
            text = scrape(port)
            if text is None:
                return None
            families = list(text_string_to_metric_families(text))
            scanned = any(s.name == SCAN_METRIC and s.value > 0 for f in families for s in f.samples)
            return families if scanned else None

        families = wait_until(after_first_scan, 30, "/metrics after the first scan",
                              detail=daemon.stderr_tail)
        assert daemon.terminate() == 0, daemon.stderr_tail()
    finally:
        daemon.cleanup()
    return {s.name for f in families for s in f.samples}


# ---------------------------------------------------------------------------- tests


def test_every_expression_parses() -> None:
    """Every target, variable query and alert expression is valid PromQL after substitution."""
    dash = dashboard()
    exprs = dashboard_exprs(dash) + rule_exprs(alert_rules()) + doc_exprs()
    assert len(exprs) >= 15
    errors = []
    for e in exprs:
        try:
            promql.parse(substitute(e.text, dash))
        except ValueError as err:
            errors.append(f"{e.where}: {err}: {e.text}")
    assert errors == []


def test_variables_used_are_defined() -> None:
    """Each $variable in an expression is a Grafana built-in or a variable the dashboard defines."""
    dash = dashboard()
    used = {next(g for g in m.groups() if g)
            for e in dashboard_exprs(dash) for m in VARIABLE.finditer(e.text)}
    assert {"job", "instance", "__rate_interval"} <= used
    assert used - set(GRAFANA_BUILTINS) <= set(variables(dash))
    for e in dashboard_exprs(dash):
        assert "$" not in substitute(e.text, dash), e.where
    for e in rule_exprs(alert_rules()) + doc_exprs():  # no dashboard variables outside Grafana's UI
        assert "$" not in e.text, e.where


@pytest.mark.e2e
def test_every_metric_is_one_the_daemon_exports(exported: set[str]) -> None:
    """Each metric the dashboard, the alert rule and the docs select is on the daemon's /metrics."""
    used = set().union(*(metric_names(e.ast) for e in everything()))
    assert used, "no metric names found"
    assert used - exported == set(), f"not exported by the daemon (it exports {sorted(exported)})"


def test_dashboard_is_importable() -> None:
    """The JSON has what Grafana's import needs: a data source input, title, uid, panels, schema."""
    dash = dashboard()
    assert dash["title"] and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"])
    assert dash.get("id") is None  # an id would make Grafana overwrite another dashboard
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 39
    (ds_input,) = dash["__inputs"]
    assert (ds_input["type"], ds_input["pluginId"]) == ("datasource", "prometheus")
    # The import replaces ${DS_PROMETHEUS} with the data source picked: the variable starts there.
    ds_var = variables(dash)["datasource"]
    assert (ds_var["type"], ds_var["query"]) == ("datasource", "prometheus")
    assert ds_var["current"]["value"] == "${" + ds_input["name"] + "}"
    # Every panel and query goes through the variable, so a provisioned copy (no import step,
    # nothing replaced) still works once a data source is picked in the drop-down.
    ids = []
    for panel in all_panels(dash["panels"]):
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == panel["datasource"], panel["title"]
    for var in variables(dash).values():
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert len(ids) == len(set(ids))


def test_the_panels_the_issue_asks_for_exist() -> None:
    """Bytes saved (graph and total), per-minute counts, gauges, quantiles, restarts, scan age."""
    panels = panels_with_queries()
    before, after = "ckpt_watchd_bytes_before_total", "ckpt_watchd_bytes_after_total"

    def find(what: str, *, kind: str, metrics: set[str], funcs: frozenset[str] = frozenset()
             ) -> list[Panel]:
        found = [p for p in panels if p.panel["type"] == kind and metrics <= p.metrics
                 and funcs <= p.functions]
        assert found, f"no {kind} panel for {what}"
        return found

    find("bytes saved over time", kind="timeseries", metrics={before, after},
         funcs=frozenset({"increase"}))
    find("bytes saved in total", kind="stat", metrics={before, after})
    counters = {f"ckpt_watchd_checkpoints_{c}_total" for c in ("stripped", "skipped", "failed")}
    (per_minute,) = find("strips, skips and failures per minute", kind="timeseries",
                         metrics=counters, funcs=frozenset({"rate"}))
    for e in per_minute.exprs:
        if metric_names(e.ast) & counters:
            assert times_sixty(e.ast) and ranges(e.ast) == {300.0}, e.text
    find("queue depth and runs settling", kind="timeseries",
         metrics={"ckpt_watchd_queue_depth", "ckpt_watchd_runs_settling"})
    (durations,) = find("strip duration quantiles", kind="timeseries",
                        metrics={"ckpt_watchd_strip_duration_seconds_bucket"},
                        funcs=frozenset({"histogram_quantile", "rate"}))
    quantiles = set()
    for e in durations.exprs:
        assert e.ast.func.name == "histogram_quantile", e.text
        quantiles.add(e.ast.args[0].val)
        agg = e.ast.args[1]
        assert isinstance(agg, promql.AggregateExpr) and str(agg.op) == "sum", e.text
        assert list(agg.modifier.labels) == ["le"], e.text
    assert quantiles == {0.5, 0.9, 0.99}
    find("worker restarts", kind="timeseries", metrics={"ckpt_watchd_worker_restarts_total"},
         funcs=frozenset({"increase"}))
    find("time since the last successful scan", kind="timeseries", metrics={SCAN_METRIC},
         funcs=frozenset({"time"}))


def test_scan_age_threshold_is_where_the_daemon_turns_unhealthy() -> None:
    """The scan-age panels and the alert rule fire at 3 x --rescan-interval + 60 s, and say why."""
    assert SCAN_AGE_LIMIT == 960  # the default --rescan-interval of 300 s
    graphs = scan_age_panels()
    assert {p["type"] for p in graphs} == {"timeseries", "stat"}
    for panel in graphs:
        assert red_thresholds(panel) == [SCAN_AGE_LIMIT], panel["title"]
        assert f"{SCAN_AGE_LIMIT:g} s" in panel["description"] and "--rescan-interval" in \
            panel["description"], panel["title"]
        if panel["type"] == "timeseries":  # drawn on the graph, not only used for colour
            style = panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"]
            assert style != "off", panel["title"]
    graph = next(p for p in graphs if p["type"] == "timeseries")

    (rule,) = alert_rules()
    steps = {d["refId"]: d for d in rule["data"]}
    (query,) = rule_exprs([rule])
    ast = promql.parse(query.text)
    assert metric_names(ast) == {SCAN_METRIC} and "time" in functions(ast)
    condition = steps[rule["condition"]]["model"]
    assert condition["type"] == "threshold"
    (evaluator,) = [c["evaluator"] for c in condition["conditions"]]
    assert evaluator == {"type": "gt", "params": [SCAN_AGE_LIMIT]}
    # The rule is linked to the graph, so the graph shows the alert's state.
    assert rule["annotations"]["__dashboardUid__"] == dashboard()["uid"]
    assert rule["annotations"]["__panelId__"] == str(graph["id"])

    # The Prometheus form of the rule in docs/deploy.md compares with the same limit.
    (documented,) = parsed(doc_exprs(), dashboard())
    assert str(documented.ast.op) == ">" and documented.ast.rhs.val == SCAN_AGE_LIMIT
    assert metric_names(documented.ast) == {SCAN_METRIC}
