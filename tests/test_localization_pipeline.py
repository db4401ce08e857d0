"""Tiny Grounding DINO + SAM files in the ORIGINAL and Hugging Face formats, loaded by the real loader
code, segmenting synthetic images; post-processing cross-checked with transformers' own processors (the
official libraries' behaviour is tests/test_localization_reference.py's)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil

import pytest
import torch

from qkv_control.localization import bert_files, detection, images, loading, pipeline, segmentation
from qkv_control.localization.checkpoint_io import CheckpointError
from qkv_control.localization.detection import DetectionOptions
from qkv_control.localization.segmentation import SamPrompts
from qkv_control.tiny.localization_files import tiny_grounding_dino, tiny_sam

pytest_plugins = ["localization_fixtures"]  # files, gdino, sam

SIZE = 128  # detection resolution for the tiny model (the real default is 800)


def square_image(height=96, width=128, box=(30, 70, 40, 90), color=(1.0, 0.0, 0.0)):
    """A coloured rectangle (rows y0:y1, cols x0:x1) on a blue-grey background, [H, W, 3]."""
    image = torch.full((height, width, 3), 0.3)
    image[..., 2] = 0.6
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = torch.tensor(color)
    return image


def run(gdino, sam, images, prompt="red square", **options):
    options.setdefault("detection_size", SIZE)
    return pipeline.text_to_masks(gdino, sam, images, prompt, **options)


def sam_box_masks(sam, image, boxes):
    return segmentation.segment(sam.model, sam.pixel_mean, sam.pixel_std, image, SamPrompts.of(boxes=boxes)).masks[:, 0]


def test_original_files_load_to_the_models_they_were_written_from(gdino, sam):
    for loaded, reference in ((gdino.model, tiny_grounding_dino()), (sam.model, tiny_sam())):
        expected = reference.state_dict()
        got = loaded.state_dict()
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_hugging_face_folders_load_and_give_the_same_masks(tmp_path, gdino, sam, files):
    gd_dir, sam_dir = tmp_path / "grounding-dino-tiny", tmp_path / "sam-tiny"
    gdino.model.save_pretrained(gd_dir)
    shutil.copy(files["bert_dir"] / "vocab.txt", gd_dir / "vocab.txt")
    sam.model.save_pretrained(sam_dir)
    hf_gdino = loading.load_grounding_dino(gd_dir / "model.safetensors")
    hf_sam = loading.load_sam(sam_dir / "model.safetensors")
    image = square_image().unsqueeze(0)
    expected = run(gdino, sam, image, box_threshold=0.0, text_threshold=0.0)
    got = run(hf_gdino, hf_sam, image, box_threshold=0.0, text_threshold=0.0)
    assert len(got.detections[0]) == len(expected.detections[0]) > 0
    assert torch.equal(got.masks, expected.masks)


def test_detections_match_transformers_post_processing(gdino):
    """Thresholding and box conversion against GroundingDinoProcessor.post_process_grounded_object_detection
    (which, like the official predict(), keeps query order and does not clip)."""
    from transformers import GroundingDinoProcessor

    image = square_image()
    caption = detection.prepare_caption("red square")
    tokens = detection.tokenize_caption(gdino.tokenizer, caption, 64)
    with torch.no_grad():
        outputs = gdino.model(pixel_values=images.grounding_dino_pixels(image, SIZE), **tokens)
    threshold = float(outputs.logits.sigmoid().max(-1).values.median())  # about half the queries pass
    ours = detection.detections_from_outputs(outputs.logits[0], outputs.pred_boxes[0], tokens["input_ids"][0],
                                             gdino.tokenizer, threshold, 0.0, 96, 128)
    processor = GroundingDinoProcessor.__new__(GroundingDinoProcessor)  # post-processing needs the tokenizer only
    processor.tokenizer = gdino.tokenizer
    reference = processor.post_process_grounded_object_detection(
        outputs, tokens["input_ids"], threshold=threshold, text_threshold=0.0, target_sizes=[(96, 128)])[0]
    assert 0 < len(ours) == len(reference["scores"]) < outputs.logits.shape[1]
    assert torch.allclose(torch.tensor([d.box for d in ours]), reference["boxes"], atol=1e-4)
    assert torch.allclose(torch.tensor([d.score for d in ours]), reference["scores"], atol=1e-6)
    # text_threshold 0: every caption token, special ones included, then "." removed (official phrases).
    everything = gdino.tokenizer.decode(tokens["input_ids"][0].tolist()).replace(".", "")
    assert all(d.phrase == everything for d in ours) and "[CLS]" in everything


def test_every_query_over_the_box_threshold_is_a_detection_whatever_its_phrase(gdino):
    image = square_image()
    loose = detection.detect(gdino.model, gdino.tokenizer, image, "red square", 0.0, 0.0, size=SIZE)
    cut = sorted(d.score for d in loose)[len(loose) // 2]
    strict = detection.detect(gdino.model, gdino.tokenizer, image, "red square", 0.0, cut, size=SIZE)
    assert len(strict) == len(loose) == gdino.model.config.num_queries  # box threshold 0: every query
    assert [d.query for d in strict] == list(range(len(strict)))  # query order
    assert any(not d.phrase.replace("[CLS]", "").replace("[SEP]", "").strip() for d in strict)
    dropped = detection.detect(gdino.model, gdino.tokenizer, image, "red square", 0.0, cut, size=SIZE,
                               options=DetectionOptions(drop_phraseless=True))
    assert 0 < len(dropped) < len(strict)
    assert all({"red", "square"} & set(d.phrase.split()) for d in dropped)


def test_sam_masks_match_transformers_post_processing(sam):
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    image = square_image()
    boxes = torch.tensor([[40.0, 30.0, 90.0, 70.0], [0.0, 0.0, 64.0, 20.0]])
    masks = sam_box_masks(sam, image, boxes)

    target = sam.model.config.vision_config.image_size
    pixels, shape = images.sam_pixels(image, target, sam.pixel_mean, sam.pixel_std)
    assert shape == (48, 64)  # longest side 128 -> 64
    with torch.no_grad():
        out = sam.model(pixel_values=pixels, input_boxes=(boxes * 0.5).unsqueeze(0), multimask_output=False)
    processor = SamImageProcessorPil(pad_size={"height": target, "width": target})
    reference = processor.post_process_masks(out.pred_masks, [(96, 128)], [shape])[0][:, 0]
    assert masks.shape == (2, 96, 128) and masks.dtype == torch.bool
    assert torch.equal(masks, reference.bool())


@pytest.mark.parametrize("height,width,expected", [
    (480, 640, (800, 1066)), (640, 480, (1066, 800)), (100, 1000, (133, 1330)), (800, 900, (800, 900)),
])
def test_detection_resize_follows_dino_random_resize(height, width, expected):
    assert images.detection_resize_shape(height, width) == expected


def test_union_best_and_all_keep_the_right_detections(gdino, sam):
    image = square_image()
    detections = detection.detect(gdino.model, gdino.tokenizer, image, "red square", 0.5, 0.25, size=SIZE)
    assert len(detections) >= 2
    per_box = sam_box_masks(sam, image, [d.box for d in detections])
    top = max(range(len(detections)), key=lambda k: detections[k].score)
    assert top != 0  # query order is not score order here, so "best" is really chosen by score
    batch = image.unsqueeze(0)
    union = run(gdino, sam, batch, box_threshold=0.5, keep="union")
    best = run(gdino, sam, batch, box_threshold=0.5, keep="best")
    every = run(gdino, sam, batch, box_threshold=0.5, keep="all")
    assert torch.equal(union.masks[0], per_box.any(dim=0).float())
    assert torch.equal(best.masks[0], per_box[top].float())
    assert torch.equal(every.masks, per_box.float()) and every.image_index == [0] * len(detections)
    ranked = run(gdino, sam, batch, box_threshold=0.5, keep="all", options=DetectionOptions(sort_by_score=True))
    order = sorted(range(len(detections)), key=lambda k: -detections[k].score)
    assert torch.equal(ranked.masks, per_box[order].float())


def test_clip_boxes_option_clips_the_box_prompts(gdino, sam):
    import copy

    # The tiny model's boxes all lie inside the image: push them right and widen them (box head biases).
    shifted = copy.deepcopy(gdino)
    with torch.no_grad():
        for head in shifted.model.bbox_embed:
            head.layers[-1].bias[0] += 2.0
            head.layers[-1].bias[2] += 2.0
    image = square_image()
    raw = detection.detect(shifted.model, shifted.tokenizer, image, "red square", 0.3, 0.25, size=SIZE)
    assert [d for d in raw if d.box[2] > 128], "some boxes reach past the right edge"
    official = run(shifted, sam, image.unsqueeze(0), keep="all")
    clipped = run(shifted, sam, image.unsqueeze(0), keep="all", options=DetectionOptions(clip_boxes=True))
    boxes = torch.tensor([d.box for d in raw])
    expected_boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([128.0, 96.0, 128.0, 96.0]))
    assert torch.equal(torch.tensor(official.boxes[0]), boxes)
    assert torch.equal(torch.tensor(clipped.boxes[0]), expected_boxes)
    assert torch.equal(clipped.masks, sam_box_masks(sam, image, expected_boxes).float())
    assert torch.equal(official.masks, sam_box_masks(sam, image, boxes).float())
    assert not torch.equal(clipped.masks, official.masks)


def test_dilation_grows_masks_by_a_square(gdino, sam):
    mask = torch.zeros(1, 9, 9)
    mask[0, 4, 4] = 1
    grown = pipeline.dilate_masks(mask, 2)
    expected = torch.zeros(1, 9, 9)
    expected[0, 2:7, 2:7] = 1
    assert torch.equal(grown, expected)
    batch = square_image().unsqueeze(0)
    plain = run(gdino, sam, batch, box_threshold=0.6)
    dilated = run(gdino, sam, batch, box_threshold=0.6, dilation=1)
    assert torch.equal(dilated.masks, pipeline.dilate_masks(plain.masks, 1))
    assert dilated.masks.sum() > plain.masks.sum() > 0


def test_prompt_that_finds_nothing_gives_empty_masks_and_a_warning(gdino, sam, caplog):
    batch = torch.stack([square_image(), square_image(color=(0.0, 1.0, 0.0))])
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        result = run(gdino, sam, batch, box_threshold=1.0)
    assert result.masks.shape == (2, 96, 128) and result.masks.sum() == 0
    assert result.image_index == [0, 1] and result.detections == [[], []]
    assert sum("found nothing" in r.message for r in caplog.records) == 2


def test_mixed_batch_processes_every_image(gdino, sam, caplog):
    """One image with detections and one without: each gets its own correct mask."""
    images_ = [square_image(), square_image(box=(10, 40, 80, 120), color=(1.0, 1.0, 0.0))]
    best = [max(d.score for d in detection.detect(gdino.model, gdino.tokenizer, im, "red square", 0.0, 0.25,
                                                  size=SIZE)) for im in images_]
    assert best[0] != best[1]
    threshold = (best[0] + best[1]) / 2
    found = 0 if best[0] > best[1] else 1
    batch = torch.stack(images_ + [images_[found]])
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        result = run(gdino, sam, batch, box_threshold=threshold, keep="all")
    alone = run(gdino, sam, images_[found].unsqueeze(0), box_threshold=threshold, keep="all")
    assert len(alone.detections[0]) >= 1
    assert [len(d) for d in result.detections] == [len(alone.detections[0]) if i != 1 - found else 0
                                                    for i in range(3)]
    masks_of = lambda i: result.masks[[k for k, owner in enumerate(result.image_index) if owner == i]]  # noqa: E731
    assert torch.equal(masks_of(found), alone.masks)
    assert torch.equal(masks_of(2), alone.masks)  # the image after the empty one is processed too
    assert masks_of(1 - found).shape[0] == 1 and masks_of(1 - found).sum() == 0
    assert any("image %d of 3" % (2 - found) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_grey_and_alpha_images_segment_like_their_rgb(gdino, sam, channels):
    rgb = square_image(color=(0.9, 0.9, 0.9)) if channels < 3 else square_image()
    if channels == 1:
        image = rgb[..., :1]
    elif channels == 2:
        image = torch.cat([rgb[..., :1], torch.rand(96, 128, 1)], dim=-1)
    else:
        image = torch.cat([rgb, torch.rand(96, 128, 1)], dim=-1)
    expected_rgb = rgb[..., :1].expand(96, 128, 3) if channels < 3 else rgb
    got = run(gdino, sam, image.unsqueeze(0), box_threshold=0.55)
    expected = run(gdino, sam, expected_rgb.unsqueeze(0), box_threshold=0.55)
    assert len(got.detections[0]) == len(expected.detections[0]) > 0
    assert torch.equal(got.masks, expected.masks)
    assert pipeline.preview(image.unsqueeze(0), got).shape == (1, 96, 128, 3)


def test_five_channel_image_is_a_clear_error(gdino, sam):
    with pytest.raises(ValueError, match="expected 1 .* channels, got 5"):
        run(gdino, sam, torch.rand(1, 32, 32, 5))


def test_preview_tints_the_mask_outlines_boxes_and_marks_points():
    image = torch.zeros(1, 20, 20, 3)
    mask = torch.zeros(1, 20, 20)
    mask[0, 5:10, 5:10] = 1
    result = pipeline.LocalizationResult(mask, [0], boxes=[[(2.0, 2.0, 18.0, 18.0), (-5.0, 15.0, 4.0, 30.0)]],
                                         points=[[(14.0, 6.0, pipeline.POSITIVE), (3.0, 12.0, pipeline.NEGATIVE)]])
    out = pipeline.preview(image, result, color=(1.0, 0.0, 0.0), alpha=0.5, line=1)
    assert torch.allclose(out[0, 7, 7], torch.tensor([0.5, 0.0, 0.0]))  # tinted inside the mask
    assert torch.equal(out[0, 0, 19], torch.zeros(3))  # untouched outside
    assert torch.equal(out[0, 2, 10], torch.tensor([1.0, 0.0, 0.0]))  # top edge of the box
    assert torch.equal(out[0, 17, 10], torch.tensor([1.0, 0.0, 0.0]))  # bottom edge
    assert torch.equal(out[0, 19, 0], torch.tensor([1.0, 0.0, 0.0]))  # a box past the edges, clipped to it
    assert torch.equal(out[0, 6, 14], torch.tensor([0.1, 0.9, 0.1]))  # positive point: green
    assert torch.equal(out[0, 12, 3], torch.tensor([0.9, 0.1, 0.1]))  # negative point: red


def test_clip_to_box_keeps_masks_inside_their_boxes(gdino, sam):
    image = square_image()
    boxes = torch.tensor([[40.0, 30.0, 90.0, 70.0], [0.0, 0.0, 64.0, 20.0]])
    inside = torch.zeros(2, 96, 128, dtype=torch.bool)
    inside[0, 30:70, 40:90] = True  # pixel centres y+0.5 in [30, 70], x+0.5 in [40, 90]
    inside[1, 0:20, 0:64] = True
    assert torch.equal(pipeline.box_masks(boxes, 96, 128), inside)
    batch = image.unsqueeze(0)
    free = run(gdino, sam, batch, keep="all")
    clipped = run(gdino, sam, batch, keep="all", clip_to_box=True)
    box_pixels = pipeline.box_masks(torch.tensor(free.boxes[0]), 96, 128)
    assert torch.equal(clipped.masks, free.masks * box_pixels)
    assert (free.masks.bool() & ~box_pixels).any()  # the tiny random SAM does leak, so the clip is exercised


# --- wrong, truncated, hostile and mismatched files ------------------------------------------------------


def test_truncated_checkpoint_is_a_clear_error(tmp_path, files):
    data = files["grounding_dino"].read_bytes()
    truncated = tmp_path / "groundingdino_swint_ogc.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="expected a Grounding DINO checkpoint .*wrong or truncated"):
        loading.load_grounding_dino(truncated, [files["bert_dir"].parent])


def test_truncated_safetensors_is_a_clear_error(tmp_path, sam):
    from safetensors.torch import save_file

    path = tmp_path / "sam.safetensors"
    save_file({k: v.contiguous() for k, v in list(sam.model.state_dict().items())[:4]}, str(path))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="expected a Segment Anything .*wrong or truncated"):
        loading.load_sam(path)


def test_text_file_is_a_clear_error_not_called_code(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_text("<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="expected a Segment Anything .*not a torch.save file") as error:
        loading.load_sam(path)
    assert "holds code" not in str(error.value) and "weights_only=False" not in str(error.value)


def test_swapped_models_name_what_the_file_is(files):
    with pytest.raises(CheckpointError, match="expected a Grounding DINO checkpoint .* got a SAM checkpoint"):
        loading.load_grounding_dino(files["sam"], [files["bert_dir"].parent])
    with pytest.raises(CheckpointError, match="expected a Segment Anything .* got a Grounding DINO checkpoint"):
        loading.load_sam(files["grounding_dino"])


class RunsCode:
    """Unpickling this would call ``os.makedirs(marker)``: a stand-in for a hostile payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def assert_plain_refusal(message: str, path, what: str):
    assert str(path) in message and f"expected {what}" in message
    assert "holds code" in message and "was refused and nothing in it ran" in message
    assert ".safetensors" in message and "plain state dict" in message
    assert "weights_only" not in message  # torch's advice to re-run unsafely is not passed on


