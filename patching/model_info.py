"""What a ComfyUI model is, read from the model itself: family, latent channels, text width.

Every check that compares a model with an inversion, a latent or a weight file reads these,
so the same question always gets the same answer. The family-specific answers come from
the model's family adapter (``families.registry``)."""

from __future__ import annotations

from ..families.base import model_config_of
from ..families.registry import family_of


def model_family(model) -> str:
    """The model's ComfyUI model config class name (``SD15``, ``SDXL``, ``Flux``, ``SD3`` ...)."""
    return type(model.model.model_config).__name__


def family_name(model) -> str:
    """The family as users know it (``Flux.1``, ``SD3 / SD3.5 (MMDiT)`` ...); a ValueError
    naming the supported families for a model the pack has no adapter for."""
    return family_of(model).name


def latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def context_dim(model) -> int:
    """Width of the model's text context (UNet cross-attention, DiT text input); 0 when it has none."""
    return family_of(model).text_width(model_config_of(model))


def pooled_dim(model) -> int:
    """Width of the pooled text vector the model takes (SDXL, Flux.1, SD3); 0 when it takes none."""
    return family_of(model).pooled_width(model_config_of(model))
