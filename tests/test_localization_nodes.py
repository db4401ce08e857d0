"""Localization nodes in-process: loaders read the tiny ORIGINAL-format files through folder_paths, models
go through ComfyUI's model management, the segment nodes match the plain pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comfy.model_management
import folder_paths
from qkv_control.localization import pipeline, prompts
from qkv_control.localization.detection import DetectionOptions
from qkv_control.localization.managed import GROUNDING_DINO_FOLDER, SAM_FOLDER, ManagedLocalizationModel, model_choices
from qkv_control.nodes.localization_nodes import (
    NODES,
    QKVGroundingDinoLoader,
    QKVSamLoader,
    QKVSamSegment,
    QKVTextSegment,
)
from qkv_control.tiny.localization_files import GROUNDING_DINO_FILE, SAM_FILE, write_tiny_localization_files

ROOT = Path(__file__).resolve().parents[1]
BERT_WEIGHTS = ("bert-base-uncased/model.safetensors", "my-bert/model.safetensors",
                "models--bert-base-uncased/snapshots/86b5e0/model.safetensors")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    files = write_tiny_localization_files(root)
    gdino_dir = root / "grounding-dino"
    (root / "sams" / "not_a_model.pth").write_bytes(b"PK\x03\x04 truncated")
    shutil.copy(root / "sams" / SAM_FILE, gdino_dir / "sam_in_wrong_folder.pth")
    # Users who copied whole BERT repositories also have BERT's own weights there: never offered.
    for name in BERT_WEIGHTS:
        folder = (gdino_dir / name).parent
        if folder != files["bert_dir"]:
            shutil.copytree(files["bert_dir"], folder)
        (gdino_dir / name).write_bytes(b"not listed")
    # A Hugging Face-format Grounding DINO folder (its own vocab.txt): offered.
    hf = gdino_dir / "grounding-dino-tiny"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "grounding-dino"}))
    (hf / "model.safetensors").write_bytes(b"listed")
    return root


@pytest.fixture
def model_folders(models_dir, monkeypatch):
    extensions = {".pth", ".safetensors"}
    monkeypatch.setitem(folder_paths.folder_names_and_paths, GROUNDING_DINO_FOLDER,
                        ([str(models_dir / "grounding-dino")], extensions))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, SAM_FOLDER, ([str(models_dir / "sams")], extensions))
    folder_paths.filename_list_cache.clear()
    yield models_dir
    folder_paths.filename_list_cache.clear()


@pytest.fixture
def loaded(model_folders):
    (gdino,) = QKVGroundingDinoLoader.execute(GROUNDING_DINO_FILE)
    (sam,) = QKVSamLoader.execute(SAM_FILE)
    return gdino, sam


def red_square_batch():
    images = torch.full((2, 96, 128, 3), 0.4)
    images[0, 20:60, 30:80] = torch.tensor([1.0, 0.0, 0.0])
    images[1, 50:90, 60:120] = torch.tensor([1.0, 0.1, 0.1])
    return images


def text_segment(gdino, sam, images, **overrides):
    values = dict(prompt="red square", box_threshold=0.55, text_threshold=0.25, keep="union", dilation=1,
                  detection_resolution=128)
    values.update(overrides)
    return QKVTextSegment.execute(gdino, sam, images, **values)


def test_model_folders_are_registered_under_the_usual_names():
    for name in (GROUNDING_DINO_FOLDER, SAM_FOLDER):
        paths, extensions = folder_paths.folder_names_and_paths[name]
        assert str(Path(folder_paths.models_dir) / name) in paths
        assert {".pth", ".safetensors"} <= set(extensions)


def test_loader_choices_list_model_files_not_berts_own_weights(model_folders):
    listed = set(folder_paths.get_filename_list(GROUNDING_DINO_FOLDER))
    assert set(BERT_WEIGHTS) <= listed  # ComfyUI itself would list them ...
    choices = model_choices(GROUNDING_DINO_FOLDER)
    assert not set(BERT_WEIGHTS) & set(choices)  # ... the dropdown does not
    assert {GROUNDING_DINO_FILE, "grounding-dino-tiny/model.safetensors", "sam_in_wrong_folder.pth"} <= set(choices)
    assert SAM_FILE in model_choices(SAM_FOLDER)


def test_loaders_give_managed_models(loaded):
    for model in loaded:
        assert isinstance(model, ManagedLocalizationModel)
        assert isinstance(model.patcher, comfy.model_patcher.ModelPatcher)
        assert model.patcher.model.net is model.net  # the patcher moves the very model the pipeline runs
        assert model.patcher.model_size() > 0


def test_text_segment_node_matches_plain_pipeline_and_loads_through_model_management(loaded, monkeypatch):
    gdino, sam = loaded
    loaded_lists = []
    real_load = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu",
                        lambda models, *a, **k: (loaded_lists.append(list(models)), real_load(models, *a, **k))[1])
    images = red_square_batch()
    mask, preview, bboxes = text_segment(gdino, sam, images)
    assert loaded_lists and loaded_lists[0] == [gdino.patcher, sam.patcher]
    reference = pipeline.text_to_masks(gdino.bundle, sam.bundle, images, "red square", box_threshold=0.55,
                                       dilation=1, detection_size=128)
    assert mask.shape == (2, 96, 128) and preview.shape == (2, 96, 128, 3)
    assert torch.equal(mask, reference.masks)
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(preview, pipeline.preview(images, reference))
    assert bboxes == prompts.detections_to_bounding_boxes(reference.detections)
    assert len(bboxes) == 2 and all(bboxes) and {"x", "y", "width", "height", "score", "label"} <= set(bboxes[0][0])


def test_text_segment_options_reach_the_detector(loaded):
    gdino, sam = loaded
    images = red_square_batch()
    _, _, official = text_segment(gdino, sam, images, keep="all")
    _, _, ranked = text_segment(gdino, sam, images, keep="all", sort_by_score=True, drop_phraseless=True,
                                clip_boxes=True)
    reference = pipeline.text_to_masks(gdino.bundle, sam.bundle, images, "red square", box_threshold=0.55,
                                       keep="all", detection_size=128,
                                       options=DetectionOptions(sort_by_score=True, clip_boxes=True,
                                                                drop_phraseless=True))
    assert ranked == prompts.detections_to_bounding_boxes(reference.detections)
    scores = [d["score"] for d in ranked[0]]
    assert scores == sorted(scores, reverse=True) and [d["score"] for d in official[0]] != scores


def test_text_segment_node_checks_for_interrupt(loaded):
    gdino, sam = loaded
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            text_segment(gdino, sam, red_square_batch())
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_sam_segment_node_matches_plain_pipeline(loaded):
    _, sam = loaded
    images = red_square_batch()
    positive = '[{"x": 50, "y": 40}]'
    negative = '[{"x": 5, "y": 5}]'
    bboxes = [[{"x": 30, "y": 20, "width": 50, "height": 40}], [{"x": 60, "y": 50, "width": 60, "height": 40}]]
    mask, preview = QKVSamSegment.execute(sam, images, positive, negative, True, "union", bboxes)
    reference = pipeline.prompts_to_masks(sam.bundle, images, [[(50.0, 40.0)]] * 2, [[(5.0, 5.0)]] * 2,
                                          [[(30.0, 20.0, 80.0, 60.0)], [(60.0, 50.0, 120.0, 90.0)]],
                                          multimask_output=True, keep="union")
    assert mask.shape == (2, 96, 128) and torch.equal(mask, reference.masks)
    assert torch.equal(preview, pipeline.preview(images, reference))
    (points_only, _) = QKVSamSegment.execute(sam, images, positive, "[]", False, "all")
    assert points_only.shape == (2, 96, 128)  # one prompt per image, one candidate
    (candidates, _) = QKVSamSegment.execute(sam, images, positive, "[]", True, "all")
    assert candidates.shape == (6, 96, 128)  # three candidates per prompt, images in order


def test_sam_segment_node_takes_core_bounding_box_shapes(loaded):
    _, sam = loaded
    images = red_square_batch()
    box = {"x": 30, "y": 20, "width": 50, "height": 40}
    one, _ = QKVSamSegment.execute(sam, images, "", "", False, "union", box)  # PrimitiveBoundingBox
    frame, _ = QKVSamSegment.execute(sam, images, "", "", False, "union", [[box]])  # CreateBoundingBoxes
    listed, _ = QKVSamSegment.execute(sam, images, "", "", False, "union", [box])
    assert torch.equal(one, frame) and torch.equal(one, listed) and one.shape == (2, 96, 128)
    per_image, _ = QKVSamSegment.execute(sam, images, "", "", False, "all", [[box, box], []])
    assert per_image.shape == (3, 96, 128) and per_image[2].sum() == 0  # 2 boxes, then an empty image


@pytest.mark.parametrize("node,call,message", [
    ("QKVSamSegment", lambda sam: QKVSamSegment.execute(sam, red_square_batch(), "[]", "[]", True, "union"),
     "expected at least one point .* or box .*, got none"),
    ("QKVSamSegment", lambda sam: QKVSamSegment.execute(sam, red_square_batch(), "[{x: 1}]", "[]", True, "union"),
     "expected positive_coords as JSON"),
    ("QKVSamSegment", lambda sam: QKVSamSegment.execute(sam, red_square_batch(), "[]", "[]", True, "union",
                                                        [[], [], []]),
     r"expected boxes for 1 image \(used for all\) or for each of the 2 images, got 3 lists"),
    ("QKVSamSegment", lambda sam: QKVSamSegment.execute(sam, torch.rand(1, 8, 8, 5), '[{"x": 1, "y": 1}]', "[]",
                                                        True, "union"),
     r"expected an IMAGE \[B, H, W, 1-4 channels\], got shape \(1, 8, 8, 5\)"),
])
def test_bad_prompts_are_value_errors_naming_the_node(loaded, node, call, message):
    _, sam = loaded
    display = next(n for n in NODES if n.define_schema().node_id == node).define_schema().display_name
    with pytest.raises(ValueError, match=f"^{display}: {message}"):
        call(sam)


def test_wrong_file_in_loader_is_a_value_error_naming_the_node(model_folders):
    with pytest.raises(ValueError, match=r"^QKV Load SAM: expected a Segment Anything .*wrong or truncated"):
        QKVSamLoader.execute("not_a_model.pth")
    with pytest.raises(ValueError, match=r"^QKV Load Grounding DINO: expected a Grounding DINO checkpoint .* "
                                         r"got a SAM checkpoint"):
        QKVGroundingDinoLoader.execute("sam_in_wrong_folder.pth")


def test_empty_prompt_is_refused_before_running():
    assert QKVTextSegment.validate_inputs(prompt=" . ").startswith("QKV Text to Mask (Grounding DINO and SAM): ")
    assert QKVTextSegment.validate_inputs(prompt="dog") is True


def test_node_schemas_follow_the_pack_conventions():
    for node in NODES:
        schema = node.define_schema()
        assert schema.node_id.startswith("QKV")
        assert schema.display_name == node.DISPLAY_NAME  # the name every error of the node starts with
        assert schema.category == "QKV Control/Localization"
        assert schema.description
        assert all(i.tooltip for i in schema.inputs), schema.node_id
        assert all(o.tooltip for o in schema.outputs), schema.node_id
        assert len(schema.search_aliases) >= 4, schema.node_id
        assert (ROOT / "web" / "docs" / f"{schema.node_id}.md").is_file()
    aliases = {a for node in NODES for a in node.define_schema().search_aliases}
    assert {"segment", "mask from text", "grounding dino", "sam", "detect", "box to mask", "points to mask"} <= aliases


def test_outputs_speak_core_types():
    text = QKVTextSegment.define_schema()
    assert [o.get_io_type() for o in text.outputs] == ["MASK", "IMAGE", "BOUNDING_BOX"]
    sam = QKVSamSegment.define_schema()
    bboxes = next(i for i in sam.inputs if i.id == "bboxes")
    assert bboxes.get_io_type() == "BOUNDING_BOX" and bboxes.optional


def _widgets(schema) -> list:
    return [i for i in schema.inputs if i.get_io_type() not in ("QKV_GROUNDING_DINO", "QKV_SAM", "IMAGE",
                                                                 "BOUNDING_BOX")]


@pytest.mark.parametrize("name,node", [("text_to_mask", QKVTextSegment), ("sam_point_prompts", QKVSamSegment)])
def test_localization_workflows_wire_their_nodes(name, node):
    workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    by_id = {n["id"]: n for n in workflow["nodes"]}
    types = {n["type"] for n in workflow["nodes"]}
    schema = node.define_schema()
    assert {"LoadImage", "QKVSamLoader", schema.node_id, "MarkdownNote"} <= types
    image = next(n for n in workflow["nodes"] if n["type"] == "LoadImage")["widgets_values"][0]
    assert (ROOT / "workflows" / "inputs" / image).is_file()
    segment = next(n for n in workflow["nodes"] if n["type"] == schema.node_id)
    widgets = _widgets(schema)
    required = [i for i in widgets if not i.optional]
    assert len(required) <= len(segment["widgets_values"]) <= len(widgets)  # optional widgets may be left out
    for link_id, origin, _slot, target, _tslot, kind in workflow["links"]:
        assert origin in by_id and target in by_id, link_id
    sam = next(n for n in workflow["nodes"] if n["type"] == "QKVSamLoader")["widgets_values"][0]
    assert sam == SAM_FILE  # the tiny files carry the released names


def test_point_workflow_points_land_on_its_subject():
    workflow = json.loads((ROOT / "workflows" / "sam_point_prompts.json").read_text())
    segment = next(n for n in workflow["nodes"] if n["type"] == "QKVSamSegment")
    positive, negative = (prompts.points_per_image(v, 1)[0] for v in segment["widgets_values"][:2])
    image_name = next(n for n in workflow["nodes"] if n["type"] == "LoadImage")["widgets_values"][0]
    pixels = torch.from_numpy(np.array(Image.open(ROOT / "workflows" / "inputs" / image_name).convert("RGB")))
    red = (pixels[..., 0] > 200) & (pixels[..., 2] < 100)
    assert positive and negative
    assert all(red[int(y), int(x)] for x, y in positive) and not any(red[int(y), int(x)] for x, y in negative)
