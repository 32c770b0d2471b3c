"""Build dashboards/asgi-token-refresh.json with the Grafana Foundation SDK (Grafana 11.6 schema).

    python -m dashboards.generate           # (re)write the JSON and examples/grafana/provisioning
    python -m dashboards.generate --check   # exit 1 if either is not what this builds

Edit this file, never the JSON. What a monitoring mixin keeps in its ``_config`` (data source,
the labels that locate a series, a selector every query carries, the runbook) is :class:`Config`;
:data:`CONFIG` builds the committed JSON, ``render(Config(...))`` builds yours.

Every query filters every template variable (``cluster``, ``namespace``, ``job``, ``instance``,
``provider``) and every rate uses ``$__rate_interval``; no panel stacks or sums series of
different providers. ``python -m dashboards.lint`` and tests/test_dashboards.py check all of
that, and that every series exists on a real ``/metrics`` page.

The first screen answers "is there a storm, where, since when": an overview row of stats (with
the alerts' state) above six storm panels, per provider (and per instance); the details follow
in collapsed-free rows below. Red bands on every time series mark the firing alerts.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    VariableHide,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

from asgi_token_refresh._dashboards import provisioning_files

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUTPUT = HERE / "asgi-token-refresh.json"
#: The Grafana provisioning of examples/grafana (compose.yaml): the `dashboards` command's
#: output for that setup, written and checked with the JSON.
EXAMPLE_PROVISIONING = ROOT / "examples" / "grafana" / "provisioning"
EXAMPLE_PROMETHEUS_URL = "http://127.0.0.1:19090"
EXAMPLE_DASHBOARDS_PATH = "/var/lib/grafana/dashboards/asgi-token-refresh"
EXAMPLE_SCRAPE_INTERVAL = "15s"  # examples/grafana/prometheus.yml's

#: The alert thresholds of alerts.yaml, drawn as dashed lines on the matching panels.
STORM_SHARE = 0.01
INVALID_GRANT_RATIO = 0.05
PROVIDER_ERROR_RATIO = 0.1
SLOW_P99_SECONDS = 2.0

REPOSITORY = "https://github.com/asgi-token-refresh/asgi-token-refresh/blob/main"


@dataclass(frozen=True)
class Config:
    """The dashboard's configuration, like a monitoring mixin's ``_config``.

    The variables are named ``cluster``, ``namespace``, ``job``, ``instance`` and ``provider``
    whatever labels they list. ``cluster`` and ``namespace`` are optional: their *All* is ``.*``,
    which also matches a series without the label, so the dashboard works unchanged where
    Prometheus adds neither (one cluster, no Kubernetes).
    """

    uid: str = "asgi-token-refresh"
    title: str = "asgi-token-refresh: single-flight token refresh"
    tags: tuple[str, ...] = ("asgi-token-refresh", "oauth2")
    datasource_type: str = "prometheus"
    #: Labels the variables list and every query filters.
    cluster_label: str = "cluster"
    namespace_label: str = "namespace"
    job_label: str = "job"
    instance_label: str = "instance"
    provider_label: str = "asgi_token_refresh_provider"  # the OAuth2Client's name
    #: Matchers every query carries besides the variables' (a mixin's ``jobSelector``), for
    #: example ``'job=~"web-.*"'``. Empty: every job that exports the library's metrics.
    selector: str = ""
    #: ``False`` hides the cluster variable (its *All* still matches everything).
    show_cluster: bool = True
    #: The runbook the panels link to; alerts.yaml's ``runbook_url`` point at its sections.
    runbook_url: str = f"{REPOSITORY}/dashboards/RUNBOOK.md"
    docs_url: str = f"{REPOSITORY}/dashboards/README.md"
    #: alerts.yaml's alert names start with this (the alert-state panel and the annotation).
    alert_prefix: str = "AsgiTokenRefresh"
    refresh: str = "30s"
    time_from: str = "now-1h"

    def variables(self) -> tuple[tuple[str, str, str], ...]:
        """``(variable, label, all value)`` in the order they are shown and chained."""
        return (
            ("cluster", self.cluster_label, ".*"),
            ("namespace", self.namespace_label, ".*"),
            ("job", self.job_label, ".+"),
            ("instance", self.instance_label, ".+"),
            ("provider", self.provider_label, ".+"),
        )

    def matchers(self, *, absent_ok: frozenset[str] = frozenset()) -> str:
        """Every variable's matcher (``absent_ok``: variables whose label a series may lack,
        matched as ``"$var|"``), then :attr:`selector`."""
        found = [
            f'{label}=~"${name}{"|" if name in absent_ok else ""}"'
            for name, label, _ in self.variables()
        ]
        return ", ".join([*found, *([self.selector] if self.selector else [])])

    def runbook(self, alert: str | None = None) -> str:
        return f"{self.runbook_url}#{alert.lower()}" if alert else self.runbook_url


CONFIG = Config()

REFRESHES = "asgi_token_refresh_refreshes_total"
TOKEN_REQUESTS = "asgi_token_refresh_token_requests_total"
TOKEN_FRESH = "asgi_token_refresh_token_fresh_total"
COORDINATOR_ERRORS = "asgi_token_refresh_coordinator_errors_total"
LOGOUTS = "asgi_token_refresh_logouts_total"
TERMINAL_FAILURES = "asgi_token_refresh_terminal_failures_total"
DUPLICATES = "asgi_token_refresh_refresh_duplicates_total"
DURATION = "asgi_token_refresh_refresh_duration_seconds"
ACTIVE = "asgi_token_refresh_refresh_active"
WAITERS = "asgi_token_refresh_refresh_waiters"
INTERVAL = "asgi_token_refresh_refresh_interval_seconds"
#: alerts.yaml's recording rule for what the storm alert evaluates.
EXCESS_SHARE = "job_provider:asgi_token_refresh_excess_refreshes:ratio_rate5m"
#: Prometheus's own series of the alerting rules' state. An alert has the labels its rule
#: aggregates by (job and provider): it may lack any of the variables' labels.
ALERTS = "ALERTS"
ALERT_ABSENT_OK = frozenset({"cluster", "namespace", "job", "instance", "provider"})
# The <= 30 s bucket: "30.0" from the Python exporter and Prometheus 3, "30" from Go exporters
# scraped by Prometheus 2.
RAPID_BUCKET = 'le=~"30|30[.]0"'
NOT_LEADER = 'asgi_token_refresh_dedupe!="leader"'
SUCCESS = 'asgi_token_refresh_outcome="success"'
INVALID_GRANT = 'asgi_token_refresh_outcome="invalid_grant"'
PROVIDER_ERRORS = 'asgi_token_refresh_outcome=~"provider_error|timeout|network_error"'
REFRESH_TOKEN_GRANT = 'asgi_token_refresh_grant="refresh_token"'
STORE_CONFLICT = 'asgi_token_refresh_detected_by="store_conflict"'
NOT_STORE_CONFLICT = 'asgi_token_refresh_detected_by!="store_conflict"'

# Runbook sections (RUNBOOK.md's headings: the alert names).
STORM = "AsgiTokenRefreshStorm"
INVALID_GRANT_SPIKE = "AsgiTokenRefreshInvalidGrantSpike"
PROVIDER_ERRORS_ALERT = "AsgiTokenRefreshProviderErrors"
SLOW = "AsgiTokenRefreshSlow"
TERMINAL = "AsgiTokenRefreshTerminalFailures"
CLIENT_REJECTED = "AsgiTokenRefreshClientRejected"
COORDINATOR_DOWN = "AsgiTokenRefreshCoordinatorDown"

#: The overview row: stats, then the storm panels; all of it above this many grid units (a
#: 1080p screen shows about 20 below Grafana's header and variables).
FIRST_SCREEN = 20
STAT_HEIGHT = 4
STORM_HEIGHT = 7


class Queries:
    """PromQL for one :class:`Config`: every selector filtered by every variable."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.provider = config.provider_label
        self.datasource = DataSourceRef(type_val=config.datasource_type, uid="${datasource}")

    def selector(self, metric: str, *matchers: str) -> str:
        return f"{metric}{{{', '.join((self.config.matchers(), *matchers))}}}"

    def rate(self, metric: str, *matchers: str) -> str:
        return f"rate({self.selector(metric, *matchers)}[$__rate_interval])"

    def summed(self, by: str, metric: str, *matchers: str) -> str:
        """The rate of ``metric`` summed ``by`` labels that always include the provider: no
        query adds up providers."""
        labels = by if by == self.provider else f"{by}, {self.provider}"
        return f"sum by ({labels}) ({self.rate(metric, *matchers)})"

    def per_provider(self, metric: str, *matchers: str) -> str:
        return self.summed(self.provider, metric, *matchers)

    def or_zero(self, expr: str) -> str:
        """``expr``, or 0 for a provider without such a series yet (every provider reports
        the fresh-path counter from its start)."""
        return f"{expr}\nor on ({self.provider})\n0 * {self.per_provider(TOKEN_FRESH)}"

    def share(self, metric: str, matcher: str) -> str:
        """The per-provider share of ``metric`` matching ``matcher``: 0, not nothing, for a
        provider whose matching series never counted."""
        total = self.per_provider(metric)
        return divided(f"(\n{self.per_provider(metric, matcher)}\nor\n0 * {total}\n)", total)

    def quantile(self, q: float, histogram: str) -> str:
        return f"histogram_quantile({q}, {self.summed('le', f'{histogram}_bucket')})"

    def alerts(self, state: Literal["firing", "pending"]) -> str:
        """Alerts of alerts.yaml in ``state``, counted per provider; 0 when there are none.

        Alerts carry only the labels their rules aggregate by (job and provider): an alert
        without one of the variables' labels is let through (``"$var|"``)."""
        config = self.config
        matchers = config.matchers(absent_ok=ALERT_ABSENT_OK)
        selected = (
            f'{ALERTS}{{alertname=~"{config.alert_prefix}.*", alertstate="{state}", {matchers}}}'
        )
        return f"count by ({self.provider}) ({selected})\nor on ()\nvector(0)"

    def recorded(self, record: str) -> str:
        """A series of alerts.yaml's recording rules: per job and provider, so a series
        without the other variables' labels is let through (``"$var|"``)."""
        absent_ok = frozenset({"cluster", "namespace", "instance"})
        return f"{record}{{{self.config.matchers(absent_ok=absent_ok)}}}"

    def firing(self) -> str:
        config = self.config
        matchers = config.matchers(absent_ok=ALERT_ABSENT_OK)
        return f'{ALERTS}{{alertname=~"{config.alert_prefix}.*", alertstate="firing", {matchers}}}'


