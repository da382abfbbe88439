"""Shared fixtures: offline settings, tiny local models, one Prefect test harness per session."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import pytest  # noqa: E402

from taskheads.tiny_models import NER_LABELS, TOPIC_LABELS, build_bart, build_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One tiny model per head task, built once for the session (seconds)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "classification": str(build_bert(root / "topic", "classification", labels=TOPIC_LABELS, max_len=64, seed=3)),
        "ner": str(build_bert(root / "ner", "ner", labels=NER_LABELS, max_len=64, seed=2)),
        "qa": str(build_bert(root / "qa", "qa", max_len=128, seed=5)),
        "translation": str(build_bart(root / "mt", max_len=64, seed=4)),
    }


@pytest.fixture(autouse=True)
def _release_held_lakes():
    """Lakes a test loaded into are held by this process (storage.lake.session): not past the test."""
    yield
    from storage import lake

    lake.release()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One ephemeral Prefect API for the whole session (it costs ~10 s to start)."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class PostgresServer:
    """A private PostgreSQL server in a temp folder (Debian's package, `make test` installs it): each
    `catalog()` is a new database on it, as a DuckLake catalog string."""

    def __init__(self, bindir: str, folder: str, port: int, run_as: list[str]):
        self.bindir, self.folder, self.port, self.run_as = bindir, folder, port, run_as
        self.n = 0

    def _run(self, tool: str, *args: str):
        import subprocess

        return subprocess.run([*self.run_as, os.path.join(self.bindir, tool), *args], capture_output=True,
                              text=True, timeout=120, check=True)

    def catalog(self, name: str | None = None) -> str:
        """A new, empty database on the server, as `ducklake:postgres:...`."""
        import uuid

        name = name or f"lake_{os.getpid()}_{self.n}_{uuid.uuid4().hex[:6]}"
        self.n += 1
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"ducklake:postgres:dbname={name} host=127.0.0.1 port={self.port} user=postgres"


@pytest.fixture(scope="session")
def postgres():
    """Start a private PostgreSQL server (initdb, pg_ctl on a free port) for the session; stopped after.

    initdb refuses to run as root (CI runs as root): the server then runs as `nobody`, in a temp folder it
    owns. One server per pytest-xdist worker."""
    import glob
    import shutil
    import socket
    import subprocess
    import tempfile

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed (Debian's postgresql): `make test` installs it")
    bindir = os.path.dirname(found[-1])
    folder = tempfile.mkdtemp(prefix="taskheads-pg-")
    run_as: list[str] = []
    if os.geteuid() == 0:
        import pwd

        user = pwd.getpwnam("nobody")
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "nobody", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = PostgresServer(bindir, folder, port, run_as)
    data = os.path.join(folder, "data")
    server._run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
    server._run("pg_ctl", "-D", data, "-l", os.path.join(folder, "log"), "-w", "-o",
                f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
    try:
        yield server
    finally:
        subprocess.run([*run_as, os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
