# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PELLUCID_DATA ?= $(abspath ../shared/data)

.PHONY: demo test test-main test-lowest check lint lock install clean system-deps viewer docs

# pyproject.toml declares the supported ranges; constraints.txt holds the exact versions known to
# work together, so every `make` builds the same environment
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,models,runtimes,docs]'
	# the MetaQuantus oracle of tests/test_metric_trust.py: without its dependencies, whose
	# cachetools==5.3.1 pin conflicts with the stack (it imports only what is installed above)
	$(PY) -m pip install --quiet --no-deps metaquantus==0.0.5
	# zennit-crp, the oracle of tests/test_crp.py: its zennit<=0.4.6 pin conflicts with zennit 0.5
	# (it uses only CondAttribution, ChannelConcept and zennit's hooks, unchanged)
	$(PY) -m pip install --quiet --no-deps zennit-crp==0.6.0
	# openvino-xai, the oracle of tests/test_reciprocam.py: pinned to openvino-dev 2024.4 and numpy 1
	# (its PyTorch Recipro-CAM needs neither; the test maps openvino.runtime onto openvino)
	$(PY) -m pip install --quiet --no-deps openvino-xai==1.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pellucid demo --out demo_out

# Debian packages the tests need (root and apt): Chromium renders report.html; Orthanc with its
# DICOMweb plugin is the PACS of the integration tests (started by the tests in a private network
# namespace, never as a service); PostgreSQL is the review study's second database (a throwaway
# cluster started by the tests on 127.0.0.1, never the system service); curl is the HTTP client of
# docs/tutorial-pacs.md, whose commands a test runs as written.
SYSTEM_PACKAGES := chromium orthanc orthanc-dicomweb iproute2 postgresql dicom3tools curl
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing (apt)"; apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; fi

# The OHIF viewer of the viewer test: npm's @ohif/app at a pinned version, its tarball checked
# against the pinned sha512 before its prebuilt dist/ is unpacked into .viewer/ (npm fetches only
# the one package; nothing of it is built or run but the static files the test serves)
OHIF_VERSION := 3.13.2
OHIF_SHA512 := WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
OHIF_DIST := .viewer/ohif-$(OHIF_VERSION)/dist
viewer: $(OHIF_DIST)/index.html
$(OHIF_DIST)/index.html:
	@command -v npm >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null; }
	rm -rf .viewer/pack && mkdir -p .viewer/pack
	cd .viewer/pack && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	test "$$(openssl dgst -sha512 -binary .viewer/pack/ohif-app-$(OHIF_VERSION).tgz | base64 -w0)" = "$(OHIF_SHA512)" \
	  || { echo "@ohif/app $(OHIF_VERSION): tarball does not match the pinned sha512"; exit 1; }
	rm -rf .viewer/ohif-$(OHIF_VERSION) && mkdir -p .viewer/ohif-$(OHIF_VERSION)
	tar xzf .viewer/pack/ohif-app-$(OHIF_VERSION).tgz -C .viewer/ohif-$(OHIF_VERSION) --strip-components=1 package/dist
	rm -rf .viewer/pack

test: test-main test-lowest

# the documentation site in build/site: the catalogue pages generated from the registries, then
# MkDocs in strict mode (a broken link or reference fails); tests/test_docs_site.py runs the same
docs: $(STAMP)
	$(PY) docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# the suite on one worker per core (pytest-xdist; a module's tests stay on one worker, so its
# trained fixtures are built once; tests/conftest.py gives each worker its share of the threads)
test-main: $(STAMP) system-deps viewer
	$(VENV)/bin/ruff check src tests benchmarks docs
	$(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder

# A user's existing stack at pellucid's lowest supported versions (constraints-lowest.txt) in a fresh
# venv; `pip install '.[test]'` (not editable, no constraints) must keep every one of those versions,
# and the tests that train nothing must pass against the installed package.
LOWEST := .venv-lowest
test-lowest:
	rm -rf $(LOWEST) && $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install --quiet --upgrade pip
	$(LOWEST)/bin/pip install --quiet -r constraints-lowest.txt
	$(LOWEST)/bin/pip install --quiet '.[test]'
	$(LOWEST)/bin/python tools/kept_versions.py constraints-lowest.txt
	$(LOWEST)/bin/python -m pytest -n auto --dist loadfile --no-loadscope-reorder -m "not slow and not models and not oracles and not docs" -q -p no:cacheprovider

# after an upgrade that passes `make test`: write the exact versions of .venv into constraints.txt
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -vi '^pellucid'; } \
	  > constraints.new && mv constraints.new constraints.txt

# the fast loop while developing: ruff and every test that trains, benchmarks and serves nothing
# (tests/conftest.py marks the others "slow"); `make test` stays the full suite
check: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks docs
	$(PY) -m pytest -m "not slow" -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks docs

clean:
	rm -rf demo_out .pytest_cache $(LOWEST)
