"""End to end: the demo's storm, scraped by a real Prometheus, through the dashboard and the alerts.

``python -m asgi_token_refresh demo --serve`` runs the naive app and the single-flight app against
strict FakeIdPs and exports the library's metrics (``asgi_token_refresh_provider="naive"`` and
``asgi_token_refresh_provider="single-flight"``). A real Prometheus (Debian's ``prometheus``, as
``scripts/system-deps`` installs it) scrapes it every second on loopback and evaluates
``dashboards/alerts.yaml`` every second. Both processes run on free loopback ports and are
stopped by PID, whatever happens.

The storm: a first burst one second after login (``--first-burst``) creates the series — a
series' first sample is no increase for Prometheus 2 — and the second one, a token lifetime
(32 s) later, is what the rates see. Then:

- every target of every panel of the dashboard, with the Grafana variables filled in as Grafana
  would, returns at least one finite sample through ``/api/v1/query``: with *All* everywhere,
  and with the target's namespace picked. The target carries a ``namespace`` label and no
  ``cluster`` label, so both kinds of optional label are exercised; a namespace nobody scrapes
  selects nothing;
- the template variables list the demo's job, its instance, both providers, its namespace and
  no cluster;
- the alert-state panel counts naive's pending storm alerts, and none for single-flight;
- Prometheus loaded every rule of ``alerts.yaml`` and each one evaluates without error;
- AsgiTokenRefreshStorm and AsgiTokenRefreshInvalidGrantSpike go pending for naive, while
  single-flight, whose sessions were refreshed twice (32 s apart), raises no alert at all.

The token lifetime stays above the 30 s of the dashboard's rapid re-refresh panel: single-flight
refreshes each session once per lifetime. (The storm alert's bound follows the usual interval:
half the median, rounded down to a bucket bound, so 10 s for these 32 s intervals; naive's
re-refreshes come within a second.) The whole module takes about 40 s.

Only the evaluation interval of the rules is not the repository's: the recording group sets
``interval: 1m`` and Prometheus slots a group's evaluations at a fixed phase of that interval
(a hash of the file and group names), which would add 0 to 60 s to every run. The rules are
loaded from a copy without the ``interval`` keys, so every group evaluates every second; the test
checks that Prometheus loaded exactly the repository's rules.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from dashboards import lint

from .processes import free_port, running, running_prometheus, tail

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_JSON = ROOT / "dashboards" / "asgi-token-refresh.json"
RULES = ROOT / "dashboards" / "alerts.yaml"

JOB = "asgi-token-refresh-demo"
NAMESPACE = "e2e"  # a label of the scrape target; there is no cluster label
PROVIDERS = {"naive", "single-flight"}
# 36 requests per app and burst, 6 at a time per session: 5 times the alerts' rate thresholds.
SESSIONS, TABS, PARALLEL = 6, 2, 3
# Above the rapid re-refresh panel's 30 s: single-flight refreshes a session once per lifetime,
# measured when the flights end. The first burst's end later (a cold process), so the interval
# comes out a few tenths of a second short of the lifetime; 2 s of room.
TOKEN_LIFETIME = 32
FIRST_BURST = 1  # seconds from login to the first burst
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 x scrape interval): a few
# seconds with 1 s scrapes over a short time range. 15 s holds the second burst (just before the
# panels are queried) and not the first one, 32 s earlier.
RATE_INTERVAL = "15s"
STORM_ALERTS = ("AsgiTokenRefreshStorm", "AsgiTokenRefreshInvalidGrantSpike")

T = TypeVar("T")


# -- the Prometheus HTTP API --------------------------------------------------------------------


class PrometheusAPI:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def get(self, path: str, params: dict[str, str | list[str]] | None = None) -> Any:
        response = self.http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        assert body.get("status") == "success", f"GET {path} {params}: {body}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, str | list[str]] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.get("query", params)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def values(self, expr: str, at: float | None = None) -> dict[str, float]:
        """``expr``'s samples as {provider label (or the label set): value}."""
        return {
            sample["metric"].get(
                "asgi_token_refresh_provider", json.dumps(sample["metric"], sort_keys=True)
            ): float(sample["value"][1])
            for sample in self.query(expr, at)
        }

    def active_alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.get("alerts")["alerts"]
        return [a for a in alerts if a["state"] in ("pending", "firing")]


