"""Processes for the tests and the benchmarks: free loopback ports, and redis-server (alone or
as a cluster), uvicorn and Prometheus started on them.

Every process is stopped by its PID: SIGTERM, then SIGKILL after a bounded wait, whatever
happened to the test or benchmark that started it, since a server left running holds its port
and skews the next measurement. Servers start in a session of their own: Ctrl-C in a terminal
reaches only the script (whose ``finally`` stops them in order), and a stop can reach, through
the process group, the workers a server forked (``uvicorn --workers``).

A test that needs a binary fails (never skips) when it is missing: ``scripts/system-deps``
(Debian's ``redis-server``, which brings ``redis-cli``, and ``prometheus``) installs them, and
``scripts/test`` runs it first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0


def free_port(avoid: Collection[int] = ()) -> int:
    """A loopback port that was free a moment ago (the kernel's pick), not one in ``avoid``:
    the kernel may offer a port again until somebody binds it, so pick several before starting
    what binds them."""
    while True:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port: int = probe.getsockname()[1]
        if port not in avoid:
            return port


def require(binary: str) -> str:
    """The path of ``binary``; a clear error (not a skip) when it is not installed."""
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(
            f"{binary} is not installed: run scripts/system-deps (it installs Debian's "
            f"{binary} package; scripts/test runs it first)"
        )
    return path


def spawn(
    command: Sequence[str],
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a session of its own, from ``cwd``, with ``env`` added to ours. Its
    output (stdout and stderr) goes to ``log``, or where ours goes without one."""
    out = open(log, "wb") if log is not None else None  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()


def stop(*processes: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM to each process still running, then SIGKILL to any that has not exited
    ``timeout`` s later: to its whole group if it leads one, so no worker it forked outlives
    it. All at once, so that N servers take one grace period, not N. Stopping twice is fine."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill(process)


def kill(process: subprocess.Popen[Any]) -> None:
    """SIGKILL, to the process group if the process leads one: no cleanup of any kind runs.
    The process is not reaped until this returns, so its PID (and group id) is still ours."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    process.wait(timeout=10)


@contextlib.contextmanager
def running(
    command: Sequence[str], *, log: Path | None = None, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """:func:`spawn` ``command``; always :func:`stop` it."""
    process = spawn(command, log=log, env=env)
    try:
        yield process
    finally:
        stop(process)


def tail(log: Path | None, lines: int = 30) -> str:
    """The end of a log, for a failure message."""
    if log is None:
        return ""
    text = log.read_text(errors="replace") if log.exists() else ""
    return f"--- {log.name} ---\n" + "\n".join(text.splitlines()[-lines:])


def wait_until(
    what: str,
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    *,
    log: Path | None = None,
    timeout: float = STARTUP_TIMEOUT,
) -> bool:
    """Poll ``ready`` (a refused or reset connection counts as not yet) until it is true; False
    after ``timeout``. Raises at once if ``process`` exits, with the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}\n{tail(log)}")
        with contextlib.suppress(OSError, httpx.TransportError):
            if ready():
                return True
        time.sleep(0.02)
    return False


# -- Redis ----------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server of our own on a free loopback port, without persistence unless
    ``options`` (its extra command-line options: a cluster node's, a durable one's) say so;
    they and ``log`` (where its output goes) are kept for :meth:`start`."""

    port: int
    process: subprocess.Popen[bytes]
    options: tuple[str, ...] = ()
    log: Path = Path(os.devnull)  # its start-up banner is noise

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def cli(self, *args: str) -> str:
        """Run ``redis-cli`` against this server; returns its output."""
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return result.stdout

    def stop(self) -> None:
        stop(self.process)

    def start(self) -> None:
        """(Re)start on the same port, after :meth:`stop`."""
        self.process = spawn_redis(self.port, self.options, self.log)


def spawn_redis(
    port: int, options: Sequence[str] = (), log: Path = Path(os.devnull)
) -> subprocess.Popen[bytes]:
    """Start redis-server on ``port`` (``options`` after ours: the later wins); return when it
    answers PING."""
    command = [require("redis-server"), "--port", str(port), "--bind", HOST]
    command += ["--save", "", "--appendonly", "no", *options]
    process = spawn(command, log=log)

    def pong() -> bool:
        with socket.create_connection((HOST, port), 0.2) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")  # not -LOADING (a file read in)

    if not wait_until(f"redis-server on port {port}", pong, process, timeout=10):
        stop(process)
        raise RuntimeError(f"redis-server on port {port} did not start")
    return process


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    """A redis-server for the ``with`` block, ready when this yields."""
    port = free_port()
    server = RedisServer(port, spawn_redis(port))
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RedisCluster:
    """A Redis Cluster of our own: primaries on loopback, no replicas, no persistence."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        """One node's URL: a cluster client finds the others from it."""
        return self.nodes[0].url

    def stop(self) -> None:
        stop(*(node.process for node in self.nodes))


def _cluster_ports(count: int) -> list[int]:
    """``count`` free ports whose cluster-bus ports (port + 10000, Redis' rule; ``cluster-port``
    only came in Redis 7) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        taken = {*ports, *(port + 10000 for port in ports)}
        port = free_port(avoid=taken)
        bus = port + 10000
        if bus > 65535 or bus in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((HOST, bus))
            except OSError:
                continue
        ports.append(port)
    return ports


@contextlib.contextmanager
def running_redis_cluster(size: int = 3) -> Iterator[RedisCluster]:
    """A ``size``-node Redis Cluster for the ``with`` block (``redis-cli --cluster create``),
    its slots spread over the nodes and ``cluster_state:ok`` on every node when this yields."""
    cli = require("redis-cli")
    cluster = RedisCluster([])
    with tempfile.TemporaryDirectory(prefix="atr-redis-cluster-") as directory:
        try:
            for port in _cluster_ports(size):
                config = f"{directory}/nodes-{port}.conf"
                options = ("--cluster-enabled", "yes", "--cluster-config-file", config)
                cluster.nodes.append(RedisServer(port, spawn_redis(port, options), options))
            command = [cli, "--cluster", "create"]
            command += [f"{HOST}:{node.port}" for node in cluster.nodes]
            command += ["--cluster-replicas", "0", "--cluster-yes"]
            created = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=STARTUP_TIMEOUT,
            )
            if created.returncode != 0:
                output = created.stdout + created.stderr
                raise RuntimeError(f"redis-cli --cluster create failed:\n{output}")
            _wait_for_cluster(cluster)
            yield cluster
        finally:
            cluster.stop()


def _wait_for_cluster(cluster: RedisCluster) -> None:
    """Until every node says the cluster is up and knows all the others (pub/sub messages
    travel between nodes over the cluster bus)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    wanted = {"cluster_state": "ok", "cluster_known_nodes": str(len(cluster.nodes))}
    info: dict[str, str] = {}
    for node in cluster.nodes:
        while True:
            lines = node.cli("CLUSTER", "INFO").splitlines()
            info = dict(line.strip().partition(":")[::2] for line in lines if ":" in line)
            if all(info.get(key) == value for key, value in wanted.items()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster node {node.port} is not ready: {info}")
            time.sleep(0.02)


# -- uvicorn --------------------------------------------------------------------------------------


@dataclass
class Uvicorn:
    """A uvicorn server this process started: ``workers`` worker processes on one port (a
    single process when ``workers`` is 1), all in the group of ``process``."""

    port: int
    workers: int
    process: subprocess.Popen[bytes]
    log: Path | None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def wait_ready(self, path: str = "/healthz", timeout: float = STARTUP_TIMEOUT) -> set[str]:
        """Poll ``path``, on a new connection each time, until every worker has answered 200
        (each with a body of its own, its PID say), or at least one by ``timeout``. Returns
        the bodies seen."""
        seen: set[str] = set()

        def answered() -> bool:
            response = httpx.get(self.url + path, timeout=2.0)
            if response.status_code == 200:
                seen.add(response.text)
            return len(seen) >= self.workers

        what = f"uvicorn on port {self.port}"
        if not wait_until(what, answered, self.process, log=self.log, timeout=timeout) and not seen:
            raise RuntimeError(f"{what} did not start\n{tail(self.log)}")
        return seen

    def kill(self) -> None:
        """SIGKILL, workers and all: no cleanup of any kind runs (a crash)."""
        kill(self.process)

    def stop(self) -> None:
        stop(self.process)

    def __enter__(self) -> Uvicorn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_uvicorn(
    factory: str,
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    app_dir: Path | None = None,
    shutdown_grace: float = 1.0,
    options: Sequence[str] = (),
    port: int | None = None,
) -> Uvicorn:
    """``python -m uvicorn --factory`` on a free loopback port (or ``port``, when something
    must know it beforehand: a provider's registered redirect URI), from the repository root
    (or ``app_dir``), with ``env`` added to ours and its output in ``log`` (or ours). Returns
    at once, so that several servers start together: then :meth:`Uvicorn.wait_ready`. As a
    context manager, the server is stopped at the end of the ``with`` block."""
    port = port or free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", factory]
    command += ["--host", HOST, "--port", str(port), "--workers", str(workers)]
    command += ["--log-level", "warning", "--no-access-log"]
    command += ["--timeout-graceful-shutdown", f"{shutdown_grace:g}"]
    command += ["--app-dir", str(app_dir)] if app_dir is not None else []
    return Uvicorn(port, workers, spawn([*command, *options], log=log, env=env), log)


# -- Prometheus -----------------------------------------------------------------------------------


@dataclass
class Prometheus:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@contextlib.contextmanager
def running_prometheus(config: Path, *, port: int, workdir: Path) -> Iterator[Prometheus]:
    """Prometheus with ``config`` on ``port`` (the caller picks it, as its scrape targets'
    ports must differ), its data and ``prometheus.log`` in ``workdir``. Ready (``/-/ready``)
    when this yields; always stopped."""
    log = workdir / "prometheus.log"
    command = [
        require("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={HOST}:{port}",
    ]
    with running(command, log=log) as process:
        server = Prometheus(port, process, log)

        def ready() -> bool:
            return httpx.get(server.url + "/-/ready", timeout=2.0).status_code == 200

        if not wait_until("prometheus", ready, process, log=log):
            raise RuntimeError(f"prometheus did not get ready\n{tail(log)}")
        yield server
