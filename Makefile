# Two commands on a fresh machine (see README.md):
#   make demo   create .venv, install the pinned stack, run every tool's demo -> demo_output/
#   make test   create .venv (if needed) and run the test suite
# .venv is reused while requirements.lock and pyproject.toml are unchanged, and rebuilt
# from scratch when either changes.  Nothing is downloaded at run time; only the
# install step reaches the package registry.

PYTHON ?= python3.11
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-from-lock
MIN_FREE_GB ?= 6
DEMO_OUT ?= demo_output
PYTEST_ARGS ?=
PGBIN ?= /usr/lib/postgresql/15/bin

# CASA runs fully offline from the repository's site config; quiet TensorFlow;
# headless matplotlib.
export CASASITECONFIG := $(CURDIR)/configs/casasiteconfig.py
export MPLBACKEND := Agg
export TF_CPP_MIN_LOG_LEVEL := 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv test test-fast demo lint clean distclean check-python check-space postgres chromium sync-conventions

help:
	@echo "make demo       set up .venv and run every tool's demo into $(DEMO_OUT)/"
	@echo "make test       set up .venv and run the full test suite"
	@echo "make test-fast  the suite without tests marked slow"
	@echo "make lint       bash -n and shellcheck on pipe_scripts/"
	@echo "make venv       only (re)build .venv from requirements.lock"
	@echo "make sync-conventions  rewrite each tool's shared block from tools/conventions.py"
	@echo "make clean      remove $(DEMO_OUT)/ and caches;  make distclean  also .venv"

# The shared conventions block: tools/conventions.py is the source, the tools carry copies.
sync-conventions:
	$(PYTHON) tools/sync_conventions.py

check-python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "error: '$(PYTHON)' not found. This project needs Python 3.11 (casatools 6.7 has" >&2; \
	  echo "       wheels for 3.11 only here). Install it (e.g. pyenv install 3.11, or" >&2; \
	  echo "       apt-get install python3.11 python3.11-venv) or run: make PYTHON=/path/to/python3.11" >&2; \
	  exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { \
	  echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'), but 3.11 is required;" >&2; \
	  echo "       run: make PYTHON=/path/to/python3.11" >&2; exit 2; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "error: $(PYTHON) lacks the venv/ensurepip modules (Debian: apt-get install python3.11-venv)" >&2; exit 2; }

check-space:
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	if [ "$$free_kb" -lt $$(( $(MIN_FREE_GB) * 1024 * 1024 )) ]; then \
	  echo "error: only $$(( free_kb / 1024 / 1024 )) GB free in $(CURDIR); the pinned stack in .venv needs" >&2; \
	  echo "       about $(MIN_FREE_GB) GB (venv ~4 GB + pip cache). Free some space, or set MIN_FREE_GB." >&2; \
	  exit 2; fi

$(STAMP): requirements.lock pyproject.toml
	@$(MAKE) --no-print-directory check-python check-space
	@echo ">>> building $(VENV) from requirements.lock (about 1-2 minutes)"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --no-input -r requirements.lock
	$(VPY) -m pip install --quiet --no-input --no-deps --no-build-isolation -e .
	$(VPY) -m pip check
	@touch $@

# The offline CASA site config, installed into the venv as casasiteconfig.py (casaconfig finds it
# on sys.path), so a plain `python -c "import casatasks"`, a script or a notebook runs offline
# without CASASITECONFIG; re-copied whenever configs/casasiteconfig.py changes.
SITECFG := $(VENV)/.casasiteconfig-installed
$(SITECFG): configs/casasiteconfig.py $(STAMP)
	$(VPY) -c "import shutil, sysconfig; shutil.copy('configs/casasiteconfig.py', sysconfig.get_paths()['purelib'])"
	@touch $@

venv: $(STAMP) $(SITECFG)

# PostgreSQL 15 + Q3C for the racs_pipeline database tests (tests/with_postgres.sh starts a
# throwaway server on 127.0.0.1 for the test run and removes it afterwards).
postgres:
	@if [ -n "$${TOOLKIT_PG_URL:-}" ]; then :; \
	elif [ -x "$(PGBIN)/initdb" ] && ls /usr/share/postgresql/15/extension/q3c.control >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo ">>> installing postgresql-15 and postgresql-15-q3c (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    postgresql-15 postgresql-15-q3c >/dev/null; \
	else \
	  echo "error: PostgreSQL 15 with the Q3C extension is needed for the database tests; install" >&2; \
	  echo "       the Debian/Ubuntu packages postgresql-15 and postgresql-15-q3c (as root:" >&2; \
	  echo "       apt-get install postgresql-15 postgresql-15-q3c), or point TOOLKIT_PG_URL at a" >&2; \
	  echo "       server with q3c (PGBIN=... if the binaries are elsewhere)" >&2; \
	  exit 2; fi

# Chromium (Debian package) for the review website's browser tests and demo screenshots;
# Playwright drives this system browser (it downloads none).
chromium:
	@if [ -x /usr/lib/chromium/chromium ] || command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo ">>> installing chromium (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium >/dev/null; \
	else \
	  echo "error: the website's browser tests need Chromium; install the Debian/Ubuntu package" >&2; \
	  echo "       chromium (as root: apt-get install chromium)" >&2; \
	  exit 2; fi

test: $(STAMP) $(SITECFG) postgres chromium
	tests/with_postgres.sh $(VPY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) $(SITECFG) postgres chromium
	tests/with_postgres.sh $(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP) $(SITECFG)
	@$(MAKE) --no-print-directory chromium || echo "(no Chromium: the racs_web demo screenshots are skipped)"
	$(VPY) tests/demo.py --outdir $(DEMO_OUT) --overwrite

lint: $(STAMP) $(SITECFG)
	for f in pipe_scripts/*.sh; do bash -n "$$f" || exit 1; done
	$(VENV)/bin/shellcheck pipe_scripts/*.sh

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
