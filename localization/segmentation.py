"""SAM masks from point and box prompts, as segment-anything 1.0's ``SamPredictor`` computes them.

``SamPredictor.set_image`` + ``predict`` / ``predict_torch`` (``segment_anything/predictor.py``):

- the image resized and normalised as `images.sam_pixels` does, encoded once for all its prompts;
- prompt coordinates scaled by ``ResizeLongestSide.apply_coords`` (``x * new_w / old_w``, ``y * new_h /
  old_h``, in float64, then float32); points (label 1 foreground, 0 background) come before the box corners
  in the prompt, as the original prompt encoder orders them;
- one prompt per box (``predict_torch(boxes=[N, 4])``; points, if any, join every box's prompt), or one
  prompt holding all the points when there is no box;
- low-resolution logits upsampled to the padded input, cropped to the resized image, resized to the image
  (``Sam.postprocess_masks``, bilinear) and thresholded at ``mask_threshold = 0.0``.

The transformers ``SamModel`` runs the networks; its output equals the original's for converted weights
(tests/test_localization_reference.py compares them with segment-anything itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .images import sam_pixels

MASK_THRESHOLD = 0.0  # Sam.mask_threshold


@dataclass(frozen=True)
class SamPrompts:
    """Prompts for one image, in its pixels: ``points [P, 2]`` (x, y) with ``labels [P]`` (1 = on the object,
    0 = not on it), and ``boxes [N, 4]`` (x0, y0, x1, y1)."""

    points: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor

    @classmethod
    def of(cls, points=(), labels=(), boxes=()) -> SamPrompts:
        return cls(torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2),
                   torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
                   torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4))

    @property
    def count(self) -> int:
        """How many prompts (and so masks per candidate) SAM gets: one per box, or one for the points."""
        if self.boxes.shape[0]:
            return self.boxes.shape[0]
        return 1 if self.points.shape[0] else 0


@dataclass
class SamMasks:
    """``masks [prompts, candidates, H, W]`` (bool) and SAM's predicted IoU ``scores [prompts, candidates]``
    (3 candidates with ``multimask_output``, else 1)."""

    masks: torch.Tensor
    scores: torch.Tensor


def _scale_to_input(coords: torch.Tensor, height: int, width: int, shape: tuple[int, int]) -> torch.Tensor:
    """``ResizeLongestSide.apply_coords``: numpy float64 arithmetic, then float32 as ``predict`` converts."""
    scale = torch.tensor([shape[1] / width, shape[0] / height], dtype=torch.float64)
    return (coords.double().reshape(-1, 2) * scale).float()


@torch.no_grad()
def segment(model, pixel_mean, pixel_std, image_rgb: torch.Tensor, prompts: SamPrompts,
            multimask_output: bool = False) -> SamMasks:
    """SAM masks of one ``[H, W, 3]`` image (0..1) for ``prompts``: one entry per prompt (see `SamPrompts.count`)."""
    height, width = image_rgb.shape[:2]
    candidates = 3 if multimask_output else 1
    if prompts.count == 0:
        return SamMasks(torch.zeros(0, candidates, height, width, dtype=torch.bool), torch.zeros(0, candidates))
    device = next(model.parameters()).device
    target = model.config.vision_config.image_size
    pixels, shape = sam_pixels(image_rgb, target, pixel_mean, pixel_std)
    embeddings = model.get_image_embeddings(pixels.to(device))

    inputs = {}
    if prompts.points.shape[0]:
        points = _scale_to_input(prompts.points, height, width, shape).to(device)
        labels = prompts.labels.to(device)
        inputs["input_points"] = points.expand(prompts.count, -1, -1).unsqueeze(0)  # [1, prompts, P, 2]
        inputs["input_labels"] = labels.expand(prompts.count, -1).unsqueeze(0)
    if prompts.boxes.shape[0]:
        boxes = _scale_to_input(prompts.boxes, height, width, shape).reshape(-1, 4)
        inputs["input_boxes"] = boxes.to(device).unsqueeze(0)  # [1, prompts, 4]
    outputs = model(image_embeddings=embeddings, multimask_output=multimask_output, **inputs)
    low_res = outputs.pred_masks[0].float()  # [prompts, candidates, h, w] logits
    masks = postprocess_masks(low_res, target, shape, (height, width)) > MASK_THRESHOLD
    return SamMasks(masks.cpu(), outputs.iou_scores[0].float().cpu())


def postprocess_masks(low_res: torch.Tensor, target: int, input_shape: tuple[int, int],
                      original_shape: tuple[int, int]) -> torch.Tensor:
    """``Sam.postprocess_masks``: upsample to the padded input, crop the padding, resize to the image."""
    logits = F.interpolate(low_res, size=(target, target), mode="bilinear", align_corners=False)
    logits = logits[..., : input_shape[0], : input_shape[1]]
    return F.interpolate(logits, size=original_shape, mode="bilinear", align_corners=False)
