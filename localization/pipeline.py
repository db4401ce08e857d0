"""Text prompt -> boxes -> masks: Grounding DINO detection, SAM box-prompted segmentation.

Implements the Subject Localization Module of MCA-Ctrl (mca-ctrl.txt, Sec. 3: "Grounding DINO ...
SAM ... to obtain the subject mask"), with the official libraries' pre- and post-processing:

- Grounding DINO (IDEA-Research/GroundingDINO ``util/inference.py``): caption lower-cased and ending in
  ".", image resized to shortest side 800 (longest <= 1333), ImageNet-normalised; a query is a
  detection when its best token probability exceeds ``box_threshold``; its phrase is the prompt tokens
  whose probability exceeds ``text_threshold``. Here a detection must also have a non-empty phrase: a
  box that matches only the [CLS]/[SEP]/"." tokens is not a detection of the prompt.
- SAM (facebookresearch/segment-anything ``SamPredictor``): longest side resized to the encoder's input
  size, normalised with the pixel statistics, padded bottom-right; one box prompt per detection,
  ``multimask_output=False``; logits upsampled to the padded input, cropped, resized to the image,
  thresholded at 0.

Pure torch/transformers: no ComfyUI here (see `localization.managed` for model management).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger("qkv_control")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KEEP_MODES = ("union", "best", "all")
BOX_THRESHOLD = 0.3  # MCA-Ctrl's (and Grounding DINO's demo) defaults
TEXT_THRESHOLD = 0.25
DETECTION_SIZE = 800
DETECTION_MAX_SIZE = 1333


@dataclass
class Detection:
    """One Grounding DINO detection: box ``(x0, y0, x1, y1)`` in pixels of the input image."""

    box: tuple[float, float, float, float]
    score: float
    phrase: str


@dataclass
class LocalizationResult:
    """Masks ``[M, H, W]`` (0/1 float), the input image each mask belongs to, and per-image detections."""

    masks: torch.Tensor
    image_index: list[int]
    detections: list[list[Detection]] = field(default_factory=list)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, W, C]`` image batch as RGB: grey (C=1) repeated, alpha (C=2, 4) dropped."""
    if images.ndim == 3:
        images = images.unsqueeze(-1)
    if images.ndim != 4:
        raise ValueError(f"expected an image batch [B, H, W, C], got shape {tuple(images.shape)}")
    channels = images.shape[-1]
    if channels in (1, 2):
        return images[..., :1].expand(*images.shape[:-1], 3)
    if channels in (3, 4):
        return images[..., :3]
    raise ValueError(f"expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA) channels, got {channels}")


def prepare_caption(prompt: str) -> str:
    """Grounding DINO's caption convention: lower case, stripped, ending with '.'."""
    caption = prompt.lower().strip()
    return caption if caption.endswith(".") else caption + "."


