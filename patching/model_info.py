"""What a ComfyUI model is, read from the model itself: family, latent channels, text width.

Every check that compares a model with an inversion, a latent or a weight file reads these,
so the same question always gets the same answer."""

from __future__ import annotations


def model_family(model) -> str:
    """The model's ComfyUI model config class name (``SD15``, ``SDXL``, ``Flux`` ...)."""
    return type(model.model.model_config).__name__


def latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def context_dim(model) -> int:
    """Width of the model's text (cross-attention) context; 0 when it has none."""
    return int(model.model.model_config.unet_config.get("context_dim") or 0)
