"""Build dashboards/asgi-token-refresh.json with the Grafana Foundation SDK (Grafana 11.6 schema).

    python dashboards/generate.py           # (re)write the JSON next to this file
    python dashboards/generate.py --check   # exit 1 if the committed JSON is not what this builds

Edit this file, never the JSON. Every query filters ``job=~"$job", instance=~"$instance"`` (and
the provider), every rate uses ``$__rate_interval``; ``python -m dashboards.lint`` and
tests/test_dashboards.py check that, and that every series exists on a real ``/metrics`` page.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

OUTPUT = Path(__file__).resolve().parent / "asgi-token-refresh.json"
UID = "asgi-token-refresh"
TITLE = "asgi-token-refresh: single-flight token refresh"

#: The alert thresholds of alerts.yaml, drawn as dashed lines on the matching panels.
STORM_SHARE = 0.1
INVALID_GRANT_RATIO = 0.05
PROVIDER_ERROR_RATIO = 0.1
SLOW_P99_SECONDS = 2.0

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
FILTER = 'job=~"$job", instance=~"$instance", asgi_token_refresh_provider=~"$provider"'
# The provider label is the OAuth2Client's name, present on every series.
BY_PROVIDER = "asgi_token_refresh_provider"

REFRESHES = "asgi_token_refresh_refreshes_total"
TOKEN_REQUESTS = "asgi_token_refresh_token_requests_total"
TOKEN_FRESH = "asgi_token_refresh_token_fresh_total"
COORDINATOR_ERRORS = "asgi_token_refresh_coordinator_errors_total"
LOGOUTS = "asgi_token_refresh_logouts_total"
TERMINAL_FAILURES = "asgi_token_refresh_terminal_failures_total"
DURATION = "asgi_token_refresh_refresh_duration_seconds"
ACTIVE = "asgi_token_refresh_refresh_active"
WAITERS = "asgi_token_refresh_refresh_waiters"
INTERVAL = "asgi_token_refresh_refresh_interval_seconds"
# The <= 30 s bucket: "30.0" from the Python exporter and Prometheus 3, "30" from Go exporters
# scraped by Prometheus 2.
RAPID_BUCKET = 'le=~"30|30[.]0"'
NOT_LEADER = 'asgi_token_refresh_dedupe!="leader"'
INVALID_GRANT = 'asgi_token_refresh_outcome="invalid_grant"'
PROVIDER_ERRORS = 'asgi_token_refresh_outcome=~"provider_error|timeout|network_error"'


def selector(metric: str, *matchers: str) -> str:
    return f"{metric}{{{', '.join((FILTER, *matchers))}}}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({selector(metric, *matchers)}[$__rate_interval])"


def summed(by: str, metric: str, *matchers: str) -> str:
    return f"sum by ({by}) ({rate(metric, *matchers)})"


def divided(numerator: str, denominator: str) -> str:
    return f"{numerator}\n/\n{denominator}"


def share(metric: str, matcher: str) -> str:
    """The per-provider share of ``metric`` matching ``matcher``: 0, not nothing, for a provider
    whose matching series was never incremented (a counter only appears when it first counts)."""
    total = summed(BY_PROVIDER, metric)
    return divided(f"(\n{summed(BY_PROVIDER, metric, matcher)}\nor\n0 * {total}\n)", total)


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, {summed(f'{BY_PROVIDER}, le', f'{histogram}_bucket')})"


def query(expr: str, legend: str, ref_id: str) -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref_id)
        .range()
        .datasource(DATASOURCE)
    )


def panel(
    title: str,
    description: str,
    unit: str,
    *targets: tuple[str, str],
    stacked: bool = False,
    ratio: bool = False,
    threshold: float | None = None,
    log_scale: bool = False,
) -> timeseries.Panel:
    built = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(12)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    if not log_scale:  # a log axis has no 0
        built = built.min(0)
    for index, (expr, legend) in enumerate(targets):
        built = built.with_target(query(expr, legend, "ABCDEFGH"[index]))
    if stacked:
        built = built.stacking(
            common_builders.StackingConfig().mode(common.StackingMode.NORMAL)
        ).fill_opacity(40)
    if ratio:
        built = built.max(1).decimals(1)
    if log_scale:
        built = built.scale_distribution(
            common_builders.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10)
        )
    if threshold is not None:
        built = built.thresholds(
            dashboard_builders.ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(None, "green"), Threshold(threshold, "red")])
        ).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.DASHED
            )
        )
    return built


def label_variable(name: str, query_text: str) -> dashboard_builders.QueryVariable:
    return (
        dashboard_builders.QueryVariable(name)
        .label(name)
        .datasource(DATASOURCE)
        .query(query_text)
        .multi(True)
        .include_all(True)
        .all_value(".+")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


def build() -> dashboard_builders.Dashboard:
    refreshes_by_outcome = panel(
        "Refreshes/s by outcome",
        "Calls to the token endpoint per second, one per flight, by outcome (success, "
        "invalid_grant, invalid_client, provider_error, timeout, network_error). With "
        "single-flight this stays near sessions / token lifetime; a storm shows as a multiple "
        "of it. Source: asgi_token_refresh.refreshes.",
        "reqps",
        (
            summed(f"{BY_PROVIDER}, asgi_token_refresh_outcome", REFRESHES),
            "{{asgi_token_refresh_provider}} {{asgi_token_refresh_outcome}}",
        ),
        stacked=True,
    )
    fresh_vs_refreshes = panel(
        "Fresh hits vs refreshes",
        "Token requests served on the fresh path (no lock, no I/O), requests that needed a new "
        "token (any dedupe path), and actual calls to the token endpoint. Healthy: fresh hits "
        "dominate and refreshes are a small fraction of the requests that needed a token. Log "
        "scale. Sources: asgi_token_refresh.token.fresh, .token.requests, .refreshes.",
        "reqps",
        (summed(BY_PROVIDER, TOKEN_FRESH), "{{asgi_token_refresh_provider}} fresh path"),
        (summed(BY_PROVIDER, TOKEN_REQUESTS), "{{asgi_token_refresh_provider}} needed a new token"),
        (summed(BY_PROVIDER, REFRESHES), "{{asgi_token_refresh_provider}} token endpoint calls"),
        log_scale=True,
    )
    by_dedupe_path = panel(
        "Token requests by dedupe path",
        "Callers that needed a new token, by how they were served: leader (started the flight), "
        "joined (waited for a flight in progress), grace_cache (a straggler handed the token "
        "that replaced its own), negative_cache (a failure remembered for a while), distributed "
        "(the flight was served the result another process published through the coordinator; "
        "counted besides that flight's leader). All but leader are dedupe hits. Source: "
        "asgi_token_refresh.token.requests.",
        "reqps",
        (
            summed(f"{BY_PROVIDER}, asgi_token_refresh_dedupe", TOKEN_REQUESTS),
            "{{asgi_token_refresh_provider}} {{asgi_token_refresh_dedupe}}",
        ),
        stacked=True,
    )
    dedupe_share = panel(
        "Dedupe share (non-leader / all token requests)",
        "The share of callers needing a new token that did not cause a token-endpoint call: "
        'token.requests{asgi_token_refresh_dedupe!="leader"} / token.requests. High under '
        "bursts of parallel requests per session; a drop to 0 while refreshes rise means "
        "every caller refreshes on its own (a naive refresh path, or one refresher per request).",
        "percentunit",
        (share(TOKEN_REQUESTS, NOT_LEADER), "{{asgi_token_refresh_provider}}"),
        ratio=True,
    )
    waiters = panel(
        "Waiters per flight",
        "Callers served by each flight, the leader included (1 = nobody joined): the mean and "
        "the p99 over flights. Large values are expected under bursts; they are the storms the "
        "single flight absorbed. Source: asgi_token_refresh.refresh.waiters.",
        "short",
        (
            divided(summed(BY_PROVIDER, f"{WAITERS}_sum"), summed(BY_PROVIDER, f"{WAITERS}_count")),
            "{{asgi_token_refresh_provider}} mean",
        ),
        (quantile(0.99, WAITERS), "{{asgi_token_refresh_provider}} p99"),
    )
    in_progress = panel(
        "Flights in progress per instance",
        "Refresh flights running now, per instance (a gauge sampled at scrape time). Stays "
        "near 0; a plateau at the refresher's max_concurrency means flights queue behind a slow "
        "provider. Source: asgi_token_refresh.refresh.active.",
        "short",
        (
            f"sum by (instance, {BY_PROVIDER}) ({selector(ACTIVE)})",
            "{{instance}} {{asgi_token_refresh_provider}}",
        ),
    )
    rapid = panel(
        "Rapid re-refresh share (interval ≤ 30 s)",
        "Share of refreshes that came 30 s or less after the previous refresh of the same "
        "session: a storm the dedupe did not stop (an API rejecting fresh tokens, tokens that "
        "expire within the refresh skew, or several instances refreshing the same session). "
        "Should be 0 when access tokens live longer than a minute. The dashed line is the "
        "AsgiTokenRefreshStorm threshold. Source: asgi_token_refresh.refresh.interval.",
        "percentunit",
        (
            divided(
                summed(BY_PROVIDER, f"{INTERVAL}_bucket", RAPID_BUCKET),
                summed(BY_PROVIDER, f"{INTERVAL}_count"),
            ),
            "{{asgi_token_refresh_provider}}",
        ),
        ratio=True,
        threshold=STORM_SHARE,
    )
    invalid_grant = panel(
        "invalid_grant ratio",
        "Share of token-endpoint calls answered invalid_grant: the refresh token was revoked, "
        "expired, or already used (a provider with reuse detection then revokes the whole "
        "session). A rise usually means refreshes of one session race somewhere. The dashed "
        "line is the AsgiTokenRefreshInvalidGrantSpike threshold. Source: "
        "asgi_token_refresh.refreshes.",
        "percentunit",
        (share(REFRESHES, INVALID_GRANT), "{{asgi_token_refresh_provider}}"),
        ratio=True,
        threshold=INVALID_GRANT_RATIO,
    )
    provider_errors = panel(
        "Provider error ratio",
        "Share of token-endpoint calls that failed transiently: provider_error (5xx, 429, "
        "malformed answer), timeout, network_error. Callers get 503 with Retry-After and keep "
        "their session. The dashed line is the AsgiTokenRefreshProviderErrors threshold. "
        "Source: asgi_token_refresh.refreshes.",
        "percentunit",
        (share(REFRESHES, PROVIDER_ERRORS), "{{asgi_token_refresh_provider}}"),
        ratio=True,
        threshold=PROVIDER_ERROR_RATIO,
    )
    terminal = panel(
        "Terminal failures by error.type and component",
        "Failures surfaced to a caller that no retry can fix, per second, by error.type "
        "(invalid_grant, invalid_client, no_session, downstream_401) and component (asgi: the "
        "middleware's accessor; httpx: TokenAuth, when an API refused a freshly refreshed "
        "token). The user must log in again. Source: asgi_token_refresh.terminal_failures.",
        "reqps",
        (
            summed(f"{BY_PROVIDER}, error_type, asgi_token_refresh_component", TERMINAL_FAILURES),
            "{{asgi_token_refresh_provider}} {{error_type}} ({{asgi_token_refresh_component}})",
        ),
        stacked=True,
    )
    latency = panel(
        "Refresh latency p50 / p90 / p99",
        "Duration of refresh flights (queueing for a slot, the token-endpoint call, store "
        "re-reads), from the histogram's buckets. The dashed line is the AsgiTokenRefreshSlow "
        "threshold for p99. Source: asgi_token_refresh.refresh.duration.",
        "s",
        (quantile(0.5, DURATION), "{{asgi_token_refresh_provider}} p50"),
        (quantile(0.9, DURATION), "{{asgi_token_refresh_provider}} p90"),
        (quantile(0.99, DURATION), "{{asgi_token_refresh_provider}} p99"),
        threshold=SLOW_P99_SECONDS,
    )
    coordinator_errors = panel(
        "Coordinator errors",
        "Failures of the cross-process coordinator (Redis, file) per second, by coordinator. "
        "During an outage flights coordinate within each process only: processes sharing "
        "sessions may refresh the same one concurrently (watch the invalid_grant ratio). "
        "0 (one line per provider, no coordinator label) when none ever failed, as with the "
        "default local coordinator. Source: asgi_token_refresh.coordinator.errors.",
        "ops",
        (
            # Every provider reports the fresh-path counter from the start.
            f"{summed(f'{BY_PROVIDER}, asgi_token_refresh_coordinator', COORDINATOR_ERRORS)}\n"
            f"or on ({BY_PROVIDER})\n0 * {summed(BY_PROVIDER, TOKEN_FRESH)}",
            "{{asgi_token_refresh_provider}} {{asgi_token_refresh_coordinator}}",
        ),
    )

    logouts = panel(
        "Logouts by revocation",
        "Sessions ended by logout per second, by what became of the grant at the provider: "
        "revoked (RFC 7009), unsupported (the provider publishes no revocation endpoint: the "
        "grant stays valid until it expires), failed (the revocation call failed), skipped. "
        "Source: asgi_token_refresh.logouts.",
        "ops",
        (
            f"{summed(f'{BY_PROVIDER}, asgi_token_refresh_revocation', LOGOUTS)}\n"
            f"or on ({BY_PROVIDER})\n0 * {summed(BY_PROVIDER, TOKEN_FRESH)}",
            "{{asgi_token_refresh_provider}} {{asgi_token_refresh_revocation}}",
        ),
    )

    fresh_query = f"label_values({TOKEN_FRESH}, job)"
    return (
        dashboard_builders.Dashboard(TITLE)
        .uid(UID)
        .description(
            "Single-flight OAuth2 token refresh (asgi-token-refresh): refresh rate and outcomes, "
            "dedupe, storms, terminal failures, latency. Generated by dashboards/generate.py."
        )
        .tags(["asgi-token-refresh", "oauth2"])
        .readonly()
        .timezone("browser")
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .annotation(
            dashboard_builders.AnnotationQuery()
            .name("Annotations & Alerts")
            .datasource(DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .built_in(1)
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
            .type("dashboard")
        )
        .with_variable(
            dashboard_builders.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
        )
        .with_variable(label_variable("job", fresh_query))
        .with_variable(
            label_variable("instance", f'label_values({TOKEN_FRESH}{{job=~"$job"}}, instance)')
        )
        .with_variable(
            label_variable(
                "provider",
                f'label_values({TOKEN_FRESH}{{job=~"$job", instance=~"$instance"}}, '
                f"{BY_PROVIDER})",
            )
        )
        .with_row(dashboard_builders.Row("Refreshes"))
        .with_panel(refreshes_by_outcome)
        .with_panel(fresh_vs_refreshes)
        .with_row(dashboard_builders.Row("Dedupe"))
        .with_panel(by_dedupe_path)
        .with_panel(dedupe_share)
        .with_panel(waiters)
        .with_panel(in_progress)
        .with_row(dashboard_builders.Row("Storms and failures"))
        .with_panel(rapid)
        .with_panel(invalid_grant)
        .with_panel(terminal)
        .with_panel(provider_errors)
        .with_row(dashboard_builders.Row("Latency and coordination"))
        .with_panel(latency)
        .with_panel(coordinator_errors)
        .with_panel(logouts)
    )


def render() -> str:
    """The dashboard JSON, with stable panel ids and sorted keys."""
    model = json.loads(json.dumps(build().build(), cls=JSONEncoder))
    for number, each in enumerate(model["panels"], start=1):
        each["id"] = number
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build dashboards/asgi-token-refresh.json.")
    parser.add_argument("--check", action="store_true", help="fail if the JSON is out of date")
    args = parser.parse_args(argv)
    built = render()
    if not args.check:
        OUTPUT.write_text(built)
        return 0
    committed = OUTPUT.read_text() if OUTPUT.exists() else ""
    if committed == built:
        return 0
    sys.stderr.writelines(
        difflib.unified_diff(
            committed.splitlines(keepends=True),
            built.splitlines(keepends=True),
            str(OUTPUT.name),
            "generate.py",
        )
    )
    print(f"{OUTPUT} is out of date: run python dashboards/generate.py", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
