"""AdaIN-initialised noise (InDetail-IP eq. 2, after StyleID): the sampler's initial noise with
the per-sample, per-channel statistics of the reference's inverted latent, which carries its
colour tone into the generated image.

The AdaIN z_T of a run starting at sigma s (the run's first sigma, whatever the scheduler,
step count or denoise) is ``adain(n, z_ref(s))``: ``n`` the seed's Gaussian noise, ``z_ref(s)``
the inverted reference at s in VP space (the latent the model sees), as the official code
takes the statistics of the inverted latent at the first sampling timestep and starts its DDIM
loop at that VP latent (``init_noise_sigma`` = 1). In ComfyUI's x-space the run starts at
``adain(n, z_ref(s)) · √(1+s²)``. Under denoise < 1 that is still noise only (the latent given
to the sampler sets the size, not the content), with the statistics of the reference at the
lower s.

Only the sampling run knows s, so the start is set there: ``AdaINStart`` is a control (no
layers) whose ``start_latent`` gives that latent, and ``patching.sampler_start`` solves
ComfyUI's own noise scaling for it, for every sampler node (KSampler, KSamplerAdvanced,
SamplerCustom, SamplerCustomAdvanced). The node's LATENT and NOISE outputs are the same start
at the inversion's top sigma for samplers run without that model.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import comfy.sample
import comfy.samplers
import torch

from ..inversion.ddim import adain, vp_scale
from ..inversion.flow import FLOW
from ..inversion.result import InversionResult
from ..patching.control import AttentionControl
from ..patching.sampler_start import noise_for_start

NAME = "QKV AdaIN Noise"


def seeded_noise(shape, seed: int, batch_index=None) -> torch.Tensor:
    """The Gaussian noise KSampler draws for ``seed`` (``comfy.sample.prepare_noise``)."""
    return comfy.sample.prepare_noise(torch.zeros(shape), seed, batch_index)


def model_input_scale(inversion: InversionResult, sigma: float) -> float:
    """x-space -> the latent the model sees at ``sigma``: 1/√(1+σ²) for eps/v models (the VP
    latent); 1 for flow models, whose x-space is what the model sees (``calculate_input`` is the
    identity) and whose z_T at σ = 1 is unit noise already."""
    return 1.0 if inversion.prediction == FLOW else vp_scale(sigma)


def adain_start(inversion: InversionResult, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The AdaIN z_T at ``sigma`` in the sampler's x-space: ``noise`` [B, C, H, W] (unit
    Gaussian) AdaIN'd to the inverted reference's model-input latent at ``sigma`` (one
    reference for every sample, or one per sample), taken back to x-space (eps/v: times
    √(1+σ²); flow: as it is)."""
    scale = model_input_scale(inversion, sigma)
    reference = inversion.chain.latent_at(sigma) * scale
    if reference.shape[0] not in (1, noise.shape[0]):
        raise ValueError(f"{NAME}: expected 1 reference or as many as the latent batch ({noise.shape[0]}), "
                         f"got {reference.shape[0]}")
    return adain(noise.float(), reference.to(noise.device)) / scale


def _batch_index(latent: dict) -> Optional[list]:
    return latent.get("batch_index") if isinstance(latent, dict) else None


class AdaINNoise:
    """A ComfyUI NOISE object (for SamplerCustomAdvanced) for a sampler run *without* the
    node's model: the noise whose scaling by ComfyUI (``noise_scaling`` at the inversion's top
    sigma with ComfyUI's ``max_denoise`` rule, an empty latent) starts exactly at the AdaIN z_T
    there. With the node's model the run starts at the AdaIN z_T of its own first sigma
    whatever this noise is (``AdaINStart``)."""

    def __init__(self, seed: int, inversion: InversionResult):
        self.seed = seed
        self.inversion = inversion

    def start_latent(self, input_latent: dict) -> torch.Tensor:
        """The AdaIN z_T at the inversion's top sigma, in the sampler's x-space."""
        samples = input_latent["samples"]
        noise = seeded_noise(samples.shape, self.seed, _batch_index(input_latent))
        return adain_start(self.inversion, noise, self.inversion.chain.sigma_max)

    def generate_noise(self, input_latent) -> torch.Tensor:
        start = self.start_latent(input_latent)
        model_sampling = self.inversion.model_sampling
        sigmas = self.inversion.chain.sigmas.flip(0)
        # ComfyUI's own rule (Sampler.max_denoise reads only the model's sigma_max): it scales
        # the noise by √(1+σ²) from sigma_max up, by σ below (ddim_uniform's top, σ(t=901) at 10 steps).
        wrap = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=model_sampling))
        max_denoise = comfy.samplers.Sampler().max_denoise(wrap, sigmas)
        return noise_for_start(model_sampling, sigmas[0], start, torch.zeros_like(start), max_denoise)


class AdaINStart(AttentionControl):
    """Starts every sampling run of the model at the AdaIN z_T of the run's first sigma
    (``adain_start``), the noise drawn from ``seed`` (the sampler's own noise, seed and
    add_noise do not change the start)."""

    # No attention layers: where the run starts is the same on every model family.
    dit_ready = True

    def __init__(self, inversion: InversionResult, seed: int, batch_index=None):
        super().__init__()
        self.inversion = inversion
        self.seed = int(seed)
        self.batch_index = batch_index

    def start_latent(self, run, noise: torch.Tensor) -> Optional[torch.Tensor]:
        batch_index = self.batch_index if self.batch_index is not None and len(self.batch_index) == noise.shape[0] \
            else None
        unit = seeded_noise(noise.shape, self.seed, batch_index)
        return adain_start(self.inversion, unit, run.clock.first_sigma).to(noise)
