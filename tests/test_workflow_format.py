"""UI -> API conversion and tiny substitution (client/workflow_format.py), without a server.

The object_info below copies the shapes ComfyUI v0.30.0 serves for these core nodes.
"""

from __future__ import annotations

import pytest

from qkv_control.client import workflow_format as wf

OBJECT_INFO = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [["a.safetensors", "sd_xl_base_1.0.safetensors"], {}]}},
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
    "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {}]}},
                  "input_order": {"required": ["images", "filename_prefix"]}, "output": [], "display_name": "Save"},
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
