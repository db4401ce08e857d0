"""Tiny random-weight diffusion transformers built with ComfyUI's own classes.

Flux.1 dev (guidance embedding) and schnell, SD3.5 (MMDiT with q/k RMS norms and one
MMDiT-X block, as SD3.5 Medium), Chroma and Flux 2: ComfyUI's model configs
(``comfy.supported_models``) with small widths and depths, seeded weights (norm weights 1,
SD3's position embedding the 2-D sin-cos table) and the last layer scaled so the velocity
has unit std on unit input. Block structure (double/single/joint blocks, patchify, token
order) is the real families', so nothing downstream may assume a block list.

Text encoders, where the family has a checkpoint (``CHECKPOINT_FAMILIES``): ComfyUI's own
classes with tiny configs through ``model_options["<name>_model_config"]``:

- Flux.1: ``FluxClipModel`` (CLIP-L + T5-XXL, both 64 wide) with ``FluxTokenizer`` (T5
  padded to 256 tokens, as the real one);
- SD3.5: ``SD3ClipModel`` with CLIP-L + CLIP-G (64 wide each) and no T5 (a configuration
  ComfyUI supports: the CLIP context padded to 4096 wide, 77 tokens per chunk). T5 is left
  out because SD3 concatenates its output with the 4096-wide CLIP context, so a tiny T5
  would need a 4096 x 32128 embedding.

The VAE is ComfyUI's TAESD with 16 latent channels (random weights).
"""

from __future__ import annotations

import copy
import functools

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import comfy.text_encoders.flux
import comfy.text_encoders.sd3_clip
from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

from .models import initialise

# Families with a whole tiny checkpoint (model, text encoder, VAE); the others are
# diffusion models only (family-adapter tests).
CHECKPOINT_FAMILIES = ("flux", "flux_schnell", "sd35")
MODEL_FAMILIES = CHECKPOINT_FAMILIES + ("chroma", "flux2")

TEXT_WIDTH = 64
_CLIP_CONFIG = {"hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH, "num_attention_heads": 4,
                # 3 layers: SD3's CLIP-L reads the penultimate layer's hidden state
                "num_hidden_layers": 3, "projection_dim": TEXT_WIDTH}
_T5_CONFIG = {"d_model": TEXT_WIDTH, "d_ff": 2 * TEXT_WIDTH, "d_kv": 16, "num_heads": 4, "num_layers": 2}
SD3_CONTEXT_WIDTH = 4096  # SD3ClipModel pads the CLIP context to T5-XXL's width
SD3_POOLED_WIDTH = 2 * TEXT_WIDTH  # CLIP-L pooled + CLIP-G projected pooled

_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": TEXT_WIDTH,
         "context_in_dim": TEXT_WIDTH, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4, "depth": 2,
         "depth_single_blocks": 3, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True,
         "txt_ids_dims": []}
