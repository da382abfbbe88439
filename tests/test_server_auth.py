"""The Prefect server that `serve` / `--runner dask` start answers only its own clients.

Why this exists: `prefect server start` on 127.0.0.1 accepts API calls from any local user (read
flow runs and their parameters, create deployments, cancel runs). `prefect_api()` starts it with a
random basic-auth string and hands it to this process and its children (Dask workers, served flow
runs) through the environment, never the command line (which other users can read).
The probe below runs in a fresh interpreter, the way the CLI uses `prefect_api()`: Prefect is
imported once the server is up. Takes ~20-60 s (a fresh server runs its migrations).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(r"""
    import base64, json, os, stat, subprocess, sys, urllib.error, urllib.request
    from pathlib import Path

    import psutil

    from taskheads.server import prefect_api

    def status(url, method="GET", auth=None):
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        req = urllib.request.Request(url, data=b"{}" if method == "POST" else None, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    out = {"user_auth_before": os.environ.get("PREFECT_API_AUTH_STRING")}
    with prefect_api(timeout=180) as url:
        secret = os.environ.get("PREFECT_API_AUTH_STRING", "")
        out["secret_len"] = len(secret)
        out["health"] = status(f"{url}/health")
        out["no_auth"] = status(f"{url}/flows/filter", "POST")
        out["wrong_auth"] = status(f"{url}/flows/filter", "POST", auth="taskheads:guess")
        out["old_user_auth"] = status(f"{url}/flows/filter", "POST", auth="user:their-own")
        out["with_auth"] = status(f"{url}/flows/filter", "POST", auth=secret)
        files = list(Path(os.environ["PREFECT_HOME"]).glob("taskheads-server-*.auth"))
        out["auth_files"] = [(f.read_text(), stat.S_IMODE(f.stat().st_mode)) for f in files]
        out["matches"] = [f.read_text() == secret for f in files]
        server_cmdlines = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
        out["secret_in_cmdline"] = any(secret in c for c in server_cmdlines)

        from prefect import flow
        from prefect.client.orchestration import get_client

        @flow(name="auth-probe")
        def probe():
            return 42

        out["flow"] = probe()  # this process's client: records the flow run in the server
        with get_client(sync_client=True) as client:
            out["flows"] = [f.name for f in client.read_flows()]
        child = subprocess.run([sys.executable, "-c", "from prefect.client.orchestration import get_client\n"
                                "with get_client(sync_client=True) as c: print(len(c.read_flow_runs()))"],
                               capture_output=True, text=True, timeout=120)  # as a Dask worker would
        out["child"] = (child.returncode, child.stdout.strip(), child.stderr[-500:])
    out["after"] = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")}
    out["auth_files_after"] = [str(f) for f in Path(os.environ["PREFECT_HOME"]).glob("taskheads-server-*.auth")]
    print("RESULT " + json.dumps(out))
""")


def test_started_server_refuses_unauthenticated_requests_and_serves_its_clients(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_AUTH_STRING="user:their-own",
               PYTHONPATH=os.pathsep.join(sys.path), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["health"] == 200  # the readiness probe stays open
    assert (out["no_auth"], out["wrong_auth"], out["old_user_auth"]) == (401, 401, 401)
    assert out["with_auth"] == 200
    assert out["secret_len"] >= 32 and not out["secret_in_cmdline"]
    assert out["flow"] == 42 and "auth-probe" in out["flows"]
    assert out["child"][0] == 0 and int(out["child"][1]) >= 1, out["child"]
    # the login string for the UI, readable by this user only, while the server runs
    assert out["matches"] == [True] and out["auth_files"][0][1] == 0o600
    # on exit: the caller's own settings are back, the login file is gone
    assert out["after"] == {"PREFECT_API_URL": None, "PREFECT_API_AUTH_STRING": "user:their-own"}
    assert out["auth_files_after"] == []
