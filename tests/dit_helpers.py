"""Helpers of the diffusion-transformer tests: tiny models of each family with conditioning,
and sampling through the core KSampler path."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import nodes as comfy_nodes

from qkv_control.tiny.dit import TEXT_WIDTH, cached_dit_checkpoint, tiny_dit
from helpers import encode

LATENT_CHANNELS = {"flux": 16, "flux_schnell": 16, "sd35": 16, "chroma": 16, "flux2": 128}


@functools.lru_cache(maxsize=None)
def dit_kit(family: str):
    """(model, positive, negative) of a tiny ``family``: the tiny text encoders where the family
    has a checkpoint, else seeded random contexts of the model's text width."""
    if family in ("flux", "flux_schnell", "sd35"):
        model, clip, _ = cached_dit_checkpoint(family)
        return model, encode(clip, "a red fox in the snow"), encode(clip, "")
    generator = torch.Generator().manual_seed(7)
    model = tiny_dit(family)
    # As CLIP Text Encode gives them: a T5-only encoder's pooled output is None (some ComfyUI versions
    # read the key for Chroma and Flux 2).
    positive = [[torch.randn(1, 12, TEXT_WIDTH, generator=generator), {"pooled_output": None}]]
    negative = [[torch.randn(1, 12, TEXT_WIDTH, generator=generator), {"pooled_output": None}]]
    return model, positive, negative


def dit_sample(model, positive, negative, family: str, *, steps=3, cfg=3.0, size=16, seed=0,
               sampler="euler", scheduler="simple", batch=1):
    latent = torch.zeros((batch, LATENT_CHANNELS[family], size, size))
    out = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative,
                                      {"samples": latent})
    return out[0]["samples"]


def counting_override(calls: list, previous=None):
    """Another pack's attention override: records each call's batch size, then runs ``previous``
    (an override it found installed) or the attention function."""

    def override(func, *args, **kwargs):
        calls.append(args[0].shape[0])
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    return override


def split_heads(t, heads):
    b, n, inner = t.shape
    return t.reshape(b, n, heads, inner // heads).transpose(1, 2)


def sdpa_reference(q, k, v, heads, mask=None):
    """Plain attention on [B, N, heads*dim] with torch's SDPA (independent of ComfyUI); ``mask``
    an additive [B, 1, Nk] mask or None."""
    b, n, inner = q.shape
    attn_mask = None if mask is None else mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
                                         attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(b, n, inner)


class ModelRows:
    """Counts the diffusion model's forward calls and their batch rows."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.handle = model.model.diffusion_model.register_forward_pre_hook(
            lambda module, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
