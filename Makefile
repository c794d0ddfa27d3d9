# lar-gen — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BASE ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export LARGEN_TINY_MODELS ?= $(CURDIR)/.cache/tiny-models
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist): much of the suite waits on subprocesses, Ray start-up and
# imports, so two workers on two cores take about half the time. `--dist loadgroup` keeps each
# `xdist_group` on one worker (tests/conftest.py makes that work with pytest >= 9.2); the tests that
# start an embedded Ray are one group, so one Ray runs at a time beside the rest.
PYTEST_WORKERS ?= 2

.PHONY: help install test lint tiny-models shards train demo mine sample-images bench-engine bench-gpu serve

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

install: ## create .venv and install lar-gen with its dev extras (CPU torch when there is no CUDA)
	@test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing the default (CUDA) torch build"; \
		$(PY) -m pip install --quiet "torch>=2.4"; \
	else \
		echo "no CUDA: installing the CPU torch build torch==$(TORCH_VERSION)"; \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	fi
	$(PY) -m pip install --quiet -e ".[dev]"
	@$(PY) -c "import torch, diffusers, transformers, ray, webdataset; print(f'torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, ray {ray.__version__}')"
	@# The browser tests (tests/serving) drive the system's Chromium; Playwright's own download is not used.
	@if [ -x "$${LARGEN_CHROMIUM:-/usr/bin/chromium}" ]; then echo "chromium: $${LARGEN_CHROMIUM:-/usr/bin/chromium}"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (apt-get) for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "chromium is missing: the browser tests need it. On Debian/Ubuntu: sudo apt-get install chromium" \
		     "(Ubuntu: chromium-browser), or set LARGEN_CHROMIUM to a Chromium binary"; \
	fi

tiny-models: ## generate the tiny offline model zoo into LARGEN_TINY_MODELS (default .cache/tiny-models)
	$(PY) scripts/make_tiny_models.py

lint: ## ruff over the whole project
	$(VENV)/bin/ruff check .

