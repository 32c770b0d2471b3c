"""Run several worker processes (``tests/workers/app.py`` under uvicorn) and always stop them.

Each worker is its own ``python -m uvicorn`` process on a free loopback port, with its output
in a log file that a failing test shows. Workers are stopped by their process id: SIGTERM, then
SIGKILL if one does not exit in time. A test may SIGKILL a worker itself (:meth:`Worker.kill`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 20.0


@dataclass
class Worker:
    index: int
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the worker."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Cluster:
    """Workers started by one test; :meth:`stop` ends every one that is still running."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.workers: list[Worker] = []

    async def start(self, n: int, env: Mapping[str, str]) -> list[Worker]:
        """Start ``n`` workers with ``env`` (plus ``ATR_WORKER_ID``); return once all answer."""
        started = [self._spawn(len(self.workers) + i, env) for i in range(n)]
        self.workers += started
        await asyncio.gather(*(self._ready(worker) for worker in started))
        return started

    def _spawn(self, index: int, env: Mapping[str, str]) -> Worker:
        port = _free_port()
        log = self.log_dir / f"worker-{index}.log"
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "tests.workers.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "1",
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, **env, "ATR_WORKER_ID": str(index)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return Worker(index, port, process, log)

    async def _ready(self, worker: Worker) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        async with httpx.AsyncClient(base_url=worker.url, timeout=1.0) as http:
            while True:
                if not worker.alive:
                    raise RuntimeError(f"worker {worker.index} exited:\n{worker.output()}")
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {worker.index} did not start:\n{worker.output()}")
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.wait()

    def logs(self) -> str:
        return "\n".join(f"--- worker {w.index} ---\n{w.output()}" for w in self.workers)
