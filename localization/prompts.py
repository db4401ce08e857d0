"""Prompts in ComfyUI's conventions: core's ``BOUNDING_BOX`` values and JSON point lists.

``BOUNDING_BOX`` (``comfy_api.latest.io.BoundingBox``): a box is ``{"x", "y", "width", "height"}`` in pixels
(core's detectors add ``"score"`` and ``"label"``). Core nodes pass one box (``PrimitiveBoundingBox``), a
list of boxes for every image, or a list per image (``SAM3_Detect``, ``RTDETR_detect``,
``CreateBoundingBoxes``); core's ``DrawBBoxes`` reads all three. An empty list means no box.

Points: a JSON list ``[{"x": .., "y": ..}, ...]`` in pixels, the format core's ``SAM3_Detect`` reads
(``positive_coords`` / ``negative_coords``) and points-editor nodes write; a list of such lists gives each
image its own points.

Pure python/torch: no ComfyUI import.
"""

from __future__ import annotations

import json
import math
from numbers import Real

from .detection import Detection

POINTS_FORMAT = '[{"x": 120, "y": 80}, ...] (pixels)'


def _per_image(frames: list, batch: int, what: str) -> list:
    """One entry per image: a single frame applies to every image, else one frame per image."""
    if len(frames) == 1:
        return frames * batch
    if len(frames) != batch:
        raise ValueError(f"expected {what} for 1 image (used for all) or for each of the {batch} images, "
                         f"got {len(frames)} lists")
    return frames


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"expected {what} as a finite number, got {value!r}")
    return float(value)


def _box(box, index: int) -> tuple[float, float, float, float]:
    if not isinstance(box, dict) or not {"x", "y", "width", "height"} <= set(box):
        raise ValueError(f"expected a bounding box {{'x', 'y', 'width', 'height'}} (pixels) as box {index}, "
                         f"got {box!r}")
    x, y = _number(box["x"], "a box's x"), _number(box["y"], "a box's y")
    width, height = _number(box["width"], "a box's width"), _number(box["height"], "a box's height")
    if width < 0 or height < 0:
        raise ValueError(f"expected a bounding box with width and height >= 0, got {box!r}")
    return x, y, x + width, y + height


def boxes_per_image(bboxes, batch: int) -> list[list[tuple[float, float, float, float]]]:
    """A ``BOUNDING_BOX`` value (None, one box, a list of boxes, or a list per image) -> ``(x0, y0, x1, y1)``
    boxes for each of ``batch`` images."""
    if bboxes is None:
        return [[] for _ in range(batch)]
    if isinstance(bboxes, dict):
        frames = [[bboxes]]
    elif isinstance(bboxes, (list, tuple)):
        if not bboxes:
            frames = [[]]
        elif all(isinstance(item, (list, tuple)) for item in bboxes):
            frames = [list(item) for item in bboxes]
        elif all(isinstance(item, dict) for item in bboxes):
            frames = [list(bboxes)]
        else:
            raise ValueError(f"expected BOUNDING_BOX as boxes or one list of boxes per image, got a list mixing "
                             f"{sorted({type(item).__name__ for item in bboxes})}")
    else:
        raise ValueError(f"expected BOUNDING_BOX as a box {{'x', 'y', 'width', 'height'}} or a list of them, "
                         f"got {type(bboxes).__name__}")
    return [[_box(box, i) for i, box in enumerate(frame)] for frame in _per_image(frames, batch, "boxes")]


def _point(point, index: int, what: str) -> tuple[float, float]:
    if not isinstance(point, dict) or not {"x", "y"} <= set(point):
        raise ValueError(f"expected {what} as {POINTS_FORMAT}, got {point!r} as point {index}")
    return _number(point["x"], "a point's x"), _number(point["y"], "a point's y")


def points_per_image(coords: str | None, batch: int, what: str = "points") -> list[list[tuple[float, float]]]:
    """A JSON point list (or a list of lists, one per image; empty or None = no point) -> points per image."""
    if coords is None or not str(coords).strip():
        return [[] for _ in range(batch)]
    try:
        data = json.loads(coords)
    except json.JSONDecodeError as error:
        raise ValueError(f"expected {what} as JSON {POINTS_FORMAT}, got text that is not JSON ({error}): "
                         f"{str(coords)[:80]!r}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"expected {what} as JSON {POINTS_FORMAT}, got {type(data).__name__}")
    if data and all(isinstance(item, list) for item in data):
        frames = data
    else:
        frames = [data]
    return [[_point(p, i, what) for i, p in enumerate(frame)] for frame in _per_image(frames, batch, what)]


def detections_to_bounding_boxes(detections: list[list[Detection]]) -> list[list[dict]]:
    """Per-image detections -> core's ``BOUNDING_BOX`` list per image (pixels, with score and label), the
    shape ``SAM3_Detect`` and ``RTDETR_detect`` output."""
    return [[{"x": d.box[0], "y": d.box[1], "width": d.box[2] - d.box[0], "height": d.box[3] - d.box[1],
              "score": d.score, "label": d.phrase} for d in frame] for frame in detections]