test: tiny-models ## run the whole test suite on CPU (pytest) and ruff
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(if $(filter-out 0 1,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

# `make shards IN="mined/a mined/b" OUT=release/v1`: one or more mined folders into a release.
IN ?= mined/default
OUT ?= release/default
SEED ?= 0
VAL_FRACTION ?= 0.05
SAMPLES_PER_SHARD ?= 1000
SHARD_BYTES ?=
LICENSE ?=
shards: ## pack mined folders IN into a dataset release OUT (dedupe, split, reshard, index, card, validate)
	$(PY) -m dataengine.release --input $(IN) --output $(OUT) --seed $(SEED) --val-fraction $(VAL_FRACTION) \
		$(if $(SHARD_BYTES),--shard-bytes $(SHARD_BYTES),--samples-per-shard $(SAMPLES_PER_SHARD)) \
		$(if $(LICENSE),--license $(LICENSE)) $(RELEASE_ARGS)

# `make train DATA='release/v1/train-{000000..000099}.tar' OUT=runs/largen`: stage 1, then stage 2 from
# its export; both resume from OUT. Multi-GPU: ACCELERATE_ARGS='--multi_gpu --num_processes 8', or an
# accelerate config file of training/accelerate/ (ACCELERATE_ARGS='--config_file training/accelerate/multi-gpu.yaml':
# the defaults below are then left out, so the file's values hold). BACKBONE=sdxl trains SDXL LAR-Gen with
# training/configs/stage{1,2}-sdxl.yaml (docs/training.md "SDXL").
# ACCELERATE_DEFAULTS spell out what `accelerate launch` would otherwise guess and warn about (ACCELERATE_ARGS
# come after them and win); --quiet: a failed run ends with its own one-line error, no launcher traceback.
# Training precision is the stage config's optim.mixed_precision.
ACCELERATE ?= $(VENV)/bin/accelerate
ACCELERATE_DEFAULTS ?= --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
ACCELERATE_ARGS ?=
BACKBONE ?= sd15
TRAIN_LAUNCH = $(ACCELERATE) launch $(if $(findstring --config_file,$(ACCELERATE_ARGS)),--quiet,$(ACCELERATE_DEFAULTS)) $(ACCELERATE_ARGS)
TRAIN_SUFFIX = $(if $(filter sdxl,$(BACKBONE)),-sdxl)
train: ## train LAR-Gen on shards DATA into OUT: stage 1 then stage 2 (accelerate launch, resumable; BACKBONE=sdxl for SDXL)
	@if [ -z "$(DATA)" ] || [ "$(origin OUT)" != "command line" ] || [ -z "$(filter sd15 sdxl,$(BACKBONE))" ]; then \
		echo "usage: make train DATA=<shards: path, brace pattern or fsspec URL> OUT=<run folder> [BACKBONE=sd15|sdxl]"; \
		echo "       [ACCELERATE_ARGS='--multi_gpu --num_processes 8'] [STAGE1_ARGS='--set optim.max_steps=100'] [STAGE2_ARGS=...]"; \
		exit 2; fi
	$(TRAIN_LAUNCH) -m training.train --config training/configs/stage1$(TRAIN_SUFFIX).yaml \
		--set 'data.shards=$(DATA)' --set 'output.dir=$(OUT)/stage1' --resume_from_checkpoint latest $(STAGE1_ARGS)
	$(TRAIN_LAUNCH) -m training.train --config training/configs/stage2$(TRAIN_SUFFIX).yaml \
		--set 'data.shards=$(DATA)' --set 'output.dir=$(OUT)/stage2' --set 'model.pretrained=$(OUT)/stage1/final' \
		--resume_from_checkpoint latest $(STAGE2_ARGS)

demo: tiny-models sample-images ## offline end to end on the tiny zoo: mine `sample` -> train both stages -> inpaint, into demo-output/
	$(PY) -m training.demo --output demo-output

bench-inference: tiny-models ## CPU: seconds per denoising step, LARGenPipeline (Refine on/off) vs diffusers inpaint
	$(PY) benchmarks/bench_inference.py --threads 1

bench-inference-gpu: ## GPU: SD-1.5-size fp16 512px 50 steps, s/image + peak memory, LAR-Gen vs diffusers inpaint
	$(PY) benchmarks/gpu_inference.py

# `make bench-gpu [BENCH_GPU_ARGS='--only inference,train']`: every full-size GPU figure (< 8 min on one GPU).
BENCH_GPU_ARGS ?=
bench-gpu: tiny-models ## GPU: inference, training, data engine, RAM++ and eval figures at full size -> benchmarks/results/
	$(PY) benchmarks/bench_gpu.py $(BENCH_GPU_ARGS)

# `make mine PIPELINE=sample PROFILE=tiny OUT=mined/sample`: mine a pipeline of pipelines.yaml into shards.
# Connects to RAY_ADDRESS when set, else starts an embedded local Ray. MINE_ARGS='--set k=v --overwrite'.
PIPELINE ?= sample
PROFILE ?=
MINE_ARGS ?=
sample-images: ## copy the `sample` pipeline's photos (bundled with scikit-image) into .cache/sample-images
	$(PY) -m dataengine.inputs sample-images .cache/sample-images

mine: ## mine PIPELINE (default sample) of pipelines.yaml into shards: [PROFILE=tiny|full] [OUT=dir] [MINE_ARGS=...]
	@if [ "$(PIPELINE)" = sample ]; then $(MAKE) --no-print-directory sample-images tiny-models; fi
	$(PY) dataengine/run.py --config pipelines.yaml --pipeline $(PIPELINE) $(if $(PROFILE),--profile $(PROFILE)) \
		$(if $(filter command line,$(origin OUT)),--output $(OUT)) $(MINE_ARGS)

bench-engine: tiny-models ## CPU: images/s of the embedded-Ray data engine vs a sequential loop (256 images, tiny zoo)
	$(PY) benchmarks/bench_engine.py --images 256 --threads 1 --set engine.layout=per_stage
	$(PY) benchmarks/bench_engine.py --images 256 --threads 1 --images-per-shard 16 --set engine.layout=fused --set engine.fused.num_cpus=1

# `make serve MODEL=.cache/tiny-models/largen-pipeline PROFILE=tiny`: the editor on http://127.0.0.1:7860/.
# HOST and PORT count only from the command line: shells export HOST (zsh: the machine's name), and
# serving on it by accident would open the server to the network.
MODEL ?= $(LARGEN_MODEL)
SERVE_ARGS ?=
serve: ## serve the HTTP API + web editor: MODEL=dir [PROFILE=tiny|full for click/word masks] [HOST=..] [PORT=..]
	$(VENV)/bin/largen serve $(if $(MODEL),--model $(MODEL)) \
		--host $(if $(filter command line,$(origin HOST)),$(HOST),127.0.0.1) \
		--port $(if $(filter command line,$(origin PORT)),$(PORT),7860) \
		$(if $(PROFILE),--profile $(PROFILE)) $(SERVE_ARGS)

# `make eval MODEL=runs/largen/stage2/final BENCH=bench/paper OUT=eval/paper [ROWS=table1,sweep] [PROFILE=tiny]`:
# the paper's benchmark (docs/evaluation.md); rerunning resumes. Several GPUs: ACCELERATE_ARGS='--multi_gpu
# --num_processes 8' runs it under `accelerate launch` (cases split by process). EVAL_ARGS='--steps 20 ...'.
ROWS ?= table1
EVAL_ARGS ?=
EVAL_BUILD_ARGS ?=
.PHONY: eval eval-bench
eval: ## run the paper's benchmark: MODEL=dir BENCH=dir OUT=dir [ROWS=table1,table2,sweep,all] [PROFILE=full|tiny]
	@if [ -z "$(BENCH)" ] || [ "$(origin OUT)" != "command line" ]; then \
		echo "usage: make eval MODEL=<LAR-Gen pipeline> BENCH=<benchmark folder> OUT=<results folder> [ROWS=table1] [PROFILE=full|tiny]"; \
		echo "       [ACCELERATE_ARGS='--multi_gpu --num_processes 8'] [EVAL_ARGS='--steps 20']; build BENCH with make eval-bench"; \
		exit 2; fi
	$(if $(ACCELERATE_ARGS),$(ACCELERATE) launch $(ACCELERATE_DEFAULTS) $(ACCELERATE_ARGS) -m inference.cli,$(VENV)/bin/largen) \
		eval run $(if $(MODEL),--model $(MODEL)) --bench $(BENCH) --out $(OUT) --rows $(ROWS) \
		$(if $(PROFILE),--profile $(PROFILE)) $(EVAL_ARGS)

eval-bench: ## build the benchmark BENCH: from COCO=dir DREAMBOOTH=dir (paper, 2,000 cases), or synthetic without them
	@if [ -z "$(BENCH)" ]; then echo "usage: make eval-bench BENCH=<folder> [COCO=<coco dir> DREAMBOOTH=<dreambooth dataset>] [EVAL_BUILD_ARGS=...]"; exit 2; fi
	$(VENV)/bin/largen eval build --out $(BENCH) \
		$(if $(COCO),--coco $(COCO) --dreambooth $(DREAMBOOTH),--synthetic) $(EVAL_BUILD_ARGS)
