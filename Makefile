# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HFI := $(VENV)/bin/hfi
STAMP := $(VENV)/.installed
# One torch thread: with anything else busy, 2 threads ran 4-7x slower on a 2-core machine.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test system lint check world verify clean

venv: $(STAMP)

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
test: $(STAMP) system
	$(PY) -m pytest -q -rs -n 2 --dist loadfile tests

# Debian packages the container test needs (a Docker engine, debootstrap for the local base
# image). Installed when missing and when we may; otherwise that test skips and says why.
system:
	@if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null \
	      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null; } \
	      || echo "could not install docker.io/debootstrap: the container test will skip"; \
	  else echo "no root or apt-get: docker.io/debootstrap not installed; the container test will skip"; fi; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check hfi_core tasks tests

## world: retrain the toy world from scratch into ./toyworld-build (about 80 min on 2 cores)
world: $(STAMP)
	$(HFI) toyworld build --out toyworld-build

clean:
	rm -rf $(VENV) .pytest_cache toyworld-build
