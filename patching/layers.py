"""Discover a UNet's attention layers from the model itself (SD1.5, SD2.x, SDXL, ...)."""

from __future__ import annotations

import weakref

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ..attention.layers import AttentionLayer

_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _diffusion_model(model):
    """Accept a ModelPatcher, a BaseModel or the UNet itself."""
    if hasattr(model, "model") and hasattr(model.model, "diffusion_model"):
        model = model.model
    if hasattr(model, "diffusion_model"):
        model = model.diffusion_model
    if not all(hasattr(model, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(
            f"expected a UNet model (SD1.5, SD2.x or SDXL family) with input/middle/output blocks, got {type(model).__name__}"
        )
    return model


def discover_layers(model) -> tuple[AttentionLayer, ...]:
    """Every attn1/attn2 of the UNet in forward order, with block keys and resolution levels."""
    unet = _diffusion_model(model)
    cached = _cache.get(unet)
    if cached is not None:
        return cached
    layers: list[AttentionLayer] = []
    ordinals = {"attn1": 0, "attn2": 0}
    level = 0

    def visit(section: str, number: int, block) -> None:
        nonlocal level
        for module in block:
            if isinstance(module, SpatialTransformer):
                for index, tb in enumerate(module.transformer_blocks):
                    for kind in ("attn1", "attn2"):
                        attn = getattr(tb, kind, None)
                        if attn is None:
                            continue
                        layers.append(AttentionLayer(kind, (section, number), index, ordinals[kind], level,
                                                     attn.heads, attn.dim_head))
                        ordinals[kind] += 1
            elif isinstance(module, Downsample):
                level += 1
            elif isinstance(module, Upsample):
                level -= 1

    for number, block in enumerate(unet.input_blocks):
        visit("input", number, block)
    visit("middle", 0, unet.middle_block)
    for number, block in enumerate(unet.output_blocks):
        visit("output", number, block)
    result = tuple(layers)
    _cache[unet] = result
    return result
