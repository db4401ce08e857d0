"""The real ComfyUI frontend in headless Chromium, against the test server.

Debian's chromium is driven by playwright-core (tests/browser/check_frontend.cjs, installed by
scripts/setup.sh into .runtime/node); the script only observes and writes JSON, the
assertions are here. Nodes and workflows are discovered, not listed: every node ``/object_info``
reports from the pack's python module, every ``workflows/*.json``.

Without chromium or playwright-core the tests skip on a user's machine, and fail in CI
(``CI`` set), where a skip must not pass for a green run.

``QKV_SCREENSHOTS=docs/screenshots`` keeps the screenshots (``make screenshots``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SCRIPT = ROOT / "tests" / "browser" / "check_frontend.cjs"
CHROMIUM = Path(os.environ.get("QKV_CHROMIUM", "/usr/bin/chromium"))
PACK = "qkv_control"  # the folder name the test server links the pack under (client/server.py)
PACK_MODULE = f"custom_nodes.{PACK}"
EXTENSION_NAME = "qkv_control.appearance"  # web/js/qkv_control.js
TIMEOUT_S = 600


def _node_modules() -> Path:
    runtime = Path(os.environ.get("QKV_RUNTIME", ROOT / ".runtime"))
    return runtime / "node" / "node_modules"


def _missing_tools() -> list[str]:
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (Debian's chromium: apt-get install chromium)")
    if shutil.which("node") is None:
        missing.append("node (Node.js >= 20)")
    if not (_node_modules() / "playwright-core").is_dir():
        missing.append(f"{_node_modules() / 'playwright-core'} (make test runs scripts/setup.sh --test-tools, which installs it with npm)")
    return missing


def write_template_thumbnails(screenshots: Path, width: int = 640) -> None:
    """workflows/<name>.jpg from the workflow screenshots: the template browser's card image for
    a custom node's workflow (the frontend asks for ``/api/workflow_templates/<pack>/<name>.jpg``)."""
    from PIL import Image

    for path in WORKFLOWS:
        shot = screenshots / f"workflow_{path.stem}.png"
        if not shot.is_file():
            continue
        image = Image.open(shot).convert("RGB")
        # Drop the sidebar and the tab bar: the graph is what the card should show.
        left, top = int(image.width * 0.04), int(image.height * 0.06)
        image = image.crop((left, top, image.width, image.height))
        image.thumbnail((width, width), Image.LANCZOS)
        image.save(path.with_suffix(".jpg"), quality=80, optimize=True)


def pack_nodes(object_info: dict) -> dict[str, dict]:
    return {name: info for name, info in object_info.items()
            if str(info.get("python_module", "")).split(".")[:2] == PACK_MODULE.split(".")}


