"""Image batches -> masks: text prompts (Grounding DINO boxes -> SAM), or point/box prompts (SAM alone).

Implements the Subject Localization Module of MCA-Ctrl (mca-ctrl.txt, Sec. 3: "Grounding DINO ... SAM ...
to obtain the subject mask") the way Grounded-SAM chains the official libraries: ``predict()`` boxes
(pixels, xyxy) as box prompts of ``SamPredictor.predict_torch(boxes=..., multimask_output=False)``, one
mask per box. The per-model conventions live in `detection` and `segmentation`; the choice of which masks
to return (``keep``), dilation and the preview are this module's.

Pure torch/transformers: no ComfyUI here (see `localization.managed` for model management).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .detection import BOX_THRESHOLD, OFFICIAL, TEXT_THRESHOLD, Detection, DetectionOptions, detect
from .images import DETECTION_SIZE, to_rgb
from .segmentation import SamMasks, SamPrompts, segment

logger = logging.getLogger("qkv_control")

KEEP_MODES = ("union", "best", "all")
POSITIVE, NEGATIVE = 1, 0  # SAM point labels


@dataclass
class LocalizationResult:
    """Masks ``[M, H, W]`` (0/1 float), the input image each mask belongs to, and per image the boxes
    (pixels, xyxy) and points ``(x, y, label)`` that prompted SAM and the detections they came from."""

    masks: torch.Tensor
    image_index: list[int]
    boxes: list[list[tuple[float, float, float, float]]] = field(default_factory=list)
    points: list[list[tuple[float, float, int]]] = field(default_factory=list)
    detections: list[list[Detection]] = field(default_factory=list)


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[N, H, W]`` bool: the pixels whose centres lie inside each box ``(x0, y0, x1, y1)``."""
    ys = torch.arange(height, dtype=torch.float32).view(1, -1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, -1) + 0.5
    x0, y0, x1, y1 = (boxes[:, i].float().view(-1, 1, 1) for i in range(4))
    return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


