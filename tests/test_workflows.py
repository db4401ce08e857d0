"""Every workflow in workflows/ runs end to end on the real server, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))


def test_there_is_a_workflow():
    assert WORKFLOWS, "workflows/ holds no *.json"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs(comfy_server, path):
    import numpy as np
    from PIL import Image

    workflow = json.loads(path.read_text())
    prompt = comfy_server.api_prompt(workflow, tiny=True)
    # Tiny mode must leave no core loader that needs a real file.
    from qkv_control.client.workflow_format import TINY_SUBSTITUTES

    assert not [n["class_type"] for n in prompt.values() if n["class_type"] in TINY_SUBSTITUTES]
    entry = comfy_server.run(prompt, tiny=False, timeout=600)
    paths = comfy_server.output_paths(entry)
    images = [p for p in paths if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]
    assert images, f"{path.name} wrote no images (outputs: {entry.get('outputs')})"
    for image_path in images:
        assert image_path.is_file(), image_path
        pixels = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32)
        assert pixels.std() > 1.0, f"{image_path.name} is constant (std {pixels.std():.3f})"
