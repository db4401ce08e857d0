# QKV Control: every target provisions the ComfyUI runtime first (idempotent, fast when done).
PY := .runtime/venv/bin/python
PORT ?= 8188
WORKFLOW ?=
PYTEST_ARGS ?=

.PHONY: setup test demo serve bench lint

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py $(if $(WORKFLOW),--workflow "$(WORKFLOW)")

serve: setup
	$(PY) scripts/serve.py --port $(PORT)

bench: setup
	$(PY) benchmarks/run.py

lint: setup
	$(PY) -m ruff check .
