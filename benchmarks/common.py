"""What the benchmarks share: the FakeIdP wiring, series of timings, the report's header and
table rows, the command line, and each script's section of RESULTS.md.

A benchmark runs as ``python benchmarks/<name>.py``, so this directory is on ``sys.path`` and
``import common`` finds this file; importing it puts the repository root there too, for
``tests.processes`` (free ports, redis-server and uvicorn processes).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from asgi_token_refresh import OAuth2Client, TokenSet
from asgi_token_refresh.testing import FakeClock, FakeIdP

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ISSUER = "https://idp.test"
EXPIRED = 300.0  # FakeIdP's default access-token lifetime: advancing this far makes tokens due
RESULTS_MD = Path(__file__).with_name("RESULTS.md")

S = TypeVar("S")


def check(condition: bool, message: str) -> None:
    """An assertion that ``python -O`` does not strip: correctness is checked in every run."""
    if not condition:
        raise AssertionError(message)


# -- the FakeIdP ----------------------------------------------------------------------------------


class RecordingTransport(httpx.AsyncBaseTransport):
    """Wraps the FakeIdP's transport: counts token requests, their peak concurrency, and notes
    ``time.perf_counter()`` when each response comes back.

    It yields to the event loop once before forwarding a request, as every network transport
    does; the in-process ASGI transport never suspends on its own, so without this no two token
    requests could ever overlap and the concurrency cap would be invisible.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.calls = 0
        self.in_flight = 0
        self.peak = 0
        self.responded_at: list[float] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0)
            response = await self.inner.handle_async_request(request)
        finally:
            self.in_flight -= 1
        self.responded_at.append(time.perf_counter())
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def client(
    transport: httpx.AsyncBaseTransport | None = None,
    clock: FakeClock | None = None,
    **options: Any,
) -> OAuth2Client:
    """The app's client of the FakeIdP at ``ISSUER`` (no discovery: one request less)."""
    return OAuth2Client(
        client_id="app",
        client_secret="app-secret",
        token_endpoint=f"{ISSUER}/token",
        transport=transport,
        clock=clock,
        **options,
    )


def login(idp: FakeIdP, clock: FakeClock, subject: str = "alice") -> TokenSet:
    """A session's first token set, as the login callback would store it."""
    return TokenSet.from_token_response(
        idp.issue(subject), issued_at=clock.time(), default_lifetime=3600.0
    )


# -- timings --------------------------------------------------------------------------------------


@dataclass
class Series:
    """One measurement's value in every round."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def spread(self, fmt: Callable[[float], str]) -> str:
        """The range over rounds, for a table."""
        return f"{fmt(self.low)} to {fmt(self.high)}"

    def cells(self, fmt: Callable[[float], str]) -> tuple[str, str]:
        """The median and the range over rounds: two cells of a table row."""
        return fmt(self.median), self.spread(fmt)


def rotated(items: Sequence[S], round_: int) -> list[S]:
    """The order for round ``round_``: each item leads in turn, so that no measurement always
    runs first, or always after the same one (with two, A/B then B/A)."""
    shift = round_ % len(items)
    return [*items[shift:], *items[:shift]]


def pairwise(a: Series, b: Series, op: Callable[[float, float], float]) -> Series:
    """``op`` of two measurements taken in the same rounds, round by round."""
    return Series([op(x, y) for x, y in zip(a.values, b.values, strict=True)])


# -- the report -----------------------------------------------------------------------------------


def row(*cells: object) -> str:
    """One row of a markdown table."""
    return "| " + " | ".join(map(str, cells)) + " |"


def table(*header: str) -> list[str]:
    """A markdown table's header and separator."""
    return [row(*header), row(*["---"] * len(header)).replace(" ", "")]


def verdict(ok: bool) -> str:
    return "✅ met" if ok else "❌ missed"


def version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def code_version() -> str:
    """The commit measured, and whether the library's files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(  # noqa: S603 - fixed arguments, no shell
            ["git", *args],  # noqa: S607 - git from PATH, as a developer runs it
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "asgi_token_refresh")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if not changed:
        return f"commit {commit}"
    return f"commit {commit} + uncommitted changes to {len(changed.splitlines())} library file(s)"


def machine() -> str:
    """CPUs this process may run on (as ``nproc`` counts them), their model, the load."""
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    name = model.group(1).strip() if model else platform.processor() or "unknown"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"nproc {nproc} ({os.cpu_count()} CPUs), {name}; load average at start {load}"


@dataclass(frozen=True)
class Run:
    """How a benchmark was run, taken when it starts: the head of its section of RESULTS.md."""

    script: str  # its file name in benchmarks/
    args: argparse.Namespace
    command: str
    when: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    )
    machine: str = field(default_factory=machine)

    def environment(self, libraries: Sequence[str], sizes: str) -> list[str]:
        libs = ", ".join(f"{name} {version}" for name in libraries if (version := version_of(name)))
        quick = " — **quick smoke run: sizes too small for the numbers**" if self.args.quick else ""
        return [
            f"- Date: {self.when}",
            f"- Python: {platform.python_implementation()} {platform.python_version()} "
            f"({platform.platform()}); {libs}",
            f"- Code: {code_version()}",
            f"- Machine: {self.machine}",
            f"- Command (from the repository root): `{self.command}`",
            f"- Sizes: {sizes}{quick}",
        ]


# -- the command line -----------------------------------------------------------------------------


def parse(
    script: str,
    description: str,
    argv: Sequence[str] | None,
    sizes: Mapping[str, str],
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
) -> Run:
    """``--quick``, ``--write``, ``--results``, an ``int`` option per entry of ``sizes`` (a
    field of the script's sizes: its help), and what ``add_arguments`` adds."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes: a fast smoke run")
    parser.add_argument("--write", action="store_true", help=f"update the section in {RESULTS_MD}")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="file for --write")
    for name, help_ in sizes.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=help_)
    add_arguments(parser)
    args = parser.parse_args(args_list)
    return Run(script, args, shlex.join(["python", f"benchmarks/{script}", *args_list]))


def sizes(args: argparse.Namespace, full: S, quick: S) -> S:
    """``full`` or, with ``--quick``, ``quick``, with the sizes given on the command line."""
    base: Any = quick if args.quick else full
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(base)
        if getattr(args, f.name, None) is not None
    }
    chosen: S = dataclasses.replace(base, **given)
    return chosen


def publish(run: Run, title: str, markdown: str) -> None:
    """Print the report; with ``--write``, also replace the script's section of the results file
    (or append it), leaving the rest alone."""
    print(markdown)
    if not run.args.write:
        return
    path: Path = run.args.results
    script = run.script
    begin = f"<!-- benchmarks/{script}: begin (generated by --write; edits are lost) -->"
    end = f"<!-- benchmarks/{script}: end -->"
    section = "\n".join(
        [begin, f"## {title} (`benchmarks/{script}`)", "", markdown.rstrip("\n"), end]
    )
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    print(f"wrote {path}")
