"""The localization stages against the official libraries' own behaviour.

- SAM: segment-anything 1.0 itself (a dev dependency, pure python) is the reference. Its ``Sam`` is built
  from its own module classes at the tiny checkpoint's sizes and loaded from the same tiny ORIGINAL-format
  state dict the pack converts; ``SamPredictor`` runs on the same uint8 image and prompts. Compared: the
  preprocessed input (exact), the image embedding (exact), masks (exact), predicted IoU scores (abs 1e-5;
  measured ~1e-10), and every LayerNorm eps (equal).
- Grounding DINO: groundingdino-py 0.4.0 does not run on transformers 5.x, so its behaviour is transcribed
  from its code (``util/inference.py`` ``predict`` + ``Model.post_process_result``, ``util/utils.py``
  ``get_phrases_from_posmap``, ``datasets/transforms.py``), calling the torchvision functions it calls.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

# segment-anything 1.0 is a dev dependency (requirements-dev.txt): a missing one fails here, never skips.
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import box_convert

from qkv_control.localization import detection, images, loading, sam_convert, segmentation
from qkv_control.localization.detection import DetectionOptions
from qkv_control.localization.segmentation import SamPrompts
from qkv_control.tiny.localization_files import sam_original_state_dict, tiny_sam

pytest_plugins = ["localization_fixtures"]  # files, sam

SCORE_ATOL = 1e-5


def original_sam(config) -> Sam:
    """segment-anything's ``Sam`` at ``config``'s sizes, built as ``build_sam._build_sam`` builds it."""
    v, p, d = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    grid = v.image_size // v.patch_size
    encoder = ImageEncoderViT(
        img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.hidden_size, depth=v.num_hidden_layers,
        num_heads=v.num_attention_heads, mlp_ratio=v.mlp_dim / v.hidden_size, out_chans=v.output_channels,
        qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        window_size=v.window_size, global_attn_indexes=tuple(v.global_attn_indexes))
    prompt = PromptEncoder(embed_dim=p.hidden_size, image_embedding_size=(grid, grid),
                           input_image_size=(v.image_size, v.image_size), mask_in_chans=p.mask_input_channels)
    decoder = MaskDecoder(
        num_multimask_outputs=d.num_multimask_outputs, transformer_dim=d.hidden_size,
        transformer=TwoWayTransformer(depth=d.num_hidden_layers, embedding_dim=d.hidden_size, mlp_dim=d.mlp_dim,
                                      num_heads=d.num_attention_heads),
        iou_head_depth=d.iou_head_depth, iou_head_hidden_dim=d.iou_head_hidden_dim)
    return Sam(encoder, prompt, decoder).eval()


@pytest.fixture(scope="module")
def ours(sam):
    return sam


@pytest.fixture(scope="module")
def reference(files, ours):
    """segment-anything's Sam with the weights of the same tiny original-format file."""
    model = original_sam(ours.model.config)
    result = model.load_state_dict(torch.load(files["sam"], weights_only=True), strict=False)
    assert result.missing_keys == [] and set(result.unexpected_keys) <= {"pixel_mean", "pixel_std"}
    return model


