"""Tiny Grounding DINO + SAM files in the ORIGINAL and Hugging Face formats, loaded by the real loader
code, segmenting synthetic images; post-processing compared with transformers' own processors."""

from __future__ import annotations

import argparse
import logging
import shutil

import pytest
import torch

from qkv_control.localization import loading, pipeline
from qkv_control.localization.checkpoint_io import CheckpointError
from qkv_control.tiny.localization_files import tiny_grounding_dino, tiny_sam, write_tiny_localization_files

SIZE = 128  # detection resolution for the tiny model (the real default is 800)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_localization_files(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def gdino(files):
    return loading.load_grounding_dino(files["grounding_dino"], [files["bert_dir"]])


@pytest.fixture(scope="module")
def sam(files):
    return loading.load_sam(files["sam"])


def square_image(height=96, width=128, box=(30, 70, 40, 90), color=(1.0, 0.0, 0.0)):
    """A coloured rectangle (rows y0:y1, cols x0:x1) on a blue-grey background, [H, W, 3]."""
    image = torch.full((height, width, 3), 0.3)
    image[..., 2] = 0.6
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1] = torch.tensor(color)
    return image


def run(gdino, sam, images, prompt="red square", **options):
    options.setdefault("detection_size", SIZE)
    return pipeline.text_to_masks(gdino.model, gdino.tokenizer, sam.model, sam.pixel_mean, sam.pixel_std, images,
                                  prompt, **options)


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
    hf_gdino = loading.load_grounding_dino(gd_dir / "model.safetensors", bert_dirs=[])
    hf_sam = loading.load_sam(sam_dir / "model.safetensors")
    image = square_image().unsqueeze(0)
    expected = run(gdino, sam, image, box_threshold=0.0, text_threshold=0.0)
    got = run(hf_gdino, hf_sam, image, box_threshold=0.0, text_threshold=0.0)
    assert len(got.detections[0]) == len(expected.detections[0]) > 0
    assert torch.equal(got.masks, expected.masks)


def test_detections_match_transformers_post_processing(gdino):
    """Our thresholding/box conversion against GroundingDinoProcessor.post_process_grounded_object_detection."""
    from transformers import GroundingDinoProcessor

    image = square_image()
    caption = pipeline.prepare_caption("red square")
    tokens = pipeline.tokenize_caption(gdino.tokenizer, caption, 64)
    with torch.no_grad():
        outputs = gdino.model(pixel_values=pipeline.grounding_dino_pixels(image, SIZE), **tokens)
    threshold = float(outputs.logits.sigmoid().max(-1).values.median())  # about half the queries pass
    ours = pipeline.detections_from_outputs(outputs.logits[0], outputs.pred_boxes[0], tokens["input_ids"][0],
                                            gdino.tokenizer, threshold, 0.0, 96, 128)
    processor = GroundingDinoProcessor.__new__(GroundingDinoProcessor)  # post-processing needs the tokenizer only
    processor.tokenizer = gdino.tokenizer
    reference = processor.post_process_grounded_object_detection(
        outputs, tokens["input_ids"], threshold=threshold, text_threshold=0.0, target_sizes=[(96, 128)])[0]
    order = reference["scores"].argsort(descending=True)
    assert 0 < len(ours) == len(order) < outputs.logits.shape[1]
    ref_boxes = reference["boxes"][order]
    ref_boxes = torch.minimum(ref_boxes.clamp(min=0), torch.tensor([128.0, 96.0, 128.0, 96.0]))
    assert torch.allclose(torch.tensor([d.box for d in ours]), ref_boxes, atol=1e-4)
    assert torch.allclose(torch.tensor([d.score for d in ours]), reference["scores"][order], atol=1e-6)
    assert all(d.phrase == "red square" for d in ours)  # text_threshold 0: every prompt token


