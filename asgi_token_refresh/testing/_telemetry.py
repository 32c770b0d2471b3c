"""Telemetry captured in memory, so tests can assert on spans and metric points.

Needs ``opentelemetry-sdk``; it is imported only when a capture is made, so the rest of
:mod:`asgi_token_refresh.testing` works without it.
"""

from __future__ import annotations

from typing import Any


class CapturedTelemetry:
    """A :class:`~asgi_token_refresh.Telemetry` wired to in-memory SDK exporters.

    Pass ``captured.telemetry`` to ``OAuth2Client(telemetry=...)`` (or a Refresher), run the
    code, then read ``spans()`` and ``points(metric)``; no global provider is touched.
    """

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from .._telemetry import Telemetry

        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.telemetry = Telemetry(
            meter_provider=self.meter_provider, tracer_provider=self.tracer_provider
        )

    def spans(self, name: str | None = None) -> list[Any]:
        """Finished spans, optionally only those called ``name``."""
        return [s for s in self.exporter.get_finished_spans() if name in (None, s.name)]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """``(attributes, point)`` for every data point of ``metric`` collected now."""
        data = self.reader.get_metrics_data()
        found: list[tuple[dict[str, Any], Any]] = []
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for each in scope.metrics:
                    if each.name == metric:
                        found += [(dict(p.attributes or {}), p) for p in each.data.data_points]
        return found

    def value(self, metric: str, **attributes: str) -> float:
        """Sum of a counter's points whose attributes include ``attributes`` (0 if none).

        Keys are the attributes' short names: ``outcome`` for ``asgi_token_refresh.outcome``,
        ``error_type`` for ``error.type``.
        """
        wanted = {
            "error.type" if k == "error_type" else "asgi_token_refresh." + k: v
            for k, v in attributes.items()
        }
        return sum(
            getattr(point, "value", getattr(point, "count", 0))
            for labels, point in self.points(metric)
            if all(labels.get(k) == v for k, v in wanted.items())
        )

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def capture_telemetry() -> CapturedTelemetry:
    """In-memory spans and metrics for tests (needs ``opentelemetry-sdk``)."""
    return CapturedTelemetry()
