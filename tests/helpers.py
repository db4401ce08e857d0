"""Small helpers shared by the in-process tests (real ComfyUI, tiny models)."""

from __future__ import annotations

import torch

import comfy.model_patcher
import comfy.samplers
import nodes as comfy_nodes

from qkv_control.patching import keys


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


def uncond_recorder(patched):
    """Clone of ``patched`` whose post-CFG hook compares, at every step, the negative prediction
    of the patched run with the unpatched model's at the same x and sigma."""
    diffs = []

    def post_cfg(args):
        options = comfy.model_patcher.create_model_options_clone(args["model_options"])
        options["transformer_options"].pop(keys.CONTROLS, None)
        (plain,) = comfy.samplers.calc_cond_batch(args["model"], [args["uncond"]], args["input"], args["sigma"], options)
        diffs.append(float((args["uncond_denoised"] - plain).abs().max() / plain.abs().max()))
        return args["denoised"]

    m = patched.clone()
    m.set_model_sampler_post_cfg_function(post_cfg)
    return m, diffs
