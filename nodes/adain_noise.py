"""AdaIN noise node (InDetail-IP eq. 2): initial noise with the inverted z_T's statistics."""

from __future__ import annotations

import math

import comfy.sample
from comfy_api.latest import io

from ..indetail_ip.compat import check_inversion
from ..inversion.ddim import adain, vp_scale
from ..inversion.result import INVERSION_TYPE, InversionResult

Inversion = io.Custom(INVERSION_TYPE)
NAME = "QKV AdaIN Noise"


class AdaINNoise:
    """A NOISE object (SamplerCustomAdvanced): seeded Gaussian noise, AdaIN'd per sample and
    channel to the inverted z_T (unit-variance VP space, where ComfyUI's noise lives)."""

    def __init__(self, seed: int, inversion: InversionResult):
        self.seed = seed
        self.inversion = inversion

    def reference(self):
        chain = self.inversion.chain
        return chain.z_top * vp_scale(chain.sigma_max)

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        noise = comfy.sample.prepare_noise(samples, self.seed, input_latent.get("batch_index"))
        reference = self.reference()
        if reference.shape[0] not in (1, noise.shape[0]):
            reference = reference.mean(dim=0, keepdim=True)
        return adain(noise, reference)


class QKVAdaINNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVAdaINNoise",
            display_name=NAME,
            category="QKV Control/InDetail-IP",
            description="InDetail-IP AdaIN noise: initial noise with the per-channel mean and std of the reference's "
                        "inverted z_T (eq. 2), carrying its colour tone. 'latent' starts KSamplerAdvanced with "
                        "add_noise disabled; 'noise' feeds SamplerCustomAdvanced.",
            search_aliases=["adain", "adain noise", "initial noise", "noise from reference", "colour tone",
                            "color tone", "indetail", "image prompt"],
            inputs=[
                Inversion.Input("inversion", tooltip="The DDIM-inverted reference (DDIM Inversion node)."),
                io.Latent.Input("latent", tooltip="The target latent (Empty Latent Image): size and batch."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the Gaussian noise before AdaIN (same noise as KSampler's seed)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The noised starting latent at the inversion's top "
                                 "sigma: use with KSamplerAdvanced, add_noise disabled, same steps/scheduler."),
                io.Noise.Output(display_name="noise", tooltip="AdaIN noise for SamplerCustomAdvanced."),
            ],
        )

    @classmethod
    def execute(cls, inversion, latent, seed) -> io.NodeOutput:
        check_inversion(NAME, inversion)
        samples = latent["samples"]
        if samples.ndim != 4 or samples.shape[1] != inversion.latent_channels:
            raise ValueError(f"{NAME}: expected a [B, {inversion.latent_channels}, H, W] latent (the inversion's "
                             f"channels), got shape {tuple(samples.shape)}")
        reference = inversion.chain.z_top
        if reference.shape[0] not in (1, samples.shape[0]):
            raise ValueError(f"{NAME}: expected 1 reference or as many as the latent batch ({samples.shape[0]}), "
                             f"got {reference.shape[0]}")
        noise_source = AdaINNoise(seed, inversion)
        noise = noise_source.generate_noise(latent)
        # KSampler scales unit noise by sqrt(1 + sigma^2) at full denoise: start there, in LATENT space.
        start = noise * math.sqrt(1.0 + inversion.chain.sigma_max ** 2)
        out = latent.copy()
        out["samples"] = inversion.latent_out(start)
        out.pop("noise_mask", None)
        return io.NodeOutput(out, noise_source)


NODES = [QKVAdaINNoise]
