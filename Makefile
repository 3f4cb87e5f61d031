# jaxnorm: the two set-up commands of README.md are `make demo` and `make test`.
# Both create the virtual environment .venv at the repo root when it is missing.
# `make test` runs the suite twice: the floor (default Python, 3.11 here, in .venv) and the newest
# releases that pyproject.toml allows (Python 3.12, in .venv-py312; jax >= 0.11 needs Python >= 3.12).
SHELL := /bin/bash
PYTHON ?= python3
# A real python3.12 (pyenv's shim for a version that is not selected fails), else pyenv's own copy.
PYTHON_NEW ?= $(shell for p in $$(type -ap python3.12) $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python 2>/dev/null); do $$p -V >/dev/null 2>&1 && echo $$p && break; done)
VENV := .venv
VENV_NEW := .venv-py312
PY := $(VENV)/bin/python
PY_NEW := $(VENV_NEW)/bin/python
CKSUM := $(shell cksum < pyproject.toml | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(CKSUM)
STAMP_NEW := $(VENV_NEW)/.installed-$(CKSUM)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Keep XLA from oversubscribing small machines; harmless elsewhere.
export PYTHONUNBUFFERED := 1

.PHONY: venv venv-new data demo test test-floor test-new test-slow test-all bench gpu-check gpu-check-tiny perceptron clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# tfds is an optional extra for users; the test suite installs it to test the tfds path.
	$(PY) -m pip install -q -e '.[test,tfds]'
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

# The newest releases: --upgrade-strategy eager re-resolves every dependency to its newest allowed
# version at each (re)install. No tfds extra (TensorFlow's wheels lag new Pythons); the floor tests it.
$(STAMP_NEW): pyproject.toml
	@test -n "$(PYTHON_NEW)" || { echo "make test-new: no working python3.12 found; set PYTHON_NEW=/path/to/python3.12" >&2; exit 2; }
	@test -x $(PY_NEW) || $(PYTHON_NEW) -m venv $(VENV_NEW)
	$(PY_NEW) -m pip install -q --upgrade pip
	$(PY_NEW) -m pip install -q --upgrade --upgrade-strategy eager -e '.[test]'
	@rm -f $(VENV_NEW)/.installed-*; touch $@

venv-new: $(STAMP_NEW)

# The embedded default dataset: Debian's real, full-size Fashion-MNIST (works offline).
$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

data: $(FMNIST)

demo: $(STAMP) $(FMNIST)
	$(PY) -m jaxnorm.sweep --config sweeps/demo.toml --out runs/demo

test: test-floor test-new

test-floor: $(STAMP) $(FMNIST)
	$(PY) -c 'import jax, sys; print("== floor: Python", sys.version.split()[0], "jax", jax.__version__)'
	$(PY) -m pytest -q

test-new: $(STAMP_NEW) $(FMNIST)
	$(PY_NEW) -c 'import jax, sys; print("== newest: Python", sys.version.split()[0], "jax", jax.__version__)'
	$(PY_NEW) -m pytest -q

test-slow: $(STAMP) $(FMNIST)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP) $(FMNIST)
	$(PY) -m pytest -q -m 'slow or not slow'

bench: $(STAMP) $(FMNIST)
	$(PY) -m pip install -q -e '.[bench]'
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The one-shot accelerator check (bench/gpu_check.sh's header says how to carry it to a lent GPU):
# `make gpu-check` there (its own python3), `make gpu-check-tiny` here (tiny sizes, CPU; also in the suite).
gpu-check:
	bash bench/gpu_check.sh

gpu-check-tiny: $(STAMP) $(FMNIST)
	JAX_PLATFORMS=cpu PY=$(abspath $(PY)) OUT=/tmp/gpu_check_tiny bash bench/gpu_check.sh --tiny

perceptron: $(STAMP)
	$(PY) -m jaxnorm.sweep --arch perceptron --alpha 5 --out runs/perceptron

clean:
	rm -rf runs .pytest_cache
