"""AdaIN-initialised noise (InDetail-IP eq. 2, after StyleID): the sampler's initial noise with
the per-sample, per-channel statistics of the reference's inverted z_T, which carries its
colour tone into the generated image."""

from __future__ import annotations

import comfy.sample
import torch

from ..inversion.ddim import adain, vp_scale
from ..inversion.result import InversionResult


class AdaINNoise:
    """A ComfyUI NOISE object (for SamplerCustomAdvanced): seeded Gaussian noise, AdaIN'd per
    sample and channel to the inverted z_T in unit-variance VP space (where ComfyUI's noise lives).

    One reference is used for every latent; as many references as latents style one latent each;
    another count uses the references' mean."""

    def __init__(self, seed: int, inversion: InversionResult):
        self.seed = seed
        self.inversion = inversion

    def reference(self) -> torch.Tensor:
        chain = self.inversion.chain
        return chain.z_top * vp_scale(chain.sigma_max)

    def generate_noise(self, input_latent) -> torch.Tensor:
        samples = input_latent["samples"]
        noise = comfy.sample.prepare_noise(samples, self.seed, input_latent.get("batch_index"))
        reference = self.reference()
        if reference.shape[0] not in (1, noise.shape[0]):
            reference = reference.mean(dim=0, keepdim=True)
        return adain(noise, reference)

    def start_latent(self, input_latent) -> torch.Tensor:
        """The noised starting latent at the inversion's top sigma, in the LATENT space nodes
        exchange: where ComfyUI's sampler starts from this noise at full denoise (its own
        ``noise_scaling`` at sigma_max with ``max_denoise``)."""
        noise = self.generate_noise(input_latent)
        sigma = torch.tensor(self.inversion.chain.sigma_max)
        start = self.inversion.model_sampling.noise_scaling(sigma, noise, torch.zeros_like(noise), True)
        return self.inversion.latent_out(start)