@pytest.mark.parametrize("payload", ["namespace", "function call"])
def test_pickle_with_code_is_refused_in_plain_words(tmp_path, payload):
    path = tmp_path / "sam_vit_h_4b8939.pth"
    marker = tmp_path / "the_code_ran"
    extra = argparse.Namespace(lr=1e-4) if payload == "namespace" else RunsCode(marker)
    torch.save({"model": {"w": torch.zeros(1)}, "args": extra}, path)
    with pytest.raises(CheckpointError) as error:
        loading.load_sam(path)
    assert_plain_refusal(str(error.value), path, "a Segment Anything")
    assert ("argparse.Namespace" if payload == "namespace" else "makedirs") in str(error.value)
    assert not marker.exists()


def test_code_pickle_in_a_hugging_face_folder_is_refused_naming_the_file(tmp_path, sam):
    folder = tmp_path / "sam-vit-base"
    sam.model.config.save_pretrained(folder)
    weights = dict(sam.model.state_dict(), hostile=RunsCode(tmp_path / "the_code_ran"))
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as error:
        loading.load_sam(folder / "pytorch_model.bin")
    assert_plain_refusal(str(error.value), folder / "pytorch_model.bin", "a Segment Anything")
    assert isinstance(error.value.__cause__, pickle.UnpicklingError)
    assert not (tmp_path / "the_code_ran").exists()


