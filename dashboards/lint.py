"""Lint the dashboard's and the rule files' PromQL against a live ``/metrics`` page.

Every expression must parse (promql-parser, Prometheus's grammar) and may only name series the
library really exports (or, in rule files, series the same file records). On top of that, the
rules of Grafana's dashboard-linter that apply to PromQL:

- counters (``*_total``, ``*_bucket``, ``*_count``, ``*_sum``, and whatever the page types as a
  counter or histogram) only as the range argument of ``rate()`` or ``increase()``; gauges never;
- ``histogram_quantile()`` over an aggregation that keeps ``le``;
- in the dashboard: every selector filters every template variable (``cluster``, ``namespace``,
  ``job``, ``instance``, ``provider``: ``label=~"$variable"``, the label read from the variable's
  ``label_values()``), every range is ``[$__rate_interval]``, and each variable's
  ``label_values()`` is valid and filters the variables before it; Prometheus's ``ALERTS`` may be
  selected too, as may the rule file's recorded series, and both may let a series without a
  label through (``label=~"$variable|"``: they keep only the labels their rules aggregate by);
- never add up providers: in the dashboard every aggregation keeps the provider label, and no
  panel stacks its series (Grafana's stacking adds them up), unless the panel is repeated per
  provider.

    python -m dashboards.lint     # lints dashboards/asgi-token-refresh.json and alerts.yaml
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import promql_parser as pq

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "asgi-token-refresh.json"
RULES = HERE / "alerts.yaml"

COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")
RANGE_FUNCTIONS = frozenset({"rate", "increase"})
# promql-parser does not know Grafana's macros: the rate interval becomes a range no one writes.
_RATE_INTERVAL = "$__rate_interval"
_RATE_INTERVAL_STANDIN = "7777s"
RATE_INTERVAL_RANGE = timedelta(seconds=7777)
DASHBOARD_MATCHERS = {"job": "$job", "instance": "$instance"}
# A template variable's name -> the label it lists (the library's labels are namespaced).
VARIABLE_LABELS = {"provider": "asgi_token_refresh_provider"}
PROVIDER_LABEL = "asgi_token_refresh_provider"
#: Series Prometheus itself makes from the rules, which a dashboard may select: a selector of
#: one may match ``label=~"$variable|"`` (the label absent, as the rules aggregated it away).
PROMETHEUS_SERIES = {"ALERTS": "gauge", "ALERTS_FOR_STATE": "gauge"}
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<expr>.+),\s*)?(?P<label>\w+)\)\s*$", re.S)


def parse(expr: str) -> pq.Expr:
    """Parse ``expr`` with ``$__rate_interval`` standing in as an ordinary range."""
    leftover = expr.replace(_RATE_INTERVAL, "")
    if "$__" in leftover:
        raise ValueError(f"only $__rate_interval is supported, in {expr!r}")
    return pq.parse(expr.replace(_RATE_INTERVAL, _RATE_INTERVAL_STANDIN))


def is_counter(name: str, series_types: Mapping[str, str]) -> bool:
    return name.endswith(COUNTER_SUFFIXES) or series_types.get(name) in ("counter", "histogram")


def lint_expr(
    expr: str,
    series_types: Mapping[str, str],
    *,
    dashboard: bool,
    recorded: frozenset[str] = frozenset(),
    matchers: Mapping[str, str] = DASHBOARD_MATCHERS,
    keep_label: str | None = None,
) -> list[str]:
    """Problems with one expression (empty if none).

    ``series_types`` maps every sample name of the ``/metrics`` page to its family's type;
    ``recorded`` names the series recording rules add (allowed in rule files). In a dashboard,
    every selector needs ``label=~"$variable"`` for each of ``matchers`` (label -> ``$variable``)
    and, with ``keep_label``, every aggregation must keep that label.
    """
    try:
        tree = parse(expr)
    except ValueError as exc:
        return [f"does not parse: {exc}"]
    problems: list[str] = []
    for selector, parents in _selectors(tree):
        name = selector.name
        where = name or str(selector)
        if name is None:
            problems.append(f"{where}: select series by metric name")
            continue
        if name not in series_types and name not in recorded:
            problems.append(f"{where}: no such series on /metrics (nor recorded by a rule)")
        parent = parents[-1] if parents else None
        in_range = isinstance(parent, pq.MatrixSelector)
        ranged_by = parents[-2] if in_range and len(parents) > 1 else None
        in_rate = isinstance(ranged_by, pq.Call) and ranged_by.func.name in RANGE_FUNCTIONS
        if is_counter(name, series_types) and not in_rate:
            problems.append(f"{where}: a counter outside rate()/increase()")
        if not is_counter(name, series_types) and in_range:
            problems.append(f"{where}: a gauge inside a range function")
        if in_range and not in_rate:
            problems.append(f"{where}: a range outside rate()/increase()")
        if dashboard:
            if isinstance(parent, pq.MatrixSelector) and parent.range != RATE_INTERVAL_RANGE:
                problems.append(f"{where}: use [$__rate_interval] as the range")
            absent_ok = name in PROMETHEUS_SERIES or name in recorded
            for label, variable in matchers.items():
                allowed = {variable, f"{variable}|"} if absent_ok else {variable}
                if not any(
                    m.name == label and m.value in allowed and m.op == pq.MatchOp.Re
                    for m in selector.matchers.matchers
                ):
                    problems.append(f'{where}: missing {label}=~"{variable}"')
    problems += _histogram_quantiles(tree)
    if dashboard and keep_label is not None:
        problems += _aggregations_drop(tree, keep_label)
    return problems


def _aggregations_drop(tree: pq.Expr, label: str) -> list[str]:
    """Aggregations that add up series of different values of ``label`` (a sum over
    providers): every one must be ``by (..., label, ...)`` or ``without`` it."""
    problems: list[str] = []

    def check(node: Any) -> None:
        if isinstance(node, pq.AggregateExpr):
            modifier = node.modifier
            keeps = modifier is not None and (
                (modifier.type == pq.AggModifierType.By and label in modifier.labels)
                or (modifier.type == pq.AggModifierType.Without and label not in modifier.labels)
            )
            if not keeps:
                problems.append(f"{node.op}(): aggregate by ({label}, ...): never add it up")
        for child in _children(node):
            check(child)

    check(tree)
    return problems


def lint_label_values(
    query: str,
    series_types: Mapping[str, str],
    label: str,
    matchers: Mapping[str, str] | None = None,
) -> list[str]:
    """A template variable's ``label_values(selector, label)`` query; its selector must carry
    ``matchers`` (label -> ``$variable``: those of the variables before it)."""
    match = _LABEL_VALUES.match(query)
    if match is None or match.group("expr") is None:
        return [f"{query!r}: not label_values(selector, label)"]
    if match.group("label") != label:
        return [f"{query!r}: asks for {match.group('label')}, not {label}"]
    try:
        tree = parse(match.group("expr"))
    except ValueError as exc:
        return [f"{query!r} does not parse: {exc}"]
    if not isinstance(tree, pq.VectorSelector) or tree.name not in series_types:
        return [f"{query!r}: select one series the library exports"]
    found = {(m.name, m.value) for m in tree.matchers.matchers if m.op == pq.MatchOp.Re}
    return [
        f'{query!r}: missing {name}=~"{variable}"'
        for name, variable in (matchers or {}).items()
        if (name, variable) not in found
    ]


def _selectors(tree: pq.Expr) -> Iterator[tuple[pq.VectorSelector, list[Any]]]:
    """Every vector selector with the chain of nodes above it."""

    def visit(node: Any, parents: list[Any]) -> Iterator[tuple[pq.VectorSelector, list[Any]]]:
        if isinstance(node, pq.VectorSelector):
            yield node, parents
            return
        below = [*parents, node]
        for child in _children(node):
            yield from visit(child, below)

    yield from visit(tree, [])


def _children(node: Any) -> list[Any]:
    if isinstance(node, pq.AggregateExpr):
        return [node.expr] + ([node.param] if isinstance(node.param, pq.Expr) else [])
    if isinstance(node, pq.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, pq.UnaryExpr | pq.ParenExpr | pq.SubqueryExpr):
        return [node.expr]
    if isinstance(node, pq.MatrixSelector):
        return [node.vector_selector]
    if isinstance(node, pq.Call):
        return list(node.args)
    return []


def _histogram_quantiles(tree: pq.Expr) -> list[str]:
    problems: list[str] = []

    def check(node: Any) -> None:
        if isinstance(node, pq.Call) and node.func.name == "histogram_quantile":
            inner = node.args[1]
            while isinstance(inner, pq.ParenExpr):
                inner = inner.expr
            modifier = getattr(inner, "modifier", None)
            keeps_le = (
                isinstance(inner, pq.AggregateExpr)
                and modifier is not None
                and modifier.type == pq.AggModifierType.By
                and "le" in modifier.labels
            )
            if not keeps_le:
                problems.append("histogram_quantile() needs sum by (..., le) (rate(..._bucket))")
        for child in _children(node):
            check(child)

    check(tree)
    return problems


# -- the files ----------------------------------------------------------------------------------


def dashboard_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """``(panel title, expr)`` for every target of every panel, rows included."""
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def annotation_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """``(annotation name, expr)`` for every PromQL annotation."""
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            yield annotation["name"], annotation["expr"]


def variable_matchers(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """label -> ``$variable`` for every ``label_values()`` variable, in order."""
    found: dict[str, str] = {}
    for name, query in template_queries(dashboard):
        match = _LABEL_VALUES.match(query)
        if match is not None:
            found[match.group("label")] = f"${name}"
    return found


def provider_variable(dashboard: Mapping[str, Any]) -> str | None:
    return variable_matchers(dashboard).get(PROVIDER_LABEL, "").removeprefix("$") or None


def stacking_problems(panel: Mapping[str, Any], provider: str | None) -> list[str]:
    """A panel that stacks its series adds up those of different providers, unless Grafana
    repeats it per provider (one provider per copy)."""
    field_config = panel.get("fieldConfig", {})
    modes = [field_config.get("defaults", {}).get("custom", {}).get("stacking", {}).get("mode")]
    for override in field_config.get("overrides", []):
        for prop in override.get("properties", []):
            if prop.get("id") == "custom.stacking" and isinstance(prop.get("value"), dict):
                modes.append(prop["value"].get("mode"))
    stacked = any(mode not in (None, "none") for mode in modes)
    if stacked and (provider is None or panel.get("repeat") != provider):
        return ["stacks series of several providers: draw lines, or repeat it per provider"]
    return []


def _panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def template_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """``(variable name, label_values query)`` for every query variable."""
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield variable["name"], query if isinstance(query, str) else query["query"]


def rule_expressions(rules: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """``(record or alert name, expr)`` for every rule."""
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield rule.get("record") or rule["alert"], rule["expr"]


def recorded_series(rules: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(
        rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule
    )


def lint_dashboard(
    dashboard: Mapping[str, Any],
    series_types: Mapping[str, str],
    alert_names: frozenset[str] | None = None,
    recorded: frozenset[str] = frozenset(),
) -> list[str]:
    """Every panel target, annotation and variable query of ``dashboard``; ``alert_names``
    (the rule file's alerts): an ``alertname`` matcher must match one of them; ``recorded``:
    the rule file's recorded series, which a panel may read (like ``ALERTS``, they keep only
    the labels their rules aggregate by, so ``label=~"$variable|"`` is allowed for them)."""
    matchers = variable_matchers(dashboard)
    series = {**series_types, **PROMETHEUS_SERIES}
    queries = [*dashboard_queries(dashboard), *annotation_queries(dashboard)]
    problems = [
        f"{title}: {expr!r}: {problem}"
        for title, expr in queries
        for problem in lint_expr(
            expr,
            series,
            dashboard=True,
            recorded=recorded,
            matchers=matchers,
            keep_label=PROVIDER_LABEL,
        )
    ]
    if alert_names is not None:
        problems += [
            f"{title}: {expr!r}: {problem}"
            for title, expr in queries
            for problem in _alert_names(expr, alert_names)
        ]
    before: dict[str, str] = {}
    for name, query in template_queries(dashboard):
        label = VARIABLE_LABELS.get(name, name)
        problems += [
            f"variable {name}: {problem}"
            for problem in lint_label_values(query, series_types, label, before)
        ]
        before[label] = f"${name}"
    provider = provider_variable(dashboard)
    problems += [
        f"{panel['title']}: {problem}"
        for panel in _panels(dashboard)
        for problem in stacking_problems(panel, provider)
    ]
    return problems


def _alert_names(expr: str, alert_names: frozenset[str]) -> list[str]:
    problems = []
    for selector, _ in _selectors(parse(expr)):
        for m in selector.matchers.matchers:
            if m.name != "alertname":
                continue
            pattern = re.compile(m.value if m.op == pq.MatchOp.Re else re.escape(m.value))
            if not any(pattern.fullmatch(name) for name in alert_names):
                problems.append(f"alertname {m.value!r} matches no alert of the rule file")
    return problems


def lint_rules(rules: Mapping[str, Any], series_types: Mapping[str, str]) -> list[str]:
    recorded = recorded_series(rules)
    return [
        f"{name}: {problem}"
        for name, expr in rule_expressions(rules)
        for problem in lint_expr(expr, series_types, dashboard=False, recorded=recorded)
    ]


def main() -> int:
    import yaml

    from dashboards.scrape import scrape

    series_types = scrape().series_types()
    rules = yaml.safe_load(RULES.read_text())
    alerts = frozenset(
        rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule
    )
    problems = lint_dashboard(
        json.loads(DASHBOARD.read_text()), series_types, alerts, recorded_series(rules)
    )
    problems += lint_rules(rules, series_types)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
