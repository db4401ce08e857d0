"""Discover a UNet's attention layers from the model itself (SD1.5, SD2.x, SDXL, ...)."""

from __future__ import annotations

import weakref
from typing import Iterator

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


def _walk(unet) -> Iterator[tuple[AttentionLayer, object]]:
    """Every attn1/attn2 of the UNet in forward order: (descriptor, its CrossAttention module).
    input_blocks / middle_block / output_blocks -> SpatialTransformer -> transformer_blocks[i]."""
    ordinals = {"attn1": 0, "attn2": 0}
    level = 0

    def visit(section: str, number: int, block):
        nonlocal level
        for module in block:
            if isinstance(module, SpatialTransformer):
                for index, tb in enumerate(module.transformer_blocks):
                    for kind in ("attn1", "attn2"):
                        attn = getattr(tb, kind, None)
                        if attn is None:
                            continue
                        yield AttentionLayer(kind, (section, number), index, ordinals[kind], level,
                                             attn.heads, attn.dim_head), attn
                        ordinals[kind] += 1
            elif isinstance(module, Downsample):
                level += 1
            elif isinstance(module, Upsample):
                level -= 1

    for number, block in enumerate(unet.input_blocks):
        yield from visit("input", number, block)
    yield from visit("middle", 0, unet.middle_block)
    for number, block in enumerate(unet.output_blocks):
        yield from visit("output", number, block)


def discover_layers(model) -> tuple[AttentionLayer, ...]:
    """Every attn1/attn2 of the UNet in forward order, with block keys and resolution levels."""
    unet = _diffusion_model(model)
    cached = _cache.get(unet)
    if cached is not None:
        return cached
    result = tuple(layer for layer, _ in _walk(unet))
    _cache[unet] = result
    return result


def attention_modules(model, layers) -> dict[tuple[str, tuple], object]:
    """The CrossAttention modules (``attn1``/``attn2`` of a transformer block) of discovered
    ``layers`` in ``model`` (ModelPatcher, BaseModel or UNet), by ``(kind, key)``: the
    modules ComfyUI runs, so a weight patch on the model (LoRA) applies to them too."""
    wanted = {(layer.kind, layer.key) for layer in layers}
    found = {(layer.kind, layer.key): module for layer, module in _walk(_diffusion_model(model))
             if (layer.kind, layer.key) in wanted}
    missing = wanted - found.keys()
    if missing:
        raise ValueError(f"expected attention layers {sorted(missing)} in the model, got none there "
                         "(layers discovered from another model?)")
    return found


def attention_module(model, layer: AttentionLayer):
    """The CrossAttention module of one discovered ``layer`` in ``model``."""
    return attention_modules(model, (layer,))[(layer.kind, layer.key)]
