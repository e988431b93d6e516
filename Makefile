# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PELLUCID_DATA ?= $(abspath ../shared/data)

.PHONY: demo test check lint install clean system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pellucid demo --out demo_out

# Debian packages the tests need (root and apt): Chromium renders report.html; Orthanc with its
# DICOMweb plugin is the PACS of the integration tests (started by the tests in a private network
# namespace, never as a service); PostgreSQL is the review study's second database (a throwaway
# cluster started by the tests on 127.0.0.1, never the system service).
SYSTEM_PACKAGES := chromium orthanc orthanc-dicomweb iproute2 postgresql
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing (apt)"; apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; fi

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest

# the fast loop while developing: ruff and every test that trains, benchmarks and serves nothing
# (tests/conftest.py marks the others "slow"); `make test` stays the full suite
check: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -m "not slow" -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf demo_out .pytest_cache
