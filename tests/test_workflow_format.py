"""UI -> API conversion, subgraph expansion and tiny substitution (client/workflow_format.py,
client/subgraphs.py), without a server.

The object_info below copies the shapes ComfyUI v0.30.0 serves for these core nodes. The
expected prompts follow the frontend's rules (frontend 1.47 graphToPrompt); tests/test_browser.py
checks the real frontend builds the same prompts.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from qkv_control.client import workflow_format as wf


def _fixtures():
    spec = importlib.util.spec_from_file_location("qkv_subgraph_fixtures", Path(__file__).with_name("subgraph_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

OBJECT_INFO = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [["a.safetensors", "sd_xl_base_1.0.safetensors",
                                              "v1-5-pruned-emaonly.safetensors"], {}]}},
        "input_order": {"required": ["ckpt_name"]}, "output": ["MODEL", "CLIP", "VAE"], "display_name": "Load Checkpoint"},
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}],
            "cfg": ["FLOAT", {}], "sampler_name": [["euler", "ddim"], {}], "scheduler": [["normal"], {}],
            "positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}], "latent_image": ["LATENT", {}],
            "denoise": ["FLOAT", {}]}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
        "output": ["LATENT"], "display_name": "KSampler"},
    "LoadImageMask": {
        "input": {"required": {"image": [["x.png"], {"image_upload": True}], "channel": [["alpha", "red"], {}]}},
        "input_order": {"required": ["image", "channel"]}, "output": ["MASK"], "display_name": "Load Image (as Mask)"},
    "ImageInvert": {"input": {"required": {"image": ["IMAGE", {}]}}, "input_order": {"required": ["image"]},
                    "output": ["IMAGE"], "display_name": "Invert Image"},
    "LoadImage": {"input": {"required": {"image": ["COMBO", {"options": ["x.png"], "image_upload": True}]}},
                  "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"], "display_name": "Load Image"},
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
                  "input_order": {"required": ["images", "filename_prefix"]}, "output": [], "display_name": "Save Image"},
    "PreviewImage": {"input": {"required": {"images": ["IMAGE", {}]}}, "input_order": {"required": ["images"]},
                     "output": [], "display_name": "Preview Image"},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
                       "input_order": {"required": ["text", "clip"]}, "output": ["CONDITIONING"],
                       "display_name": "CLIP Text Encode (Prompt)"},
    "EmptyLatentImage": {"input": {"required": {"width": ["INT", {"default": 512}], "height": ["INT", {"default": 512}],
                                                "batch_size": ["INT", {"default": 1}]}},
                         "input_order": {"required": ["width", "height", "batch_size"]}, "output": ["LATENT"],
                         "display_name": "Empty Latent Image"},
    "LatentUpscaleBy": {"input": {"required": {"samples": ["LATENT", {}],
                                               "upscale_method": [["nearest-exact", "bilinear"], {}],
                                               "scale_by": ["FLOAT", {"default": 1.5}]}},
                        "input_order": {"required": ["samples", "upscale_method", "scale_by"]}, "output": ["LATENT"],
                        "display_name": "Upscale Latent By"},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
                  "input_order": {"required": ["samples", "vae"]}, "output": ["IMAGE"], "display_name": "VAE Decode"},
    "CLIPVisionLoader": {"input": {"required": {"clip_name": [["v.safetensors"], {}]}},
                         "input_order": {"required": ["clip_name"]}, "output": ["CLIP_VISION"]},
}


def _node(id, type, widgets=(), inputs=(), mode=0, title=None, outputs=()):
    node = {"id": id, "type": type, "mode": mode, "widgets_values": list(widgets), "inputs": list(inputs),
            "outputs": list(outputs)}
    if title:
        node["title"] = title
    return node


def test_widgets_control_after_generate_and_converted_widget_links():
    workflow = {"nodes": [
        _node(1, "CheckpointLoaderSimple", ["a.safetensors"]),
        _node(2, "PrimitiveNode", [1234, "increment"]),
        _node(3, "KSampler", [7, "randomize", 20, 6.5, "ddim", "normal", 0.75],
              inputs=[{"name": "model", "type": "MODEL", "link": 1},
                      {"name": "seed", "type": "INT", "link": 2, "widget": {"name": "seed"}}], title="Sampler"),
        _node(4, "MarkdownNote", ["# notes"]),
    ], "links": [[1, 1, 0, 3, 0, "MODEL"], [2, 2, 0, 3, 1, "INT"]]}
    prompt = wf.ui_to_api(workflow, OBJECT_INFO)
    assert set(prompt) == {"1", "3"}
    assert prompt["3"]["inputs"] == {"model": ["1", 0], "seed": 1234, "steps": 20, "cfg": 6.5, "sampler_name": "ddim",
                                     "scheduler": "normal", "denoise": 0.75}
    assert prompt["3"]["_meta"]["title"] == "Sampler"
    assert prompt["1"]["_meta"]["title"] == "Load Checkpoint"


def test_upload_widget_value_is_skipped():
    workflow = {"nodes": [_node(1, "LoadImageMask", ["x.png", "image", "red"])], "links": []}
    assert wf.ui_to_api(workflow, OBJECT_INFO)["1"]["inputs"] == {"image": "x.png", "channel": "red"}
    workflow = {"nodes": [_node(1, "LoadImageMask", ["x.png", "red", "image"])], "links": []}
    assert wf.ui_to_api(workflow, OBJECT_INFO)["1"]["inputs"] == {"image": "x.png", "channel": "red"}


def test_reroute_bypass_and_mute():
    workflow = {"nodes": [
        _node(1, "LoadImage", ["x.png", "image"], outputs=[{"type": "IMAGE"}, {"type": "MASK"}]),
        _node(2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}], outputs=[{"type": "IMAGE"}]),
        _node(3, "ImageInvert", inputs=[{"name": "image", "type": "IMAGE", "link": 2}], mode=4,
              outputs=[{"type": "IMAGE"}]),
        _node(4, "SaveImage", ["bypassed"], inputs=[{"name": "images", "type": "IMAGE", "link": 3}]),
        _node(5, "ImageInvert", inputs=[{"name": "image", "type": "IMAGE", "link": 4}], mode=2),
        _node(6, "SaveImage", ["muted"], inputs=[{"name": "images", "type": "IMAGE", "link": 5}]),
    ], "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"],
                 [4, 1, 0, 5, 0, "IMAGE"], [5, 5, 0, 6, 0, "IMAGE"]]}
    prompt = wf.ui_to_api(workflow, OBJECT_INFO)
    assert set(prompt) == {"1", "4", "6"}
    assert prompt["1"]["inputs"] == {"image": "x.png"}
    assert prompt["4"]["inputs"] == {"images": ["1", 0], "filename_prefix": "bypassed"}
    assert prompt["6"]["inputs"] == {"filename_prefix": "muted"}  # its source is muted


def test_dict_widget_values_and_api_passthrough():
    workflow = {"nodes": [_node(1, "SaveImage")], "links": []}
    workflow["nodes"][0]["widgets_values"] = {"filename_prefix": "p"}
    prompt = wf.ui_to_api(workflow, OBJECT_INFO)
    assert prompt["1"]["inputs"] == {"filename_prefix": "p"}
    assert wf.is_api_format(prompt) and wf.ui_to_api(prompt, OBJECT_INFO) == prompt


def test_unknown_node_types_are_named():
    workflow = {"nodes": [_node(1, "QKVNotInstalled")], "links": []}
    with pytest.raises(wf.WorkflowError, match="QKVNotInstalled"):
        wf.ui_to_api(workflow, OBJECT_INFO)


def test_tiny_substitution_family_and_table():
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "v.safetensors"}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1}},
    }
    tiny, replaced = wf.apply_tiny_substitutions(prompt)
    assert tiny["1"] == {"class_type": "QKVTinyCheckpointLoader", "inputs": {"family": "sdxl", "seed": 0}}
    assert tiny["2"] == {"class_type": "QKVTinyCLIPVisionLoader", "inputs": {"seed": 0}}
    assert len(replaced) == 2 and prompt["1"]["class_type"] == "CheckpointLoaderSimple"  # input untouched
    assert wf.apply_tiny_substitutions(prompt, family="sd15")[0]["1"]["inputs"]["family"] == "sd15"
    with pytest.raises(wf.WorkflowError, match="QKV_CONTROL_TINY_MODELS"):
        wf.apply_tiny_substitutions(prompt, object_info=OBJECT_INFO)

    # A substitute with another output order rewires the links to it.
    table = {"CheckpointLoaderSimple": wf.TinySubstitute("Swapped", lambda inputs, family: {}, (2, 1, 0))}
    swapped, _ = wf.apply_tiny_substitutions(prompt, substitutes=table)
    assert swapped["3"]["inputs"]["model"] == ["1", 2]


def test_family_hint():
    assert wf.family_hint("sd_xl_base_1.0.safetensors") == "sdxl"
    assert wf.family_hint("juggernautXL_v9.safetensors") == "sdxl"
    assert wf.family_hint("v1-5-pruned-emaonly.safetensors") == "sd15"
    assert wf.family_hint("model.safetensors") is None


def test_missing_widget_values_get_the_frontends_defaults():
    # A widget added to a node type after the workflow was saved: the frontend fills its default.
    workflow = {"nodes": [_node(1, "EmptyLatentImage", [256])], "links": []}
    assert wf.ui_to_api(workflow, OBJECT_INFO)["1"]["inputs"] == {"width": 256, "height": 512, "batch_size": 1}
    workflow = {"nodes": [_node(1, "LoadImageMask", ["x.png", "image"])], "links": []}
    assert wf.ui_to_api(workflow, OBJECT_INFO)["1"]["inputs"] == {"image": "x.png", "channel": "alpha"}


def test_nested_subgraphs_expand_as_the_frontend_queues_them():
    fixtures = _fixtures()
    assert wf.ui_to_api(fixtures.nested_subgraph_workflow(), OBJECT_INFO) == fixtures.EXPECTED_PROMPT


def test_saved_without_unlinked_widget_inputs():
    # The frontend saves a subgraph node without its unlinked widget inputs (and renumbers the
    # link slots); the values are still read from widgets_values, in definition order.
    fixtures = _fixtures()
    workflow = fixtures.nested_subgraph_workflow()
    for node in workflow["nodes"]:
        if node["type"] == fixtures.OUTER_ID:
            node["inputs"] = [i for i in node["inputs"] if "widget" not in i or i["link"] is not None]
            for link in workflow["links"]:
                if link[3] == node["id"]:
                    link[4] = next(k for k, i in enumerate(node["inputs"]) if i["link"] == link[0])
    assert wf.ui_to_api(workflow, OBJECT_INFO) == fixtures.EXPECTED_PROMPT


def test_subgraph_errors_are_named():
    fixtures = _fixtures()
    workflow = fixtures.nested_subgraph_workflow()
    inner = workflow["definitions"]["subgraphs"][1]
    inner["nodes"][0]["type"] = "QKVNotInstalled"
    with pytest.raises(wf.WorkflowError, match="QKVNotInstalled"):
        wf.ui_to_api(workflow, OBJECT_INFO)

    workflow = fixtures.nested_subgraph_workflow()
    inner = workflow["definitions"]["subgraphs"][1]
    inner["nodes"].append({**copy.deepcopy(inner["nodes"][0]), "id": 50, "type": fixtures.OUTER_ID, "inputs": []})
    with pytest.raises(wf.WorkflowError, match="contains itself"):
        wf.ui_to_api(workflow, OBJECT_INFO)

    workflow = fixtures.nested_subgraph_workflow()
    workflow["nodes"][1]["properties"]["proxyWidgets"] = [["1", "text"]]
    with pytest.raises(wf.WorkflowError, match="proxyWidgets"):
        wf.ui_to_api(workflow, OBJECT_INFO)


def test_tiny_substitution_inside_a_subgraph():
    # The checkpoint loader inside the subgraph is replaced, and the links to it follow.
    fixtures = _fixtures()
    workflow = fixtures.nested_subgraph_workflow()
    outer = workflow["definitions"]["subgraphs"][0]
    loader = {"id": 40, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
              "outputs": [{"name": "MODEL", "type": "MODEL", "links": [140]}],
              "widgets_values": ["sd_xl_base_1.0.safetensors"], "properties": {}}
    outer["nodes"].append(loader)
    outer["links"] = [link for link in outer["links"] if link["id"] != 107]
    outer["links"].append({"id": 140, "origin_id": 40, "origin_slot": 0, "target_id": 6, "target_slot": 0,
                           "type": "MODEL"})
    next(n for n in outer["nodes"] if n["id"] == 6)["inputs"][0]["link"] = 140
    prompt = wf.ui_to_api(workflow, OBJECT_INFO)
    assert prompt["10:40"]["class_type"] == "CheckpointLoaderSimple"
    # Inner's node 1 is renumbered after the highest id seen so far (40), as the frontend does.
    assert prompt["10:6:41"]["inputs"]["model"] == ["10:40", 0]
    tiny, replaced = wf.apply_tiny_substitutions(prompt)
    assert tiny["10:40"] == {"class_type": "QKVTinyCheckpointLoader", "inputs": {"family": "sdxl", "seed": 0},
                             "_meta": {"title": "Load Checkpoint"}}
    assert "10:40: CheckpointLoaderSimple -> QKVTinyCheckpointLoader" in replaced
    table = {"CheckpointLoaderSimple": wf.TinySubstitute("Swapped", lambda inputs, family: {}, (2, 1, 0))}
    swapped, _ = wf.apply_tiny_substitutions(prompt, substitutes=table)
    assert swapped["10:6:41"]["inputs"]["model"] == ["10:40", 2]
    assert swapped["13:6:41"]["inputs"]["model"] == ["13:40", 2]  # both instances share the definition
    assert wf.substituted_model_files(prompt) == {
        "checkpoints": {"v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"}}


def test_promoted_widgets_name_every_input_they_feed():
    from qkv_control.client.sweep import UsageError, build_sweep

    fixtures = _fixtures()
    expansion = wf.expand_workflow(fixtures.nested_subgraph_workflow(), OBJECT_INFO)
    assert expansion.prompt == fixtures.EXPECTED_PROMPT
    targets = {(w.node_id, w.name): w.targets for w in expansion.promoted}
    # Instance 10's seed reaches the KSampler two levels down; 13's seed comes from a Primitive
    # outside, so it is no widget value; the nested instance's own steps widget feeds both.
    assert targets == {("10", "text"): (("10:18", "text"),), ("10", "seed"): (("10:6:19", "seed"),),
                       ("13", "text"): (("13:18", "text"),),
                       ("10:6", "steps"): (("10:6:19", "steps"),), ("13:6", "steps"): (("13:6:19", "steps"),)}
    sweep = build_sweep(expansion.prompt, ["10.seed=1..2", "13.text=[\"a\", \"b\"]"], [], OBJECT_INFO,
                        promoted=expansion.promoted)
    assert sweep.axes["10.seed"].targets == (("10:6:19", "seed"),)
    with pytest.raises(UsageError, match="ambiguous"):
        build_sweep(expansion.prompt, ["Outer.seed=1"], [], OBJECT_INFO, promoted=expansion.promoted)
    with pytest.raises(UsageError, match="widgets: seed, text"):
        build_sweep(expansion.prompt, ["10.cfg=1"], [], OBJECT_INFO, promoted=expansion.promoted)


def test_dit_loaders_name_every_file_they_read():
    """A Flux workflow's separate loaders (diffusion model, two text encoders, VAE) each name their
    files by models/ folder, so a test server can list every one of them (no missing-model outline)."""
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                          "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "3": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "clip_g.safetensors",
                                                            "clip_name2": "clip_l.safetensors",
                                                            "clip_name3": "t5xxl_fp8.safetensors"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
    }
    assert wf.substituted_model_files(prompt) == {
        "diffusion_models": {"flux1-dev.safetensors"},
        "text_encoders": {"clip_l.safetensors", "t5xxl_fp16.safetensors", "clip_g.safetensors",
                          "t5xxl_fp8.safetensors"},
        "vae": {"ae.safetensors"}}
