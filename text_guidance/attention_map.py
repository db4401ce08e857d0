"""Word cross-attention maps (what mask guidance thresholds), captured while sampling.

``AttentionMapCapture`` averages the cross-attention maps of chosen prompt words over the
chosen layers, heads, words and sampling steps, per batch item of the prompt rows; only
``N x tokens`` cross-attention maps are built, and only in the chosen layers.
``sample_with_word_maps`` runs ComfyUI's KSampler with it and returns the maps as a MASK."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..attention.cross_attention import word_attention_map
from ..attention.layers import select_layers
from ..attention.rows import ROLE_COND
from ..attention.token_grid import layer_grid
from ..patching.control import AttentionCall, AttentionControl
from ..patching.layers import discover_layers
from ..patching.patch import add_control
from ..patching.prompt_tokens import expand_positions, prompt_token_count, word_token_positions


@dataclass
class _Scratch:
    size: Optional[tuple[int, int]]          # latent (h, w) the maps are resized to
    sum: Optional[torch.Tensor] = None       # [items, h, w] summed maps
    hits: Optional[torch.Tensor] = None      # [items] maps summed per item


class AttentionMapCapture(AttentionControl):
    """Writes the averaged maps (``[items, H, W]`` at latent resolution) to ``sink["maps"]``
    when the run ends."""

    kind = "attn2"

    def __init__(self, positions: list[int], context_tokens: int, layers: str, sink: dict):
        super().__init__()
        self.positions = list(positions)
        self.context_tokens = context_tokens
        self.layers = layers
        self.sink = sink

    def select_layers(self, layers):
        return select_layers(self.layers, layers, "attn2")

    def start_run(self, run) -> _Scratch:
        latent = run.latent_image
        return _Scratch(size=tuple(latent.shape[-2:]) if latent is not None else None)

    def attend(self, call: AttentionCall, q, k, v, attend_next):
        rows = call.rows(ROLE_COND)
        if rows:
            self._record(call, q[rows], k[rows])
        return attend_next(q, k, v)

    @torch.no_grad()
    def _record(self, call: AttentionCall, q, k) -> None:
        scratch: _Scratch = call.run.scratch(self)
        tokens = expand_positions(self.positions, self.context_tokens, k.shape[1])
        maps = word_attention_map(q, k, call.heads, tokens)            # [R, Nq]
        h, w = layer_grid(call.extra_options, maps.shape[1])
        maps = maps.reshape(-1, 1, h, w)
        size = scratch.size or (h, w)
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0].cpu()
        items = call.layout.items(ROLE_COND)
        needed = max(items) + 1
        if scratch.sum is None:
            scratch.sum, scratch.hits = torch.zeros((needed,) + tuple(size)), torch.zeros(needed)
        if needed > scratch.sum.shape[0]:
            grow = needed - scratch.sum.shape[0]
            scratch.sum = torch.cat([scratch.sum, torch.zeros((grow,) + tuple(size))])
            scratch.hits = torch.cat([scratch.hits, torch.zeros(grow)])
        for m, item in zip(maps, items):
            scratch.sum[item] += m
            scratch.hits[item] += 1

    def end_run(self, run) -> None:
        scratch: _Scratch = run.scratch(self)
        if scratch.sum is not None:
            self.sink["maps"] = scratch.sum / scratch.hits.clamp(min=1).view(-1, 1, 1)


def encode_prompt(clip, text: str):
    """CONDITIONING of ``text`` with its pooled output (SDXL's adm input needs it)."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sample_with_word_maps(model, clip, text: str, words: str, negative, latent_image, seed: int, steps: int,
                          cfg: float, sampler_name: str, scheduler: str, layers: str, denoise: float, node: str):
    """KSampler on ``text`` recording the words' maps: (LATENT, MASK [B, 8h, 8w] max-normalised
    per image). An error naming ``node`` when the prompt rows never ran (cfg 0, denoise 0)."""
    import nodes as comfy_nodes

    select_layers(layers, discover_layers(model), "attn2")
    positions = word_token_positions(clip, text, words, node)
    sink: dict = {}
    capture = AttentionMapCapture(positions, prompt_token_count(clip, text), layers, sink)
    (latent,) = comfy_nodes.common_ksampler(add_control(model, capture), seed, steps, cfg, sampler_name, scheduler,
                                            encode_prompt(clip, text), negative, latent_image, denoise=denoise)
    maps = sink.get("maps")
    if maps is None:
        raise ValueError(f"{node}: expected the sampler to run the prompt branch, got no attention maps "
                         "(cfg 0 or denoise 0?)")
    batch = latent["samples"].shape[0]
    maps = maps[:batch] if maps.shape[0] >= batch else maps.expand(batch, -1, -1)
    peak = maps.flatten(1).amax(dim=1).clamp(min=1e-8).view(-1, 1, 1)
    mask = F.interpolate((maps / peak).unsqueeze(1), scale_factor=8, mode="bilinear",
                         align_corners=False)[:, 0].clamp(0, 1)
    return latent, mask
