"""`make workflows-api`: write the API-format copy of every workflow.

``workflows/<name>.json`` (UI format, what the frontend opens) ->
``workflows/api/<name>.json`` (API format, what ``POST /prompt`` and the batch CLI take),
converted by ``client.workflow_format.ui_to_api`` against the ``/object_info`` of a real
ComfyUI server with the pack loaded. Copies of workflows that no longer exist are removed.
tests/test_workflow_files.py fails when a copy is out of date.

    python scripts/workflows_api.py [--url http://127.0.0.1:8188] [--check]

Without ``--url`` a throw-away server is started on a free loopback port (~20 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import _runtime  # noqa: F401  (sys.path for the pack)
from _runtime import ROOT, comfyui_path

from client import workflow_format as wf
from client.server import ComfyServer, make_base_directory

logger = logging.getLogger("qkv_control.workflows_api")

WORKFLOWS = ROOT / "workflows"
API_DIR = WORKFLOWS / "api"


def api_copy_path(ui_path: Path) -> Path:
    return API_DIR / ui_path.name


def render(prompt: dict) -> str:
    """The file text of an API-format prompt (stable: same input, same bytes)."""
    return json.dumps(prompt, indent=2, ensure_ascii=False) + "\n"


def expected_copies(object_info: dict) -> dict[Path, str]:
    """{api copy path: file text} for every UI-format workflow."""
    copies = {}
    for ui_path in sorted(WORKFLOWS.glob("*.json")):
        workflow = json.loads(ui_path.read_text())
        copies[api_copy_path(ui_path)] = render(wf.ui_to_api(workflow, object_info))
    return copies


def fetch_object_info(url: str | None) -> dict:
    if url:
        return wf.fetch_object_info(url)
    with tempfile.TemporaryDirectory(prefix="qkv-workflows-api-") as tmp:
        make_base_directory(Path(tmp) / "base")
        # tiny_models: the tiny loaders are registered too; conversion only reads the nodes a
        # workflow uses, so the copies are the same as against a user's server.
        with ComfyServer(comfyui=comfyui_path(), python=sys.executable, base_directory=Path(tmp) / "base",
                         output_directory=Path(tmp) / "output", temp_directory=Path(tmp) / "temp",
                         user_directory=Path(tmp) / "user", tiny_models=True,
                         log_path=Path(tmp) / "server.log") as server:
            return wf.fetch_object_info(server.url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running ComfyUI server with the pack (default: start one)")
    parser.add_argument("--check", action="store_true", help="only report out-of-date copies (exit 1 if any)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    copies = expected_copies(fetch_object_info(args.url))
    stale = sorted(p for p in API_DIR.glob("*.json") if p not in copies)
    changed = sorted(p for p, text in copies.items() if not p.is_file() or p.read_text() != text)
    if args.check:
        for path in changed + stale:
            logger.error("out of date: %s", path.relative_to(ROOT))
        return 1 if changed or stale else 0
    API_DIR.mkdir(parents=True, exist_ok=True)
    for path in changed:
        path.write_text(copies[path])
        logger.info("wrote %s", path.relative_to(ROOT))
    for path in stale:
        path.unlink()
        logger.info("removed %s (its workflow is gone)", path.relative_to(ROOT))
    logger.info("%d API copies, %d updated, %d removed", len(copies), len(changed), len(stale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