def test_text_threshold_drops_boxes_whose_phrase_is_empty(gdino):
    image = square_image()
    loose = pipeline.detect(gdino.model, gdino.tokenizer, image, "red square", 0.0, 0.0, size=SIZE)
    cut = sorted(d.score for d in loose)[len(loose) // 2]
    strict = pipeline.detect(gdino.model, gdino.tokenizer, image, "red square", 0.0, cut, size=SIZE)
    assert 0 < len(strict) < len(loose)
    assert all(d.phrase for d in strict)


def test_sam_masks_match_transformers_post_processing(sam):
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    image = square_image()
    boxes = torch.tensor([[40.0, 30.0, 90.0, 70.0], [0.0, 0.0, 64.0, 20.0]])
    masks = pipeline.segment_boxes(sam.model, sam.pixel_mean, sam.pixel_std, image, boxes)

    target = sam.model.config.vision_config.image_size
    pixels, shape = pipeline.sam_pixels(image, target, sam.pixel_mean, sam.pixel_std)
    assert shape == (48, 64)  # longest side 128 -> 64
    with torch.no_grad():
        out = sam.model(pixel_values=pixels, input_boxes=(boxes * 0.5).unsqueeze(0), multimask_output=False)
    processor = SamImageProcessorPil(pad_size={"height": target, "width": target})
    reference = processor.post_process_masks(out.pred_masks, [(96, 128)], [shape])[0][:, 0]
    assert masks.shape == (2, 96, 128) and masks.dtype == torch.bool
    assert torch.equal(masks, reference.bool())


def test_sam_preprocessing_matches_segment_anything(sam):
    image = torch.rand(40, 100, 3)
    pixels, shape = pipeline.sam_pixels(image, 64, sam.pixel_mean, sam.pixel_std)
    assert shape == (26, 64)  # int(40 * 0.64 + 0.5)
    assert torch.equal(pixels[0, :, 26:], torch.zeros(3, 38, 64))  # padded after normalising
    plain = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None] * 255, size=shape, mode="bilinear",
                                            align_corners=False, antialias=True)[0]
    mean, std = torch.tensor(sam.pixel_mean).view(3, 1, 1), torch.tensor(sam.pixel_std).view(3, 1, 1)
    assert torch.allclose(pixels[0, :, :26], (plain - mean) / std, atol=1e-5)


@pytest.mark.parametrize("height,width,expected", [
    (480, 640, (800, 1066)), (640, 480, (1066, 800)), (100, 1000, (133, 1330)), (800, 900, (800, 900)),
])
def test_detection_resize_follows_dino_random_resize(height, width, expected):
    assert pipeline.detection_resize_shape(height, width) == expected


def test_union_best_and_all_keep_the_right_detections(gdino, sam):
    image = square_image()
    detections = pipeline.detect(gdino.model, gdino.tokenizer, image, "red square", 0.5, 0.25, size=SIZE)
    assert len(detections) >= 2
    per_box = pipeline.segment_boxes(sam.model, sam.pixel_mean, sam.pixel_std, image,
                                     torch.tensor([d.box for d in detections]))
    batch = image.unsqueeze(0)
    union = run(gdino, sam, batch, box_threshold=0.5, keep="union")
    best = run(gdino, sam, batch, box_threshold=0.5, keep="best")
    every = run(gdino, sam, batch, box_threshold=0.5, keep="all")
    assert torch.equal(union.masks[0], per_box.any(dim=0).float())
    assert torch.equal(best.masks[0], per_box[0].float())
    assert torch.equal(every.masks, per_box.float()) and every.image_index == [0] * len(detections)


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
    images = [square_image(), square_image(box=(10, 40, 80, 120), color=(1.0, 1.0, 0.0))]
    best = [pipeline.detect(gdino.model, gdino.tokenizer, im, "red square", 0.0, 0.25, size=SIZE)[0].score
            for im in images]
    assert best[0] != best[1]
    threshold = (best[0] + best[1]) / 2
    found = 0 if best[0] > best[1] else 1
    batch = torch.stack(images + [images[found]])
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        result = run(gdino, sam, batch, box_threshold=threshold, keep="all")
    alone = run(gdino, sam, images[found].unsqueeze(0), box_threshold=threshold, keep="all")
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


def test_preview_tints_the_mask_and_outlines_boxes():
    image = torch.zeros(1, 20, 20, 3)
    mask = torch.zeros(1, 20, 20)
    mask[0, 5:10, 5:10] = 1
    result = pipeline.LocalizationResult(mask, [0], [[pipeline.Detection((2.0, 2.0, 18.0, 18.0), 0.9, "x")]])
    out = pipeline.preview(image, result, color=(1.0, 0.0, 0.0), alpha=0.5, line=1)
    assert torch.allclose(out[0, 7, 7], torch.tensor([0.5, 0.0, 0.0]))  # tinted inside the mask
    assert torch.equal(out[0, 0, 0], torch.zeros(3))  # untouched outside
    assert torch.equal(out[0, 2, 10], torch.tensor([1.0, 0.0, 0.0]))  # top edge of the box
    assert torch.equal(out[0, 17, 10], torch.tensor([1.0, 0.0, 0.0]))  # bottom edge


