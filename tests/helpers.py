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


def inverted_pair(model, size: int, steps: int, seed: int = 1):
    """Two DDIM inversions (subject, scene) of random latents, for the MCA-Ctrl tests."""
    from qkv_control.inversion.invert import invert

    g = torch.Generator().manual_seed(seed)
    return tuple(invert(model, torch.randn((1, 4, size, size), generator=g) * 0.5, steps, "normal")[0]
                 for _ in range(2))
