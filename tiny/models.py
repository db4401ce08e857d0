"""Tiny random-weight SD1.5- and SDXL-shaped models built with ComfyUI's own classes
(the diffusion transformers: ``tiny/dit.py``; ``tiny_checkpoint`` builds both).

No weights can be downloaded where the tests run, so the UNet, text encoder,
VAE and CLIP vision model are built from ComfyUI's model classes with small
widths and seeded, properly initialised weights. Block structure (which blocks
hold attention, transformer depths, resolution levels) follows the real
families, so nothing downstream may assume SD1.5 block lists.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import tempfile
from pathlib import Path

import torch

import comfy.clip_vision
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.taesd.taesd

FAMILIES = ("sd15", "sdxl")

# Width of the tiny text encoder = the tiny UNets' cross-attention context size.
TEXT_WIDTH = 64
# Pooled text size (SDXL's adm input = pooled + 6 x 256 size embeddings).
POOLED_WIDTH = 64
# Tiny CLIP vision sizes (IP-Adapter image embeddings).
VISION_WIDTH = 64
VISION_PROJECTION = 64

_UNET_CONFIGS = {
    # comfy/model_detection.py SD15 with model_channels 320 -> 32
    "sd15": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": TEXT_WIDTH,
        "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    # comfy/model_detection.py SDXL with model_channels 320 -> 32 and depth 10 -> 2
    "sdxl": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": POOLED_WIDTH + 6 * 256,
        "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2],
        "transformer_depth": [0, 0, 2, 2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth_middle": 2,
        "use_linear_in_transformer": True, "context_dim": TEXT_WIDTH, "num_head_channels": 16,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 2, 2, 2],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
}

_TEXT_CONFIG = {
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 49407,
    "hidden_act": "quick_gelu", "hidden_size": TEXT_WIDTH, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 4 * TEXT_WIDTH, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": POOLED_WIDTH, "vocab_size": 49408,
}

_VISION_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": VISION_WIDTH,
    "image_size": 56, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 4 * VISION_WIDTH, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
    "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": 3, "patch_size": 14,
    "projection_dim": VISION_PROJECTION, "torch_dtype": "float32",
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"tiny models: expected family one of {FAMILIES}, got '{family}'")


@torch.no_grad()
def initialise(module: torch.nn.Module, seed: int) -> None:
    """Seeded init of every parameter: ComfyUI's ``disable_weight_init`` ops leave them empty.

    Linear/conv weights ~ N(0, 1/fan_in) (unit-variance activations), biases 0, norm
    weights 1 (zero norms would make the UNet output a constant), embeddings N(0, 0.02).
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        leaf = name.rsplit(".", 1)[-1]
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        is_norm = isinstance(owner, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in name.rsplit(".", 1)[0].split(".")[-1]
        if leaf == "bias":
            param.zero_()
        elif is_norm and param.ndim == 1:
            param.fill_(1.0)
        elif param.ndim >= 2 and not isinstance(owner, torch.nn.Embedding) and "embedding" not in name:
            fan_in = math.prod(param.shape[1:])
            param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
        else:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def unet_config(family: str) -> dict:
    _check_family(family)
    return copy.deepcopy(_UNET_CONFIGS[family])


def tiny_unet(family: str = "sd15", seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A fresh ModelPatcher around a tiny UNet of ``family`` (a new model each call)."""
    config = unet_config(family)
    config["dtype"] = torch.float32
    model_config_cls = comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SDXL
    model_config = model_config_cls(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    initialise(model.diffusion_model, seed)
    _calibrate_output(model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


@torch.no_grad()
def _calibrate_output(model, seed: int) -> None:
    """Scale the last conv so the prediction has unit std on unit-variance input, as a
    trained eps-model's would; otherwise sampled latents blow up to ~1e2."""
    unet = model.diffusion_model
    generator = torch.Generator().manual_seed(seed + 10)
    x = torch.randn((2, 4, 16, 16), generator=generator)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn((2, 77, TEXT_WIDTH), generator=generator)
    y = None
    if getattr(unet, "num_classes", None) is not None:
        y = torch.randn((2, model.model_config.unet_config["adm_in_channels"]), generator=generator)
    std = float(unet(x, t, context=context, y=y).std())
    final_conv = unet.out[-1]
    final_conv.weight.div_(std)


class _TinyClipTarget:
    """What ``comfy.sd.CLIP`` expects of a checkpoint's text-encoder target."""

    def __init__(self):
        self.clip = comfy.sd1_clip.SD1ClipModel
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer
        self.params = {"clip_model": comfy.sd1_clip.SDClipModel, "textmodel_json_config": dict(_TEXT_CONFIG)}


def tiny_clip(seed: int = 0) -> comfy.sd.CLIP:
    """A 2-layer CLIP text encoder (width 64) with ComfyUI's bundled CLIP tokenizer."""
    clip = comfy.sd.CLIP(target=_TinyClipTarget(), model_options={"dtype": torch.float32})
    initialise(clip.cond_stage_model, seed + 1)
    return clip


def tiny_vae(seed: int = 0) -> comfy.sd.VAE:
    """TAESD (ComfyUI's tiny autoencoder) with random weights: 8x down/up-scaling, 4 latent channels."""
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    initialise(taesd, seed + 2)
    return comfy.sd.VAE(sd=taesd.state_dict())


def tiny_clip_vision(seed: int = 0) -> comfy.clip_vision.ClipVisionModel:
    """A 3-layer ViT CLIP vision model (width 64, 56 px input, 16 patches)."""
    # A JSON file, not a dict: before ComfyUI 0.24 the config argument is a path only.
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "clip_vision_config.json"
        config_path.write_text(json.dumps(_VISION_CONFIG))
        vision = comfy.clip_vision.ClipVisionModel(str(config_path))
    initialise(vision.model, seed + 3)
    return vision


@functools.lru_cache(maxsize=8)
def _cached_checkpoint(family: str, seed: int):
    return tiny_unet(family, seed), tiny_clip(seed), tiny_vae(seed)


def checkpoint_families() -> tuple[str, ...]:
    """Every family ``tiny_checkpoint`` builds: the UNets, then the diffusion transformers."""
    from .dit import CHECKPOINT_FAMILIES

    return FAMILIES + CHECKPOINT_FAMILIES


def tiny_checkpoint(family: str = "sd15", seed: int = 0, cached: bool = True):
    """(MODEL, CLIP, VAE) of a tiny ``family`` checkpoint (``checkpoint_families()``). Cached by
    default: nodes and tests only ever clone the returned ModelPatcher, never mutate it."""
    if family not in FAMILIES and family in checkpoint_families():
        from . import dit

        if cached:
            return dit.cached_dit_checkpoint(family, seed)
        return dit.tiny_dit(family, seed), dit.tiny_dit_clip(family, seed), dit.tiny_dit_vae(seed)
    if family not in FAMILIES:
        raise ValueError(f"tiny models: expected family one of {checkpoint_families()}, got '{family}'")
    if cached:
        return _cached_checkpoint(family, seed)
    return tiny_unet(family, seed), tiny_clip(seed), tiny_vae(seed)


@functools.lru_cache(maxsize=4)
def cached_clip_vision(seed: int = 0) -> comfy.clip_vision.ClipVisionModel:
    return tiny_clip_vision(seed)
