"""Localization nodes in-process: loaders read the tiny ORIGINAL-format files through folder_paths, models
go through ComfyUI's model management, the segment node matches the plain pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import comfy.model_management
import folder_paths
from qkv_control.localization import pipeline
from qkv_control.localization.managed import GROUNDING_DINO_FOLDER, SAM_FOLDER, ManagedLocalizationModel
from qkv_control.nodes.localization_nodes import NODES, QKVGroundingDinoLoader, QKVSamLoader, QKVTextSegment
from qkv_control.tiny.localization_files import GROUNDING_DINO_FILE, SAM_FILE, write_tiny_localization_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_tiny_localization_files(root)
    (root / "sams" / "not_a_model.pth").write_bytes(b"PK\x03\x04 truncated")
    shutil.copy(root / "sams" / SAM_FILE, root / "grounding-dino" / "sam_in_wrong_folder.pth")
    # A user who copied the whole bert-base-uncased repository also has its weights there.
    (root / "grounding-dino" / "bert-base-uncased" / "model.safetensors").write_bytes(b"not listed")
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


def test_model_folders_are_registered_under_the_usual_names():
    for name in (GROUNDING_DINO_FOLDER, SAM_FOLDER):
        paths, extensions = folder_paths.folder_names_and_paths[name]
        assert str(Path(folder_paths.models_dir) / name) in paths
        assert {".pth", ".safetensors"} <= set(extensions)


def test_loader_choices_list_model_files_not_the_bert_folder(model_folders):
    from qkv_control.localization.managed import model_choices

    choices = model_choices(GROUNDING_DINO_FOLDER)
    assert GROUNDING_DINO_FILE in choices and not [c for c in choices if "bert-base-uncased" in c]
    assert SAM_FILE in model_choices(SAM_FOLDER)


def test_loaders_give_managed_models(loaded):
    for model in loaded:
        assert isinstance(model, ManagedLocalizationModel)
        assert isinstance(model.patcher, comfy.model_patcher.ModelPatcher)
        assert model.patcher.model.net is model.net  # the patcher moves the very model the pipeline runs
        assert model.patcher.model_size() > 0


def test_segment_node_matches_plain_pipeline_and_loads_through_model_management(loaded, monkeypatch):
    gdino, sam = loaded
    loaded_lists = []
    real_load = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu",
                        lambda models, *a, **k: (loaded_lists.append(list(models)), real_load(models, *a, **k))[1])
    images = red_square_batch()
    mask, preview = QKVTextSegment.execute(gdino, sam, images, "red square", 0.55, 0.25, "union", 1, 128)
    assert loaded_lists and loaded_lists[0] == [gdino.patcher, sam.patcher]
    reference = pipeline.text_to_masks(gdino.net, gdino.bundle.tokenizer, sam.net, sam.bundle.pixel_mean,
                                       sam.bundle.pixel_std, images, "red square", box_threshold=0.55, dilation=1,
                                       detection_size=128)
    assert mask.shape == (2, 96, 128) and preview.shape == (2, 96, 128, 3)
    assert torch.equal(mask, reference.masks)
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(preview, pipeline.preview(images, reference))


def test_segment_node_checks_for_interrupt(loaded):
    gdino, sam = loaded
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            QKVTextSegment.execute(gdino, sam, red_square_batch(), "red square", 0.3, 0.25, "union", 0, 128)
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_wrong_file_in_loader_is_a_value_error_naming_the_node(model_folders):
    with pytest.raises(ValueError, match=r"^QKV Load SAM: expected a Segment Anything .*wrong or truncated"):
        QKVSamLoader.execute("not_a_model.pth")
    with pytest.raises(ValueError, match=r"^QKV Load Grounding DINO: expected a Grounding DINO checkpoint .* "
                                         r"got a SAM checkpoint"):
        QKVGroundingDinoLoader.execute("sam_in_wrong_folder.pth")


def test_empty_prompt_is_refused_before_running():
    assert QKVTextSegment.validate_inputs(prompt=" . ").startswith("QKV Text to Mask")
    assert QKVTextSegment.validate_inputs(prompt="dog") is True


def test_node_schemas_follow_the_pack_conventions():
    for node in NODES:
        schema = node.define_schema()
        assert schema.node_id.startswith("QKV")
        assert schema.category == "QKV Control/Localization"
        assert schema.description
        assert all(i.tooltip for i in schema.inputs), schema.node_id
        assert all(o.tooltip for o in schema.outputs), schema.node_id
        assert (ROOT / "web" / "docs" / f"{schema.node_id}.md").is_file()


def test_text_to_mask_workflow_wires_the_localization_nodes():
    workflow = json.loads((ROOT / "workflows" / "text_to_mask.json").read_text())
    by_id = {n["id"]: n for n in workflow["nodes"]}
    types = {n["type"] for n in workflow["nodes"]}
    assert {"LoadImage", "QKVGroundingDinoLoader", "QKVSamLoader", "QKVTextSegment", "MarkdownNote"} <= types
    image = next(n for n in workflow["nodes"] if n["type"] == "LoadImage")["widgets_values"][0]
    assert (ROOT / "workflows" / "inputs" / image).is_file()
    segment = next(n for n in workflow["nodes"] if n["type"] == "QKVTextSegment")
    schema = QKVTextSegment.define_schema()
    widgets = [i.id for i in schema.inputs if i.get_io_type() not in ("QKV_GROUNDING_DINO", "QKV_SAM", "IMAGE")]
    assert len(segment["widgets_values"]) == len(widgets)
    for link_id, origin, _slot, target, _tslot, kind in workflow["links"]:
        assert origin in by_id and target in by_id, link_id
    gdino = next(n for n in workflow["nodes"] if n["type"] == "QKVGroundingDinoLoader")["widgets_values"][0]
    sam = next(n for n in workflow["nodes"] if n["type"] == "QKVSamLoader")["widgets_values"][0]
    assert (gdino, sam) == (GROUNDING_DINO_FILE, SAM_FILE)  # the tiny files carry the released names
