# stem_megatron: one target per habit. `make setup` once, then `make demo` / `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup setup-py312 test test-py312 test-slow test-gpu gpu-check lint bench bench-mlp bench-exchange bench-preprocess bench-train \
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

# --- The second supported line: Python 3.12 + megatron-core 0.19.x (README "Supported megatron-core").
# `make setup-py312` creates $(VENV312) with a Python 3.12 interpreter ($(PYTHON312) if set, else
# `pyenv prefix 3.12` / `pyenv prefix 3.12.1`, else python3.12 on PATH) and installs, from PyPI:
# torch==2.13.0 as PyPI ships it for CPython 3.12, i.e. the CUDA 13 build with its nvidia-* CUDA
# libraries and triton (several GB of wheels, 5.7 GB installed; it runs on a CPU), then this project
# editable with `.[dev,plot]`, which brings megatron-core 0.19.x (setup.py's marker for 3.12).
# No interpreter, or a failed install: one line on stderr and exit 1 (pip's log in $(VENV312)/install.log).
VENV312 ?= .venv312
PY312 := $(VENV312)/bin/python
PYTHON312 ?=
# The focused suite of the 3.12 lane, one list for CI (.ci/run) and humans: the compat layer and the
# version gate; the model against the reference at TP1, TP2 and PP2; the table engine; training and
# resume after kill -9; the checkpoint format and a failed save (where 0.19 differs); preprocessing
# byte parity; export to transformers.
LANE312_TESTS := tests/test_compat.py tests/test_megatron_version.py \
	'tests/test_model_equivalence.py::test_megatron_model_matches_reference[tp1]' \
	'tests/test_model_equivalence.py::test_megatron_model_matches_reference[tp2]' \
	'tests/test_model_equivalence.py::test_megatron_model_matches_reference[pp2]' \
	tests/test_stem_engine.py tests/test_stem_engine_distributed.py \
	tests/test_training.py tests/test_checkpoint_resume.py tests/test_checkpoint.py \
	'tests/test_collective_failures.py::test_dense_save_failing_on_one_rank_fails_the_save_on_every_rank' \
	tests/test_data_preprocess.py tests/test_export.py

setup-py312:
	@py=""; for c in "$(PYTHON312)" "$$(pyenv prefix 3.12 2>/dev/null)/bin/python3.12" \
	        "$$(pyenv prefix 3.12.1 2>/dev/null)/bin/python3.12" "$$(command -v python3.12)"; do \
	    if [ -n "$$c" ] && [ -x "$$c" ] && "$$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; \
	    then py="$$c"; break; fi; done; \
	if [ -z "$$py" ]; then echo "setup-py312: no Python 3.12 interpreter found (tried PYTHON312=, pyenv prefix 3.12 and 3.12.1, python3.12 on PATH); install one (pyenv install 3.12) or pass PYTHON312=/path/to/python3.12" >&2; exit 1; fi; \
	echo "setup-py312: $$py -> $(VENV312); downloading from PyPI: torch 2.13.0 for CPython 3.12 (the CUDA 13 build: several GB with its nvidia-* libraries and triton, 5.7 GB installed; runs on CPU), megatron-core 0.19.x and the .[dev,plot] extras"; \
	if [ ! -x $(PY312) ]; then "$$py" -m venv $(VENV312) || { echo "setup-py312: '$$py -m venv $(VENV312)' failed" >&2; exit 1; }; fi; \
	if ! { $(PY312) -m pip install 'torch==2.13.0' && $(PY312) -m pip install -e '.[dev,plot]'; } > $(VENV312)/install.log 2>&1; then \
	    echo "setup-py312: pip install failed: $$(grep -E '^(ERROR|error)' $(VENV312)/install.log | head -1 | cut -c1-300) (full log: $(VENV312)/install.log)" >&2; exit 1; fi; \
	$(PY312) -c "import torch, megatron.core, stem_megatron.megatron_version as v; print('setup-py312: python 3.12 | torch', torch.__version__, '| megatron-core', v.installed_version(), '| tested line', v.tested_line(v.installed_version()))"

# The 3.12 lane's focused suite (LANE312_TESTS) in $(VENV312); needs `make setup-py312` first.
test-py312:
	@[ -x $(PY312) ] || { echo "test-py312: $(PY312) does not exist; run make setup-py312 first" >&2; exit 1; }
	$(PY312) -m pytest -q -p no:cacheprovider $(LANE312_TESTS)

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
