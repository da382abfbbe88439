"""A real Prefect API for the commands that need one (`serve`, `--runner dask`).

Prefect's default, the ephemeral in-process API, cannot schedule (serve refuses it) and makes every
Dask worker start an API of its own. When PREFECT_API_URL is set (a shared `prefect server start`,
Prefect Cloud) it is used as is; otherwise one `prefect server start` is started for the duration of
the command, on a free local port, with the user's PREFECT_HOME (so the UI keeps the history).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


class ServerError(RuntimeError):
    """The Prefect server could not be started or never became healthy."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _drain_prefect_clients(timeout: float = 10.0) -> None:
    """Send the logs and events still queued in this process while the server is up; once it is
    gone, Prefect would retry them for about a minute at exit."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:
            pass


@contextmanager
def prefect_api(log_path: str | None = None, timeout: float = 90.0):
    """Yield the API URL to use, starting a local `prefect server start` when none is configured."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    home.mkdir(parents=True, exist_ok=True)
    log = open(log_path or home / "taskheads-server.log", "ab")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise ServerError(f"prefect server exited with code {proc.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise ServerError(f"prefect server not healthy after {timeout:.0f} s; see {log.name}")
            time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = url  # child processes (Dask workers, served runs) inherit it
        yield url
    finally:
        _drain_prefect_clients()
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
