"""The localization nodes and ComfyUI's core nodes in one graph, on the real server.

MCA-Ctrl's automatic-mask workflow (its API copy, tiny models) with its masks rewired through core nodes:
core ``BOUNDING_BOX`` values (``PrimitiveBoundingBox``: one dict) into QKV SAM Points and Boxes to Mask on a
batch of one and a batch of two images, its MASK through core mask nodes (``GrowMask``, ``MaskComposite``)
into MCA-Ctrl's target mask, a subject mask made by core nodes alone (``ImageToMask``, ``ThresholdMask``,
``InvertMask``) into MCA-Ctrl, and Text to Mask's BOUNDING_BOX (a list per image) into core's ``DrawBBoxes``. The saved masks are compared with the same pipeline run in this process on the same tiny
files (exact: 0/255 pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from qkv_control.client.prompt_api import output_files
from qkv_control.localization import loading, pipeline, prompts
from qkv_control.tiny.localization_files import SAM_FILE, write_tiny_localization_files

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "api" / "mca_ctrl_replacement_auto_mask.json"
GREY_BOX = {"x": 18, "y": 48, "width": 46, "height": 50}  # the grey box of workflows/inputs/mca_scene.png


def node_of(graph: dict, class_type: str, **inputs) -> str:
    """The id of the one node of ``class_type`` whose inputs include ``inputs``."""
    found = [k for k, v in graph.items() if v["class_type"] == class_type
             and all(v["inputs"].get(name) == value for name, value in inputs.items())]
    assert len(found) == 1, (class_type, inputs, found)
    return found[0]


def load_image(name: str) -> torch.Tensor:
    """What core LoadImage makes of a file: ``[1, H, W, 3]`` float32 ``k / 255``."""
    image = ImageOps.exif_transpose(Image.open(ROOT / "workflows" / "inputs" / name)).convert("RGB")
    return torch.from_numpy(np.array(image).astype(np.float32) / 255.0)[None]


def saved(comfy_server, entry: dict, node_id: str, mode: str) -> list[np.ndarray]:
    """The images one SaveImage node of a finished prompt wrote."""
    return [np.asarray(Image.open(comfy_server.output_directory / f["subfolder"] / f["filename"]).convert(mode))
            for f in output_files(entry) if f["node_id"] == node_id and f["type"] == "output"]


def test_pack_nodes_take_core_masks_and_boxes_and_core_nodes_take_theirs(comfy_server, tmp_path):
    prompt = comfy_server.api_prompt(WORKFLOW, tiny=True)
    sam = node_of(prompt, "QKVSamLoader")
    subject_image = node_of(prompt, "LoadImage", image="mca_subject.png")
    scene_image = node_of(prompt, "LoadImage", image="mca_scene.png")
    replace = node_of(prompt, "QKVMCACtrlReplace")
    target_text = node_of(prompt, "QKVTextSegment", prompt="grey box")
    prompt[target_text]["inputs"]["box_threshold"] = 0.0  # every query: boxes for DrawBBoxes to draw

    def add(node_id: str, class_type: str, **inputs) -> list:
        prompt[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]

    box = add("900", "PrimitiveBoundingBox", **GREY_BOX)
    sam_options = dict(positive_coords="[]", negative_coords="[]", multimask_output=False, keep="union")
    target = add("901", "QKVSamSegment", sam=[sam, 0], image=[scene_image, 0], bboxes=box, **sam_options)
    add("902", "SaveImage", images=add("903", "MaskToImage", mask=target), filename_prefix="loc_core/target")
    grown = add("904", "GrowMask", mask=target, expand=2, tapered_corners=True)
    # The tiny random SAM leaks past its box: keep the region inside it (MCA-Ctrl needs scene background).
    region = add("913", "MaskComposite", destination=add("914", "SolidMask", value=0.0, width=128, height=128),
                 source=add("915", "SolidMask", value=1.0, width=GREY_BOX["width"], height=GREY_BOX["height"]),
                 x=GREY_BOX["x"], y=GREY_BOX["y"], operation="add")
    target_region = add("916", "MaskComposite", destination=grown, source=region, x=0, y=0, operation="multiply")
    # The subject (an orange toy on near-white) from core nodes alone: low blue = subject.
    blue = add("905", "ImageToMask", image=[subject_image, 0], channel="blue")
    subject = add("906", "InvertMask", mask=add("917", "ThresholdMask", mask=blue, value=0.5))
    prompt[replace]["inputs"].update(subject_mask=subject, target_mask=target_region)  # core MASKs into MCA-Ctrl
    pair = add("907", "RepeatImageBatch", image=[scene_image, 0], amount=2)
    batch = add("908", "QKVSamSegment", sam=[sam, 0], image=pair, bboxes=box, **sam_options)
    add("909", "SaveImage", images=add("910", "MaskToImage", mask=batch), filename_prefix="loc_core/batch")
    # Core's DrawBBoxes is not in every supported ComfyUI (0.16.3 has the BOUNDING_BOX type, not this node).
    draws_boxes = "DrawBBoxes" in comfy_server.object_info()
    if draws_boxes:
        drawn = add("911", "DrawBBoxes", image=[scene_image, 0], bboxes=[target_text, 2])
        add("912", "SaveImage", images=drawn, filename_prefix="loc_core/boxes")

    entry = comfy_server.run(prompt, tiny=False, timeout=600)

    # The same SAM on the same tiny files, in this process.
    files = write_tiny_localization_files(tmp_path / "models")
    bundle = loading.load_sam(files["sam"])
    assert Path(files["sam"]).name == SAM_FILE
    scene = load_image("mca_scene.png")
    expected = pipeline.prompts_to_masks(bundle, scene, [[]], [[]], prompts.boxes_per_image(GREY_BOX, 1),
                                         multimask_output=False).masks
    (target_png,) = saved(comfy_server, entry, "902", "L")
    assert np.array_equal(target_png, (expected[0].numpy() * 255).astype(np.uint8))
    assert 0 < expected.sum() < expected.numel()
    batch_pngs = saved(comfy_server, entry, "909", "L")
    assert len(batch_pngs) == 2 and all(np.array_equal(p, target_png) for p in batch_pngs)  # one box, both images

    if draws_boxes:
        (boxes_png,) = saved(comfy_server, entry, "912", "RGB")
        assert boxes_png.shape == (128, 128, 3)
        assert not np.array_equal(boxes_png, (scene[0].numpy() * 255).round().astype(np.uint8))  # boxes drawn

    (replaced,) = saved(comfy_server, entry, node_of(prompt, "SaveImage", filename_prefix="qkv_mca_ctrl_replace"),
                        "RGB")
    assert replaced.astype(np.float32).std() > 1.0  # MCA-Ctrl sampled with the core-made masks
