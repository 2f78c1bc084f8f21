# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HFI := $(VENV)/bin/hfi
STAMP := $(VENV)/.installed
# Label Studio's server pins packages that clash with Airflow's: it gets a virtual environment of
# its own. Only its client (label-studio-sdk) lives in .venv.
LS_VENV := .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed
# One torch thread: with anything else busy, 2 threads ran 4-7x slower on a 2-core machine.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv labelstudio demo test system lint check world verify clean

venv: $(STAMP)

labelstudio: $(LS_STAMP)

$(LS_STAMP):
	test -x $(LS_VENV)/bin/python || python3 -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --disable-pip-version-check label-studio==1.23.2
	touch $@

# torch first, on its own: it must be the CPU wheel, never a multi-GB CUDA build.
$(STAMP): requirements.txt setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

## demo: the nightly pipeline on the embedded default (toy world, Airflow dags test, MLflow sqlite)
demo: $(STAMP)
	$(HFI) toyworld verify
	$(PY) -m tasks.demo

## test: the whole test suite, two workers (one per core; each test module stays on one worker)
test: $(STAMP) $(LS_STAMP) system
	$(PY) -m pytest -q -rs -n 2 --dist loadfile --durations=12 tests

# Debian packages the end-to-end tests need: a Docker engine and debootstrap (the local base
# image), Chromium (the MLflow UI check). Installed when missing and when we may; otherwise those
# tests skip and say why.
SYSTEM_PACKAGES := docker.io debootstrap chromium
system:
	@if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null \
	      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; } \
	      || echo "could not install $(SYSTEM_PACKAGES): the container and browser tests will skip"; \
	  else echo "no root or apt-get: $(SYSTEM_PACKAGES) not installed; the container and browser tests will skip"; fi; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check hfi_core tasks tests

## world: retrain the toy world from scratch into ./toyworld-build (about 80 min on 2 cores)
world: $(STAMP)
	$(HFI) toyworld build --out toyworld-build

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache toyworld-build