@pytest.fixture(scope="module")
def frontend(request, tmp_path_factory):
    """Run the browser script once for the module; returns its report (+ "seconds")."""
    missing = _missing_tools()
    if missing:
        message = "browser test tools missing: " + "; ".join(missing)
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message + " (CI: make test runs scripts/setup.sh --test-tools, which must install them)")
        pytest.skip(message)
    # Only now the server: a skip costs no server start.
    comfy_server = request.getfixturevalue("comfy_server")
    work = tmp_path_factory.mktemp("browser")
    screenshots = Path(os.environ.get("QKV_SCREENSHOTS") or work / "screenshots")
    if not screenshots.is_absolute():
        screenshots = ROOT / screenshots
    nodes = pack_nodes(comfy_server.object_info())
    assert nodes, "the server reports no node from the pack"
    config = {
        "url": comfy_server.url,
        "pack": PACK,
        "extension": EXTENSION_NAME,
        "nodes": [{"name": name, "display_name": info.get("display_name") or name,
                   "description": info.get("description") or ""} for name, info in sorted(nodes.items())],
        "workflows": [path.stem for path in WORKFLOWS],
        "screenshot_dir": str(screenshots),
        "result_path": str(work / "result.json"),
        "chromium": str(CHROMIUM),
        "user_data_dir": str(work / "profile"),  # fresh profile every run
    }
    config_path = work / "config.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = dict(os.environ, NODE_PATH=str(_node_modules()))
    started = time.monotonic()
    proc = subprocess.run(["node", str(SCRIPT), str(config_path)], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    seconds = time.monotonic() - started
    result_path = Path(config["result_path"])
    assert result_path.is_file(), f"browser script wrote no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(result_path.read_text())
    assert not report.get("fatal"), f"browser script failed: {report['fatal']}\n{proc.stderr[-2000:]}"
    report["seconds"] = seconds
    if os.environ.get("QKV_SCREENSHOTS"):
        write_template_thumbnails(screenshots)
    logging.getLogger("qkv_control").info("browser run: %.1f s, stages %s", seconds, report["timings"])
    return report


def test_frontend_loads_the_extension_without_errors(frontend):
    assert frontend["extension_registered"], (
        f"the frontend did not register {EXTENSION_NAME}; console errors: {frontend['console_errors'][:10]}")
    failed = sorted({f"{item['url'].split('/', 3)[-1]} ({item['status']})" for item in frontend["failed_pack_requests"]
                     if item["status"] != "net::ERR_ABORTED"})
    thumbnails = [f for f in failed if f.startswith("api/workflow_templates/") and ".jpg " in f]
    assert not thumbnails, f"template thumbnails missing (run `make screenshots`): {thumbnails}"
    assert not failed, f"pack files failed to load: {failed}"
    assert not frontend["extension_errors"], f"console errors from the pack's scripts: {frontend['extension_errors']}"


def test_pack_nodes_appear_in_node_search_with_descriptions(frontend, comfy_server):
    nodes = pack_nodes(comfy_server.object_info())
    not_found = sorted(name for name in nodes if not frontend["search"].get(name, {}).get("found"))
    assert not not_found, f"pack nodes not found in the node search box: {not_found}"
    undescribed = sorted(name for name in nodes if not frontend["search"][name].get("description_shown"))
    assert not undescribed, ("pack nodes whose search result shows no description: "
                             + ", ".join(f"{n}: {frontend['search'][n]['result_text']!r}" for n in undescribed))


def test_pack_nodes_get_their_method_style(frontend, comfy_server):
    nodes = pack_nodes(comfy_server.object_info())
    unstyled = {}
    for name, info in nodes.items():
        style = frontend["styles"].get(name) or {}
        method = str(info.get("category", "")).split("/")
        if not style.get("created") or not style.get("badge") or not style.get("color"):
            unstyled[name] = style
        elif (style.get("width") or 0) < 300:
            unstyled[name] = style
        if len(method) < 2 or method[0] != "QKV Control":
            unstyled[name] = f"category {info.get('category')!r} is not 'QKV Control/<method>'"
    assert not unstyled, f"pack nodes without the extension's colour/badge/width: {unstyled}"


def test_missing_node_detection_works(frontend):
    # The same checks, on a workflow with one node type replaced by an unknown one.
    check = frontend.get("missing_node_self_check")
    assert check, "the browser script did not run its missing-node self-check"
    assert check["missing_types"] == ["QKVNoSuchNodeForTheBrowserTest"], check
    assert "QKVNoSuchNodeForTheBrowserTest" in check["missing_toast"], check


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_opens_from_the_template_browser(frontend, path):
    entry = frontend["workflows"].get(path.stem)
    assert entry and entry["opened"], f"{path.name} did not open from the template browser: {entry}"
    expected = len(json.loads(path.read_text())["nodes"])
    assert entry["node_count"] == expected, f"{path.name}: {entry['node_count']} nodes in the graph, file has {expected}"
    assert not entry["missing_types"], f"{path.name} opens with missing nodes: {entry['missing_types']}"
    assert not entry["missing_toast"], f"{path.name}: the frontend reports missing nodes: {entry['missing_toast']}"

