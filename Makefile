# The two README commands: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install browser postgres demo test clean

PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

# pyproject.toml has ranges; constraints.txt the tested versions, so make installs exactly what is tested
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first, at the constrained CPU build: resolved together with the rest, pip may fetch a CUDA build
	$(PIP) torch
	$(PIP) -e '.[dev]'
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m taskheads.demo

# the report test opens the HTML report in headless Chromium (Debian's package)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the report screenshot test"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }

# the DuckLake tests start a private PostgreSQL server (Debian's package) as a lake catalog
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing Debian postgresql for the DuckLake catalog tests"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -q postgresql >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q postgresql >/dev/null; }; }

# one pytest worker per core (pytest-xdist): many tests wait on Prefect servers and CLI subprocesses
test: install browser postgres
	$(PY) -m pytest -q -n auto

clean:
	rm -rf $(VENV) demo_out .pytest_cache
