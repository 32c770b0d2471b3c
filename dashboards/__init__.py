"""Grafana dashboard, Prometheus rules and the tools that check them against the library.

Not part of the installed package: ``generate.py`` builds the dashboard, ``scrape.py`` renders a
live ``/metrics`` page from the library's real instruments, ``lint.py`` checks every PromQL
expression against it. See README.md.
"""