def _wait_until(
    what: str, check: Callable[[], T | None], timeout: float, diagnostics: Callable[[], str]
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            result = check()
            if result is not None:
                return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting until {what}\n{diagnostics()}")
        time.sleep(0.25)


# -- the storm ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Storm:
    api: PrometheusAPI
    instance: str  # the demo's metrics endpoint, as Prometheus labels it
    scraped_at: float  # wall time: both second bursts have been scraped by then
    diagnostics: Callable[[], str]


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storm]:
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    metrics_port = free_port()
    # 9090: Prometheus's default port, which a Prometheus of somebody else's may be about to take.
    prometheus_port = free_port(avoid={metrics_port, 9090})
    instance = f"127.0.0.1:{metrics_port}"

    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group.pop("interval", None)  # evaluate every group every second (see the docstring)
    rule_file = tmp / "alerts.yaml"
    rule_file.write_text(yaml.safe_dump(rules, sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rule_file)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [{"targets": [instance], "labels": {"namespace": NAMESPACE}}],
            }
        ],
    }
    config_file = tmp / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    demo_log = tmp / "demo.log"
    demo = [
        sys.executable, "-m", "asgi_token_refresh", "demo", "--serve",
        "--metrics-port", str(metrics_port), "--host", "127.0.0.1",
        "--sessions", str(SESSIONS), "--tabs", str(TABS), "--parallel", str(PARALLEL),
        "--token-lifetime", str(TOKEN_LIFETIME), "--first-burst", str(FIRST_BURST),
        # Bounds the demo on its own too: it exits after the storm that outlasts 60 s, its
        # third burst (1 s + 2 lifetimes), though the tests are done after the second one.
        "--rounds", "3", "--duration", "60",
    ]  # fmt: skip

    with (
        running_prometheus(config_file, port=prometheus_port, workdir=tmp) as prometheus,
        running(demo, log=demo_log) as demo_process,
    ):
        api = PrometheusAPI(prometheus.url)

        def diagnostics() -> str:
            return tail(prometheus.log) + "\n" + tail(demo_log)

        def alive() -> str:
            for name, process in (("prometheus", prometheus.process), ("demo", demo_process)):
                if process.poll() is not None:
                    pytest.fail(f"{name} exited with {process.returncode}\n{diagnostics()}")
            return diagnostics()

        def scraped(expr: str) -> Callable[[], bool | None]:
            def check() -> bool | None:
                alive()
                return bool(api.query(expr)) or None

            return check

        try:
            _wait_until("the demo is scraped", scraped(f'up{{job="{JOB}"}} == 1'), 30, alive)
            # Single-flight records a refresh interval from a session's second refresh on: the
            # second burst. Naive's second burst is the same moment; a positive 10 s increase
            # this long after the first burst is that one.
            second_burst = FIRST_BURST + TOKEN_LIFETIME + 30
            single_flight = (
                f'asgi_token_refresh_refresh_interval_seconds_count{{job="{JOB}", '
                f'asgi_token_refresh_provider="single-flight"}} >= {SESSIONS}'
            )
            _wait_until("single-flight's second burst", scraped(single_flight), second_burst, alive)
            naive = (
                f'increase(asgi_token_refresh_refreshes_total{{job="{JOB}", '
                'asgi_token_refresh_provider="naive"}[10s]) > 0'
            )
            _wait_until("naive's second burst", scraped(naive), 10, alive)
            time.sleep(1.5)  # a scrape more: the bursts' stragglers
            yield Storm(api, instance, time.time(), alive)
        finally:
            api.http.close()


# -- the dashboard ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return loaded


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _regex_value(value: str) -> str:
    """A variable's value as Grafana puts it into a Prometheus regex matcher (escaped)."""
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\\\" + m.group(0), value)


def interpolate(expr: str, variables: dict[str, str]) -> str:
    """What Grafana sends for ``expr``: $__rate_interval and the template variables filled in."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"the dashboard uses ${name}, which this test does not fill in")
        return variables[name]

    return _VARIABLE.sub(value, expr)


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            yield panel
        yield from panel.get("panels", [])


def _all(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every variable on "All": its allValue (".*" for cluster and namespace, which also
    matches a series without the label)."""
    return {
        v["name"]: v["allValue"] for v in dashboard["templating"]["list"] if v["type"] == "query"
    }


