# The README's commands. `make demo` and `make test` each set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Machines without an NVIDIA driver get the CPU build of torch (pinned in constraints/cpu.txt);
# GPU machines let pip choose the CUDA build. Override with `make CONSTRAINTS=...`.
CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,constraints/cpu.txt)
PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
DEMO_OUT ?= out

.PHONY: setup demo test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(PIP_CONSTRAINTS) -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m jobs.prepare sg2im --input jobs/samples/graphs.json --output $(DEMO_OUT)/sample_graphs

test: setup
	bash scripts/ensure-chromium.sh
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
