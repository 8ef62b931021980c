# stem_megatron: one target per habit. `make setup` once, then `make demo` / `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup test test-slow test-gpu gpu-check lint bench bench-mlp bench-exchange bench-preprocess bench-train \
        bench-step bench-generate bench-scale bench-cache bench-offload sample-data demo compare clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# CPU machines get the CPU torch build (a bare `torch` would pull a multi-GB CUDA build).
setup: $(PY)
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install -q -e '.[dev,plot]'
else
	$(PY) -m pip install -q 'torch==2.13.0' && $(PY) -m pip install -q -e '.[dev,plot]'
endif
	$(PY) -c "import torch, megatron.core, stem_megatron; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)"

test: $(PY)
	$(PY) -m pytest -q -x -p no:cacheprovider tests

test-slow: $(PY)
	$(PY) -m pytest -q -p no:cacheprovider -m slow tests

test-gpu: $(PY)
	$(PY) -m pytest -q -p no:cacheprovider -m gpu tests

# Everything a lent GPU should show, < 8 minutes, one JSON line at the end; says so and exits 0
# without CUDA. Uses .venv when there is one, else the machine's python3 (no venv is assumed); where
# megatron-core is missing it installs ./wheelhouse into .gpu_check/ offline (docs/benchmarks.md).
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) benchmarks/gpu_check.py $(ARGS)

# Offline install for GPU nodes (docs/launch.md): the wheels a CUDA PyTorch node lacks (CPython 3.12,
# manylinux x86_64, pinned in launch/wheelhouse.lock), the project's wheel and the sample corpus, in ./wheelhouse.
.PHONY: wheelhouse wheelhouse-lock
WHEELHOUSE ?= wheelhouse
wheelhouse: $(PY) sample-data
	$(PY) -m launch.wheelhouse build --out $(WHEELHOUSE)

# Maintainers, with network: resolve the wheelhouse's set again and rewrite launch/wheelhouse.lock.
wheelhouse-lock: $(PY)
	$(PY) -m launch.wheelhouse lock

lint: $(PY)
	$(VENV)/bin/ruff check stem_megatron data_tools tests benchmarks launch

sample-data: $(PY)
	$(PY) -m stem_megatron.cli.sample_data --output-dir data/sample

bench: bench-mlp bench-exchange bench-preprocess bench-train bench-generate bench-scale bench-cache bench-offload

bench-mlp: $(PY)
	$(PY) -m benchmarks.bench_mlp

bench-exchange: $(PY) sample-data
	$(PY) -m benchmarks.bench_exchange

bench-preprocess: $(PY) sample-data
	$(PY) -m benchmarks.bench_preprocess

bench-train: $(PY) sample-data
	$(PY) -m benchmarks.bench_train

bench-step: $(PY)
	$(PY) -m benchmarks.bench_step
bench-generate: $(PY)
	$(PY) -m benchmarks.bench_generate
bench-scale: $(PY) sample-data
	$(PY) -m benchmarks.scale_model

# Host tables: row-cache hit rate by policy and size on the sample corpus (writes a PNG too).
bench-cache: $(PY) sample-data
	$(PY) -m benchmarks.bench_cache

# Host tables: step time with host tables / with device tables.
bench-offload: $(PY) sample-data
	$(PY) -m benchmarks.bench_offload

# The README's main job: a small STEM pretraining on real text (CPU by default).
demo: setup sample-data
	NPROC_PER_NODE=$(NPROC) PYTHON=$(PY) launch/torchrun.sh configs/tiny_stem.yaml $(ARGS)

compare: $(PY) sample-data
	$(PY) -m benchmarks.compare_dense_stem

clean:
	rm -rf runs .pytest_cache .gpu_check