def uint8_image(height=48, width=80, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def as_comfy_image(pixels: np.ndarray) -> torch.Tensor:
    """What ComfyUI's LoadImage makes of an 8-bit file: float32 ``k / 255``."""
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


# --- resizing: the uint8 image through PIL, bilinear ---------------------------------------------------


def test_comfy_images_from_8bit_files_round_trip_to_the_same_uint8():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    assert np.array_equal(images.to_uint8(as_comfy_image(levels)), levels)


@pytest.mark.parametrize("height,width,size,max_size", [(37, 53, 64, 100), (90, 40, 64, 100), (64, 200, 64, 150)])
def test_grounding_dino_input_equals_the_official_transforms_exactly(height, width, size, max_size):
    """``RandomResize([size], max_size)`` (torchvision resize of the PIL image), ``ToTensor``, ``Normalize``."""
    pixels = uint8_image(height, width)
    shape = images.detection_resize_shape(height, width, size, max_size)
    expected = TF.normalize(TF.to_tensor(TF.resize(Image.fromarray(pixels), list(shape))),
                            list(images.IMAGENET_MEAN), list(images.IMAGENET_STD))
    got = images.grounding_dino_pixels(as_comfy_image(pixels), size, max_size)
    assert got.shape == (1, 3, *shape)
    assert torch.equal(got[0], expected)


def test_resize_is_pil_bilinear_not_a_float_tensor_resize():
    pixels = uint8_image(48, 80)
    expected = np.asarray(Image.fromarray(pixels).resize((40, 24), Image.BILINEAR))
    assert np.array_equal(images.resize_uint8(pixels, (24, 40)).permute(1, 2, 0).numpy(), expected)
    # The float-tensor resize the pipeline used before lands elsewhere (up to about a level per pixel).
    floats = torch.nn.functional.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None].float(), size=(24, 40),
                                             mode="bilinear", align_corners=False, antialias=True)[0]
    pil = torch.from_numpy(expected.copy()).permute(2, 0, 1).float()
    assert (floats - pil).abs().max() > 0.5 and not torch.equal(floats.round(), pil)


def test_sam_input_equals_segment_anything_preprocessing_exactly(reference, ours):
    pixels = uint8_image(48, 80)
    target = reference.image_encoder.img_size
    resized = ResizeLongestSide(target).apply_image(pixels)
    expected = reference.preprocess(torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None])
    got, shape = images.sam_pixels(as_comfy_image(pixels), target, ours.pixel_mean, ours.pixel_std)
    assert shape == resized.shape[:2] == (38, 64)
    assert torch.equal(got, expected)


# --- SAM: SamPredictor on the same weights, image and prompts ------------------------------------------

PROMPTS = {
    "one positive point": dict(points=[[20.0, 10.0]], labels=[1]),
    "positive and negative points": dict(points=[[20.0, 10.0], [61.0, 33.0], [5.0, 40.0]], labels=[1, 0, 1]),
    "one box": dict(boxes=[[10.0, 5.0, 50.0, 40.0]]),
    "box and points": dict(points=[[30.0, 20.0], [12.0, 8.0]], labels=[1, 0], boxes=[[10.0, 5.0, 50.0, 40.0]]),
    "box past the edges": dict(boxes=[[-8.0, -3.0, 90.0, 30.5]]),
}


def predictor_masks(reference, pixels, points=None, labels=None, boxes=None, multimask=False):
    """``SamPredictor.predict`` for one prompt; ``predict_torch`` with ``apply_boxes`` for several boxes."""
    predictor = SamPredictor(reference)
    predictor.set_image(pixels)
    point_coords = np.array(points) if points else None
    point_labels = np.array(labels) if points else None
    if boxes is None or len(boxes) == 1:
        box = np.array(boxes[0]) if boxes else None
        masks, scores, _ = predictor.predict(point_coords, point_labels, box, multimask_output=multimask)
        return torch.from_numpy(masks)[None], torch.from_numpy(scores)[None]
    transformed = torch.as_tensor(predictor.transform.apply_boxes(np.array(boxes), pixels.shape[:2]),
                                  dtype=torch.float)
    masks, scores, _ = predictor.predict_torch(None, None, boxes=transformed, multimask_output=multimask)
    return masks, scores


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_sam_masks_equal_sam_predictor(reference, ours, name, multimask):
    pixels = uint8_image(48, 80)
    prompt = PROMPTS[name]
    expected_masks, expected_scores = predictor_masks(reference, pixels, multimask=multimask, **prompt)
    got = segmentation.segment(ours.model, ours.pixel_mean, ours.pixel_std, as_comfy_image(pixels),
                               SamPrompts.of(**prompt), multimask_output=multimask)
    assert got.masks.shape == expected_masks.shape == (1, 3 if multimask else 1, 48, 80)
    assert 0 < expected_masks.sum() < expected_masks.numel()  # not trivially empty or full
    assert torch.equal(got.masks, expected_masks)
    assert torch.allclose(got.scores, expected_scores, atol=SCORE_ATOL, rtol=0)


