"""The ``dashboards`` command: write the shipped Grafana dashboard, the Prometheus rules and a
Grafana provisioning example into a directory.

The dashboard JSON and ``alerts.yaml`` have one source, the repository's ``dashboards/``; the
wheel carries them as ``asgi_token_refresh/dashboards/`` (``force-include`` in pyproject.toml),
and a source checkout reads them where they are. The provisioning files are made here, and
``dashboards/generate.py`` writes the same ones, for compose, into examples/grafana/provisioning.

    asgi-token-refresh dashboards --out DIR [--force] [--prometheus-url URL]
        [--grafana-dashboards-path PATH] [--scrape-interval 15s]
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import re
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

__all__ = [
    "DASHBOARD",
    "RULES",
    "add_dashboards_command",
    "provisioning_files",
    "run_dashboards",
    "shipped",
]

DASHBOARD = "asgi-token-refresh.json"
RULES = "alerts.yaml"
#: Where, in DIR, each file goes (POSIX paths).
DASHBOARD_OUT = f"dashboards/{DASHBOARD}"
RULES_OUT = f"prometheus/{RULES}"
DATASOURCE_OUT = "provisioning/datasources/asgi-token-refresh.yaml"
PROVIDER_OUT = "provisioning/dashboards/asgi-token-refresh.yaml"

DEFAULT_PROMETHEUS_URL = "http://127.0.0.1:9090"
DEFAULT_SCRAPE_INTERVAL = "15s"
_DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")


def shipped(name: str) -> bytes:
    """One of the shipped files (:data:`DASHBOARD`, :data:`RULES`): from the installed wheel,
    or, in a source checkout, from the repository's ``dashboards/``."""
    if name not in (DASHBOARD, RULES):
        raise ValueError(f"not a shipped file: {name!r}")
    packaged = importlib.resources.files(__package__).joinpath("dashboards", name)
    if packaged.is_file():
        return packaged.read_bytes()
    checkout = Path(__file__).resolve().parent.parent / "dashboards" / name
    if checkout.is_file():
        return checkout.read_bytes()
    raise FileNotFoundError(
        f"{name} is neither in the installed package (asgi_token_refresh/dashboards/) nor in a "
        "source checkout (dashboards/): reinstall asgi-token-refresh"
    )


def _quoted(value: str) -> str:
    """A YAML double-quoted scalar (a JSON string is one)."""
    return json.dumps(value, ensure_ascii=False)


def provisioning_files(
    *,
    prometheus_url: str,
    dashboards_path: str,
    scrape_interval: str = DEFAULT_SCRAPE_INTERVAL,
    default_datasource: bool = False,
) -> dict[str, str]:
    """Grafana provisioning: a Prometheus data source and a file dashboard provider that loads
    the dashboard JSON from ``dashboards_path``. Keys are paths relative to the output."""
    datasource = f"""\
# Grafana data source for the asgi-token-refresh dashboard: the Prometheus that scrapes the
# app's /metrics and evaluates alerts.yaml. timeInterval is its scrape interval, so that
# $__rate_interval always spans several scrapes. Made by `asgi-token-refresh dashboards`.
# isDefault: the dashboard's data-source variable starts on the default data source (Grafana
# allows one per organisation); otherwise pick this one in the variable.
apiVersion: 1
datasources:
  - name: asgi-token-refresh Prometheus
    uid: asgi-token-refresh-prometheus
    type: prometheus
    access: proxy
    url: {_quoted(prometheus_url)}
    isDefault: {"true" if default_datasource else "false"}
    editable: false
    jsonData:
      httpMethod: POST
      timeInterval: {_quoted(scrape_interval)}
"""
    provider = f"""\
# Grafana dashboard provider: loads {DASHBOARD} from the directory below,
# read-only (the dashboard is generated: edits in the UI are not allowed; Grafana reloads the
# file when it changes). Made by `asgi-token-refresh dashboards`.
apiVersion: 1
providers:
  - name: asgi-token-refresh
    folder: asgi-token-refresh
    type: file
    disableDeletion: true
    allowUiUpdates: false
    updateIntervalSeconds: 30
    options:
      path: {_quoted(dashboards_path)}
      foldersFromFilesStructure: false
"""
    return {DATASOURCE_OUT: datasource, PROVIDER_OUT: provider}


class UsageError(Exception):
    """Bad input: the command says why and exits 2."""


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise UsageError(
            f"--prometheus-url must be an http(s) URL such as {DEFAULT_PROMETHEUS_URL}"
        )
    return url


def _check_interval(interval: str) -> str:
    if not interval or not _DURATION.match(interval) or not any(c.isdigit() for c in interval):
        raise UsageError("--scrape-interval must be a Prometheus duration such as 15s or 1m")
    return interval


