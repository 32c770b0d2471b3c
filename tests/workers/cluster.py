"""Run several worker processes (``tests/workers/app.py`` under uvicorn) and always stop them.

Each worker is its own uvicorn process on a free loopback port (``tests/processes.py``), with its
output in a log file that a failing test shows. Workers are stopped by their process id: SIGTERM,
then SIGKILL if one does not exit in time. A test may SIGKILL a worker itself (:meth:`Worker.kill`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..processes import Uvicorn, start_uvicorn, stop


@dataclass
class Worker:
    index: int  # echoed by the app as ``worker`` (``ATR_WORKER_ID``)
    server: Uvicorn

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def alive(self) -> bool:
        return self.server.alive

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the worker."""
        self.server.kill()


class Cluster:
    """Workers started by one test; :meth:`stop` ends every one that is still running."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.workers: list[Worker] = []

    async def start(self, n: int, env: Mapping[str, str]) -> list[Worker]:
        """Start ``n`` workers with ``env`` (plus ``ATR_WORKER_ID``); return once all answer."""
        started = []
        for index in range(len(self.workers), len(self.workers) + n):
            server = start_uvicorn(
                "tests.workers.app:create_app",
                env={**env, "ATR_WORKER_ID": str(index)},
                log=self.log_dir / f"worker-{index}.log",
            )
            started.append(Worker(index, server))
        self.workers += started
        await asyncio.gather(*(asyncio.to_thread(w.server.wait_ready) for w in started))
        return started

    def stop(self) -> None:
        stop(*(worker.server.process for worker in self.workers), timeout=5)

    def logs(self) -> str:
        return "\n".join(f"--- worker {w.index} ---\n{w.server.output()}" for w in self.workers)