def test_several_boxes_equal_predict_torch(reference, ours):
    pixels = uint8_image(48, 80, seed=3)
    boxes = [[10.0, 5.0, 50.0, 40.0], [40.0, 0.0, 79.0, 47.0], [0.0, 20.0, 30.0, 47.0]]
    expected_masks, expected_scores = predictor_masks(reference, pixels, boxes=boxes)
    got = segmentation.segment(ours.model, ours.pixel_mean, ours.pixel_std, as_comfy_image(pixels),
                               SamPrompts.of(boxes=boxes))
    assert got.masks.shape == expected_masks.shape == (3, 1, 48, 80)
    assert torch.equal(got.masks, expected_masks)
    assert torch.allclose(got.scores, expected_scores, atol=SCORE_ATOL, rtol=0)


def test_image_embedding_equals_segment_anything(reference, ours):
    pixels = uint8_image(48, 80)
    predictor = SamPredictor(reference)
    predictor.set_image(pixels)
    inputs, _ = images.sam_pixels(as_comfy_image(pixels), 64, ours.pixel_mean, ours.pixel_std)
    with torch.no_grad():
        assert torch.equal(ours.model.get_image_embeddings(inputs), predictor.features)


def _layer_norms(model: torch.nn.Module) -> dict[str, float]:
    return {name: module.eps for name, module in model.named_modules()
            if isinstance(module, (torch.nn.LayerNorm, LayerNorm2d))}


@pytest.mark.parametrize("source", ["original file", "hugging face folder"])
def test_every_layer_norm_eps_equals_segment_anything(reference, ours, tmp_path, source):
    """Each original LayerNorm (found by its weight's key) against the converted module it maps to."""
    model = ours.model
    if source == "hugging face folder":
        model.save_pretrained(tmp_path / "sam-tiny")
        config = (tmp_path / "sam-tiny" / "config.json")
        config.write_text(config.read_text().replace("1e-05", "1e-06"))  # transformers' default everywhere
        model = loading.load_sam(tmp_path / "sam-tiny" / "model.safetensors").model
    converted = dict(model.named_modules())
    depth = reference.mask_decoder.iou_prediction_head.num_layers
    original = _layer_norms(reference)
    assert len(original) == 2 * 2 + 2 + 2 + 2 * 4 + 1 + 1  # blocks, neck, mask downscaling, decoder
    for name, eps in original.items():
        target = sam_convert.original_key_target(f"{name}.weight", depth).removesuffix(".weight")
        assert converted[target].eps == eps, (name, target)
    assert {original[n] for n in original if n.startswith("mask_decoder.transformer")} == {1e-5}
    assert model.config.mask_decoder_config.layer_norm_eps == sam_convert.SAM_DECODER_LAYER_NORM_EPS == 1e-5


def test_tiny_sam_model_matches_the_reference_decoder_eps():
    assert _layer_norms(tiny_sam())["mask_decoder.transformer.layers.0.layer_norm1"] == 1e-5
    assert sam_original_state_dict(tiny_sam())  # the tiny writer and the reference share one model


# --- Grounding DINO: predict() transcribed from groundingdino-py 0.4.0 ----------------------------------


def official_predict(logits, boxes, input_ids, tokenizer, box_threshold, text_threshold, height, width):
    """``predict()`` (sigmoid, max over tokens, phrases from the posmap) + ``Model.post_process_result``."""
    prediction_logits = logits.sigmoid()
    mask = prediction_logits.max(dim=1)[0] > box_threshold
    kept, kept_boxes = prediction_logits[mask], boxes[mask]
    ids = input_ids.tolist()
    phrases = [tokenizer.decode([ids[i] for i in (logit > text_threshold).nonzero(as_tuple=True)[0].tolist()])
               .replace(".", "") for logit in kept]
    xyxy = box_convert(kept_boxes * torch.Tensor([width, height, width, height]), in_fmt="cxcywh", out_fmt="xyxy")
    return xyxy, kept.max(dim=1)[0], phrases, mask.nonzero().flatten().tolist()