def dilate_masks(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow ``[N, H, W]`` masks by ``pixels`` (square structuring element of side 2*pixels+1)."""
    if pixels <= 0 or masks.shape[0] == 0:
        return masks
    grown = F.max_pool2d(masks.float().unsqueeze(1), kernel_size=2 * pixels + 1, stride=1, padding=pixels)
    return grown.squeeze(1)


def combine_masks(sam: SamMasks, keep: str, height: int, width: int) -> torch.Tensor:
    """One image's SAM masks ``[prompts, candidates, H, W]`` -> what ``keep`` asks (float 0/1):

    - ``union``: ``[1, H, W]``, every prompt's best candidate (highest score) together;
    - ``best``: ``[1, H, W]``, the single candidate with the highest score;
    - ``all``: ``[prompts * candidates, H, W]``, every mask in prompt order (SAM's own output).

    An image without prompts gives one empty ``[1, H, W]``. Ties go to the first candidate / prompt.
    """
    if keep not in KEEP_MODES:
        raise ValueError(f"expected keep in {KEEP_MODES}, got {keep!r}")
    prompts, candidates = sam.scores.shape
    if prompts == 0:
        return torch.zeros(1, height, width)
    masks = sam.masks.float()
    if keep == "all":
        return masks.reshape(prompts * candidates, height, width)
    if keep == "best":
        flat = int(sam.scores.flatten().argmax())
        return masks[flat // candidates, flat % candidates].unsqueeze(0)
    best = sam.scores.argmax(dim=1)
    return masks[torch.arange(prompts), best].amax(dim=0, keepdim=True)


@dataclass(frozen=True)
class Hooks:
    """Callbacks around each image of a batch (ComfyUI's interrupt check and progress bar)."""

    before_image: Callable[[int], None] | None = None
    after_image: Callable[[int], None] | None = None


@dataclass
class ImageMasks:
    """One image's result: its masks ``[M, H, W]`` and what prompted SAM (see `LocalizationResult`)."""

    masks: torch.Tensor
    boxes: list[tuple[float, float, float, float]]
    points: list[tuple[float, float, int]] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)


def _over_batch(images: torch.Tensor, keep: str, hooks: Hooks,
                masks_of: Callable[[int, int, torch.Tensor], ImageMasks]) -> LocalizationResult:
    """``masks_of(index, batch, image_rgb)`` for every image, in order, collected into one result."""
    if keep not in KEEP_MODES:
        raise ValueError(f"expected keep in {KEEP_MODES}, got {keep!r}")
    rgb = to_rgb(images)
    result = LocalizationResult(torch.zeros(0), [])
    out_masks = []
    for i in range(rgb.shape[0]):
        if hooks.before_image is not None:
            hooks.before_image(i)
        one = masks_of(i, rgb.shape[0], rgb[i])
        out_masks.append(one.masks)
        result.image_index += [i] * one.masks.shape[0]
        result.boxes.append(one.boxes)
        result.points.append(one.points)
        result.detections.append(one.detections)
        if hooks.after_image is not None:
            hooks.after_image(i)
    result.masks = torch.cat(out_masks, dim=0)
    return result


def text_to_masks(gdino, sam, images: torch.Tensor, prompt: str, box_threshold: float = BOX_THRESHOLD,
                  text_threshold: float = TEXT_THRESHOLD, keep: str = "union", dilation: int = 0,
                  detection_size: int = DETECTION_SIZE, clip_to_box: bool = False,
                  options: DetectionOptions = OFFICIAL, hooks: Hooks = Hooks()) -> LocalizationResult:
    """Masks of what ``prompt`` names in every image of ``images`` ``[B, H, W, C]`` (0..1).

    ``gdino``/``sam``: `loading.GroundingDinoBundle` / `loading.SamBundle`. Every image is processed: one
    with no detection gives an empty mask and a warning. ``keep`` picks among the detections' masks (see
    `combine_masks`; "best" = highest Grounding DINO score). ``clip_to_box`` keeps each mask inside its box
    (SAM can leak past a box on low-contrast images), then ``dilation`` grows the masks by that many pixels.
    """

    def masks_of(i: int, batch: int, image: torch.Tensor) -> ImageMasks:
        height, width = image.shape[:2]
        detections = detect(gdino.model, gdino.tokenizer, image, prompt, box_threshold, text_threshold,
                            detection_size, options=options)
        if not detections:
            logger.warning("Text segment: %r found nothing in image %d of %d; its mask is empty", prompt, i + 1, batch)
        boxes = [d.box for d in detections]
        sam_masks = segment(sam.model, sam.pixel_mean, sam.pixel_std, image, SamPrompts.of(boxes=boxes))
        if clip_to_box and boxes:
            sam_masks.masks &= box_masks(torch.tensor(boxes), height, width).unsqueeze(1)
        scores = torch.tensor([[d.score] for d in detections]).reshape(-1, 1)
        masks = dilate_masks(combine_masks(SamMasks(sam_masks.masks, scores), keep, height, width), dilation)
        return ImageMasks(masks, boxes, detections=detections)

    return _over_batch(images, keep, hooks, masks_of)


def prompts_to_masks(sam, images: torch.Tensor, positive: list[list[tuple[float, float]]],
                     negative: list[list[tuple[float, float]]], boxes: list[list[tuple[float, float, float, float]]],
                     multimask_output: bool = True, keep: str = "union", hooks: Hooks = Hooks()) -> LocalizationResult:
    """SAM masks of every image of ``images`` for its points (positive, negative) and boxes (one list each
    per image, pixels). See `segmentation.segment` for how they become prompts and `combine_masks` for
    ``keep`` ("best" = highest predicted IoU). An image with no prompt gets an empty mask and a warning."""

    def masks_of(i: int, batch: int, image: torch.Tensor) -> ImageMasks:
        points = [(x, y, POSITIVE) for x, y in positive[i]] + [(x, y, NEGATIVE) for x, y in negative[i]]
        prompts = SamPrompts.of([(x, y) for x, y, _ in points], [label for *_, label in points], boxes[i])
        if prompts.count == 0:
            logger.warning("SAM segment: image %d of %d has no point or box prompt; its mask is empty", i + 1, batch)
        sam_masks = segment(sam.model, sam.pixel_mean, sam.pixel_std, image, prompts, multimask_output)
        return ImageMasks(combine_masks(sam_masks, keep, *image.shape[:2]), list(boxes[i]), points)

    return _over_batch(images, keep, hooks, masks_of)


def preview(images: torch.Tensor, result: LocalizationResult, color=(1.0, 0.2, 0.2), alpha: float = 0.5,
            line: int = 2) -> torch.Tensor:
    """``[B, H, W, 3]``: each image with its masks tinted, its prompt boxes outlined, and its points as
    squares (green on the object, red not on it)."""
    rgb = to_rgb(images).float().cpu().clone()
    tint = torch.tensor(color)
    point_colors = {POSITIVE: torch.tensor([0.1, 0.9, 0.1]), NEGATIVE: torch.tensor([0.9, 0.1, 0.1])}
    height, width = rgb.shape[1:3]
    for i in range(rgb.shape[0]):
        rows = [m for m, owner in zip(result.masks, result.image_index) if owner == i]
        mask = torch.stack(rows).amax(dim=0).unsqueeze(-1) if rows else torch.zeros(height, width, 1)
        rgb[i] = rgb[i] * (1 - alpha * mask) + alpha * mask * tint
        for box in result.boxes[i] if i < len(result.boxes) else []:
            x0, y0 = (min(max(int(round(v)), 0), limit) for v, limit in zip(box[:2], (width - 1, height - 1)))
            x1, y1 = (min(max(int(round(v)), 0), limit) for v, limit in zip(box[2:], (width, height)))
            x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
            rgb[i, y0:y1, x0:x0 + line] = tint
            rgb[i, y0:y1, max(x1 - line, x0):x1] = tint
            rgb[i, y0:y0 + line, x0:x1] = tint
            rgb[i, max(y1 - line, y0):y1, x0:x1] = tint
        for x, y, label in result.points[i] if i < len(result.points) else []:
            cx, cy = int(x), int(y)
            if 0 <= cx < width and 0 <= cy < height:
                rgb[i, max(cy - line, 0):cy + line + 1, max(cx - line, 0):cx + line + 1] = point_colors[label]
    return rgb
