"""AdaIN noise node (InDetail-IP eq. 2): initial noise with the inverted z_T's statistics."""

from __future__ import annotations

from comfy_api.latest import io

from ..indetail_ip.adain_noise import AdaINNoise
from ..inversion.checks import check_inversion
from .naming import errors_named
from .types import Inversion

NAME = "QKV AdaIN Noise"


class QKVAdaINNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVAdaINNoise",
            display_name=NAME,
            category="QKV Control/InDetail-IP",
            description="Initial noise with the per-channel mean and std of the reference's inverted z_T "
                        "(InDetail-IP eq. 2), carrying its colour tone. 'latent' starts KSamplerAdvanced with "
                        "add_noise disabled; 'noise' feeds SamplerCustomAdvanced.",
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
        with errors_named(NAME):
            check_inversion(NAME, inversion)
            samples = latent["samples"]
            if samples.ndim != 4 or samples.shape[1] != inversion.latent_channels:
                raise ValueError(f"expected a [B, {inversion.latent_channels}, H, W] latent (the inversion's "
                                 f"channels), got shape {tuple(samples.shape)}")
            reference = inversion.chain.z_top
            if reference.shape[0] not in (1, samples.shape[0]):
                raise ValueError(f"expected 1 reference or as many as the latent batch ({samples.shape[0]}), "
                                 f"got {reference.shape[0]}")
            noise_source = AdaINNoise(seed, inversion)
            out = latent.copy()
            out["samples"] = noise_source.start_latent(latent)
            out.pop("noise_mask", None)
        return io.NodeOutput(out, noise_source)


NODES = [QKVAdaINNoise]
