"""Small helpers shared by the in-process tests (real ComfyUI, tiny models)."""

from __future__ import annotations

import torch

import nodes as comfy_nodes


def encode(clip, text: str):
    """CONDITIONING for ``text`` (with pooled output, so SDXL's adm input works)."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sample(model, positive, negative, *, seed=0, steps=4, cfg=5.0, sampler="ddim", scheduler="normal",
           batch=1, size=16, latent=None, denoise=1.0):
    """Run the core KSampler path and return the sampled latent."""
    if latent is None:
        latent = torch.zeros((batch, 4, size, size))
    out = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative,
                                      {"samples": latent}, denoise=denoise)
    return out[0]["samples"]
