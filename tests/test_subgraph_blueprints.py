"""The pack's subgraph blueprints (subgraphs/*.json) against the workflows they wrap, on the real server's node types.

Each blueprint, put in place of its nodes in its source workflow (``client.blueprints.wrap_in_blueprint``),
must queue exactly the workflow's prompt: the same nodes, widget values and links, only with the
subgraph node's id in front of the inner node ids. tests/test_browser.py checks that the real
frontend opens, drops, expands and runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkv_control.client import blueprints as bp
from qkv_control.client import workflow_format as wf
from qkv_control.client.ui_graph import subgraph_definitions

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
BLUEPRINTS = sorted((ROOT / "subgraphs").glob("*.json"))
SOURCE_KEY = "qkv_source_workflow"  # scripts/subgraph_blueprints.py
METHOD_NODES = {"QKVInDetailReferenceAttention", "QKVMCACtrlGenerate", "QKVMCACtrlReplace", "QKVIPAdapterStyleContent",
                "QKVConditionGuidance"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_one_blueprint_per_method():
    used = set()
    for path in BLUEPRINTS:
        definition = bp.blueprint_definition(_load(path))
        used |= {n["type"] for n in definition["nodes"]} & METHOD_NODES
    assert used == METHOD_NODES, f"methods without a blueprint: {sorted(METHOD_NODES - used)}"


@pytest.mark.parametrize("path", BLUEPRINTS, ids=[p.stem for p in BLUEPRINTS])
def test_blueprint_is_a_published_subgraph(comfy_server, path):
    blueprint = _load(path)
    assert blueprint["version"] == 0.4 and len(blueprint["nodes"]) == 1 and not blueprint["links"]
    (instance,) = blueprint["nodes"]
    definitions = subgraph_definitions(blueprint)
    assert list(definitions) == [instance["type"]], "the one node must be an instance of the one subgraph"
    definition = definitions[instance["type"]]
    assert definition["name"] == path.stem == instance["title"], "the node library shows the file name"
    assert definition["category"] == "QKV Control" and len(definition["description"]) > 80
    info = comfy_server.object_info()
    unknown = sorted({n["type"] for n in definition["nodes"]} - set(info))
    assert not unknown, f"{path.name}: node types the server does not have: {unknown}"
    assert [i["name"] for i in instance["inputs"]] == [i["name"] for i in definition["inputs"]]
    promoted = [i for i in instance["inputs"] if "widget" in i]
    assert len(instance["widgets_values"]) == len(promoted) > 0
    # The user's model, CLIP and VAE come in from outside; nothing loads a checkpoint inside.
    assert {"model", "clip", "vae"} <= {i["name"] for i in definition["inputs"]}
    assert not {n["type"] for n in definition["nodes"]} & {"CheckpointLoaderSimple", "CheckpointLoader", "UNETLoader"}


@pytest.mark.parametrize("path", BLUEPRINTS, ids=[p.stem for p in BLUEPRINTS])
def test_blueprint_in_its_workflow_queues_the_workflows_prompt(comfy_server, path):
    info = comfy_server.object_info()
    blueprint = _load(path)
    source = _load(ROOT / "workflows" / blueprint["extra"][SOURCE_KEY])
    wrapped = bp.wrap_in_blueprint(source, blueprint, info)
    instance_id = str(wrapped["nodes"][-1]["id"])
    prompt = wf.ui_to_api(wrapped, info)
    assert any(key.startswith(f"{instance_id}:") for key in prompt), "the subgraph was not expanded"
    assert bp.strip_instance_prefix(prompt, instance_id) == wf.ui_to_api(source, info)


@pytest.mark.parametrize("path", BLUEPRINTS, ids=[p.stem for p in BLUEPRINTS])
def test_blueprint_defaults_keep_inversion_and_sampling_on_one_schedule(comfy_server, path):
    # Dropped as it is: every inner node with a step count (inversions, samplers) uses the same.
    prompt = wf.ui_to_api(_load(path), comfy_server.object_info())
    steps = {node["inputs"]["steps"] for node in prompt.values() if "steps" in node["inputs"]}
    assert len(steps) == 1 and steps.pop() >= 20, f"{path.name}: step counts {steps} (real-size defaults expected)"