# --- wrong, truncated and mismatched files -----------------------------------------------------------


def test_truncated_checkpoint_is_a_clear_error(tmp_path, files):
    data = files["grounding_dino"].read_bytes()
    truncated = tmp_path / "groundingdino_swint_ogc.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="expected a Grounding DINO checkpoint .*wrong or truncated"):
        loading.load_grounding_dino(truncated, [files["bert_dir"]])


def test_truncated_safetensors_is_a_clear_error(tmp_path, sam):
    from safetensors.torch import save_file

    path = tmp_path / "sam.safetensors"
    save_file({k: v.contiguous() for k, v in list(sam.model.state_dict().items())[:4]}, str(path))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="expected a Segment Anything .*wrong or truncated"):
        loading.load_sam(path)


def test_text_file_is_a_clear_error(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_text("<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="expected a Segment Anything"):
        loading.load_sam(path)


def test_swapped_models_name_what_the_file_is(files):
    with pytest.raises(CheckpointError, match="expected a Grounding DINO checkpoint .* got a SAM checkpoint"):
        loading.load_grounding_dino(files["sam"], [files["bert_dir"]])
    with pytest.raises(CheckpointError, match="expected a Segment Anything .* got a Grounding DINO checkpoint"):
        loading.load_sam(files["grounding_dino"])


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "sam_vit_h_4b8939.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        loading.load_sam(path)


def test_missing_bert_vocab_says_where_to_put_it(tmp_path, files):
    with pytest.raises(CheckpointError, match="bert-base-uncased.*vocab.txt.*" + str(tmp_path / "nowhere")):
        loading.load_grounding_dino(files["grounding_dino"], [tmp_path / "nowhere"])


def test_checkpoint_with_missing_weights_is_an_error(tmp_path, files):
    original = torch.load(files["sam"], weights_only=True)
    del original["mask_decoder.iou_token.weight"]
    original["mask_decoder.iou_token.weight"] = torch.zeros(1, 32)  # is_original_sam still true
    del original["mask_decoder.transformer.layers.0.mlp.lin1.bias"]
    path = tmp_path / "partial.pth"
    torch.save(original, path)
    with pytest.raises(CheckpointError, match="1 weights missing"):
        loading.load_sam(path)


def test_clip_to_box_keeps_masks_inside_their_boxes(sam):
    image = square_image()
    boxes = torch.tensor([[40.0, 30.0, 90.0, 70.0], [0.0, 0.0, 64.0, 20.0]])
    free = pipeline.segment_boxes(sam.model, sam.pixel_mean, sam.pixel_std, image, boxes)
    clipped = pipeline.segment_boxes(sam.model, sam.pixel_mean, sam.pixel_std, image, boxes, clip_to_box=True)
    inside = torch.zeros(2, 96, 128, dtype=torch.bool)
    inside[0, 30:70, 40:90] = True  # pixel centres y+0.5 in [30, 70], x+0.5 in [40, 90]
    inside[1, 0:20, 0:64] = True
    assert torch.equal(pipeline.box_masks(boxes, 96, 128), inside)
    assert torch.equal(clipped, free & inside)
    assert (free & ~inside).any()  # the tiny random SAM does leak, so the clip is exercised


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


def test_bert_sizes_come_from_the_weights_when_config_json_is_absent(tmp_path, files):
    bert = tmp_path / "bert-base-uncased"
    bert.mkdir()
    shutil.copy(files["bert_dir"] / "vocab.txt", bert / "vocab.txt")
    loaded = loading.load_grounding_dino(files["grounding_dino"], [bert])
    text = loaded.model.config.text_config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (
        len((bert / "vocab.txt").read_text().split()), 16, 1, 32)
    assert text.num_attention_heads == 1  # no config.json: bert-base's 64-dim heads, at least one


def test_vocab_larger_than_the_checkpoints_bert_is_refused(tmp_path, files):
    bert = tmp_path / "bert-base-uncased"
    bert.mkdir()
    words = (files["bert_dir"] / "vocab.txt").read_text().split("\n")
    (bert / "vocab.txt").write_text("\n".join(words + [f"extra{i}" for i in range(50)]))
    with pytest.raises(CheckpointError, match="vocab.txt of at most"):
        loading.load_grounding_dino(files["grounding_dino"], [bert])
