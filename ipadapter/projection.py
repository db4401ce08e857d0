"""IP-Adapter image projections: CLIP image features -> image prompt tokens.

- LinearProjection: ip-adapter_sd15 / sd15_light / sdxl / sdxl_vit-h (Ye et al. 2023,
  §3.2.1): ``LayerNorm(reshape(W e + b, [tokens, cross_dim]))`` on the projected CLIP
  image embedding ``e``.
- Resampler: the plus variants (sd15_plus, plus-face, plus_sdxl_vit-h): a Perceiver
  resampler (Flamingo) of learned latent queries over the penultimate CLIP hidden
  states, written from the structure of the released weights.

Both are built from a state dict's shapes, so any width loads (tiny test files too).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

# The released Resampler weights use 64-dim heads (IP-Adapter's resampler.py default).
RESAMPLER_DIM_HEAD = 64


class LinearProjection(nn.Module):
    def __init__(self, embed_dim: int, cross_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.cross_dim = cross_dim
        self.proj = nn.Linear(embed_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(embeds).reshape(-1, self.tokens, self.cross_dim)
        return self.norm(x)


class PerceiverAttention(nn.Module):
    """Latent queries attend to [image features; latents] (one softmax)."""

    def __init__(self, dim: int, inner_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        b = q.shape[0]

        def heads(x):
            return x.view(b, x.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).reshape(b, q.shape[1], -1))


def _feed_forward(dim: int, inner: int) -> nn.Sequential:
    # Indices 0 (norm), 1 and 3 (linears) match the released keys ``layers.N.1.{0,1,3}``.
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, inner_dim: int, ff_inner: int,
                 queries: int, embed_dim: int, output_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, inner_dim, heads), _feed_forward(dim, ff_inner)])
            for _ in range(depth)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(features.shape[0], -1, -1)
        features = self.proj_in(features)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def build_projection(state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict]:
    """The projection module for an ``image_proj`` state dict, loaded, and what it is:
    ``{"kind": "linear"|"resampler", "tokens", "cross_dim", "embed_dim", "input"}`` where
    ``input`` names the CLIP vision output it reads."""
    if "proj.weight" in state and "norm.weight" in state:
        cross_dim = state["norm.weight"].shape[0]
        out_features, embed_dim = state["proj.weight"].shape
        if out_features % cross_dim:
            raise ValueError(f"expected image_proj.proj.weight rows to be a multiple of the norm width {cross_dim}, "
                             f"got {out_features}")
        tokens = out_features // cross_dim
        module = LinearProjection(embed_dim, cross_dim, tokens)
        info = {"kind": "linear", "tokens": tokens, "cross_dim": cross_dim, "embed_dim": embed_dim,
                "input": "image_embeds"}
    elif "latents" in state and "proj_in.weight" in state:
        _, queries, dim = state["latents"].shape
        embed_dim = state["proj_in.weight"].shape[1]
        output_dim = state["proj_out.weight"].shape[0]
        depth = len({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.0\.to_q\.weight$", k))})
        if depth == 0:
            raise ValueError("expected Resampler layers 'image_proj.layers.N.0.to_q.weight', got none")
        inner_dim = state["layers.0.0.to_q.weight"].shape[0]
        ff_inner = state["layers.0.1.1.weight"].shape[0]
        heads = max(1, inner_dim // RESAMPLER_DIM_HEAD)
        module = Resampler(dim, depth, heads, inner_dim, ff_inner, queries, embed_dim, output_dim)
        info = {"kind": "resampler", "tokens": queries, "cross_dim": output_dim, "embed_dim": embed_dim,
                "input": "penultimate_hidden_states"}
    else:
        raise ValueError("expected an image_proj of a known IP-Adapter layout (linear 'proj.weight' + "
                         f"'norm.weight', or Resampler 'latents' + 'proj_in.weight'), got keys {sorted(state)[:6]}")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"expected image_proj keys of a {info['kind']} projection, got missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    module.eval().requires_grad_(False)
    return module, info
