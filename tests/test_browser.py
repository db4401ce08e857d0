"""The real ComfyUI frontend in headless Chromium, against the test server.

Debian's chromium is driven by playwright-core (tests/browser/check_frontend.cjs, installed by
scripts/setup.sh into .runtime/node); the script only observes and writes JSON, the
assertions are here. Nodes, workflows and blueprints are discovered, not listed: every node ``/object_info``
reports from the pack's python module, every ``workflows/*.json``, every ``subgraphs/*.json``.

Besides the nodes' search, style and the template browser, the script: drags each subgraph
blueprint from the node library onto the canvas, wires it to loaders and a SaveImage and hands
back what the frontend would queue (``app.graphToPrompt()``), which the tests compare with what
the batch CLI builds (``client.workflow_format.ui_to_api``) and then run on the tiny models;
captures the frontend's prompt for every workflow, for each blueprint placed in its workflow
and for a workflow with nested subgraphs (tests/subgraph_fixtures.py); reads the red error
outlines of every workflow screenshot; and types the search aliases users type.

Without chromium or playwright-core the tests skip on a user's machine, and fail in CI
(``CI`` set), where a skip must not pass for a green run.

``QKV_SCREENSHOTS=docs/screenshots`` keeps the screenshots (``make screenshots``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from qkv_control.client import blueprints as bp
from qkv_control.client import workflow_format as wf

pytestmark = [pytest.mark.server, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
BLUEPRINTS = sorted((ROOT / "subgraphs").glob("*.json"))
BLUEPRINT_CATEGORY = "QKV Control"
SOURCE_KEY = "qkv_source_workflow"  # scripts/subgraph_blueprints.py
NESTED = "nested_subgraphs"
# What users type, and a node each search must find (by node id; blueprints by file name).
ALIAS_SEARCHES = [
    ("unsampler", "QKVDDIMInversion"), ("style transfer", "QKVIPAdapterStyleContent"),
    ("inpaint subject", "QKVMCACtrlReplace"), ("SALQ", "QKVMCACtrlGenerate"), ("SAGI", "QKVMCACtrlReplace"),
    ("stratified attention", "QKVInDetailReferenceAttention"), ("ip adapter", "QKVIPAdapterApply"),
    ("conflict-free", "QKVImagePromptGuidance"), ("image prompt", "QKV Image Prompt (InDetail-IP)"),
    ("subject replacement", "QKV Subject Replacement (MCA-Ctrl)"),
]
SCRIPT = ROOT / "tests" / "browser" / "check_frontend.cjs"
CHROMIUM = Path(os.environ.get("QKV_CHROMIUM", "/usr/bin/chromium"))
PACK = "qkv_control"  # the folder name the test server links the pack under (client/server.py)
PACK_MODULE = f"custom_nodes.{PACK}"
EXTENSION_NAME = "qkv_control.appearance"  # web/js/qkv_control.js
KV_BANK_SETTING = "QKVControl.KVBank.BudgetMB"  # web/js/kv_bank_setting.js, inversion/kv_bank.py
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


def _fixtures():
    spec = importlib.util.spec_from_file_location("qkv_subgraph_fixtures", ROOT / "tests" / "subgraph_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slug(path: Path) -> str:
    """"QKV Subject Replacement (MCA-Ctrl)" -> "subject_replacement_mca_ctrl"."""
    words = re.findall(r"[a-z0-9]+", path.stem.lower())
    return "_".join(w for w in words if w != "qkv")


def wrapped_blueprint(path: Path, object_info: dict) -> dict:
    """The blueprint placed in its source workflow, in place of the nodes it was made from."""
    blueprint = json.loads(path.read_text())
    source = json.loads((ROOT / "workflows" / blueprint["extra"][SOURCE_KEY]).read_text())
    return bp.wrap_in_blueprint(source, blueprint, object_info)


def blueprint_drop(path: Path, object_info: dict) -> dict:
    """How the browser script wires a dropped blueprint: the loaders and images of its workflow,
    its workflow's widget values, but 3 steps (quick) and a seed no other test uses (so the run is
    not served from ComfyUI's cache)."""
    wrapped = wrapped_blueprint(path, object_info)
    instance = wrapped["nodes"][-1]
    nodes = {n["id"]: n for n in wrapped["nodes"]}
    links = {link[0]: link for link in wrapped["links"]}
    sources, wiring = {}, []
    for inp in instance["inputs"]:
        if inp.get("link") is None:
            continue
        _id, origin, slot, *_ = links[inp["link"]]
        node = nodes[origin]
        sources[str(origin)] = {"type": node["type"], "title": node.get("title") or "",
                                "widgets": wf.widget_values_by_name(node, object_info[node["type"]])}
        wiring.append([str(origin), slot, inp["name"]])
    promoted = [i["name"] for i in instance["inputs"] if "widget" in i]
    widgets = dict(zip(promoted, instance["widgets_values"]))
    widgets["seed"] += 1000
    widgets["steps"] = 3  # inversions and sampler together: they share the subgraph input
    definition = bp.blueprint_definition(json.loads(path.read_text()))
    return {"name": path.stem, "category": BLUEPRINT_CATEGORY, "sources": sources, "links": wiring, "widgets": widgets,
            "output": definition["outputs"][0]["name"], "prefix": f"qkv_blueprint/{slug(path)}",
            "screenshot": f"subgraph_{slug(path)}"}


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
    info = comfy_server.object_info()
    names = {name: node.get("display_name") or name for name, node in info.items()}
    config = {
        "url": comfy_server.url,
        "pack": PACK,
        "extension": EXTENSION_NAME,
        "nodes": [{"name": name, "display_name": info.get("display_name") or name,
                   "description": info.get("description") or ""} for name, info in sorted(nodes.items())],
        "workflows": [path.stem for path in WORKFLOWS],
        "blueprints": [blueprint_drop(path, info) for path in BLUEPRINTS],
        "graphs": [{"name": NESTED, "workflow": _fixtures().nested_subgraph_workflow()}]
        + [{"name": f"wrapped_{slug(path)}", "workflow": wrapped_blueprint(path, info)} for path in BLUEPRINTS],
        "searches": [{"query": query, "expect": names.get(target, target)} for query, target in ALIAS_SEARCHES],
        "settings": [{"id": KV_BANK_SETTING, "probe": 320}],
        "error_check": {"workflow": json.loads((ROOT / "workflows" / "baseline_txt2img.json").read_text()), "node": 1,
                        "value": "qkv_no_such_model.safetensors"},
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


def test_the_kv_bank_budget_setting_is_registered_and_stored_where_the_server_reads_it(frontend):
    """The frontend lists the setting (a number, default 0 = not set, under QKV Control), and setting
    it from the frontend stores it in the user's settings on the server (GET /settings/<id>), the
    file the bank reads when a run starts (tests/test_kv_bank_server.py runs a prompt with it)."""
    from qkv_control.inversion import kv_bank

    assert KV_BANK_SETTING == kv_bank.SETTING_BUDGET
    setting = frontend["settings"][KV_BANK_SETTING]
    assert setting["registered"], setting
    assert (setting["type"], setting["default_value"], setting["category"][0]) == ("number", 0, "QKV Control")
    assert kv_bank.SETTING_BUDGET_NAME.endswith(f"> {setting['name']}"), setting["name"]  # what warnings name
    assert "QKV_KV_BANK_MB" in setting["tooltip"] and setting["value"] == 0
    assert setting["stored_after_set"] == 320 and setting["stored_after_restore"] == 0, setting


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



@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_screenshot_shows_no_error_outline(frontend, path):
    # The test server lists every model file the workflows name (placeholders where tiny mode
    # swaps the loader): a reader sees the graph as it looks on a working install.
    entry = frontend["workflows"][path.stem]
    assert entry.get("opened") and entry.get("error_outlines") == [], (
        f"{path.name}: nodes outlined as errors in the screenshot: {entry.get('error_outlines')}")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_nodes_do_not_hide_each_other(frontend, path):
    # Node boxes as the frontend renders them (title bar included): no node of a shipped workflow
    # sits on another, so the screenshot and the opened workflow show every widget.
    entry = frontend["workflows"][path.stem]
    assert entry.get("opened") and entry.get("overlaps") == [], f"{path.name}: overlapping nodes {entry.get('overlaps')}"


def test_error_outline_check_can_fail(frontend):
    check = frontend.get("error_outline_self_check")
    assert check, "the browser script did not run its error-outline self-check"
    assert [e["id"] for e in check["error_outlines"]] == [str(check["node"])], check


def test_search_aliases_find_the_nodes(frontend):
    missed = [(s["query"], s["expect"]) for s in frontend["alias_searches"] if not s["found"]]
    assert len(frontend["alias_searches"]) == len(ALIAS_SEARCHES)
    assert not missed, f"searches that do not find their node: {missed}"


def test_every_pack_node_but_localization_has_search_aliases(comfy_server):
    localization = {"QKVGroundingDinoLoader", "QKVSamLoader", "QKVTextSegment"}  # another change owns these
    without = sorted(name for name, info in pack_nodes(comfy_server.object_info()).items()
                     if name not in localization and not info.get("search_aliases"))
    assert not without, f"nodes without search_aliases in /object_info: {without}"


@pytest.mark.parametrize("path", BLUEPRINTS, ids=[slug(p) for p in BLUEPRINTS])
def test_blueprint_is_in_the_node_library(frontend, path):
    entry = frontend["blueprints"][path.stem]
    assert entry["in_library"], f"{path.stem} not in the node library: {entry.get('library_items')}"
    assert entry["library_path"][-1] == BLUEPRINT_CATEGORY, entry["library_path"]
    assert entry["dropped"], f"dragging {path.stem} onto the canvas made no subgraph node: {entry}"
    assert not entry["missing_types"], f"{path.stem} opens with missing nodes: {entry['missing_types']}"
    assert not entry["unwired"] and not entry["unset"], entry


@pytest.mark.parametrize("path", BLUEPRINTS, ids=[slug(p) for p in BLUEPRINTS])
def test_dropped_blueprint_queues_the_cli_prompt_and_runs(frontend, comfy_server, path):
    entry = frontend["blueprints"][path.stem]
    assert entry["dropped"], entry
    assert not entry["error_outlines"], f"{path.stem}: nodes outlined as errors: {entry['error_outlines']}"
    prompt = entry["prompt"]
    assert any(":" in key for key in prompt), "the frontend's prompt has no subgraph node inside"
    assert wf.ui_to_api(entry["workflow"], comfy_server.object_info()) == prompt
    import numpy as np
    from PIL import Image

    run = comfy_server.run(prompt, tiny=True)
    images = [p for p in comfy_server.output_paths(run) if p.suffix == ".png"]
    assert images, f"{path.stem} wrote no image: {run.get('outputs')}"
    for image in images:
        assert np.asarray(Image.open(image).convert("RGB"), dtype=np.float32).std() > 1.0, image


CAPTURED = [f"workflow:{p.stem}" for p in WORKFLOWS] + [f"graph:{NESTED}"] + [f"graph:wrapped_{slug(p)}" for p in BLUEPRINTS]


@pytest.mark.parametrize("capture", CAPTURED)
def test_cli_builds_the_prompt_the_frontend_queues(frontend, comfy_server, capture):
    kind, name = capture.split(":", 1)
    entry = frontend["workflows" if kind == "workflow" else "graphs"][name]
    info = comfy_server.object_info()
    if kind == "workflow":
        saved = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    elif name == NESTED:
        saved = _fixtures().nested_subgraph_workflow()
    else:
        saved = wrapped_blueprint(next(p for p in BLUEPRINTS if f"wrapped_{slug(p)}" == name), info)
    assert not entry.get("missing_types"), entry.get("missing_types")
    # The file as given, and the file as the frontend saves it again (Export).
    assert wf.ui_to_api(saved, info) == entry["prompt"]
    assert wf.ui_to_api(entry["workflow"], info) == entry["prompt"]


@pytest.mark.parametrize("path", BLUEPRINTS, ids=[slug(p) for p in BLUEPRINTS])
def test_frontend_queues_a_blueprint_as_the_workflow_it_wraps(frontend, path):
    blueprint = json.loads(path.read_text())
    wrapped = frontend["graphs"][f"wrapped_{slug(path)}"]["prompt"]
    instance = next(key.split(":")[0] for key in wrapped if ":" in key)
    source = frontend["workflows"][Path(blueprint["extra"][SOURCE_KEY]).stem]["prompt"]
    assert bp.strip_instance_prefix(wrapped, instance) == source
