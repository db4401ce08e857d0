"""A loaded IP-Adapter: image projection + per-layer decoupled K/V projections, matched
against a model's cross-attention layers (discovered, never a hard-coded block list)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.layers import AttentionLayer
from .files import IPAdapterWeights
from .projection import build_projection

# (context width, cross-attention layer count) of the released families.
FAMILY_NAMES = {(768, 16): "SD1.5", (1024, 16): "SD2.x", (2048, 70): "SDXL"}
# CLIP vision widths of the released encoders, to name them in errors.
VISION_NAMES = {768: "ViT-L", 1024: "ViT-H", 1280: "ViT-H hidden / ViT-bigG", 1664: "ViT-bigG hidden"}


def family_name(cross_dim: int, layers: int) -> str:
    name = FAMILY_NAMES.get((cross_dim, layers))
    detail = f"{layers} cross-attention layers, context width {cross_dim}"
    return f"{name} ({detail})" if name else f"a model with {detail}"


def diffusers_order(layers) -> list[AttentionLayer]:
    """Cross-attention layers in diffusers' processor order: down blocks, up blocks, then
    the mid block (the order ``ip_adapter.N`` numbers them in)."""
    attn2 = [layer for layer in layers if layer.kind == "attn2"]
    rank = {"input": 0, "output": 1, "middle": 2}
    return sorted(attn2, key=lambda layer: (rank[layer.section], layer.ordinal))


@dataclass
class ImageTokens:
    """Image prompt tokens of one reference: ``cond`` for the positive branch, ``uncond``
    (tokens of an empty image, as IP-Adapter trains with) for the negative; ``[1, T, D]``."""

    cond: torch.Tensor
    uncond: torch.Tensor


class IPAdapterModel:
    def __init__(self, weights: IPAdapterWeights, name: str = "IP-Adapter"):
        self.name = name
        self.projection, self.info = build_projection(weights.image_proj)
        self.kv = weights.kv
        self.cross_dim = weights.cross_dim
        if self.info["cross_dim"] != self.cross_dim:
            raise ValueError(f"{name}: expected image_proj output width {self.cross_dim} (the ip_adapter "
                             f"K/V input width), got {self.info['cross_dim']}")

    @property
    def layer_count(self) -> int:
        return len(self.kv)

    def describe(self) -> str:
        return (f"{self.info['kind']} projection, {self.info['tokens']} tokens, for "
                f"{family_name(self.cross_dim, self.layer_count)}, CLIP vision width {self.info['embed_dim']}")

    def layer_map(self, layers, context_dim: int, node: str) -> dict[tuple, tuple[torch.Tensor, torch.Tensor]]:
        """Layer key -> (to_k_ip, to_v_ip) for a model; a family mismatch is an error naming both."""
        ordered = diffusers_order(layers)
        if len(ordered) != self.layer_count or context_dim != self.cross_dim:
            raise ValueError(f"{node}: IP-Adapter weights are for {family_name(self.cross_dim, self.layer_count)}; "
                             f"the model is {family_name(context_dim, len(ordered))}")
        result = {}
        for i, layer in enumerate(ordered):
            w_k, w_v = self.kv[2 * i + 1]
            inner = layer.heads * layer.dim_head
            if w_k.shape[0] != inner:
                raise ValueError(f"{node}: IP-Adapter weights are for another model than "
                                 f"{family_name(context_dim, len(ordered))}: ip_adapter.{2 * i + 1} projects to "
                                 f"width {w_k.shape[0]}, the model's layer {layer.describe()} has width {inner} "
                                 f"(same layer count and context width, other attention widths)")
            result[layer.key] = (w_k, w_v)
        return result

    @torch.no_grad()
    def tokens_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Image prompt tokens ``[B, T, D]`` from CLIP features (embeds or hidden states)."""
        width = features.shape[-1]
        if width != self.info["embed_dim"]:
            want, got = self.info["embed_dim"], width
            raise ValueError(
                f"{self.name}: expected CLIP vision {self.info['input']} of width {want} "
                f"({VISION_NAMES.get(want, 'another encoder')}), the CLIP vision model gives {got} "
                f"({VISION_NAMES.get(got, 'another encoder')})")
        return self.projection(features.float().cpu())

    @torch.no_grad()
    def encode(self, clip_vision, image: torch.Tensor) -> ImageTokens:
        """Tokens of ``image`` ([B, H, W, C] in 0..1; several images are concatenated into one
        longer prompt). The negative is what IP-Adapter trains and runs with: zero embeddings
        for the linear projection, the hidden states of a black image for the Resampler."""
        key = self.info["input"]
        features = clip_vision.encode_image(image)[key]
        cond = self.tokens_from_features(features)
        if key == "image_embeds":
            uncond = self.tokens_from_features(torch.zeros_like(features))
        else:
            black = torch.zeros((1,) + tuple(image.shape[1:]), dtype=image.dtype)
            uncond = self.tokens_from_features(clip_vision.encode_image(black)[key]).expand(cond.shape[0], -1, -1)
        return ImageTokens(cond.reshape(1, -1, cond.shape[-1]), uncond.reshape(1, -1, uncond.shape[-1]))