def outputs(
    out: Path,
    *,
    prometheus_url: str = DEFAULT_PROMETHEUS_URL,
    dashboards_path: str | None = None,
    scrape_interval: str = DEFAULT_SCRAPE_INTERVAL,
) -> dict[Path, bytes]:
    """Every file the command writes into ``out``, with its content."""
    if dashboards_path is None:
        dashboards_path = str((out / DASHBOARD_OUT).parent.resolve())
    elif not (PurePosixPath(dashboards_path).is_absolute() or Path(dashboards_path).is_absolute()):
        raise UsageError("--grafana-dashboards-path must be absolute (as Grafana sees it)")
    files = {
        DASHBOARD_OUT: shipped(DASHBOARD),
        RULES_OUT: shipped(RULES),
        **{
            relative: text.encode()
            for relative, text in provisioning_files(
                prometheus_url=_check_url(prometheus_url),
                dashboards_path=dashboards_path,
                scrape_interval=_check_interval(scrape_interval),
            ).items()
        },
    }
    return {out.joinpath(*relative.split("/")): content for relative, content in files.items()}


def write(out: Path, files: dict[Path, bytes], *, force: bool) -> None:
    """Write ``files`` (all inside ``out``), refusing to overwrite any unless ``force``; nothing
    is written when one is refused."""
    present = next((path for path in (out, *out.absolute().parents) if path.exists()), None)
    if present is not None and not present.is_dir():
        raise UsageError(f"--out {out}: {present} exists and is not a directory")
    for path in files:
        for parent in path.relative_to(out).parents:
            if parent != Path(".") and (out / parent).exists() and not (out / parent).is_dir():
                raise UsageError(f"{out / parent} exists and is not a directory")
        if path.is_dir():
            raise UsageError(f"{path} exists and is a directory")
    existing = [path for path in files if path.exists() or path.is_symlink()]
    if existing and not force:
        listed = "\n  ".join(str(path) for path in existing)
        raise UsageError(f"refusing to overwrite (pass --force to replace them):\n  {listed}")
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()  # --force replaces the link, never the file it points to
        path.write_bytes(content)


def add_dashboards_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dashboards`` on the command line's subcommands."""
    parser = commands.add_parser(
        "dashboards",
        help="write the Grafana dashboard, the Prometheus rules and Grafana provisioning "
        "into a directory",
        description="Write the Grafana dashboard (dashboards/), the Prometheus recording and "
        "alerting rules (prometheus/) and a Grafana provisioning example (provisioning/: a "
        "data source and a dashboard provider) into DIR. Existing files are kept unless "
        "--force.",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write")
    parser.add_argument("--force", action="store_true", help="overwrite files already there")
    parser.add_argument(
        "--prometheus-url",
        default=DEFAULT_PROMETHEUS_URL,
        help=f"the Prometheus Grafana queries, as Grafana reaches it ({DEFAULT_PROMETHEUS_URL})",
    )
    parser.add_argument(
        "--grafana-dashboards-path",
        metavar="PATH",
        help="where Grafana finds the dashboard JSON (default: DIR/dashboards, absolute; give "
        "the path inside the container if Grafana runs in one)",
    )
    parser.add_argument(
        "--scrape-interval",
        default=DEFAULT_SCRAPE_INTERVAL,
        help=f"Prometheus's scrape interval, the data source's timeInterval "
        f"({DEFAULT_SCRAPE_INTERVAL})",
    )


def run_dashboards(args: argparse.Namespace) -> int:
    """The ``dashboards`` command: 0 when written, 2 with a message for bad input."""
    out: Path = args.out
    try:
        files = outputs(
            out,
            prometheus_url=args.prometheus_url,
            dashboards_path=args.grafana_dashboards_path,
            scrape_interval=args.scrape_interval,
        )
        write(out, files, force=args.force)
    except UsageError as exc:
        print(f"asgi-token-refresh dashboards: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"asgi-token-refresh dashboards: error: cannot write to {out}: {exc}", file=sys.stderr
        )
        return 2
    rules = out / RULES_OUT
    provisioning = out / DATASOURCE_OUT
    print(
        f"wrote {len(files)} files to {out}:\n"
        + "".join(f"  {path.relative_to(out).as_posix()}\n" for path in files)
        + "next:\n"
        f"  Prometheus: add {rules.resolve()} to rule_files in prometheus.yml\n"
        f"  Grafana: copy {provisioning.parent.parent.resolve()}/*/ into its provisioning "
        "directory (or import the dashboard JSON: Dashboards > New > Import)"
    )
    return 0