def legend(label: str) -> str:
    """A Grafana legend placeholder for ``label``."""
    return "{{" + label + "}}"


def divided(numerator: str, denominator: str) -> str:
    return f"{numerator}\n/\n{denominator}"


Link = dashboard_models.DashboardLink


class Panels:
    """Panel builders sharing a :class:`Queries` and the config's links."""

    def __init__(self, queries: Queries) -> None:
        self.q = queries
        self.config = queries.config

    def _query(self, expr: str, legend: str, ref_id: str) -> prometheus.Dataquery:
        return (
            prometheus.Dataquery()
            .expr(expr)
            .legend_format(legend)
            .ref_id(ref_id)
            .range()
            .datasource(self.q.datasource)
        )

    def _links(self, runbooks: Sequence[str]) -> list[cogbuilder.Builder[Link]]:
        return [
            dashboard_builders.DashboardLink(f"Runbook: {alert}")
            .type(DashboardLinkType.LINK)
            .url(self.config.runbook(alert))
            .target_blank(True)
            for alert in runbooks
        ]

    def lines(
        self,
        title: str,
        description: str,
        unit: str,
        *targets: tuple[str, str],
        runbooks: Sequence[str] = (),
        height: int = 8,
        width: int = 12,
        ratio: bool = False,
        threshold: float | None = None,
        log_scale: bool = False,
    ) -> timeseries.Panel:
        """A line per series, never stacked: series of several providers never add up."""
        built = (
            timeseries.Panel()
            .title(title)
            .description(description)
            .datasource(self.q.datasource)
            .unit(unit)
            .height(height)
            .span(width)
            .line_width(1)
            .fill_opacity(10)
            .show_points(common.VisibilityMode.NEVER)
            .stacking(common_builders.StackingConfig().mode(common.StackingMode.NONE))
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
        if runbooks:
            built = built.links(self._links(runbooks))
        if not log_scale:  # a log axis has no 0
            built = built.min(0)
        for index, (expr, legend) in enumerate(targets):
            built = built.with_target(self._query(expr, legend, "ABCDEFGH"[index]))
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

    def storm(
        self,
        title: str,
        description: str,
        unit: str,
        *targets: tuple[str, str],
        runbooks: Sequence[str],
        ratio: bool = False,
        threshold: float | None = None,
    ) -> timeseries.Panel:
        """A panel of the first screen: a third of its width."""
        return self.lines(
            title,
            description,
            unit,
            *targets,
            runbooks=runbooks,
            height=STORM_HEIGHT,
            width=8,
            ratio=ratio,
            threshold=threshold,
        )

    def big(
        self,
        title: str,
        description: str,
        unit: str,
        *targets: tuple[str, str],
        runbooks: Sequence[str] = (),
        warn_above: float | None = None,
        width: int = 3,
        decimals: float | None = None,
    ) -> stat.Panel:
        """An overview stat: one value per provider (never a sum over providers), the last
        one, over a sparkline; orange above ``warn_above``."""
        steps = [Threshold(None, "green" if warn_above is not None else "blue")]
        if warn_above is not None:
            steps.append(Threshold(warn_above, "orange"))
        built = (
            stat.Panel()
            .title(title)
            .description(description)
            .datasource(self.q.datasource)
            .unit(unit)
            .height(STAT_HEIGHT)
            .span(width)
            .graph_mode(common.BigValueGraphMode.AREA)
            .color_mode(common.BigValueColorMode.VALUE)
            .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
            .justify_mode(common.BigValueJustifyMode.AUTO)
            .orientation(common.VizOrientation.AUTO)
            .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
            .thresholds(
                dashboard_builders.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps)
            )
        )
        if decimals is not None:
            built = built.decimals(decimals)
        if runbooks:
            built = built.links(self._links(runbooks))
        for index, (expr, legend) in enumerate(targets):
            built = built.with_target(self._query(expr, legend, "ABCDEFGH"[index]))
        return built

    def alert_state(self) -> stat.Panel:
        """Alerts of alerts.yaml firing (red) and pending (orange), per provider."""
        red = [Threshold(None, "green"), Threshold(1, "red")]
        orange = {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}, {"color": "orange", "value": 1}],
        }
        return (
            self.big(
                "Alerts firing / pending",
                f"Alerts of alerts.yaml ({self.config.alert_prefix}*) per provider, from "
                "Prometheus's ALERTS series: firing (red above 0) and pending (orange: the "
                "condition holds, its for: duration has not passed yet). 0 when none is active. "
                "The red bands on the time series below mark firing alerts: when a storm began. "
                "Each alert's runbook section is linked from the panels it concerns.",
                "none",
                (self.q.alerts("firing"), f"{legend(self.q.provider)} firing"),
                (self.q.alerts("pending"), f"{legend(self.q.provider)} pending"),
                runbooks=(),
                width=6,
                decimals=0,
            )
            .graph_mode(common.BigValueGraphMode.NONE)
            .color_mode(common.BigValueColorMode.BACKGROUND)
            .thresholds(
                dashboard_builders.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(red)
            )
            .override_by_query("B", [DynamicConfigValue(id_val="thresholds", value=orange)])
            .links(
                [
                    dashboard_builders.DashboardLink("Runbook: every alert")
                    .type(DashboardLinkType.LINK)
                    .url(self.config.runbook())
                    .target_blank(True)
                ]
            )
        )


