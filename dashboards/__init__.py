"""Grafana dashboard, Prometheus rules and the tools that check them against the library.

The tools are not part of the installed package: ``generate.py`` builds the dashboard,
``scrape.py`` renders a live ``/metrics`` page from the library's real instruments, ``lint.py``
checks every PromQL expression against it. Their products are: the wheel carries
``asgi-token-refresh.json`` and ``alerts.yaml`` from this directory (``asgi-token-refresh
dashboards --out DIR`` writes them out). See README.md.
"""
