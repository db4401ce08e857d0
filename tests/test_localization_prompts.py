"""Prompts in ComfyUI's conventions: core BOUNDING_BOX values and JSON point lists, read per image as core's
nodes write them (``PrimitiveBoundingBox``: one dict; ``RTDETR_detect`` / ``SAM3_Detect``: a list per image;
``CreateBoundingBoxes``: ``[[...]]`` or ``[]``; points as ``SAM3_Detect``'s ``positive_coords``)."""

from __future__ import annotations

import json

import pytest

from qkv_control.localization import prompts
from qkv_control.localization.detection import Detection

BOX = {"x": 10, "y": 20, "width": 30, "height": 40}
XYXY = (10.0, 20.0, 40.0, 60.0)


@pytest.mark.parametrize("value,expected", [
    (None, [[], [], []]),
    (BOX, [[XYXY]] * 3),  # PrimitiveBoundingBox: one box for every image
    ([], [[], [], []]),  # CreateBoundingBoxes with no box drawn
    ([BOX, dict(BOX, x=0)], [[XYXY, (0.0, 20.0, 30.0, 60.0)]] * 3),  # one list for every image
    ([[BOX]], [[XYXY]] * 3),  # CreateBoundingBoxes: one frame
    ([[BOX], [], [dict(BOX, score=0.9, label="cat")]], [[XYXY], [], [XYXY]]),  # a list per image (SAM3/RT-DETR)
])
def test_bounding_box_values_per_image(value, expected):
    assert prompts.boxes_per_image(value, 3) == expected


@pytest.mark.parametrize("value,message", [
    ([[BOX], [BOX]], "for 1 image .* or for each of the 3 images, got 2"),
    ({"x": 1, "y": 2}, "expected a bounding box .* got"),
    ([BOX, [BOX]], "mixing"),
    (dict(BOX, width=-3), "width and height >= 0"),
    (dict(BOX, x=float("nan")), "finite number"),
    ("10,20,30,40", "got str"),
])
def test_bad_bounding_box_values_are_clear_errors(value, message):
    with pytest.raises(ValueError, match=message):
        prompts.boxes_per_image(value, 3)


@pytest.mark.parametrize("text,expected", [
    ("", [[], []]),
    ("[]", [[], []]),
    (None, [[], []]),
    ('[{"x": 12, "y": 7.5}, {"x": 0, "y": 100}]', [[(12.0, 7.5), (0.0, 100.0)]] * 2),
    ('{"x": 3, "y": 4}', [[(3.0, 4.0)]] * 2),
    ('[[{"x": 1, "y": 2}], [{"x": 3, "y": 4}]]', [[(1.0, 2.0)], [(3.0, 4.0)]]),  # one list per image
])
def test_point_lists_per_image(text, expected):
    assert prompts.points_per_image(text, 2) == expected


@pytest.mark.parametrize("text,message", [
    ("[{x: 1}]", "not JSON"),
    ('[{"x": 1}]', r'expected positive_coords as \[\{"x"'),
    ('[{"x": "1", "y": 2}]', "finite number, got '1'"),
    ('[[{"x": 1, "y": 2}], [], []]', "for 1 image .* or for each of the 2 images, got 3"),
    ("5", "got int"),
])
def test_bad_point_lists_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        prompts.points_per_image(text, 2, "positive_coords")


def test_detections_become_core_bounding_boxes_that_read_back():
    detections = [[Detection((1.5, 2.0, 11.5, 22.0), 0.8, "cat", 4)], []]
    bboxes = prompts.detections_to_bounding_boxes(detections)
    assert bboxes == [[{"x": 1.5, "y": 2.0, "width": 10.0, "height": 20.0, "score": 0.8, "label": "cat"}], []]
    assert json.loads(json.dumps(bboxes)) == bboxes  # plain JSON values, as core's nodes pass them
    assert prompts.boxes_per_image(bboxes, 2) == [[(1.5, 2.0, 11.5, 22.0)], []]
