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

# The main job on the embedded default: local Ray, the demo model and segmenter, the bundled
# shapes graphs; prints where the images, the summary and the report are.
demo: setup
	$(BIN)/python -m jobs.generate --output $(DEMO_OUT) --run-id demo --overwrite

# Benchmarks print figures measured side by side; each takes minutes (see README).
bench: setup
	$(BIN)/python benchmarks/shapes_quality.py --grid docs/samples.png
	$(BIN)/python benchmarks/text_cache.py
	$(BIN)/python benchmarks/prepare_vg.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/sbpc.py --draft-model models/shapes-sg-diffusion-draft
	$(BIN)/python benchmarks/sbpc_drafts.py --draft-model models/shapes-sg-diffusion-draft
	$(BIN)/python benchmarks/finetune_scaling.py

test: setup
	bash scripts/ensure-chromium.sh
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