def _targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in _panels(dashboard):
        assert panel.get("targets"), f"{panel['title']}: a panel without a query"
        for target in panel["targets"]:
            yield panel["title"], target


def _without_data(storm: Storm, dashboard: dict[str, Any], variables: dict[str, str]) -> list[str]:
    empty, checked = [], 0
    for title, target in _targets(dashboard):
        expr = interpolate(target["expr"], variables)
        samples = storm.api.values(expr, at=storm.scraped_at)
        checked += 1
        if not any(math.isfinite(v) for v in samples.values()):
            empty.append(f"{title} [{target['refId']}]: {samples}\n  {expr}")
    assert checked >= len(list(_panels(dashboard)))
    return empty


@pytest.mark.parametrize("namespace", ["All", NAMESPACE])
def test_every_panel_target_returns_data(
    storm: Storm, dashboard: dict[str, Any], namespace: str
) -> None:
    # The demo's job and instance picked, every provider and cluster ("All": the target has no
    # cluster label), every namespace or the target's.
    variables = {
        **_all(dashboard),
        "job": _regex_value(JOB),
        "instance": _regex_value(storm.instance),
    }
    if namespace != "All":
        variables["namespace"] = _regex_value(namespace)
    empty = _without_data(storm, dashboard, variables)
    assert not empty, "panel targets without a finite sample:\n" + "\n".join(empty)


def test_a_namespace_nobody_scrapes_selects_nothing(
    storm: Storm, dashboard: dict[str, Any]
) -> None:
    variables = {**_all(dashboard), "namespace": "elsewhere"}
    selected = {
        f"{title} [{target['refId']}]"
        for title, target in _targets(dashboard)
        if storm.api.query(interpolate(target["expr"], variables), at=storm.scraped_at)
    }
    # Only what the rules make answers: alerts and recorded series keep no namespace label
    # (their rules aggregate by job and provider), so they are let through ("$namespace|")
    # whatever the namespace; the alert panel reads 0 when there is no alert.
    rules_made = {
        f"{title} [{target['refId']}]"
        for title, target in _targets(dashboard)
        if 'namespace=~"$namespace|"' in target["expr"]
    }
    assert rules_made >= {
        "Alerts firing / pending [A]",
        "Alerts firing / pending [B]",
        "Excess refresh share (the storm alert's measure) [A]",
    }
    assert selected == rules_made


def test_the_template_variables_list_the_demo(storm: Storm, dashboard: dict[str, Any]) -> None:
    expected = {
        "cluster": set(),  # no such label: the variable has only "All", which matches
        "namespace": {NAMESPACE},
        "job": {JOB},
        "instance": {storm.instance},
        "provider": PROVIDERS,
    }
    found = {}
    for name, query in lint.template_queries(dashboard):
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query, re.S)
        assert match is not None, query
        label = match.group(2)
        selector = interpolate(match.group(1), _all(dashboard))
        found[name] = set(storm.api.get(f"label/{label}/values", {"match[]": [selector]}))
    assert found == expected


# -- the rules ----------------------------------------------------------------------------------


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", text))


def test_prometheus_loads_every_rule_and_each_evaluates(storm: Storm) -> None:
    repository = yaml.safe_load(RULES.read_text())
    expected = {
        group["name"]: [
            (rule.get("record") or rule["alert"], _duration(rule.get("for", "0s")))
            for rule in group["rules"]
        ]
        for group in repository["groups"]
    }
    groups = storm.api.get("rules")["groups"]
    loaded = {
        group["name"]: [(rule["name"], float(rule.get("duration", 0))) for rule in group["rules"]]
        for group in groups
    }
    assert loaded == expected
    unhealthy = [
        f"{rule['name']}: {rule['health']} {rule.get('lastError', '')}"
        for group in groups
        for rule in group["rules"]
        if rule["health"] != "ok"
    ]
    assert not unhealthy


def _evaluated_after(storm: Storm, moment: float) -> float | None:
    """The latest evaluation of every rule group, once all of them evaluated after ``moment``."""
    evaluated = [
        datetime.fromisoformat(group["lastEvaluation"]).timestamp()
        for group in storm.api.get("rules")["groups"]
    ]
    return max(evaluated) if min(evaluated) > moment else None


