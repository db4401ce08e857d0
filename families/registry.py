"""The model families the pack supports, and which one a ComfyUI model is.

One entry per family; adding a family is one adapter entry here (plus its tests). A model
no entry recognises is an error naming the families that are supported, never a silent
no-op.
"""

from __future__ import annotations

from typing import Optional

from .base import ModelFamily, diffusion_model_of, model_config_of
from .flux import CHROMA, FLUX1, FLUX2
from .mmdit import MMDiTFamily
from .unet import UNetFamily

UNET = UNetFamily()
SD3 = MMDiTFamily()

FAMILIES: tuple[ModelFamily, ...] = (UNET, FLUX1, SD3, CHROMA, FLUX2)


def supported_families() -> str:
    return "; ".join(family.describe() for family in FAMILIES)


def family_of(model, node: Optional[str] = None) -> ModelFamily:
    """The family adapter of ``model`` (a ModelPatcher, BaseModel or diffusion model). The error
    for a model of no supported family starts with ``node`` when given (nodes add their own
    display name through ``nodes.naming.errors_named``)."""
    diffusion_model = diffusion_model_of(model)
    config = model_config_of(model)
    for family in FAMILIES:
        if family.matches(model):
            return family
    what = type(config).__name__ if config is not None else type(diffusion_model).__name__
    prefix = f"{node}: " if node else ""
    raise ValueError(f"{prefix}expected a model of a supported family ({supported_families()}), "
                     f"got {what} (diffusion model {type(diffusion_model).__module__}.{type(diffusion_model).__name__})")