def test_broken_hugging_face_folder_is_a_clear_error(tmp_path, gdino):
    folder = tmp_path / "grounding-dino-tiny"
    gdino.model.config.save_pretrained(folder)  # config.json, no weights
    with pytest.raises(CheckpointError, match="expected a Grounding DINO checkpoint in the Hugging Face-format folder"):
        loading.load_grounding_dino(folder / "config.json")


def test_checkpoint_with_missing_weights_is_an_error(tmp_path, files):
    original = torch.load(files["sam"], weights_only=True)
    del original["mask_decoder.iou_token.weight"]
    original["mask_decoder.iou_token.weight"] = torch.zeros(1, 32)  # is_original_sam still true
    del original["mask_decoder.transformer.layers.0.mlp.lin1.bias"]
    path = tmp_path / "partial.pth"
    torch.save(original, path)
    with pytest.raises(CheckpointError, match="1 weights missing"):
        loading.load_sam(path)


def test_original_layout_also_loads_from_safetensors(tmp_path, files, sam):
    from safetensors.torch import save_file

    original = torch.load(files["sam"], weights_only=True)
    path = tmp_path / "sam_vit_b_01ec64.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    loaded = loading.load_sam(path)
    expected = sam.model.state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], expected[k]) for k in expected)


def test_wrapped_and_ddp_prefixed_state_dicts_are_unwrapped(tmp_path):
    from qkv_control.localization.checkpoint_io import read_state_dict

    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"module.a.weight": torch.ones(2)}, "epoch": 3}, path)
    assert list(read_state_dict(path, "x")) == ["a.weight"]