def detection_resize_shape(height: int, width: int, size: int = DETECTION_SIZE,
                           max_size: int | None = DETECTION_MAX_SIZE) -> tuple[int, int]:
    """Shortest side to ``size`` unless the longest would exceed ``max_size`` (DETR's RandomResize)."""
    if max_size is not None:
        short, long = min(height, width), max(height, width)
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _resize(image_chw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if tuple(image_chw.shape[-2:]) == tuple(shape):
        return image_chw
    return F.interpolate(image_chw.unsqueeze(0), size=shape, mode="bilinear", align_corners=False,
                         antialias=True).squeeze(0)


def grounding_dino_pixels(image_rgb: torch.Tensor, size: int = DETECTION_SIZE,
                          max_size: int | None = DETECTION_MAX_SIZE) -> torch.Tensor:
    """``[H, W, 3]`` in 0..1 -> ``[1, 3, h, w]`` resized and ImageNet-normalised."""
    height, width = image_rgb.shape[:2]
    chw = _resize(image_rgb.permute(2, 0, 1).float(), detection_resize_shape(height, width, size, max_size))
    mean = torch.tensor(IMAGENET_MEAN, device=chw.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=chw.device).view(3, 1, 1)
    return ((chw - mean) / std).unsqueeze(0)


def tokenize_caption(tokenizer, caption: str, max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(caption, return_tensors="pt", truncation=True, max_length=max_length)


def _special_ids(tokenizer) -> set[int]:
    ids = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    ids.update(tokenizer.convert_tokens_to_ids([".", "?"]))
    return {i for i in ids if i is not None}


@torch.no_grad()
def detect(model, tokenizer, image_rgb: torch.Tensor, prompt: str, box_threshold: float = BOX_THRESHOLD,
           text_threshold: float = TEXT_THRESHOLD, size: int = DETECTION_SIZE,
           max_size: int | None = DETECTION_MAX_SIZE) -> list[Detection]:
    """Grounding DINO detections of ``prompt`` in one ``[H, W, 3]`` image, best score first."""
    device = next(model.parameters()).device
    height, width = image_rgb.shape[:2]
    caption = prepare_caption(prompt)
    max_length = min(model.config.max_text_len, model.config.text_config.max_position_embeddings)
    tokens = {k: v.to(device) for k, v in tokenize_caption(tokenizer, caption, max_length).items()}
    pixels = grounding_dino_pixels(image_rgb.to(device), size, max_size)
    outputs = model(pixel_values=pixels, **tokens)

    return detections_from_outputs(outputs.logits[0], outputs.pred_boxes[0], tokens["input_ids"][0], tokenizer,
                                   box_threshold, text_threshold, height, width)


def detections_from_outputs(logits: torch.Tensor, pred_boxes: torch.Tensor, input_ids: torch.Tensor, tokenizer,
                            box_threshold: float, text_threshold: float, height: int,
                            width: int) -> list[Detection]:
    """One image's Grounding DINO outputs (``logits [queries, 256]``, ``pred_boxes [queries, 4]`` as
    relative cx, cy, w, h) -> detections in pixels, best score first."""
    device = logits.device
    probs = logits[:, : input_ids.shape[0]].float().sigmoid()  # [queries, tokens]
    special = _special_ids(tokenizer)
    phrase_tokens = torch.tensor([int(i) not in special for i in input_ids.tolist()], device=device)
    scores = probs.max(dim=1).values
    token_hits = (probs > text_threshold) & phrase_tokens
    keep = (scores > box_threshold) & token_hits.any(dim=1)

    boxes = pred_boxes.float()
    scale = torch.tensor([width, height, width, height], device=device, dtype=boxes.dtype)
    xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1) * scale
    xyxy = torch.minimum(xyxy.clamp(min=0), scale)

    detections = []
    for query in keep.nonzero().flatten().tolist():
        phrase = tokenizer.decode(input_ids[token_hits[query]].tolist()).strip()
        detections.append(Detection(tuple(xyxy[query].tolist()), float(scores[query]), phrase))
    detections.sort(key=lambda d: d.score, reverse=True)
    return detections


def sam_input_shape(height: int, width: int, target: int) -> tuple[int, int]:
    """segment-anything's ResizeLongestSide.get_preprocess_shape."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_pixels(image_rgb: torch.Tensor, target: int, mean, std) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[H, W, 3]`` in 0..1 -> (``[1, 3, target, target]`` normalised and padded, resized shape)."""
    height, width = image_rgb.shape[:2]
    shape = sam_input_shape(height, width, target)
    chw = _resize(image_rgb.permute(2, 0, 1).float() * 255.0, shape)
    chw = (chw - torch.tensor(mean, device=chw.device).view(3, 1, 1)) / torch.tensor(std, device=chw.device).view(3, 1, 1)
    padded = F.pad(chw, (0, target - shape[1], 0, target - shape[0]))
    return padded.unsqueeze(0), shape


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[N, H, W]`` bool: the pixels whose centres lie inside each box ``(x0, y0, x1, y1)``."""
    ys = torch.arange(height, dtype=torch.float32, device=boxes.device).view(1, -1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32, device=boxes.device).view(1, 1, -1) + 0.5
    x0, y0, x1, y1 = (boxes[:, i].float().view(-1, 1, 1) for i in range(4))
    return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


@torch.no_grad()
def segment_boxes(model, pixel_mean, pixel_std, image_rgb: torch.Tensor, boxes: torch.Tensor,
                  clip_to_box: bool = False) -> torch.Tensor:
    """SAM masks ``[N, H, W]`` (bool) for ``N`` box prompts ``(x0, y0, x1, y1)`` in image pixels.

    ``clip_to_box`` keeps each mask inside its box: SAM's box-prompted masks can leak past the box on
    low-contrast images, and a subject-replacement region must not spill into the scene.
    """
    height, width = image_rgb.shape[:2]
    if boxes.shape[0] == 0:
        return torch.zeros(0, height, width, dtype=torch.bool, device=image_rgb.device)
    device = next(model.parameters()).device
    target = model.config.vision_config.image_size
    pixels, shape = sam_pixels(image_rgb.to(device), target, pixel_mean, pixel_std)
    embeddings = model.get_image_embeddings(pixels)
    scale = torch.tensor([shape[1] / width, shape[0] / height] * 2, device=device)
    outputs = model(image_embeddings=embeddings, input_boxes=(boxes.to(device).float() * scale).unsqueeze(0),
                    multimask_output=False)
    low_res = outputs.pred_masks[0, :, 0].float()  # [N, h, w] logits
    logits = F.interpolate(low_res.unsqueeze(1), size=(target, target), mode="bilinear", align_corners=False)
    logits = logits[..., : shape[0], : shape[1]]
    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    masks = logits[:, 0] > 0.0
    if clip_to_box:
        masks &= box_masks(boxes.to(device), height, width)
    return masks.to(image_rgb.device)


def dilate_masks(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow ``[N, H, W]`` masks by ``pixels`` (square structuring element of side 2*pixels+1)."""
    if pixels <= 0 or masks.shape[0] == 0:
        return masks
    grown = F.max_pool2d(masks.float().unsqueeze(1), kernel_size=2 * pixels + 1, stride=1, padding=pixels)
    return grown.squeeze(1)


def combine_masks(masks: torch.Tensor, keep: str, height: int, width: int) -> torch.Tensor:
    """Masks of one image (best score first) -> what ``keep`` asks: ``[1, H, W]`` for union/best,
    ``[N, H, W]`` for all; an empty ``[1, H, W]`` when there are none."""
    if keep not in KEEP_MODES:
        raise ValueError(f"expected keep in {KEEP_MODES}, got {keep!r}")
    if masks.shape[0] == 0:
        return torch.zeros(1, height, width)
    masks = masks.float()
    if keep == "union":
        return masks.amax(dim=0, keepdim=True)
    if keep == "best":
        return masks[:1]
    return masks


def text_to_masks(gdino_model, tokenizer, sam_model, pixel_mean, pixel_std, images: torch.Tensor, prompt: str,
                  box_threshold: float = BOX_THRESHOLD, text_threshold: float = TEXT_THRESHOLD, keep: str = "union",
                  dilation: int = 0, detection_size: int = DETECTION_SIZE, clip_to_box: bool = False,
                  on_image_done: Callable[[int], None] | None = None,
                  before_image: Callable[[int], None] | None = None) -> LocalizationResult:
    """Masks of what ``prompt`` names in every image of ``images`` ``[B, H, W, C]`` (0..1).

    Every image is processed: one with no detection gives an empty mask and a warning. ``keep``:
    "union" (one mask per image, all detections), "best" (one per image, highest score), "all" (one per
    detection, images in order). ``dilation`` grows each mask by that many pixels (after the optional
    ``clip_to_box``, see `segment_boxes`).
    """
    if keep not in KEEP_MODES:
        raise ValueError(f"expected keep in {KEEP_MODES}, got {keep!r}")
    rgb = to_rgb(images)
    batch, height, width = rgb.shape[:3]
    out_masks, image_index, all_detections = [], [], []
    for i in range(batch):
        if before_image is not None:
            before_image(i)
        detections = detect(gdino_model, tokenizer, rgb[i], prompt, box_threshold, text_threshold, detection_size)
        if not detections:
            logger.warning("Text segment: %r found nothing in image %d of %d; its mask is empty", prompt, i + 1, batch)
        boxes = torch.tensor([d.box for d in detections], dtype=torch.float32).reshape(-1, 4)
        masks = segment_boxes(sam_model, pixel_mean, pixel_std, rgb[i], boxes, clip_to_box).cpu()
        masks = dilate_masks(combine_masks(masks, keep, height, width), dilation)
        out_masks.append(masks)
        image_index += [i] * masks.shape[0]
        all_detections.append(detections)
        if on_image_done is not None:
            on_image_done(i)
    return LocalizationResult(torch.cat(out_masks, dim=0), image_index, all_detections)


def preview(images: torch.Tensor, result: LocalizationResult, color=(1.0, 0.2, 0.2), alpha: float = 0.5,
            line: int = 2) -> torch.Tensor:
    """``[B, H, W, 3]``: each image with its masks tinted and its detection boxes outlined."""
    rgb = to_rgb(images).float().cpu().clone()
    tint = torch.tensor(color)
    for i in range(rgb.shape[0]):
        rows = [m for m, owner in zip(result.masks, result.image_index) if owner == i]
        mask = torch.stack(rows).amax(dim=0).unsqueeze(-1) if rows else torch.zeros(*rgb.shape[1:3], 1)
        rgb[i] = rgb[i] * (1 - alpha * mask) + alpha * mask * tint
        for detection in result.detections[i] if i < len(result.detections) else []:
            x0, y0, x1, y1 = (int(round(v)) for v in detection.box)
            x1, y1 = min(max(x1, x0 + 1), rgb.shape[2]), min(max(y1, y0 + 1), rgb.shape[1])
            rgb[i, y0:y1, x0:x0 + line] = tint
            rgb[i, y0:y1, max(x1 - line, x0):x1] = tint
            rgb[i, y0:y0 + line, x0:x1] = tint
            rgb[i, max(y1 - line, y0):y1, x0:x1] = tint
    return rgb
