# QKV Control: every target provisions the ComfyUI runtime first (idempotent, fast when done).
# QKV_RUNTIME moves the runtime (scripts/setup.sh, the tests and the client read it too).
RUNTIME := $(or $(QKV_RUNTIME),.runtime)
PY := $(RUNTIME)/venv/bin/python
PORT ?= 8188
WORKFLOW ?=
PYTEST_ARGS ?=

.PHONY: setup test test-oldest soak demo serve bench lint workflows-api workflows-docs subgraphs screenshots

setup:
	@bash scripts/setup.sh

# The whole suite on the provisioned ComfyUI and, side by side, on the oldest supported one
# (QKV_COMFYUI=oldest; the browser test runs on the first only). Each pass runs one torch thread, so
# on a 2-core machine the two together take about as long as the longer one. The oldest pass writes
# to a log that is printed when both are done (TEST_PASSES=serial: one after the other, streamed).
# Both passes always run; the target fails if either did. Ctrl-C stops both (a background job
# ignores SIGINT, so the recipe passes it on).
OLDEST_PASS := QKV_COMFYUI=oldest $(PY) -m pytest --ignore=tests/test_browser.py $(PYTEST_ARGS)
TEST_PASSES ?= parallel

test:
	@bash scripts/setup.sh --test-tools
	@status=0; oldest=; log=$(RUNTIME)/test-oldest-pass.log; \
	if [ "$(TEST_PASSES)" = parallel ]; then \
	  echo "$(OLDEST_PASS) > $$log  (in the background)"; \
	  $(OLDEST_PASS) > "$$log" 2>&1 & oldest=$$!; \
	  trap 'kill $$oldest 2>/dev/null; exit 130' INT TERM; \
	fi; \
	echo "$(PY) -m pytest $(PYTEST_ARGS)"; $(PY) -m pytest $(PYTEST_ARGS) || status=1; \
	if [ -n "$$oldest" ]; then \
	  wait $$oldest || status=1; \
	  echo "=== the oldest supported ComfyUI's pass: $(OLDEST_PASS)"; cat "$$log"; \
	else \
	  echo "$(OLDEST_PASS)"; $(OLDEST_PASS) || status=1; \
	fi; \
	exit $$status

# Only the second pass: the suite on the oldest supported ComfyUI.
test-oldest:
	@bash scripts/setup.sh --test-tools
	$(OLDEST_PASS)

# 100 prompts over every workflow through the real server (the suite runs a bounded 24).
soak: setup
	QKV_SOAK_PROMPTS=100 $(PY) -m pytest tests/test_soak.py -k soak $(PYTEST_ARGS)

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
