# The two commands of the README:
#   make start   install pacsnode in .venv and start a node on its embedded default
#   make test    install what the tests need (Python packages, dcmtk) and run them
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: start test install install-test dcmtk proto clean viewer

proto: install-test
	$(BIN)/python -m pacsnode.proto.generate

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test dcmtk

# dcmtk's storescu/findscu/getscu/movescu/storescp are the real clients the tests use.
dcmtk:
	@if command -v storescu >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk; \
	else echo "dcmtk is missing: run 'sudo apt-get install -y dcmtk' (Debian/Ubuntu) and try again" >&2; exit 1; fi

start: install
	$(BIN)/pacsnode start $(ARGS)

# Two pytest-xdist workers: the integration tests one after another in one of them (they
# start node processes and wait on real time), the unit and property tests in the other
# (tests/conftest.py). PYTEST_WORKERS=0 runs everything in one process, as before.
PYTEST_WORKERS ?= 2
test: install-test
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis

# OHIF's prebuilt viewer (npm @ohif/app, its dist/), served by every node at /viewer/ and
# pointed at the node's own DICOMweb. About 200 MB unpacked; not in git (node/ohif/).
OHIF_VERSION ?= 3.13.2
viewer: install
	rm -rf .viewer && mkdir -p .viewer
	cd .viewer && npm pack --silent @ohif/app@$(OHIF_VERSION) && tar xzf ohif-app-$(OHIF_VERSION).tgz
	$(BIN)/python -m pacsnode.node.viewer_install .viewer/package/dist node/ohif
	rm -rf .viewer
