"""Masks as users make them: PNG files loaded through ComfyUI's own loaders (Load Image, Load Image
(as Mask), Convert Image to Mask), grayscale and RGB, white, near-white and anti-aliased, into the
MCA-Ctrl nodes (issue 15: a white grayscale PNG loads as 0.99611, not 1).

One threshold: a pixel is in a mask when its loaded value is at least 0.5 (byte 128 and up), for
the subject mask and the target mask alike, at every layer. Runs are compared exactly (atol 0)
with the same masks given as exact binary tensors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import folder_paths
import nodes as comfy_nodes
from comfy_extras.nodes_mask import ImageToMask

from helpers import encode, inverted_pair, sample
from qkv_control.attention import mca_ctrl as mca
from qkv_control.attention.token_grid import token_grid
from qkv_control.nodes.mca_ctrl_nodes import QKVMCACtrlGenerate, QKVMCACtrlReplace

SIZE = 16
PIXELS = SIZE * 8
STEPS = 3
SCHEDULE = {"sagi_steps": 0.34, "salq_end": 1.0, "order": "sagi_first", "salq_layers": "all",
            "sagi_layers": "all", "subject_dilation": 1}


def _white(value=255):
    return np.full((PIXELS, PIXELS), value, np.uint8)


def _box(value=255):
    a = np.zeros((PIXELS, PIXELS), np.uint8)
    a[32:96, 32:96] = value
    return a


def _anti_aliased_disc():
    """A disc with a soft edge: every byte from 0 to 255 occurs, 127 and 128 among them."""
    y, x = np.mgrid[:PIXELS, :PIXELS]
    distance = np.hypot(y - 70.0, x - 60.0)
    return np.clip((40.0 - distance) * 32.0 + 128.0, 0, 255).astype(np.uint8)


def _white_with_a_hole():
    """White but for a small square the 2x2 layer's nearest samples (pixels 0 and 64) miss: full
    at the coarsest layer, not at the finer ones."""
    a = _white()
    a[80:96, 80:96] = 0
    return a


MASKS = {"white": _white, "near_white": lambda: _white(250), "box": _box, "anti_aliased": _anti_aliased_disc,
         "white_with_a_hole": _white_with_a_hole}


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    """PNG files of every mask, grayscale (L), RGB and RGBA (mask in the alpha channel, as the
    mask editor saves it: ComfyUI's MASK is 1 - alpha)."""
    directory = tmp_path_factory.mktemp("mask_inputs")
    for name, make in MASKS.items():
        a = make()
        Image.fromarray(a, "L").save(directory / f"{name}_gray.png")
        Image.fromarray(np.stack([a] * 3, -1), "RGB").save(directory / f"{name}_rgb.png")
        rgba = np.concatenate([np.full((PIXELS, PIXELS, 3), 90, np.uint8), (255 - a)[..., None]], -1)
        Image.fromarray(rgba, "RGBA").save(directory / f"{name}_alpha.png")
    previous = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(directory))
    yield directory
    folder_paths.set_input_directory(previous)


def _load(loader, name, kind):
    """MASK of ``{name}_{kind}.png`` through one of ComfyUI's core loaders."""
    file = f"{name}_{kind}.png"
    if loader == "LoadImageMask":
        channel = "alpha" if kind == "alpha" else "red"
        node = comfy_nodes.LoadImageMask()
        return getattr(node, node.FUNCTION)(file, channel)[0]  # the method's name differs across ComfyUI versions
    image, mask = comfy_nodes.LoadImage().load_image(file)
    if kind == "alpha":
        return mask
    return ImageToMask.execute(image, "red").args[0]


LOADERS = [(loader, kind) for loader in ("LoadImageMask", "LoadImage") for kind in ("gray", "rgb", "alpha")]


@pytest.mark.parametrize("loader, kind", LOADERS, ids=[f"{a}-{b}" for a, b in LOADERS])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_loaded_png_masks_binarise_at_byte_128(input_dir, loader, kind, name):
    mask = _load(loader, name, kind)
    expected = torch.from_numpy(MASKS[name]() >= 128).float()
    assert mask.shape == (1, PIXELS, PIXELS)
    torch.testing.assert_close(mca.binarize(mask)[0, 0], expected, atol=0, rtol=0)
    if name == "white":
        # White loads as 1.0 or just below it (0.99611 through LoadImage's grayscale path on ComfyUI
        # 0.30, the case of issue 15): either way one full mask.
        assert 0.99 <= float(mask.max()) <= 1.0