def label_variable(
    config: Config, datasource: DataSourceRef, name: str, label: str, all_value: str, query: str
) -> dashboard_builders.QueryVariable:
    built = (
        dashboard_builders.QueryVariable(name)
        .label(name)
        .datasource(datasource)
        .query(query)
        .multi(True)
        .include_all(True)
        .all_value(all_value)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
    )
    if name == "cluster" and not config.show_cluster:
        built = built.hide(VariableHide.HIDE_VARIABLE)
    return built


def variables(config: Config, datasource: DataSourceRef) -> list[dashboard_builders.QueryVariable]:
    """The label variables, each listing its label among the series the ones before it select."""
    built: list[dashboard_builders.QueryVariable] = []
    before: list[str] = []
    for name, label, all_value in config.variables():
        matchers = [*before, *([config.selector] if config.selector else [])]
        series = f"{TOKEN_FRESH}{{{', '.join(matchers)}}}" if matchers else TOKEN_FRESH
        query = f"label_values({series}, {label})"
        built.append(label_variable(config, datasource, name, label, all_value, query))
        before.append(f'{label}=~"${name}"')
    return built


def build(config: Config = CONFIG) -> dashboard_builders.Dashboard:
    q = Queries(config)
    p = Panels(q)
    provider = legend(q.provider)

    # -- overview: stats ------------------------------------------------------------------------
    provider_calls = p.big(
        "Provider calls/s",
        "Calls to the token endpoint per second, per provider (all outcomes). With single-flight "
        "it stays near active sessions / access-token lifetime; a storm is a multiple of that. "
        "Source: asgi_token_refresh.refreshes.",
        "reqps",
        (q.per_provider(REFRESHES), provider),
        runbooks=(STORM,),
    )
    dedupe = p.big(
        "Dedupe share",
        "Share of the callers that needed a new token and were served without a token-endpoint "
        "call of their own (joined a flight, grace cache, negative cache, another process). "
        "High under bursts; 0 while calls rise means every caller refreshes on its own. "
        "Source: asgi_token_refresh.token.requests.",
        "percentunit",
        (q.share(TOKEN_REQUESTS, NOT_LEADER), provider),
        decimals=1,
    )
    invalid_grants = p.big(
        "invalid_grant/s",
        "Token-endpoint calls answered invalid_grant per second, per provider: refresh tokens "
        "reused, revoked or expired; with reuse detection the user is logged out. Orange above "
        "0. Source: asgi_token_refresh.refreshes.",
        "reqps",
        (q.or_zero(q.per_provider(REFRESHES, INVALID_GRANT)), provider),
        runbooks=(INVALID_GRANT_SPIKE,),
        warn_above=0.001,
    )
    terminal_rate = p.big(
        "Terminal failures/s",
        "Failures surfaced to a caller that no retry fixes (invalid_grant, invalid_client, "
        "no_session, downstream_401), per second and provider: those users must log in "
        "again. Orange above 0. Source: asgi_token_refresh.terminal_failures.",
        "reqps",
        (q.or_zero(q.per_provider(TERMINAL_FAILURES)), provider),
        runbooks=(TERMINAL, CLIENT_REJECTED),
        warn_above=0.001,
    )
    duplicates = p.big(
        "Duplicate refreshes/s",
        "Refreshes that repeated one someone else had already made (replicas sharing sessions "
        "without a shared coordinator), per second and provider. 0 with a Redis or file "
        "coordinator. Orange above 0. Source: asgi_token_refresh.refresh.duplicates.",
        "reqps",
        (q.or_zero(q.per_provider(DUPLICATES)), provider),
        runbooks=(STORM, COORDINATOR_DOWN),
        warn_above=0.001,
    )
    active = p.big(
        "Flights in progress",
        "Refresh flights running now, per provider over the selected instances (a gauge at "
        "scrape time). Near 0; a plateau at the refresher's max_concurrency means flights queue "
        "behind a slow provider. Source: asgi_token_refresh.refresh.active.",
        "short",
        (f"sum by ({q.provider}) ({q.selector(ACTIVE)})", provider),
        runbooks=(SLOW,),
        decimals=0,
    )

    # -- overview: storm panels -----------------------------------------------------------------
    refreshes_by_outcome = p.storm(
        "Refreshes/s by outcome",
        "Calls to the token endpoint per second, one per flight, per provider and outcome "
        "(success, invalid_grant, invalid_client, provider_error, timeout, network_error); "
        "lines, never stacked. With single-flight this stays near sessions / token lifetime; a "
        "storm shows as a multiple of it, and when it began. Source: asgi_token_refresh.refreshes.",
        "reqps",
        (
            q.summed("asgi_token_refresh_outcome", REFRESHES),
            provider + " {{asgi_token_refresh_outcome}}",
        ),
        runbooks=(STORM, INVALID_GRANT_SPIKE, PROVIDER_ERRORS_ALERT),
    )
    excess = p.storm(
        "Excess refresh share (the storm alert's measure)",
        "What AsgiTokenRefreshStorm evaluates, per job and provider: excess provider calls "
        "(re-refreshes of a session within half its usual interval, plus duplicate refreshes "
        "of another process's) as a share of all provider calls, over 5 minutes. 0 at rest "
        "whatever the size of the site; the dashed line is the alert's 1 % (it also needs "
        "0.02 excess calls/s, for 10 minutes). Read from alerts.yaml's recording rule "
        f"{EXCESS_SHARE}: no data where Prometheus does not load those rules (the rapid "
        "re-refresh panel below needs none). Sources: asgi_token_refresh.refresh.interval, "
        ".refresh.duplicates, .refreshes.",
        "percentunit",
        (q.recorded(EXCESS_SHARE), "{{job}} " + provider),
        runbooks=(STORM,),
        ratio=True,
        threshold=STORM_SHARE,
    )
    invalid_grant = p.storm(
        "invalid_grant ratio",
        "Share of token-endpoint calls answered invalid_grant: the refresh token was revoked, "
        "expired, or already used (a provider with reuse detection then revokes the whole "
        "session). A rise usually means refreshes of one session race somewhere. The dashed "
        "line is the AsgiTokenRefreshInvalidGrantSpike threshold. Source: "
        "asgi_token_refresh.refreshes.",
        "percentunit",
        (q.share(REFRESHES, INVALID_GRANT), provider),
        runbooks=(INVALID_GRANT_SPIKE,),
        ratio=True,
        threshold=INVALID_GRANT_RATIO,
    )
    successes = q.per_provider(REFRESHES, SUCCESS, REFRESH_TOKEN_GRANT)
    per_rotation = p.storm(
        "Refreshes per grant rotation",
        "Token-endpoint calls per rotation of a session's refresh token that was kept: "
        "(successful refresh-token refreshes + duplicates the provider refused) / (successful "
        "refresh-token refreshes - duplicates that lost the race to store). 1.0 is healthy: "
        "every rotation cost one provider call. Above 1, replicas refresh the same sessions "
        "(no shared coordinator, or it is down): 2.0 is two calls per rotation. No line while "
        "nothing was refreshed. Sources: asgi_token_refresh.refreshes, .refresh.duplicates.",
        "short",
        (
            divided(
                f"(\n{successes}\n+\n({q.or_zero(q.per_provider(DUPLICATES, NOT_STORE_CONFLICT))})"
                "\n)",
                f"(\n{successes}\n-\n({q.or_zero(q.per_provider(DUPLICATES, STORE_CONFLICT))})\n)",
            ),
            provider,
        ),
        runbooks=(STORM, COORDINATOR_DOWN),
    )
    by_instance = p.storm(
        "Refreshes/s per instance",
        "Calls to the token endpoint per second, per instance and provider: where a storm "
        "comes from (one replica, or all of them: a deploy, a restart, a client-side change). "
        "Source: asgi_token_refresh.refreshes.",
        "reqps",
        (q.summed(q.config.instance_label, REFRESHES), "{{instance}} " + provider),
        runbooks=(STORM,),
    )
    duplicates_by = p.storm(
        "Duplicate refreshes by detected_by",
        "Refreshes that repeated someone else's, per second, by how they were noticed: "
        "store_conflict (the store already held another token set of that generation), "
        "newer_stored (the provider refused the token and the store holds its successor), "
        "spent_here (the provider refused a refresh token this process spent moments ago). "
        "A line at 0 per provider when none happened. Source: "
        "asgi_token_refresh.refresh.duplicates.",
        "reqps",
        (
            q.or_zero(q.summed("asgi_token_refresh_detected_by", DUPLICATES)),
            provider + " {{asgi_token_refresh_detected_by}}",
        ),
        runbooks=(STORM, COORDINATOR_DOWN),
    )

    # -- below the fold -------------------------------------------------------------------------
    rapid = p.lines(
        "Rapid re-refresh share (interval ≤ 30 s)",
        "Share of refreshes that came 30 s or less after the previous refresh of the same "
        "session, as this process measured it: a storm the dedupe did not stop (an API "
        "rejecting fresh tokens, tokens that expire within the refresh skew, or several "
        "instances refreshing the same session). Should be 0 when access tokens live longer "
        "than a minute. Raw series only, no recording rule; the storm alert counts "
        "re-refreshes within half the usual interval instead (the excess panel above). Source: "
        "asgi_token_refresh.refresh.interval.",
        "percentunit",
        (
            divided(
                q.per_provider(f"{INTERVAL}_bucket", RAPID_BUCKET),
                q.per_provider(f"{INTERVAL}_count"),
            ),
            provider,
        ),
        runbooks=(STORM,),
        ratio=True,
        width=8,
    )
    fresh_vs_refreshes = p.lines(
        "Fresh hits vs refreshes",
        "Token requests served on the fresh path (no lock, no I/O), requests that needed a new "
        "token (any dedupe path), and actual calls to the token endpoint. Healthy: fresh hits "
        "dominate and refreshes are a small fraction of the requests that needed a token. Log "
        "scale. Sources: asgi_token_refresh.token.fresh, .token.requests, .refreshes.",
        "reqps",
        (q.per_provider(TOKEN_FRESH), provider + " fresh path"),
        (q.per_provider(TOKEN_REQUESTS), provider + " needed a new token"),
        (q.per_provider(REFRESHES), provider + " token endpoint calls"),
        log_scale=True,
        width=8,
    )
    latency = p.lines(
        "Refresh latency p50 / p90 / p99",
        "Duration of refresh flights (queueing for a slot, the token-endpoint call, store "
        "re-reads), from the histogram's buckets. The dashed line is the AsgiTokenRefreshSlow "
        "threshold for p99. Source: asgi_token_refresh.refresh.duration.",
        "s",
        (q.quantile(0.5, DURATION), provider + " p50"),
        (q.quantile(0.9, DURATION), provider + " p90"),
        (q.quantile(0.99, DURATION), provider + " p99"),
        runbooks=(SLOW,),
        threshold=SLOW_P99_SECONDS,
        width=8,
    )
    by_dedupe_path = p.lines(
        "Token requests by dedupe path",
        "Callers that needed a new token, by how they were served: leader (started the flight), "
        "joined (waited for a flight in progress), grace_cache (a straggler handed the token "
        "that replaced its own), negative_cache (a failure remembered for a while), distributed "
        "(the flight's leader was served the result another process published through the "
        "coordinator). Each caller counts once. All but leader are dedupe hits. Lines, never "
        "stacked. Source: asgi_token_refresh.token.requests.",
        "reqps",
        (
            q.summed("asgi_token_refresh_dedupe", TOKEN_REQUESTS),
            provider + " {{asgi_token_refresh_dedupe}}",
        ),
    )
    dedupe_share = p.lines(
        "Dedupe share (non-leader / all token requests)",
        "The share of callers needing a new token that did not cause a token-endpoint call: "
        'token.requests{asgi_token_refresh_dedupe!="leader"} / token.requests. High under '
        "bursts of parallel requests per session; a drop to 0 while refreshes rise means "
        "every caller refreshes on its own (a naive refresh path, or one refresher per request).",
        "percentunit",
        (q.share(TOKEN_REQUESTS, NOT_LEADER), provider),
        ratio=True,
    )
    waiters = p.lines(
        "Waiters per flight",
        "Callers served by each flight, the leader included (1 = nobody joined): the mean and "
        "the p99 over flights. Large values are expected under bursts; they are the storms the "
        "single flight absorbed. Source: asgi_token_refresh.refresh.waiters.",
        "short",
        (
            divided(q.per_provider(f"{WAITERS}_sum"), q.per_provider(f"{WAITERS}_count")),
            provider + " mean",
        ),
        (q.quantile(0.99, WAITERS), provider + " p99"),
    )
    in_progress = p.lines(
        "Flights in progress per instance",
        "Refresh flights running now, per instance (a gauge sampled at scrape time). Stays "
        "near 0; a plateau at the refresher's max_concurrency means flights queue behind a slow "
        "provider. Source: asgi_token_refresh.refresh.active.",
        "short",
        (
            f"sum by ({q.config.instance_label}, {q.provider}) ({q.selector(ACTIVE)})",
            "{{instance}} " + provider,
        ),
        runbooks=(SLOW,),
    )
    terminal = p.lines(
        "Terminal failures by error.type and component",
        "Failures surfaced to a caller that no retry can fix, per second, by error.type "
        "(invalid_grant, invalid_client, no_session, downstream_401) and component (asgi: the "
        "middleware's accessor; httpx: TokenAuth, when an API refused a freshly refreshed "
        "token; login: the login callback). The user must log in again. Lines, never stacked. "
        "Source: asgi_token_refresh.terminal_failures.",
        "reqps",
        (
            q.summed("error_type, asgi_token_refresh_component", TERMINAL_FAILURES),
            provider + " {{error_type}} ({{asgi_token_refresh_component}})",
        ),
        runbooks=(TERMINAL, CLIENT_REJECTED),
    )
    provider_errors = p.lines(
        "Provider error ratio",
        "Share of token-endpoint calls that failed transiently: provider_error (5xx, 429, "
        "malformed answer), timeout, network_error. Callers get 503 with Retry-After and keep "
        "their session. The dashed line is the AsgiTokenRefreshProviderErrors threshold. "
        "Source: asgi_token_refresh.refreshes.",
        "percentunit",
        (q.share(REFRESHES, PROVIDER_ERRORS), provider),
        runbooks=(PROVIDER_ERRORS_ALERT,),
        ratio=True,
        threshold=PROVIDER_ERROR_RATIO,
    )
    coordinator_errors = p.lines(
        "Coordinator errors",
        "Failures of the cross-process coordinator (Redis, file) per second, by coordinator. "
        "During an outage flights coordinate within each process only: processes sharing "
        "sessions may refresh the same one concurrently (watch the duplicates). "
        "0 (one line per provider, no coordinator label) when none ever failed, as with the "
        "default local coordinator. Source: asgi_token_refresh.coordinator.errors.",
        "ops",
        (
            q.or_zero(q.summed("asgi_token_refresh_coordinator", COORDINATOR_ERRORS)),
            provider + " {{asgi_token_refresh_coordinator}}",
        ),
        runbooks=(COORDINATOR_DOWN,),
    )
    logouts = p.lines(
        "Logouts by revocation",
        "Sessions ended by logout per second, by what became of the grant at the provider: "
        "revoked (RFC 7009), unsupported (the provider publishes no revocation endpoint: the "
        "grant stays valid until it expires), failed (the revocation call failed), skipped. "
        "Source: asgi_token_refresh.logouts.",
        "ops",
        (
            q.or_zero(q.summed("asgi_token_refresh_revocation", LOGOUTS)),
            provider + " {{asgi_token_refresh_revocation}}",
        ),
    )

    built = (
        dashboard_builders.Dashboard(config.title)
        .uid(config.uid)
        .description(
            "Single-flight OAuth2 token refresh (asgi-token-refresh). First screen: is there a "
            "refresh storm, where (provider, instance), since when (red bands: firing alerts). "
            "Below: dedupe, failures, latency, coordination. Generated by dashboards/generate.py."
        )
        .tags(list(config.tags))
        .readonly()
        .timezone("browser")
        .time(config.time_from, "now")
        .refresh(config.refresh)
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
        .annotation(
            dashboard_builders.AnnotationQuery()
            .name(f"{config.alert_prefix} alerts firing")
            .datasource(q.datasource)
            .enable(True)
            .hide(False)
            .icon_color("red")
            .expr(q.firing())
        )
        .link(
            dashboard_builders.DashboardLink("Runbook")
            .type(DashboardLinkType.LINK)
            .icon("doc")
            .tooltip("What to do for each alert")
            .url(config.runbook())
            .target_blank(True)
        )
        .link(
            dashboard_builders.DashboardLink("Metrics and panels")
            .type(DashboardLinkType.LINK)
            .icon("info")
            .tooltip("Every metric, label and panel of this dashboard")
            .url(config.docs_url)
            .target_blank(True)
        )
        .link(
            dashboard_builders.DashboardLink("asgi-token-refresh")
            .type(DashboardLinkType.DASHBOARDS)
            .tags([config.tags[0]])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .with_variable(
            dashboard_builders.DatasourceVariable("datasource")
            .label("Data source")
            .type(config.datasource_type)
        )
    )
    for variable in variables(config, q.datasource):
        built = built.with_variable(variable)
    built = built.with_row(dashboard_builders.Row("Overview: is there a storm, where, since when"))
    for each in (
        p.alert_state(),
        provider_calls,
        dedupe,
        invalid_grants,
        terminal_rate,
        duplicates,
        active,
        refreshes_by_outcome,
        excess,
        invalid_grant,
        per_rotation,
        by_instance,
        duplicates_by,
    ):
        built = built.with_panel(each)
    rows: tuple[tuple[str, tuple[timeseries.Panel, ...]], ...] = (
        ("Refreshes and latency", (rapid, fresh_vs_refreshes, latency)),
        ("Dedupe", (by_dedupe_path, dedupe_share, waiters, in_progress)),
        ("Failures", (terminal, provider_errors)),
        ("Coordination and logouts", (coordinator_errors, logouts)),
    )
    for title, panels in rows:
        built = built.with_row(dashboard_builders.Row(title))
        for each in panels:
            built = built.with_panel(each)
    return built


def render(config: Config = CONFIG) -> str:
    """The dashboard JSON, with stable panel ids and sorted keys."""
    model = json.loads(json.dumps(build(config).build(), cls=JSONEncoder))
    for number, each in enumerate(model["panels"], start=1):
        each["id"] = number
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def example_provisioning() -> dict[Path, str]:
    """examples/grafana/provisioning: what ``asgi-token-refresh dashboards`` writes for the
    compose setup (Prometheus on 19090, the dashboard mounted where the provider looks)."""
    files = provisioning_files(
        prometheus_url=EXAMPLE_PROMETHEUS_URL,
        dashboards_path=EXAMPLE_DASHBOARDS_PATH,
        scrape_interval=EXAMPLE_SCRAPE_INTERVAL,
        default_datasource=True,
    )
    folder = EXAMPLE_PROVISIONING.parent
    return {folder.joinpath(*relative.split("/")): text for relative, text in files.items()}


def outputs() -> dict[Path, str]:
    return {OUTPUT: render(), **example_provisioning()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build dashboards/asgi-token-refresh.json and examples/grafana/provisioning."
    )
    parser.add_argument("--check", action="store_true", help="fail if either is out of date")
    args = parser.parse_args(argv)
    stale = 0
    for path, built in outputs().items():
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(built)
            continue
        committed = path.read_text() if path.exists() else ""
        if committed == built:
            continue
        stale += 1
        sys.stderr.writelines(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                built.splitlines(keepends=True),
                str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                "generate.py",
            )
        )
        print(f"{path} is out of date: run python -m dashboards.generate", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