@pytest.fixture(scope="module")
def tokenizer(files):
    return loading.load_bert_tokenizer(files["bert_dir"])


def synthetic_outputs(input_ids: torch.Tensor, queries: int = 12, seed: int = 0):
    """Logits over 256 positions (-inf past the caption, as both models pad them) and boxes, some reaching
    past the image; query 3 matches only [CLS], query 7 only [SEP]."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.full((queries, 256), float("-inf"))
    logits[:, : len(input_ids)] = torch.randn(queries, len(input_ids), generator=generator) * 2
    logits[3, : len(input_ids)] = -9.0
    logits[3, 0] = 4.0
    logits[7, : len(input_ids)] = -9.0
    logits[7, len(input_ids) - 1] = 3.0
    boxes = torch.rand(queries, 4, generator=generator) * torch.tensor([1.0, 1.0, 0.9, 0.9])
    logits[0, 1] = 5.0
    boxes[0] = torch.tensor([0.02, 0.98, 0.3, 0.2])  # past the left and the bottom edge
    return logits, boxes


def test_detections_equal_official_predict(tokenizer):
    caption = detection.prepare_caption("Red Square . blue ball")
    assert caption == "red square . blue ball."
    input_ids = tokenizer(caption, return_tensors="pt")["input_ids"][0]
    logits, boxes = synthetic_outputs(input_ids)
    xyxy, scores, phrases, queries = official_predict(logits, boxes, input_ids, tokenizer, 0.6, 0.5, 96, 128)
    ours = detection.detections_from_outputs(logits, boxes, input_ids, tokenizer, 0.6, 0.5, 96, 128)
    assert [d.query for d in ours] == queries and 3 in queries and 7 in queries  # query order, none dropped
    assert torch.equal(torch.tensor([d.box for d in ours]), xyxy)
    assert torch.equal(torch.tensor([d.score for d in ours]), scores)
    assert [d.phrase for d in ours] == phrases
    assert "[CLS]" in ours[queries.index(3)].phrase and "[SEP]" in ours[queries.index(7)].phrase
    first = queries.index(0)
    assert xyxy[first, 0] < 0 and xyxy[first, 3] > 96  # unclipped, as the official boxes


def test_detection_options_sort_clip_and_drop(tokenizer):
    caption = detection.prepare_caption("red square")
    input_ids = tokenizer(caption, return_tensors="pt")["input_ids"][0]
    logits, boxes = synthetic_outputs(input_ids, seed=1)
    official = detection.detections_from_outputs(logits, boxes, input_ids, tokenizer, 0.6, 0.5, 96, 128)
    options = DetectionOptions(sort_by_score=True, clip_boxes=True, drop_phraseless=True)
    extra = detection.detections_from_outputs(logits, boxes, input_ids, tokenizer, 0.6, 0.5, 96, 128, options)
    words = {tokenizer.convert_tokens_to_ids(w) for w in ("red", "square")}
    has_word = {d.query for d in official
                if any(int(input_ids[i]) in words for i in (logits[d.query].sigmoid() > 0.5).nonzero().flatten())}
    assert {d.query for d in extra} == has_word and {3, 7}.isdisjoint(has_word)
    assert [d.score for d in extra] == sorted((d.score for d in official if d.query in has_word), reverse=True)
    for d in extra:
        box = torch.tensor(next(o.box for o in official if o.query == d.query))
        assert torch.equal(torch.tensor(d.box), torch.minimum(box.clamp(min=0), torch.tensor([128.0, 96, 128, 96])))


def test_caption_tokens_are_sliced_as_the_original_model_slices_them(tokenizer):
    caption = detection.prepare_caption(" . ".join(["red square"] * 20))
    full = tokenizer(caption, return_tensors="pt")["input_ids"][0]
    tokens = detection.tokenize_caption(tokenizer, caption, 16)
    assert torch.equal(tokens["input_ids"][0], full[:16])  # no [SEP] re-added: the original slices
    assert tokens["attention_mask"].shape == (1, 16)