@pytest.fixture(scope="module")
def kit():
    from qkv_control.tiny.models import tiny_checkpoint
    model, clip, _ = tiny_checkpoint("sd15")
    subject, scene = inverted_pair(model, SIZE, STEPS)
    return {"model": model, "clip": clip, "subject": subject, "scene": scene,
            "positive": encode(clip, "a photo of a dog on the beach"), "negative": encode(clip, "")}


def _replace(kit, subject_mask, target_mask):
    (model,) = QKVMCACtrlReplace.execute(kit["model"], kit["subject"], subject_mask, kit["scene"], target_mask,
                                         target_dilation=1, **SCHEDULE).args
    return model


def _run(kit, model):
    return sample(model, kit["positive"], kit["negative"], steps=STEPS, size=SIZE)


def _exact(name):
    return torch.from_numpy(MASKS[name]() >= 128).float()[None]


@pytest.mark.parametrize("kind", ["gray", "rgb"])
def test_white_png_target_mask_is_a_full_mask(input_dir, kit, caplog, kind):
    """The issue's case: a white PNG target mask (0.99611 when grayscale) is a full mask, said at
    the node, and samples exactly as torch.ones does (it used to stop inside the sampler with
    "expected a non-empty scene background")."""
    subject = _load("LoadImageMask", "box", kind)
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        model = _replace(kit, subject, _load("LoadImageMask", "white", kind))
    assert "covers the whole image" in caplog.text
    reference = _replace(kit, _exact("box"), torch.ones((1, PIXELS, PIXELS)))
    torch.testing.assert_close(_run(kit, model), _run(kit, reference), atol=0, rtol=0)


SAMPLED = [("LoadImageMask", "gray"), ("LoadImage", "rgb"), ("LoadImage", "alpha")]


@pytest.mark.parametrize("loader, kind", SAMPLED, ids=[f"{a}-{b}" for a, b in SAMPLED])
def test_png_masks_sample_as_their_binary_masks(input_dir, kit, loader, kind):
    """Near-white subject mask and anti-aliased target mask, from PNG through the core loaders,
    sample exactly as the same masks thresholded at 128 and given as tensors."""
    model = _replace(kit, _load(loader, "near_white", kind), _load(loader, "anti_aliased", kind))
    reference = _replace(kit, _exact("near_white"), _exact("anti_aliased"))
    torch.testing.assert_close(_run(kit, model), _run(kit, reference), atol=0, rtol=0)


def test_a_mask_full_at_the_coarsest_layer_only_is_consistent(input_dir, kit):
    """White but for a small hole: at the coarsest layer the target mask is full (no background
    keys, none needed), at finer layers the hole is background. Runs, and every layer's key set
    and fusion weights come from one binary mask."""
    model = _replace(kit, _load("LoadImageMask", "box", "gray"), _load("LoadImageMask", "white_with_a_hole", "gray"))
    from qkv_control.patching.patch import registered_controls

    control = registered_controls(model)[0]
    seen = {}
    original = control._mca_attention

    def spy(call, phase, masks, *args):
        seen[masks.region.shape[-1]] = masks
        return original(call, phase, masks, *args)

    control._mca_attention = spy
    _run(kit, model)
    hole = _exact("white_with_a_hole")
    for n_tokens, masks in seen.items():
        grid = token_grid((SIZE, SIZE), n_tokens)
        expected = torch.nn.functional.interpolate(hole[None], size=grid).flatten()
        assert torch.equal(masks.region.flatten(), expected)
        assert torch.equal(masks.background_keys.flatten(), expected < 1)
    assert bool(seen[4].region.eq(1).all()) and not bool(seen[SIZE * SIZE].region.eq(1).all())


def test_generation_node_with_a_white_png_target_mask(input_dir, kit, caplog):
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        (model,) = QKVMCACtrlGenerate.execute(kit["model"], kit["clip"], kit["subject"],
                                              _load("LoadImage", "box", "rgb"), "a photo of a dog on the beach",
                                              "dog", 0.3, target_mask=_load("LoadImage", "white", "gray"),
                                              **SCHEDULE).args
    assert "covers the whole image" in caplog.text
    (reference,) = QKVMCACtrlGenerate.execute(kit["model"], kit["clip"], kit["subject"], _exact("box"),
                                              "a photo of a dog on the beach", "dog", 0.3,
                                              target_mask=torch.ones((1, PIXELS, PIXELS)), **SCHEDULE).args
    torch.testing.assert_close(_run(kit, model), _run(kit, reference), atol=0, rtol=0)
