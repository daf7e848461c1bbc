# Set-up and the two main commands. The virtual environment lives outside the clone, keyed by a hash of
# the dependency pins, so a fresh clone on the same machine reuses it; a new machine builds it once.
SHELL := /bin/bash
PYTHON ?= python3
PIN_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
VENV ?= $(HOME)/.cache/gmot/venv-$(PIN_HASH)
BIN := $(VENV)/bin
DEMO_DIR ?= demo_run

.PHONY: venv venv-path sysdeps test test-fast lint demo clean

# Debian packages: espeak-ng speaks the demo corpus; a CJK font lets plot-alignment label Mandarin tokens;
# flac and sox decode the `flac ... |` and `sox ... |` entries of Kaldi wav.scp files (tested).
DEB_PACKAGES := espeak-ng fonts-wqy-zenhei flac sox

sysdeps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# no prerequisites: the venv's path carries the pins' hash, and a fresh clone's newer file times must not
# send every clone through pip again
$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,dev,export,lhotse,hf]'
	touch $@

venv: sysdeps $(VENV)/.ready
	@# the venv is shared by clones on this machine: point its editable install at this clone (checked from
	@# outside the clone, where the current directory cannot shadow the installed mapping)
	@(cd / && $(BIN)/python -c "import gmot_cli, pathlib, sys; sys.exit(pathlib.Path(gmot_cli.__file__).resolve().parents[1] != pathlib.Path('$(CURDIR)').resolve())") \
	  || $(BIN)/pip install -q --no-deps -c constraints.txt -e .

# where this clone's venv is (it need not exist yet): `source "$$(make -s venv-path)/bin/activate"`
venv-path:
	@echo $(VENV)

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q

test-fast: venv
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

# The main job on the embedded demo corpus (see recipes/demo/run.sh; sizes overridable from the environment).
demo: venv
	PATH="$(BIN):$$PATH" OUT=$(DEMO_DIR) bash recipes/demo/run.sh

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
