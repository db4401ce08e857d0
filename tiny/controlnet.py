"""A tiny random-weight ControlNet built with ComfyUI's own classes (``comfy.cldm.cldm.ControlNet``
wrapped in ``comfy.controlnet.ControlNet``, as ``load_controlnet`` does for real files), matching
the tiny UNet of the same family so core Apply ControlNet nodes work with tiny checkpoints."""

from __future__ import annotations

import functools

import torch

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_management
import comfy.ops

from .models import initialise, unet_config


def tiny_controlnet(family: str = "sd15", seed: int = 0) -> comfy.controlnet.ControlNet:
    """A CONTROL_NET for the tiny ``family`` UNet; its zero convolutions are random (not zero)
    so the control visibly changes the result."""
    config = unet_config(family)
    config.pop("out_channels", None)
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                  device=comfy.model_management.unet_offload_device())
    control_model = comfy.cldm.cldm.ControlNet(**config)
    initialise(control_model, seed + 7)
    return comfy.controlnet.ControlNet(control_model, load_device=comfy.model_management.get_torch_device(),
                                       manual_cast_dtype=None)


@functools.lru_cache(maxsize=4)
def cached_tiny_controlnet(family: str = "sd15", seed: int = 0) -> comfy.controlnet.ControlNet:
    return tiny_controlnet(family, seed)
