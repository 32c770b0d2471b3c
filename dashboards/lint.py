"""Lint the dashboard's and the rule files' PromQL against a live ``/metrics`` page.

Every expression must parse (promql-parser, Prometheus's grammar) and may only name series the
library really exports (or, in rule files, series the same file records). On top of that, the
rules of Grafana's dashboard-linter that apply to PromQL:

- counters (``*_total``, ``*_bucket``, ``*_count``, ``*_sum``, and whatever the page types as a
  counter or histogram) only as the range argument of ``rate()`` or ``increase()``; gauges never;
- ``histogram_quantile()`` over an aggregation that keeps ``le``;
- in the dashboard: every selector filters ``job=~"$job"`` and ``instance=~"$instance"``, every
  range is ``[$__rate_interval]``, and each template variable's ``label_values()`` is valid too.

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
) -> list[str]:
    """Problems with one expression (empty if none).

    ``series_types`` maps every sample name of the ``/metrics`` page to its family's type;
    ``recorded`` names the series recording rules add (allowed in rule files).
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
            for label, variable in DASHBOARD_MATCHERS.items():
                if not any(
                    (m.name, m.value) == (label, variable) and m.op == pq.MatchOp.Re
                    for m in selector.matchers.matchers
                ):
                    problems.append(f'{where}: missing {label}=~"{variable}"')
    problems += _histogram_quantiles(tree)
    return problems


def lint_label_values(query: str, series_types: Mapping[str, str], label: str) -> list[str]:
    """A template variable's ``label_values(selector, label)`` query."""
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
    return []


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


def lint_dashboard(dashboard: Mapping[str, Any], series_types: Mapping[str, str]) -> list[str]:
    problems = [
        f"{title}: {expr!r}: {problem}"
        for title, expr in dashboard_queries(dashboard)
        for problem in lint_expr(expr, series_types, dashboard=True)
    ]
    problems += [
        f"variable {name}: {problem}"
        for name, query in template_queries(dashboard)
        for problem in lint_label_values(query, series_types, VARIABLE_LABELS.get(name, name))
    ]
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
    problems = lint_dashboard(json.loads(DASHBOARD.read_text()), series_types)
    problems += lint_rules(yaml.safe_load(RULES.read_text()), series_types)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
