"""A real Prefect API for the commands that need one (`serve`, `--runner dask`).

Prefect's default, the ephemeral in-process API, cannot schedule (serve refuses it) and makes every
Dask worker start an API of its own. When PREFECT_API_URL is set (a shared `prefect server start`,
Prefect Cloud) it is used as is; otherwise one `prefect server start` is started for the duration of
the command, on a free local port, with the user's PREFECT_HOME (so the UI keeps the history).
That server requires a random basic-auth string (other local users can reach 127.0.0.1 too): it
goes to the server and to this process and its children (Dask workers, served flow runs) through
the environment, which other users cannot read, never through a command line, which they can.
"""
from __future__ import annotations

import os
import secrets
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


def _children(exclude: set[int]) -> list[int]:
    """Live child processes of this process, e.g. flow runs started by `serve` (psutil: any OS)."""
    import psutil

    kids = []
    for child in psutil.Process().children():
        if child.pid in exclude:
            continue
        try:
            if child.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in " ".join(child.cmdline()):
                continue  # (multiprocessing's resource tracker lives as long as we do)
        except psutil.Error:  # gone meanwhile, or not ours to inspect
            continue
        kids.append(child.pid)
    return kids


def _wait_for_children(exclude: set[int], timeout: float) -> None:
    """Let flow runs still going finish while the server they report to is up (bounded; a second
    signal cuts the wait short)."""
    deadline = time.monotonic() + timeout
    told = False
    while (kids := _children(exclude)) and time.monotonic() < deadline:
        if not told:
            print(f"taskheads: waiting for {len(kids)} running flow run process(es) to finish before stopping "
                  f"the Prefect server (up to {timeout:.0f} s; signal again to stop now)", file=sys.stderr, flush=True)
            told = True
        time.sleep(0.5)


def _write_private(path: Path, text: str) -> None:
    """A file only this user can read (created 0600, never widened from an older file's mode)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _refresh_prefect_settings() -> None:
    """Prefect reads its settings from the environment when imported; re-read them if it already was."""
    if "prefect" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


@contextmanager
def prefect_api(log_path: str | None = None, timeout: float = 90.0, wait_for_runs: float = 0.0):
    """Yield the API URL to use, starting a local `prefect server start` when none is configured.

    The server started here accepts only requests carrying its random auth string
    (PREFECT_SERVER_API_AUTH_STRING; clients send PREFECT_API_AUTH_STRING, set here for this
    process and its children). For the UI login it is also in `auth_file(url)` (mode 0600) while
    the server runs. `wait_for_runs`: on exit, seconds to wait for child processes (served flow runs)
    before the server started here is stopped; a run that loses its API mid-way cannot record its end."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        yield url
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    home.mkdir(parents=True, exist_ok=True)
    auth = f"taskheads:{secrets.token_urlsafe(32)}"
    login = auth_file(url, home)
    _write_private(login, auth)
    log = open(log_path or home / "taskheads-server.log", "ab")
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(home),
           "PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_API_AUTH_STRING": auth}
    env.pop("PREFECT_API_URL", None)
    caller_auth = os.environ.get("PREFECT_API_AUTH_STRING")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    except BaseException:
        login.unlink(missing_ok=True)
        log.close()
        raise
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):  # GET /health needs no auth (a readiness probe)
            if proc.poll() is not None:
                raise ServerError(f"prefect server exited with code {proc.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise ServerError(f"prefect server not healthy after {timeout:.0f} s; see {log.name}")
            time.sleep(0.5)
        # child processes (Dask workers, served runs) inherit both
        os.environ["PREFECT_API_URL"] = url
        os.environ["PREFECT_API_AUTH_STRING"] = auth
        _refresh_prefect_settings()
        yield url
    finally:
        if wait_for_runs:
            _wait_for_children({proc.pid}, wait_for_runs)
        _drain_prefect_clients()
        os.environ.pop("PREFECT_API_URL", None)
        if caller_auth is None:
            os.environ.pop("PREFECT_API_AUTH_STRING", None)
        else:
            os.environ["PREFECT_API_AUTH_STRING"] = caller_auth
        _refresh_prefect_settings()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        login.unlink(missing_ok=True)
        log.close()


def auth_file(url: str, home: Path | None = None) -> Path:
    """Where the login string of the server `prefect_api()` started at `url` is kept while it runs."""
    from urllib.parse import urlsplit

    home = home or Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    return home / f"taskheads-server-{urlsplit(url).port}.auth"
