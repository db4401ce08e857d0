"""What the inversion node hands on: the chain plus everything needed to run it as a
batch row of the same model. ComfyUI IO type: ``QKV_INVERSION``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .chain import InvertedChain

# Name of the custom ComfyUI IO type carrying an InversionResult between nodes.
INVERSION_TYPE = "QKV_INVERSION"


@dataclass(frozen=True, eq=False)
class InversionResult:
    """A DDIM-inverted reference (one or more images of one size).

    chain:          latents at every sigma of the inversion schedule (sampler x-space)
    context:        the cross-attention context the model saw during inversion,
                    [1, T, D] (the inversion prompt; empty prompt for cross-prompt use)
    conds:          other per-row model inputs of that call (e.g. SDXL's ``y``), each [1, ...]
    latent_channels, context_dim, model_family, prediction: what the inversion ran on,
                    to reject use with an incompatible model
    key:            cache key (image content, model, schedule and clean level, prompt)
    clean_level:    the level the VAE latent was taken to be at (``invert.CLEAN_LEVELS``);
                    its sigma is ``chain.sigmas[0]``
    negative_context, negative_conds: the reference's text in the negative CFG branch
                    (official: the empty prompt) where it differs from ``context``; None: the
                    same text in both branches
    """

    chain: InvertedChain
    context: torch.Tensor
    conds: dict[str, Any] = field(default_factory=dict)
    latent_channels: int = 4
    context_dim: int = 768
    model_family: str = ""
    prediction: str = "eps"
    key: str = ""
    # ComfyUI LatentFormat of the model (process_in/process_out), for LATENT outputs
    latent_format: Any = None
    # the model's ComfyUI model_sampling (noise scaling, sigma range), for starting latents
    model_sampling: Any = None
    clean_level: str = "sigma_min"
    negative_context: Optional[torch.Tensor] = None
    negative_conds: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.chain.batch

    def latent_at(self, sigma: float) -> torch.Tensor:
        return self.chain.latent_at(sigma)

    @property
    def clean_sigma(self) -> float:
        """The sigma of the clean latent: sigma_min (the official ᾱ₀) or 0."""
        return float(self.chain.sigmas[0])

    @property
    def negative_reference(self) -> Optional["InversionResult"]:
        """The same chain with the negative branch's text, or None when both branches' reference
        texts are the same (one reference row then serves both)."""
        if self.negative_context is None:
            return None
        return dataclasses.replace(self, context=self.negative_context, conds=dict(self.negative_conds),
                                   negative_context=None, negative_conds={})

    def latent_out(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler-space latent -> the LATENT space nodes exchange (``process_latent_out``)."""
        return self.latent_format.process_out(x) if self.latent_format is not None else x

    def latent_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.latent_format.process_in(x) if self.latent_format is not None else x

    def describe(self) -> str:
        c, h, w = self.chain.latent_shape
        return (f"{self.model_family or 'model'} inversion: {self.chain.steps} steps, {self.batch} image(s), "
                f"latent {c}x{h}x{w}, {self.prediction}-prediction, clean level {self.clean_level} "
                f"(sigma {self.clean_sigma:.4f})")