def test_storm_alerts_pend_for_naive_and_single_flight_stays_quiet(storm: Storm) -> None:
    api = storm.api

    def naive_pending() -> list[dict[str, Any]] | None:
        alerts = api.active_alerts()
        names = {
            a["labels"]["alertname"]
            for a in alerts
            if a["labels"]["asgi_token_refresh_provider"] == "naive"
        }
        return alerts if names >= set(STORM_ALERTS) else None

    def state() -> str:
        recorded = api.query('{__name__=~"job_provider.*"}')
        return "\n".join(
            [json.dumps(api.get("alerts"))]
            + [f"{r['metric']} {r['value'][1]}" for r in recorded]
            + [storm.diagnostics()]
        )

    _wait_until("naive's storm alerts are pending", naive_pending, 30, state)
    # Recorded series after the storm was scraped, then alerts evaluated on them.
    recorded = _wait_until(
        "the rules evaluate the storm",
        lambda: _evaluated_after(storm, storm.scraped_at),
        10,
        storm.diagnostics,
    )
    _wait_until(
        "the alerts evaluate the recorded storm",
        lambda: _evaluated_after(storm, recorded),
        10,
        storm.diagnostics,
    )
    alerts = api.active_alerts()
    by_provider: dict[str, set[str]] = {provider: set() for provider in PROVIDERS}
    for alert in alerts:
        assert alert["labels"]["job"] == JOB
        assert alert["labels"]["severity"] in ("warning", "critical")
        by_provider[alert["labels"]["asgi_token_refresh_provider"]].add(
            alert["labels"]["alertname"]
        )
    assert by_provider["naive"] >= set(STORM_ALERTS), alerts
    assert by_provider["single-flight"] == set(), alerts

    # What the alerts saw: single-flight refreshed every session twice, a lifetime apart,
    # naive refreshed sessions again within the same burst and had refresh tokens refused.
    interval = "asgi_token_refresh_refresh_interval_seconds"
    rapid = api.values(f'{interval}_bucket{{job="{JOB}", le=~"30|30[.]0"}}')
    counted = api.values(f'{interval}_count{{job="{JOB}"}}')
    assert counted["single-flight"] >= SESSIONS
    assert rapid["single-flight"] == 0
    assert rapid["naive"] > 0
    invalid_grant = api.values(
        f'sum by (asgi_token_refresh_provider) (asgi_token_refresh_refreshes_total{{job="{JOB}", '
        'asgi_token_refresh_outcome="invalid_grant"})'
    )
    assert invalid_grant.get("naive", 0) > 0
    assert invalid_grant.get("single-flight", 0) == 0  # 0 or absent: series may be pre-set


def test_the_alert_state_panel_counts_the_storm_alerts(
    storm: Storm, dashboard: dict[str, Any]
) -> None:
    [panel] = [p for p in _panels(dashboard) if p["title"] == "Alerts firing / pending"]
    targets = {t["legendFormat"].split()[-1]: t["expr"] for t in panel["targets"]}
    assert set(targets) == {"firing", "pending"}
    variables = _all(dashboard)
    pending = interpolate(targets["pending"], variables)

    def naive_pending() -> dict[str, float] | None:
        counted = storm.api.values(pending)
        return counted if counted.get("naive", 0) >= len(STORM_ALERTS) else None

    counted = _wait_until("the panel counts naive's alerts", naive_pending, 30, storm.diagnostics)
    assert "single-flight" not in counted
    # Nothing of single-flight fires; with no alert firing at all, the panel shows 0.
    firing = storm.api.values(interpolate(targets["firing"], variables))
    assert "single-flight" not in firing
    assert firing == {"{}": 0.0} or all(value >= 1 for value in firing.values())


def test_the_excess_panel_shows_naives_storm_and_none_for_single_flight(
    storm: Storm, dashboard: dict[str, Any]
) -> None:
    [panel] = [p for p in _panels(dashboard) if p["title"].startswith("Excess refresh share")]
    [target] = panel["targets"]
    expr = interpolate(target["expr"], _all(dashboard))
    threshold = panel["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"]

    def shown() -> dict[str, float] | None:
        share = storm.api.values(expr)
        return share if set(share) == PROVIDERS and share["naive"] > threshold else None

    share = _wait_until("the excess share is recorded", shown, 20, storm.diagnostics)
    assert share["single-flight"] == 0
