"""Checks between a model, a latent and an inversion result, used by every node that takes
an inversion or a latent to invert, with messages that name what was expected and what came."""

from __future__ import annotations

from ..patching.model_info import context_dim, latent_channels, model_family
from .result import InversionResult


def check_latent(node: str, model, latent, what: str = "latent") -> None:
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"{node}: expected a LATENT ({what}), got {type(latent).__name__}")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise ValueError(f"{node}: expected a 4-d image latent [B, C, H, W] ({what}), got shape {tuple(samples.shape)}")
    channels = latent_channels(model)
    if samples.shape[1] != channels:
        raise ValueError(
            f"{node}: expected a {channels}-channel latent for this {model_family(model)} model ({what}), "
            f"got {samples.shape[1]} channels (VAE of another model family?)"
        )


def check_inversion(node: str, inversion, model=None, what: str = "inversion") -> InversionResult:
    if inversion is None:
        raise ValueError(f"{node}: expected an inversion (connect a DDIM Inversion node to '{what}'), got nothing")
    if not isinstance(inversion, InversionResult):
        raise ValueError(f"{node}: expected a QKV_INVERSION from the DDIM Inversion node ({what}), "
                         f"got {type(inversion).__name__}")
    if model is not None:
        family = model_family(model)
        if inversion.model_family and inversion.model_family != family:
            raise ValueError(
                f"{node}: expected a {inversion.model_family} model (the {what} was made with one), got {family}"
            )
        channels = latent_channels(model)
        if inversion.latent_channels != channels:
            raise ValueError(f"{node}: expected a model with {inversion.latent_channels}-channel latents "
                             f"(the {what}'s), got {channels}")
        width = context_dim(model)
        if width and inversion.context_dim != width:
            raise ValueError(f"{node}: expected a model with {inversion.context_dim}-wide text context "
                             f"(the {what}'s), got {width}")
    return inversion