_CONFIGS = {
    # comfy/model_detection.py's Flux.1 config with hidden 3072 -> 64, 19 + 38 blocks -> 2 + 3
    "flux": (comfy.supported_models.Flux, {**_FLUX, "guidance_embed": True}),
    "flux_schnell": (comfy.supported_models.FluxSchnell, {**_FLUX, "guidance_embed": False}),
    # SD3.5 Medium-like: q/k RMS norms, MMDiT-X self-attention in block 0; depth 2 = 128 wide, 2 heads of 64
    "sd35": (comfy.supported_models.SD3, {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "num_blocks": 3, "input_size": None,
        "pos_embed_scaling_factor": None, "adm_in_channels": SD3_POOLED_WIDTH, "num_patches": 64 * 64,
        "pos_embed_max_size": 64, "qk_norm": "rms", "x_block_self_attn_layers": [0],
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": SD3_CONTEXT_WIDTH, "out_features": 128}}}),
    # Chroma: Flux.1's blocks without modulation weights, modulations from the approximator
    "chroma": (comfy.supported_models.Chroma, {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": TEXT_WIDTH,
        "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 3,
        "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64,
        "hidden_dim": 64, "n_layers": 2, "txt_ids_dims": [], "vec_in_dim": None}),
    # Flux 2: global modulation, SiLU MLPs, 128-channel latents, patch 1, text positions on axis 3
    "flux2": (comfy.supported_models.Flux2, {
        "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
        "context_in_dim": TEXT_WIDTH, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 4, "depth": 2,
        "depth_single_blocks": 3, "axes_dim": [4, 4, 4, 4], "theta": 2000, "patch_size": 1, "qkv_bias": False,
        "guidance_embed": True, "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
        "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3]}),
}


def _check_family(family: str, families=MODEL_FAMILIES) -> None:
    if family not in families:
        raise ValueError(f"tiny diffusion transformers: expected family one of {families}, got '{family}'")


def dit_config(family: str) -> dict:
    _check_family(family)
    return copy.deepcopy(_CONFIGS[family][1])


@torch.no_grad()
def _unit_norms(module: torch.nn.Module) -> None:
    """Norm weights 1 in every norm class (``initialise`` misses MMDiT's ``ln_q`` and Chroma's
    ``norms.N``): near-zero q/k norms would make every attention uniform."""
    for sub in module.modules():
        if "Norm" in type(sub).__name__ and isinstance(getattr(sub, "weight", None), torch.nn.Parameter):
            if sub.weight.ndim == 1:
                sub.weight.fill_(1.0)


@torch.no_grad()
def _fill_position_embedding(diffusion_model) -> None:
    """SD3's position table (a buffer ComfyUI leaves empty): the 2-D sin-cos embedding of its grid."""
    pos_embed = getattr(diffusion_model, "pos_embed", None)
    if pos_embed is None:
        return
    size = int(diffusion_model.pos_embed_max_size)
    table = get_2d_sincos_pos_embed(pos_embed.shape[-1], size)
    pos_embed.copy_(torch.from_numpy(table).float().reshape(pos_embed.shape))


def _sample_inputs(family: str, model, generator) -> dict:
    latent = 128 if family == "flux2" else 16
    x = torch.randn((2, latent, 16, 16), generator=generator)
    context_width = SD3_CONTEXT_WIDTH if family == "sd35" else TEXT_WIDTH
    inputs = {"x": x, "context": torch.randn((2, 24, context_width), generator=generator)}
    config = model.model_config.unet_config
    if family == "sd35":
        inputs["y"] = torch.randn((2, SD3_POOLED_WIDTH), generator=generator)
    elif config.get("vec_in_dim"):
        inputs["y"] = torch.randn((2, config["vec_in_dim"]), generator=generator)
    if family == "chroma" or config.get("guidance_embed"):
        inputs["guidance"] = torch.full((2,), 3.5)
    return inputs


@torch.no_grad()
def _calibrate_output(family: str, model, seed: int) -> None:
    """Scale the final projection so the velocity has unit std at sigma 0.5, as a trained
    flow model's would (its target eps - x0 has std ~1.4 for unit data)."""
    generator = torch.Generator().manual_seed(seed + 10)
    inputs = _sample_inputs(family, model, generator)
    t = model.model_sampling.timestep(torch.tensor([0.5, 0.5])).float()
    out = model.diffusion_model(inputs.pop("x"), t, **inputs)
    model.diffusion_model.final_layer.linear.weight.div_(float(out.std()))


def tiny_dit(family: str = "flux", seed: int = 0, overrides: dict | None = None) -> comfy.model_patcher.ModelPatcher:
    """A fresh ModelPatcher around a tiny diffusion transformer of ``family``; ``overrides``:
    config entries to change (wider or deeper models for benchmarks)."""
    _check_family(family)
    config_cls, config = _CONFIGS[family]
    model_config = config_cls(dict(config, **(overrides or {}), dtype=torch.float32))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    initialise(model.diffusion_model, seed)
    _unit_norms(model.diffusion_model)
    _fill_position_embedding(model.diffusion_model)
    _calibrate_output(family, model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def tiny_dit_clip(family: str = "flux", seed: int = 0) -> comfy.sd.CLIP:
    """The tiny text encoder of a checkpoint family (see the module docstring)."""
    _check_family(family, CHECKPOINT_FAMILIES)
    options = {"dtype": torch.float32, "clip_l_model_config": dict(_CLIP_CONFIG)}
    if family == "sd35":
        options["clip_g_model_config"] = dict(_CLIP_CONFIG)
        target = comfy.supported_models_base.ClipTarget(
            comfy.text_encoders.sd3_clip.SD3Tokenizer,
            comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False))
    else:
        options["t5xxl_model_config"] = dict(_T5_CONFIG)
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                        comfy.text_encoders.flux.flux_clip())
    clip = comfy.sd.CLIP(target=target, model_options=options)
    initialise(clip.cond_stage_model, seed + 1)
    _unit_norms(clip.cond_stage_model)
    return clip


def tiny_dit_vae(seed: int = 0) -> comfy.sd.VAE:
    """TAESD with 16 latent channels (the Flux.1 / SD3 latent), random weights."""
    taesd = comfy.taesd.taesd.TAESD(latent_channels=16)
    initialise(taesd, seed + 2)
    return comfy.sd.VAE(sd=taesd.state_dict())


@functools.lru_cache(maxsize=8)
def cached_dit_checkpoint(family: str, seed: int = 0):
    """(MODEL, CLIP, VAE) of a tiny checkpoint family; callers only clone the ModelPatcher."""
    _check_family(family, CHECKPOINT_FAMILIES)
    return tiny_dit(family, seed), tiny_dit_clip(family, seed), tiny_dit_vae(seed)
