"""SD1.5, SD2.x and SDXL: ComfyUI's UNet (``openaimodel.UNetModel``).

Every attention call sees image tokens only (self-attention ``attn1``) or image queries
against text keys (cross-attention ``attn2``); layers are reached by attn1/attn2 replace
patches and named by ComfyUI's blocks (``input:4``, ``output:3-5`` ...).
"""

from __future__ import annotations

from typing import Iterator

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample

from ..attention.layers import AttentionLayer
from .base import ModelFamily, diffusion_model_of


def walk_unet(unet) -> Iterator[tuple[AttentionLayer, object]]:
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


class UNetFamily(ModelFamily):
    name = "SD1.5 / SD2.x / SDXL (UNet)"
    config_names = ("SD15", "SD20", "SDXL", "...")
    diffusion_model_classes = (UNetModel,)

    def matches(self, model) -> bool:
        # Any model built on ComfyUI's UNet: the block walk reads the model, not a list.
        return isinstance(diffusion_model_of(model), UNetModel)

    def discover_layers(self, diffusion_model) -> tuple[AttentionLayer, ...]:
        return tuple(layer for layer, _ in walk_unet(diffusion_model))

    def block_spec_help(self) -> str:
        return "input, middle, output, input:N, output:N-M, input:N.T, #N-M, level:N-M"

    def text_width(self, model_config) -> int:
        return int(model_config.unet_config.get("context_dim") or 0)

    def pooled_width(self, model_config) -> int:
        # SDXL-style pooled text: what the adm encoder expects minus the 6 x 256 size embeddings
        adm = model_config.unet_config.get("adm_in_channels")
        return max(int(adm) - 6 * 256, 1) if adm else 0
