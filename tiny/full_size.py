"""A full-size SD1.5 UNet checkpoint file with random weights.

Loaded through the real CheckpointLoaderSimple (whose model detection only
recognises full-size channel counts), it covers the real SD1.5 block structure
in tests and benchmarks. Nothing is downloaded: the weights are seeded noise.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from .models import initialise

SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def write_random_sd15_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``model.diffusion_model.*`` weights of a random full-size SD1.5 UNet (~1.7 GB in fp16)."""
    unet = UNetModel(**SD15_UNET_CONFIG, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    initialise(unet, seed)
    state = {f"model.diffusion_model.{k}": v.to(dtype).contiguous() for k, v in unet.state_dict().items()}
    del unet
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(path))
    return path
