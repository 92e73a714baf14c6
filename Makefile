# Fresh-machine entry points:  make demo   (the main job)   make test   (the test suite)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MAX_JOBS ?= 2

.PHONY: venv build demo test bench cmake clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt

venv: $(BIN)/python

build: venv
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(BIN)/tts-kernels demo

bench: build
	$(BIN)/tts-kernels bench

test: build
	$(BIN)/python -m pytest -q tests

cmake: venv
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH=$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
	cmake --build build/cmake -j 2

clean:
	rm -rf build $(VENV) tts_kernels/_C*.so *.egg-info
