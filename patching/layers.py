"""Discover a model's attention layers from the model itself, through its family adapter
(``families.registry``): UNets (SD1.5, SD2.x, SDXL ...) and diffusion transformers."""

from __future__ import annotations

import weakref

from ..attention.layers import AttentionLayer
from ..families.base import diffusion_model_of
from ..families.registry import family_of
from ..families.unet import UNetFamily, walk_unet

_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def discover_layers(model) -> tuple[AttentionLayer, ...]:
    """Every attention layer of the model in forward order, with block keys (UNet: attn1/attn2
    with resolution levels; DiT: the joint attentions of its blocks, kind attn1)."""
    family = family_of(model)
    diffusion_model = diffusion_model_of(model)
    cached = _cache.get(diffusion_model)
    if cached is not None:
        return cached
    result = family.discover_layers(diffusion_model)
    _cache[diffusion_model] = result
    return result


def _unet(model):
    family = family_of(model)
    if not isinstance(family, UNetFamily):
        raise ValueError(f"expected a UNet model (SD1.5, SD2.x or SDXL family) with attn1/attn2 modules, "
                         f"got a {family.name} model")
    return diffusion_model_of(model)


def attention_modules(model, layers) -> dict[tuple[str, tuple], object]:
    """The CrossAttention modules (``attn1``/``attn2`` of a transformer block) of discovered
    ``layers`` in ``model`` (ModelPatcher, BaseModel or UNet), by ``(kind, key)``: the
    modules ComfyUI runs, so a weight patch on the model (LoRA) applies to them too."""
    wanted = {(layer.kind, layer.key) for layer in layers}
    found = {(layer.kind, layer.key): module for layer, module in walk_unet(_unet(model))
             if (layer.kind, layer.key) in wanted}
    missing = wanted - found.keys()
    if missing:
        raise ValueError(f"expected attention layers {sorted(missing)} in the model, got none there "
                         "(layers discovered from another model?)")
    return found


def attention_module(model, layer: AttentionLayer):
    """The CrossAttention module of one discovered ``layer`` in ``model``."""
    return attention_modules(model, (layer,))[(layer.kind, layer.key)]
