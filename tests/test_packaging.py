"""Packaging: every third-party import is declared, the constraints fit the ranges and are what is
installed, and `serve`'s wait for its flow runs works through psutil (no Linux-only /proc)."""
from __future__ import annotations

import ast
import functools
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"core", "heads", "storage", "training", "pipeline", "tasks", "flows", "taskheads"}
# imported only inside `try: ... except ImportError`, and said so when missing: the registry's
# duckdb-extension-vss is built for DuckDB 1.5.5 only (README "Search"), so it cannot be declared
OPTIONAL_UNDECLARED = {"duckdb_extension_vss"}
# optional parts of the core packages: imported only for the `backend` that needs them, which
# heads.backends.check_backend refuses first with one line naming the extra to install
OPTIONAL_PARTS = {"heads/backends/onnx.py", "heads/backends/ct2.py",
                  # a `ducklake:` database only: without the `lake` extra it fails with one line naming it
                  "storage/lake.py"}

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def third_party_imports(folders: list[str], skip: set[str] = frozenset()) -> dict[str, list[str]]:
    """Top-level module -> where imported, for every absolute import (module level or in a function)."""
    found: dict[str, list[str]] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() in skip:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    local = (ROOT / folder / f"{top}.py").exists()  # tests import their sibling modules
                    if top not in sys.stdlib_module_names and top not in PROJECT and top != "__future__" and not local:
                        found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


@functools.cache
def _packages() -> dict[str, list[str]]:
    return metadata.packages_distributions()  # (scans every installed distribution: once)


def _distributions(module: str) -> set[str]:
    """The distributions that install `module`; not installed here (tomli on 3.11+): its own name."""
    return {canonicalize_name(d) for d in _packages().get(module, [canonicalize_name(module)])}


def _undeclared(folders: list[str], declared: set[str], skip: set[str] = frozenset()) -> list[str]:
    out = []
    for module, where in sorted(third_party_imports(folders, skip).items()):
        if module in OPTIONAL_UNDECLARED:
            continue
        dists = _distributions(module)
        if not dists & declared:
            out.append(f"{module} (distribution {sorted(dists) or 'not installed'}) imported at {where[0]}")
    return out


def test_every_import_of_the_package_is_a_declared_dependency_or_extra():
    project = _pyproject()
    declared = _declared(project["dependencies"])
    extras = {name: _declared(reqs) for name, reqs in project["optional-dependencies"].items()}
    # the package itself: the base install plus its extras (dask, report, demo, ...)
    assert _undeclared(sorted(PROJECT), declared.union(*extras.values())) == []
    # the CLI's core needs no extra: only optional parts import extras
    assert _undeclared(["core", "pipeline", "storage", "tasks", "flows", "heads", "training"], declared,
                       OPTIONAL_PARTS) == []
    # the tests run on the dev extra, which pulls every other extra
    assert {f"taskheads[{','.join(sorted(set(extras) - {'dev'}))}]"} <= set(project["optional-dependencies"]["dev"])
    assert _undeclared(["tests"], declared.union(*extras.values())) == []


def test_the_report_and_dask_parts_are_extras_not_base_dependencies():
    project = _pyproject()
    base = _declared(project["dependencies"])
    assert "plotly" not in base and "prefect-dask" not in base
    assert "datasets" in base  # a corpus may be a saved Hugging Face dataset folder
    assert "plotly" in _declared(project["optional-dependencies"]["report"])
    assert "prefect-dask" in _declared(project["optional-dependencies"]["dask"])
    # ranges, not exact pins: exact versions live in constraints.txt
    assert not [r for r in project["dependencies"] if "==" in r]


def test_constraints_fit_the_ranges_and_are_what_is_installed():
    project = _pyproject()
    ranges = {}
    for r in [*project["dependencies"], *(x for reqs in project["optional-dependencies"].values() for x in reqs)]:
        req = Requirement(r)
        ranges.setdefault(canonicalize_name(req.name), []).append(req.specifier)
    pins = [Requirement(line.split("#")[0].strip()) for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.split("#")[0].strip()]
    assert {canonicalize_name(p.name) for p in pins} >= {"torch", "prefect", "fastapi", "sqlalchemy", "duckdb"}
    for pin in pins:
        installed = metadata.version(pin.name)
        # local builds (torch 2.13.0+cpu) satisfy their public version's pin
        assert pin.specifier.contains(installed.split("+")[0], prereleases=True), (pin, installed)
        for spec in ranges.get(canonicalize_name(pin.name), []):
            assert spec.contains(installed.split("+")[0], prereleases=True), (pin, spec, installed)


def test_serve_sees_its_live_child_processes_not_zombies_nor_excluded():
    from taskheads.server import _children

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    excluded = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while zombie.pid in _children({excluded.pid}) and time.monotonic() < deadline:
            time.sleep(0.05)  # until it has exited (not reaped: a zombie)
        kids = _children({excluded.pid})
        assert live.pid in kids and excluded.pid not in kids and zombie.pid not in kids
    finally:
        for p in (live, excluded, zombie):
            p.kill()
            p.wait()
    assert live.pid not in _children(set())


def test_report_without_its_extra_says_which_extra_in_one_line(tmp_path, monkeypatch, capsys):
    from taskheads.report import main_report

    (tmp_path / "r.duckdb").touch()
    monkeypatch.setitem(sys.modules, "plotly", None)  # as if the [report] extra were not installed
    assert main_report(str(tmp_path / "r.duckdb"), str(tmp_path / "r.html")) == 2
    err = capsys.readouterr().err
    assert err == "taskheads: report needs the [report] extra (plotly): pip install 'taskheads[report]'\n"
    assert not (tmp_path / "r.html").exists()


def test_dask_runner_without_its_extra_says_which_extra_before_any_work(tmp_path, tiny_models, monkeypatch, capsys):
    from taskheads.cli import main

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1], "text": ["a document"]}), tmp_path / "docs.parquet")
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'corpus = "docs.parquet"\ndatabase = "r.duckdb"\n\n'
                   f'[heads.topic]\ntask = "classification"\nmodel = "{tiny_models["classification"]}"\n')
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if the [dask] extra were not installed
    assert main(["run", str(cfg), "--runner", "dask"]) == 2
    err = capsys.readouterr().err
    assert err == "taskheads: --runner dask needs the [dask] extra (prefect-dask): pip install 'taskheads[dask]'\n"
    assert not (tmp_path / "r.duckdb").exists()
