# QKV Control: every target provisions the ComfyUI runtime first (idempotent, fast when done).
PY := .runtime/venv/bin/python
PORT ?= 8188
WORKFLOW ?=
PYTEST_ARGS ?=

.PHONY: setup test demo serve bench lint workflows-api workflows-docs subgraphs screenshots

setup:
	@bash scripts/setup.sh

test:
	@bash scripts/setup.sh --test-tools
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py $(if $(WORKFLOW),--workflow "$(WORKFLOW)")

serve: setup
	$(PY) scripts/serve.py --port $(PORT)

bench: setup
	$(PY) benchmarks/run.py

lint: setup
	$(PY) -m ruff check .

# API-format copies of workflows/*.json into workflows/api/ (tests/test_workflow_files.py checks them).
workflows-api: setup
	$(PY) scripts/workflows_api.py

# docs/workflows.md from the workflows' notes and loaders (tests/test_packaging.py checks it is current).
workflows-docs:
	$(PY) scripts/workflows_doc.py

# Subgraph blueprints (subgraphs/*.json) from the workflows (tests/test_subgraph_blueprints.py checks them).
subgraphs: setup
	$(PY) scripts/subgraph_blueprints.py

# README screenshots (docs/screenshots/*.png), taken by the browser test.
screenshots: setup
	QKV_SCREENSHOTS=docs/screenshots $(PY) -m pytest tests/test_browser.py $(PYTEST_ARGS)