# --- finding BERT -----------------------------------------------------------------------------------------


def checkpoint_in(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(files["grounding_dino"], folder / "groundingdino_swint_ogc.pth")
    return folder / "groundingdino_swint_ogc.pth"


def copy_bert(files, folder):
    shutil.copytree(files["bert_dir"], folder)
    return folder


def test_bert_folder_next_to_the_checkpoint_is_found(files, gdino):
    assert files["bert_dir"].parent == files["grounding_dino"].parent
    assert bert_files.bert_candidates(files["grounding_dino"], [])[0] == files["bert_dir"]
    assert len(gdino.tokenizer) == len((files["bert_dir"] / "vocab.txt").read_text().split())


def test_any_folder_with_vocab_and_bert_config_next_to_the_checkpoint_is_found(tmp_path, files):
    checkpoint = checkpoint_in(tmp_path / "grounding-dino", files)
    copy_bert(files, tmp_path / "grounding-dino" / "my-bert-download")
    (tmp_path / "grounding-dino" / "notes").mkdir()  # a folder without BERT files is passed over
    loaded = loading.load_grounding_dino(checkpoint)
    assert len(loaded.tokenizer) == len((files["bert_dir"] / "vocab.txt").read_text().split())


def test_hugging_face_cache_layout_is_found(tmp_path, files):
    checkpoint = checkpoint_in(tmp_path / "models" / "grounding-dino", files)
    cache = tmp_path / "models" / "models--bert-base-uncased"
    copy_bert(files, cache / "snapshots" / "0a1b2c")
    copy_bert(files, cache / "snapshots" / "86b5e0")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("86b5e0")
    candidates = bert_files.bert_candidates(checkpoint, [tmp_path / "models"])
    assert bert_files.find_bert_dir(candidates) == cache / "snapshots" / "86b5e0"  # refs/main's snapshot
    assert loading.load_grounding_dino(checkpoint, [tmp_path / "models"]).tokenizer is not None


def test_hugging_face_cache_under_bert_base_uncased_new_name_is_found(tmp_path, files):
    checkpoint = checkpoint_in(tmp_path / "grounding-dino", files)
    snapshot = copy_bert(files, tmp_path / "grounding-dino" / "models--google-bert--bert-base-uncased" / "snapshots"
                         / "86b5e0")
    assert bert_files.find_bert_dir(bert_files.bert_candidates(checkpoint, [])) == snapshot


def test_missing_bert_lists_every_place_looked(tmp_path, files):
    checkpoint = checkpoint_in(tmp_path / "grounding-dino", files)
    with pytest.raises(CheckpointError, match="bert-base-uncased's tokenizer files") as error:
        loading.load_grounding_dino(checkpoint, [tmp_path / "elsewhere", tmp_path])
    message = str(error.value)
    for place in (tmp_path / "grounding-dino" / "bert-base-uncased",
                  tmp_path / "grounding-dino" / "models--bert-base-uncased" / "snapshots" / "*",
                  tmp_path / "grounding-dino" / "models--google-bert--bert-base-uncased" / "snapshots" / "*",
                  tmp_path / "elsewhere" / "bert-base-uncased", tmp_path / "bert-base-uncased",
                  tmp_path / "models--bert-base-uncased" / "snapshots" / "*"):
        assert str(place) in message, place
    assert "any folder with vocab.txt and a BERT config.json" in message


def test_small_bert_without_config_json_is_refused_not_guessed(tmp_path, files):
    checkpoint = checkpoint_in(tmp_path / "grounding-dino", files)
    bert = tmp_path / "grounding-dino" / "bert-base-uncased"
    bert.mkdir()
    shutil.copy(files["bert_dir"] / "vocab.txt", bert / "vocab.txt")
    with pytest.raises(CheckpointError, match="expected BERT's config.json .* got none.* not bert-base-uncased "
                                              ".*hidden_size 16.*head count cannot be read"):
        loading.load_grounding_dino(checkpoint)


def test_bert_base_sized_weights_without_config_json_get_bert_base_uncased_config():
    from transformers import BertConfig

    base = BertConfig()
    with torch.device("meta"):
        original = {
            "bert.embeddings.word_embeddings.weight": torch.empty(base.vocab_size, base.hidden_size),
            "bert.embeddings.position_embeddings.weight": torch.empty(base.max_position_embeddings, base.hidden_size),
            "bert.embeddings.token_type_embeddings.weight": torch.empty(base.type_vocab_size, base.hidden_size),
            **{f"bert.encoder.layer.{i}.intermediate.dense.weight": torch.empty(base.intermediate_size,
                                                                                 base.hidden_size) for i in range(12)},
        }
    config = bert_files.bert_config_for(original, None)
    assert (config.num_attention_heads, config.hidden_size, config.num_hidden_layers) == (12, 768, 12)


def test_bert_config_json_of_another_bert_is_refused(tmp_path, files):
    checkpoint = checkpoint_in(tmp_path / "grounding-dino", files)
    bert = copy_bert(files, tmp_path / "grounding-dino" / "bert-base-uncased")
    config = json.loads((bert / "config.json").read_text())
    config.update(hidden_size=32, num_attention_heads=4)
    (bert / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json .* for another BERT: hidden_size 32 .*has 16"):
        loading.load_grounding_dino(checkpoint)


def test_bert_head_count_comes_from_config_json(gdino, files):
    heads = json.loads((files["bert_dir"] / "config.json").read_text())["num_attention_heads"]
    assert gdino.model.config.text_config.num_attention_heads == heads == 2  # hidden 16: not 16 // 64


def test_vocab_larger_than_the_checkpoints_bert_is_refused(tmp_path, files):
    checkpoint = checkpoint_in(tmp_path / "grounding-dino", files)
    bert = copy_bert(files, tmp_path / "grounding-dino" / "bert-base-uncased")
    words = (files["bert_dir"] / "vocab.txt").read_text().split("\n")
    (bert / "vocab.txt").write_text("\n".join(words + [f"extra{i}" for i in range(50)]))
    with pytest.raises(CheckpointError, match="vocab.txt of at most"):
        loading.load_grounding_dino(checkpoint)
