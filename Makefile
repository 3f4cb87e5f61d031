# jaxnorm: the two set-up commands of README.md are `make demo` and `make test`.
# Both create the virtual environment .venv at the repo root when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Keep XLA from oversubscribing small machines; harmless elsewhere.
export PYTHONUNBUFFERED := 1

.PHONY: venv data demo test test-slow test-all bench perceptron clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# tfds is an optional extra for users; the test suite installs it to test the tfds path.
	$(PY) -m pip install -q -e '.[test,tfds]'
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

# The embedded default dataset: Debian's real, full-size Fashion-MNIST (works offline).
$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

data: $(FMNIST)

demo: $(STAMP) $(FMNIST)
	$(PY) -m jaxnorm.sweep --config sweeps/demo.toml --out runs/demo

test: $(STAMP) $(FMNIST)
	$(PY) -m pytest -q

test-slow: $(STAMP) $(FMNIST)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP) $(FMNIST)
	$(PY) -m pytest -q -m 'slow or not slow'

bench: $(STAMP) $(FMNIST)
	$(PY) -m pip install -q -e '.[bench]'
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

perceptron: $(STAMP)
	$(PY) -m jaxnorm.sweep --arch perceptron --alpha 5 --out runs/perceptron

clean:
	rm -rf runs .pytest_cache
