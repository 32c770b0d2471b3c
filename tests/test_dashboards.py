"""The Grafana dashboard, the Prometheus rules and the example configs, checked with real tools.

A live ``/metrics`` page rendered from the library's instruments (dashboards/scrape.py) is the
reference: every series a panel or rule names must be on it, and every library metric must have
a panel. promtool (Debian's ``prometheus`` package; ``scripts/system-deps`` installs it)
checks the page, the rules, their unit tests and the example Prometheus config. Without promtool
these tests fail rather than skip: CI installs it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from asgi_token_refresh import _telemetry
from dashboards import generate, lint, scrape

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
GRAFANA_EXAMPLE = ROOT / "examples" / "grafana"
DASHBOARD_JSON = DASHBOARDS / "asgi-token-refresh.json"
RULES = DASHBOARDS / "alerts.yaml"
RULE_TESTS = DASHBOARDS / "alerts.test.yaml"
RUNBOOK = DASHBOARDS / "RUNBOOK.md"

# Every metric name _telemetry defines (span names aside): a new one needs a panel here.
LIBRARY_METRICS = set(_telemetry.METRICS)
REQUIRED_PANELS = {
    "Refreshes/s by outcome",
    "Dedupe share (non-leader / all token requests)",
    "Token requests by dedupe path",
    "invalid_grant ratio",
    "Terminal failures by error.type and component",
    "Refresh latency p50 / p90 / p99",
    "Flights in progress per instance",
    "Waiters per flight",
    "Rapid re-refresh share (interval ≤ 30 s)",
    "Fresh hits vs refreshes",
}
# Units Grafana knows (a subset: those a dashboard like this one may use).
KNOWN_UNITS = {"reqps", "ops", "percentunit", "percent", "s", "ms", "short", "none"}
ALERTS = {
    "AsgiTokenRefreshStorm",
    "AsgiTokenRefreshInvalidGrantSpike",
    "AsgiTokenRefreshProviderErrors",
    "AsgiTokenRefreshSlow",
    "AsgiTokenRefreshTerminalFailures",
    "AsgiTokenRefreshClientRejected",
    "AsgiTokenRefreshCoordinatorDown",
}
DASHBOARD_UID = "asgi-token-refresh"
# Labels whose values are names the app gives (OAuth2Client, coordinator), not the library's.
NAMED_LABELS = ("asgi_token_refresh_provider", "asgi_token_refresh_coordinator")
# The scenarios of the threshold model (RUNBOOK.md) and the alert each one is about.
AT_REST = "a 10,000-user site at rest"
SCENARIOS = {
    AT_REST: "AsgiTokenRefreshStorm",
    "a 20-session storm": "AsgiTokenRefreshStorm",
    "a 100-session storm": "AsgiTokenRefreshStorm",
    "every refresh failing": "AsgiTokenRefreshTerminalFailures",
    "one invalid_client": "AsgiTokenRefreshClientRejected",
    "45 s tokens": "AsgiTokenRefreshStorm",
    "a process restart": "AsgiTokenRefreshStorm",
}


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: run scripts/system-deps (Debian's prometheus "
            "package; scripts/system-deps, which scripts/test runs, installs it too)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def live() -> scrape.Scrape:
    return scrape.scrape()


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return loaded


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return loaded


def _run(
    *args: str, cwd: Path = ROOT, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            yield panel
        yield from panel.get("panels", [])


def _alerts(rules: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in rules["groups"]:
        yield from (rule for rule in group["rules"] if "alert" in rule)


# -- the dashboard is generated -----------------------------------------------------------------


def test_the_committed_json_is_the_generators_output() -> None:
    assert DASHBOARD_JSON.read_text() == generate.render(), "run python dashboards/generate.py"
    result = _run(sys.executable, str(DASHBOARDS / "generate.py"), "--check")
    assert result.returncode == 0, result.stderr


def test_generate_check_fails_on_a_stale_json(tmp_path: Path, monkeypatch: Any) -> None:
    stale = tmp_path / "asgi-token-refresh.json"
    stale.write_text(generate.render().replace("Refreshes/s by outcome", "Edited by hand"))
    monkeypatch.setattr(generate, "OUTPUT", stale)
    assert generate.main(["--check"]) == 1
    assert generate.main([]) == 0
    assert generate.main(["--check"]) == 0


def test_the_json_decodes_as_a_grafana_11_dashboard_model(dashboard: dict[str, Any]) -> None:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard, Panel
    from grafana_foundation_sdk.models.prometheus import Dataquery

    register_default_plugins()
    model = Dashboard.from_json(dashboard)
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == dashboard
    panels = [p for p in model.panels or [] if isinstance(p, Panel)]
    assert panels
    assert all(isinstance(q, Dataquery) for p in panels for q in p.targets or [])


def test_the_dashboard_is_stable_read_only_and_templated(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "asgi-token-refresh"
    assert dashboard["editable"] is False
    assert dashboard["schemaVersion"] >= 41  # Grafana 11.6 and 12's dashboard model
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "cluster", "namespace", "job", "instance", "provider"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["label"] == "Data source"
    for name in ("cluster", "namespace", "job", "instance", "provider"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variable["multi"] is True
        assert variable["includeAll"] is True
        assert variable["current"]["value"] == ["$__all"]


def test_cluster_and_namespace_are_optional(dashboard: dict[str, Any]) -> None:
    # "All" is ".*", which matches a series without the label (its value is ""): the dashboard
    # works where Prometheus adds no cluster or namespace. tests/test_prometheus_e2e.py runs it
    # against a target with a namespace label and no cluster label.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("cluster", "namespace"):
        assert re.fullmatch(variables[name]["allValue"], "")
    for name in ("job", "instance", "provider"):  # always there
        assert variables[name]["allValue"] == ".+"
    # Each variable lists its label among the series the variables before it select.
    assert lint.variable_matchers(dashboard) == {
        "cluster": "$cluster",
        "namespace": "$namespace",
        "job": "$job",
        "instance": "$instance",
        "asgi_token_refresh_provider": "$provider",
    }


def test_the_config_block_drives_every_query() -> None:
    config = generate.Config(
        cluster_label="k8s_cluster",
        namespace_label="kube_namespace",
        selector='env="prod"',
        runbook_url="https://runbooks.example/asgi-token-refresh",
        show_cluster=False,
    )
    mine = json.loads(generate.render(config))
    variables = {v["name"]: v for v in mine["templating"]["list"]}
    assert variables["cluster"]["query"].endswith(", k8s_cluster)")
    assert variables["cluster"]["hide"] == 2
    assert 'k8s_cluster=~"$cluster"' in variables["namespace"]["query"]
    queries = [*lint.dashboard_queries(mine), *lint.annotation_queries(mine)]
    assert len(queries) > 20
    for title, expr in queries:
        for selector, _ in lint._selectors(lint.parse(expr)):
            found = {(m.name, m.value) for m in selector.matchers.matchers}
            assert ("env", "prod") in found, (title, expr)
            assert {("k8s_cluster", "$cluster"), ("k8s_cluster", "$cluster|")} & found, title
            assert {("kube_namespace", "$namespace"), ("kube_namespace", "$namespace|")} & found
    links = [link["url"] for p in _panels(mine) for link in p.get("links", [])]
    assert links
    assert all(url.startswith("https://runbooks.example/asgi-token-refresh") for url in links)
    assert json.loads(generate.render()) == json.loads(DASHBOARD_JSON.read_text())


def test_the_first_screen_answers_is_there_a_storm_where_since_when(
    dashboard: dict[str, Any],
) -> None:
    top = dashboard["panels"]
    assert top[0]["type"] == "row"
    assert top[0]["gridPos"]["y"] == 0
    first_screen = [
        p
        for p in top[1:]
        if p["type"] != "row" and p["gridPos"]["y"] + p["gridPos"]["h"] <= generate.FIRST_SCREEN
    ]
    [second_row, *_] = [p for p in top[1:] if p["type"] == "row"]
    assert all(p["gridPos"]["y"] < second_row["gridPos"]["y"] for p in first_screen)
    stats = [p for p in first_screen if p["type"] == "stat"]
    assert {p["title"] for p in stats} == {
        "Alerts firing / pending",
        "Provider calls/s",
        "Dedupe share",
        "invalid_grant/s",
        "Terminal failures/s",
        "Duplicate refreshes/s",
        "Flights in progress",
    }
    assert all(p["gridPos"]["y"] == 1 for p in stats)  # the overview row of stats, on top
    storms = {p["title"] for p in first_screen if p["type"] == "timeseries"}
    assert storms == {
        "Refreshes/s by outcome",
        "Excess refresh share (the storm alert's measure)",
        "invalid_grant ratio",
        "Refreshes per grant rotation",
        "Refreshes/s per instance",
        "Duplicate refreshes by detected_by",
    }
    # The alert state: Prometheus's ALERTS for the rule file's alerts, and red bands for the
    # firing ones on every time series (since when).
    [alert_state] = [p for p in stats if p["title"] == "Alerts firing / pending"]
    assert all("ALERTS{" in t["expr"] for t in alert_state["targets"])
    [band] = [a for a in dashboard["annotations"]["list"] if a.get("expr")]
    assert band["expr"].startswith("ALERTS{")
    assert 'alertstate="firing"' in band["expr"]
    assert band["enable"] is True


def test_no_panel_stacks_series(dashboard: dict[str, Any]) -> None:
    # Stacking adds up the series of a panel: with "All" providers, those of several providers.
    for panel in _panels(dashboard):
        if panel["type"] == "timeseries":
            custom = panel["fieldConfig"]["defaults"]["custom"]
            assert custom["stacking"]["mode"] == "none", panel["title"]
        assert lint.stacking_problems(panel, "provider") == [], panel["title"]


def test_panels_and_the_dashboard_link_to_the_runbook(
    dashboard: dict[str, Any], rules: dict[str, Any]
) -> None:
    anchors = _runbook_anchors()
    base = generate.CONFIG.runbook_url
    # The alerts' runbook_url and the panels' links point at the same runbook.
    for alert in _alerts(rules):
        assert alert["annotations"]["runbook_url"].startswith(base + "#")
    linked = set()
    for panel in _panels(dashboard):
        for link in panel.get("links", []):
            url, _, anchor = link["url"].partition("#")
            assert url == base, panel["title"]
            assert link["targetBlank"] is True
            if anchor:
                assert anchor in anchors, f"{panel['title']}: no RUNBOOK.md section #{anchor}"
                linked.add(anchor)
    linked_alerts = {a for a in ALERTS if a.lower() in linked}
    assert linked_alerts == ALERTS, "every alert's runbook section is linked from a panel"
    storm_panels = {"Refreshes/s by outcome", "Excess refresh share (the storm alert's measure)"}
    for panel in _panels(dashboard):
        if panel["title"] in storm_panels:
            assert any(link["url"].endswith("#asgitokenrefreshstorm") for link in panel["links"])
    links = {link["title"]: link for link in dashboard["links"]}
    assert links["Runbook"]["url"] == base
    assert links["asgi-token-refresh"]["type"] == "dashboards"


def test_every_panel_has_a_title_description_unit_and_the_datasource_variable(
    dashboard: dict[str, Any],
) -> None:
    panels = list(_panels(dashboard))
    assert {p["title"] for p in panels} >= REQUIRED_PANELS
    for panel in panels:
        assert panel["title"]
        assert len(panel.get("description", "")) > 40, panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit") in KNOWN_UNITS, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_no_two_panels_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


# -- against a live /metrics page ---------------------------------------------------------------


def test_the_live_metrics_page_passes_promtool_check_metrics(
    live: scrape.Scrape, promtool: str
) -> None:
    # The library's families. The page also has opentelemetry-instrumentation-httpx's HTTP
    # client histogram, in milliseconds under the old HTTP conventions (promtool wants
    # seconds: OTEL_SEMCONV_STABILITY_OPT_IN=http, as the README recommends, gives them).
    blocks = re.split(r"(?m)^(?=# HELP )", live.text)
    ours = "".join(
        b for b in blocks if b.startswith(("# HELP asgi_token_refresh_", "# HELP target"))
    )
    assert "asgi_token_refresh_refreshes_total" in ours
    result = _run(promtool, "check", "metrics", stdin=ours)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_every_library_instrument_is_on_the_page(live: scrape.Scrape) -> None:
    assert len(LIBRARY_METRICS) >= 9
    assert {i.name for i in live.instruments} == LIBRARY_METRICS
    assert len(scrape.rows(live)) == len(LIBRARY_METRICS)


def test_the_readme_table_matches_the_scrape(live: scrape.Scrape) -> None:
    readme = scrape.README.read_text()
    assert scrape.readme_table(readme) == scrape.table(live), (
        "run python -m dashboards.scrape --write-readme"
    )


def test_every_panel_variable_and_rule_expression_lints_clean(
    live: scrape.Scrape, dashboard: dict[str, Any], rules: dict[str, Any]
) -> None:
    series = live.series_types()
    alerts = frozenset(a["alert"] for a in _alerts(rules))
    recorded = lint.recorded_series(rules)
    assert lint.lint_dashboard(dashboard, series, alerts, recorded) == []
    # The panels that read a recording rule say so, and work only with alerts.yaml loaded.
    without_rules = lint.lint_dashboard(dashboard, series, alerts)
    assert without_rules
    assert all(generate.EXCESS_SHARE in problem for problem in without_rules)
    assert lint.lint_rules(rules, series) == []
    assert len(list(lint.dashboard_queries(dashboard))) >= len(REQUIRED_PANELS)


def test_every_library_metric_has_a_panel(live: scrape.Scrape, dashboard: dict[str, Any]) -> None:
    used = {
        selector.name
        for _, expr in lint.dashboard_queries(dashboard)
        for selector, _ in lint._selectors(lint.parse(expr))
    }
    for row in scrape.rows(live):
        assert used & set(row.family.series), f"no panel shows {row.otel.name}"


def test_every_library_metric_has_a_rule_or_is_only_a_panel(
    live: scrape.Scrape, rules: dict[str, Any]
) -> None:
    used = {
        selector.name
        for _, expr in lint.rule_expressions(rules)
        for selector, _ in lint._selectors(lint.parse(expr))
    }
    # Waiters, flights in progress and logouts are context for a human, not alert conditions;
    # so are fresh hits, which scale with requests, not with sessions or refreshes.
    dashboard_only = {
        _telemetry.REFRESH_WAITERS,
        _telemetry.REFRESH_ACTIVE,
        _telemetry.LOGOUTS,
        _telemetry.TOKEN_FRESH,
    }
    for row in scrape.rows(live):
        if row.otel.name not in dashboard_only:
            assert used & set(row.family.series), f"no rule uses {row.otel.name}"


SERIES = {
    "x_total": "counter",
    "h_bucket": "histogram",
    "h_count": "histogram",
    "h_sum": "histogram",
    "g": "gauge",
}
GOOD = 'job=~"$job", instance=~"$instance"'


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        (f"x_total{{{GOOD}}}", "a counter outside rate()/increase()"),
        (f"sum(x_total{{{GOOD}}})", "a counter outside rate()/increase()"),
        (f"irate(x_total{{{GOOD}}}[$__rate_interval])", "a counter outside rate()/increase()"),
        (f"h_sum{{{GOOD}}} / h_count{{{GOOD}}}", "a counter outside rate()/increase()"),
        ('rate(x_total{instance=~"$instance"}[$__rate_interval])', 'missing job=~"$job"'),
        ('rate(x_total{job=~"$job"}[$__rate_interval])', 'missing instance=~"$instance"'),
        ('rate(x_total{job="$job", instance=~"$instance"}[$__rate_interval])', "missing job"),
        (f"rate(x_total{{{GOOD}}}[5m])", "use [$__rate_interval] as the range"),
        (f"rate(x_total{{{GOOD}}}[$__interval])", "only $__rate_interval is supported"),
        (f"rate(g{{{GOOD}}}[$__rate_interval])", "a gauge inside a range function"),
        (f"max_over_time(g{{{GOOD}}}[$__rate_interval])", "a range outside rate()/increase()"),
        (f"rate(nope_total{{{GOOD}}}[$__rate_interval])", "no such series on /metrics"),
        (f'{{__name__="g", {GOOD}}}', "select series by metric name"),
        (
            f"histogram_quantile(0.9, sum(rate(h_bucket{{{GOOD}}}[$__rate_interval])))",
            "histogram_quantile() needs sum by (..., le)",
        ),
        (f"sum(rate(x_total{{{GOOD}}}[$__rate_interval]) ", "does not parse"),
    ],
)
def test_the_linter_catches(expr: str, problem: str) -> None:
    problems = lint.lint_expr(expr, SERIES, dashboard=True)
    assert any(problem in p for p in problems), problems


def test_the_linter_passes_good_dashboard_and_rule_expressions() -> None:
    quantile = f"histogram_quantile(0.9, sum by (le) (rate(h_bucket{{{GOOD}}}[$__rate_interval])))"
    assert lint.lint_expr(quantile, SERIES, dashboard=True) == []
    assert lint.lint_expr(f"sum(g{{{GOOD}}})", SERIES, dashboard=True) == []
    rule = "sum by (job) (rate(x_total[5m])) / job:x:rate5m > 0.1"
    assert lint.lint_expr(rule, SERIES, dashboard=False, recorded=frozenset({"job:x:rate5m"})) == []
    assert lint.lint_expr(rule, SERIES, dashboard=False) != []  # job:x:rate5m: not recorded


PROVIDER = 'asgi_token_refresh_provider=~"$provider"'
VARIABLES = {"job": "$job", "instance": "$instance", "asgi_token_refresh_provider": "$provider"}


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        (
            f'rate(x_total{{{GOOD}, asgi_token_refresh_provider="$provider"}}[$__rate_interval])',
            'missing asgi_token_refresh_provider=~"$provider"',
        ),
        (f"rate(x_total{{{GOOD}}}[$__rate_interval])", "missing asgi_token_refresh_provider"),
        (f"sum(rate(x_total{{{GOOD}, {PROVIDER}}}[$__rate_interval]))", "never add it up"),
        (f"sum by (job) (g{{{GOOD}, {PROVIDER}}})", "never add it up"),
        (
            f"sum without (asgi_token_refresh_provider) (g{{{GOOD}, {PROVIDER}}})",
            "never add it up",
        ),
        # "$var|" lets a series without the label through: only for Prometheus's ALERTS.
        (f'g{{job=~"$job|", instance=~"$instance", {PROVIDER}}}', 'missing job=~"$job"'),
    ],
)
def test_the_linter_keeps_providers_apart_and_every_variable_filtered(
    expr: str, problem: str
) -> None:
    problems = lint.lint_expr(
        expr, SERIES, dashboard=True, matchers=VARIABLES, keep_label=lint.PROVIDER_LABEL
    )
    assert any(problem in p for p in problems), problems


def test_the_linter_passes_per_provider_queries_and_alerts() -> None:
    good = [
        f"sum by (asgi_token_refresh_provider) (g{{{GOOD}, {PROVIDER}}})",
        f"sum without (le) (rate(h_bucket{{{GOOD}, {PROVIDER}}}[$__rate_interval]))",
        f'count by (asgi_token_refresh_provider) (ALERTS{{job=~"$job", instance=~"$instance|", '
        f"{PROVIDER}}}) or on () vector(0)",
    ]
    series = {**SERIES, **lint.PROMETHEUS_SERIES}
    for expr in good:
        problems = lint.lint_expr(
            expr, series, dashboard=True, matchers=VARIABLES, keep_label=lint.PROVIDER_LABEL
        )
        assert problems == [], (expr, problems)


def _dashboard_with(panel: dict[str, Any], *, annotation: str | None = None) -> dict[str, Any]:
    variables = [
        {"name": name, "type": "query", "query": query}
        for name, query in (
            ("job", "label_values(g, job)"),
            ("provider", 'label_values(g{job=~"$job"}, asgi_token_refresh_provider)'),
        )
    ]
    annotations = [{"name": "band", "expr": annotation}] if annotation else []
    return {
        "panels": [panel],
        "templating": {"list": variables},
        "annotations": {"list": annotations},
    }


def test_the_linter_catches_stacking_variables_and_alert_names() -> None:
    selector = f'g{{job=~"$job", {PROVIDER}}}'
    expr = f"sum by (asgi_token_refresh_provider) ({selector})"
    stacked = {
        "title": "stacked",
        "fieldConfig": {"defaults": {"custom": {"stacking": {"mode": "normal"}}}},
        "targets": [{"expr": expr}],
    }
    assert lint.lint_dashboard(_dashboard_with({**stacked, "repeat": "provider"}), SERIES) == []
    [problem] = lint.lint_dashboard(_dashboard_with(stacked), SERIES)
    assert "stacks series of several providers" in problem
    override = {
        "title": "override",
        "fieldConfig": {
            "defaults": {},
            "overrides": [
                {"properties": [{"id": "custom.stacking", "value": {"mode": "percent"}}]}
            ],
        },
        "targets": [{"expr": expr}],
    }
    assert "stacks series" in lint.lint_dashboard(_dashboard_with(override), SERIES)[0]

    lines = {"title": "lines", "targets": [{"expr": expr}]}
    assert lint.lint_dashboard(_dashboard_with(lines), SERIES) == []
    unfiltered = {"title": "unfiltered", "targets": [{"expr": 'g{job=~"$job"}'}]}
    assert any(
        'missing asgi_token_refresh_provider=~"$provider"' in p
        for p in lint.lint_dashboard(_dashboard_with(unfiltered), SERIES)
    )
    band = f'ALERTS{{alertname=~"Other.*", job=~"$job", {PROVIDER}}}'
    problems = lint.lint_dashboard(
        _dashboard_with(lines, annotation=band), SERIES, frozenset({"AsgiTokenRefreshStorm"})
    )
    assert any("matches no alert of the rule file" in p for p in problems), problems
    unchained = _dashboard_with(lines)
    unchained["templating"]["list"][1]["query"] = "label_values(g, asgi_token_refresh_provider)"
    assert any('missing job=~"$job"' in p for p in lint.lint_dashboard(unchained, SERIES))


def test_the_linter_checks_label_values_queries() -> None:
    good = 'label_values(g{job=~"$job"}, instance)'
    assert lint.lint_label_values(good, SERIES, "instance") == []
    assert lint.lint_label_values("label_values(nope, job)", SERIES, "job") != []
    assert lint.lint_label_values("label_values(g, job)", SERIES, "instance") != []
    assert lint.lint_label_values("label_values(job)", SERIES, "job") != []
    assert lint.lint_label_values("query_result(g)", SERIES, "job") != []


# -- Prometheus rules -------------------------------------------------------------------------


def test_promtool_check_rules(promtool: str) -> None:
    result = _run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules(promtool: str) -> None:
    result = _run(promtool, "test", "rules", RULE_TESTS.name, cwd=DASHBOARDS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_follow_the_mixin_conventions(rules: dict[str, Any]) -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }
    alerts = list(_alerts(rules))
    assert {a["alert"] for a in alerts} == ALERTS
    for alert in alerts:
        assert re.fullmatch(r"AsgiTokenRefresh[A-Za-z]+", alert["alert"])
        assert alert["labels"]["severity"] in ("warning", "critical")
        annotations = alert["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url", "dashboard_url"}
        url = annotations["runbook_url"]
        assert url.endswith(f"/dashboards/RUNBOOK.md#{alert['alert'].lower()}")
        assert url.rsplit("#", 1)[1] in anchors
        # A path of the Grafana that has the dashboard, with its job and provider picked.
        assert annotations["dashboard_url"] == (
            f"/d/{DASHBOARD_UID}?var-job={{{{ $labels.job | urlquery }}}}"
            "&var-provider={{ $labels.asgi_token_refresh_provider | urlquery }}"
        )
    assert "how-the-thresholds-were-chosen" in anchors
    for record in lint.recorded_series(rules):
        assert re.fullmatch(r"[a-z_]+:asgi_token_refresh_[a-z0-9_]+:[a-z0-9_]+", record), record


def test_every_alert_has_a_firing_and_a_must_not_fire_unit_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert fires == ALERTS
    assert silent == ALERTS
    [steady] = [t for t in tests if t["name"].startswith(f"{AT_REST}: steady single-flight")]
    assert {c["alertname"] for c in steady["alert_rule_test"] if not c["exp_alerts"]} == ALERTS


def test_every_scenario_of_the_model_has_a_must_fire_and_a_must_not_fire_case() -> None:
    # The scenarios RUNBOOK.md's thresholds were chosen for (issue 12): the tests named
    # "<scenario>: ..." have, for its alert, a case that fires and a case that must not.
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    for scenario, alert in SCENARIOS.items():
        cases = [
            case
            for test in tests
            if test["name"].startswith(f"{scenario}: ")
            for case in test.get("alert_rule_test", [])
            if case["alertname"] == alert
        ]
        assert any(case["exp_alerts"] for case in cases), f"{scenario}: nothing fires {alert}"
        assert any(not case["exp_alerts"] for case in cases), f"{scenario}: no must-not-fire"
    restart = [t for t in tests if t["name"].startswith("a process restart: ")]
    quiet = [t for t in restart if all(not c["exp_alerts"] for c in t["alert_rule_test"])]
    assert quiet, "a process restart: no test where nothing fires"
    assert {c["alertname"] for c in quiet[0]["alert_rule_test"]} == ALERTS


def test_the_rule_tests_model_the_series_the_library_exports(live: scrape.Scrape) -> None:
    # Every input series of alerts.test.yaml is one the live page has, with its labels exactly
    # (plus job and instance, which Prometheus adds; the exporter's empty otel_scope_schema_url
    # is no label in Prometheus) and label values the library uses.
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(live.text):
        for sample in family.samples:
            for key, value in sample.labels.items():
                values.setdefault(sample.name, {}).setdefault(key, set()).add(value)
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checked = 0
    for test in tests:
        for item in test["input_series"]:
            [(selector, _)] = list(lint._selectors(lint.parse(item["series"])))
            assert selector.name in values, f"{test['name']}: {selector.name} is not on /metrics"
            exported = values[selector.name]
            labels = {m.name: m.value for m in selector.matchers.matchers}
            expected = set(exported) - {"otel_scope_schema_url"} | {"job", "instance"}
            assert set(labels) == expected, (test["name"], item["series"])
            for key, value in labels.items():
                if key not in ("job", "instance", "le", "otel_scope_version", *NAMED_LABELS):
                    assert value in exported[key], (test["name"], key, value)
            checked += 1
    assert checked > 100


def test_the_dashboard_draws_the_alert_thresholds(rules: dict[str, Any]) -> None:
    # The lines are the warning thresholds.
    expressions = {
        a["alert"]: a["expr"] for a in _alerts(rules) if a["labels"]["severity"] == "warning"
    }
    for alert, threshold in (
        ("AsgiTokenRefreshStorm", generate.STORM_SHARE),
        ("AsgiTokenRefreshInvalidGrantSpike", generate.INVALID_GRANT_RATIO),
        ("AsgiTokenRefreshProviderErrors", generate.PROVIDER_ERROR_RATIO),
        ("AsgiTokenRefreshSlow", generate.SLOW_P99_SECONDS),
    ):
        assert re.search(rf"> {threshold:g}\b", expressions[alert]), alert
    # The storm panel of the first screen draws the alert's own measure, the recorded share.
    storm = expressions["AsgiTokenRefreshStorm"]
    assert f"{generate.EXCESS_SHARE} > {generate.STORM_SHARE:g}" in storm


def test_the_excess_panel_reads_the_storm_alerts_recording_rule(
    dashboard: dict[str, Any], rules: dict[str, Any]
) -> None:
    [panel] = [p for p in _panels(dashboard) if p["title"].startswith("Excess refresh share")]
    [target] = panel["targets"]
    assert target["expr"].startswith(generate.EXCESS_SHARE + "{")
    assert generate.EXCESS_SHARE in lint.recorded_series(rules)
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == generate.STORM_SHARE


# -- examples/grafana ---------------------------------------------------------------------------


def test_the_example_prometheus_config_passes_promtool(promtool: str, tmp_path: Path) -> None:
    # Laid out as compose.yaml mounts it: alerts.yaml next to prometheus.yml.
    shutil.copy(GRAFANA_EXAMPLE / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(RULES, tmp_path / "alerts.yaml")
    result = _run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((GRAFANA_EXAMPLE / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "asgi-token-refresh-demo"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9464"]}]


def test_compose_and_grafana_provisioning_agree() -> None:
    compose = yaml.safe_load((GRAFANA_EXAMPLE / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"demo", "prometheus", "grafana"}
    assert "asgi-token-refresh[demo]" in services["demo"]["environment"]["ASGI_TOKEN_REFRESH"]
    assert "--metrics-port 9464" in services["demo"]["command"][-1]
    for name in ("prometheus", "grafana"):
        assert services[name]["network_mode"] == "service:demo"
    mounts = {
        target.removesuffix(":ro"): GRAFANA_EXAMPLE / source
        for service in services.values()
        for source, target in (v.split(":", 1) for v in service.get("volumes", []))
    }
    for target, source in mounts.items():
        assert source.exists(), f"{source} (mounted at {target}) does not exist"
    assert mounts["/etc/prometheus/alerts.yaml"].resolve() == RULES
    assert mounts["/etc/prometheus/prometheus.yml"].resolve() == GRAFANA_EXAMPLE / "prometheus.yml"

    listen = next(
        a for a in services["prometheus"]["command"] if a.startswith("--web.listen-address=")
    )
    port = listen.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}:{port}" in services["demo"]["ports"]
    assert "127.0.0.1:3000:3000" in services["demo"]["ports"]

    provisioning = GRAFANA_EXAMPLE / "provisioning"
    [datasource] = yaml.safe_load(
        (provisioning / "datasources" / "asgi-token-refresh.yaml").read_text()
    )["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == f"http://127.0.0.1:{port}"
    assert datasource["isDefault"] is True
    scrape_interval = yaml.safe_load((GRAFANA_EXAMPLE / "prometheus.yml").read_text())["global"][
        "scrape_interval"
    ]
    assert datasource["jsonData"]["timeInterval"] == scrape_interval

    [provider] = yaml.safe_load(
        (provisioning / "dashboards" / "asgi-token-refresh.yaml").read_text()
    )["providers"]
    assert provider["type"] == "file"
    assert provider["allowUiUpdates"] is False
    dashboard_mount = f"{provider['options']['path']}/asgi-token-refresh.json"
    assert mounts[dashboard_mount].resolve() == DASHBOARD_JSON
    assert mounts["/etc/grafana/provisioning"].resolve() == provisioning
    grafana_env = services["grafana"]["environment"]
    assert grafana_env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_mount

    # The Grafana image is the version the dashboard's schema was generated for.
    grafana_version = services["grafana"]["image"].rsplit(":", 1)[1]
    sdk_pin = re.search(r'"grafana-foundation-sdk==\d+!([\d.]+)"', _pyproject())
    assert sdk_pin is not None
    assert grafana_version == sdk_pin.group(1)


def test_the_example_provisioning_is_what_the_dashboards_command_writes() -> None:
    # examples/grafana/provisioning is generated (python -m dashboards.generate) from the
    # package's own provisioning_files(), with compose's addresses.
    files = generate.example_provisioning()
    assert len(files) == 2
    for path, text in files.items():
        assert path.read_text() == text, f"{path}: run python -m dashboards.generate"
    on_disk = {p for p in (GRAFANA_EXAMPLE / "provisioning").rglob("*") if p.is_file()}
    assert on_disk == set(files)


def test_the_examples_say_grafana_rendering_is_not_tested() -> None:
    for readme in (GRAFANA_EXAMPLE / "README.md", DASHBOARDS / "README.md"):
        text = " ".join(readme.read_text().split())
        assert "Rendering in Grafana itself is not exercised by CI" in text, readme


def test_no_config_uses_port_9090() -> None:
    configs = [
        path
        for folder in (DASHBOARDS, GRAFANA_EXAMPLE)
        for path in folder.rglob("*")
        if path.suffix in (".yml", ".yaml", ".json")
    ]
    assert len(configs) >= 7
    for path in configs:
        assert not re.search(r"(?<![\d.])9090(?!\d)", path.read_text()), path


def test_system_deps_is_a_no_op_when_everything_is_installed(promtool: str) -> None:
    script = ROOT / "scripts" / "system-deps"
    assert script.stat().st_mode & 0o111
    assert _run("bash", "-n", str(script)).returncode == 0
    result = _run(str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""


def _runbook_anchors() -> set[str]:
    return {
        re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()
