"""AdaIN noise node (InDetail-IP eq. 2): initial noise with the inverted z_T's statistics."""

from __future__ import annotations

from comfy_api.latest import io

from ..indetail_ip.adain_noise import AdaINNoise, AdaINStart
from ..inversion.checks import check_inversion
from ..patching.patch import add_control
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
            description="InDetail-IP AdaIN noise: initial noise with the per-channel mean and std of the reference's "
                        "inverted latent (eq. 2), carrying its colour tone. Sample with the 'model' output: every run "
                        "then starts at the AdaIN z_T of its own first sigma (any sampler node, scheduler, "
                        "denoise). 'latent' feeds KSampler (Advanced), 'noise' SamplerCustomAdvanced.",
            search_aliases=["adain", "adain noise", "initial noise", "noise from reference", "colour tone",
                            "color tone", "indetail", "image prompt"],
            inputs=[
                io.Model.Input("model", optional=True,
                               tooltip="The model you sample with (after InDetail-IP Reference Attention and Image "
                                       "Prompt Guidance); its copy at the 'model' output starts every run at the "
                                       "AdaIN z_T. Optional, so graphs made before this input existed still run: "
                                       "without it, 'latent' and 'noise' are exact on the inversion's own schedule."),
                Inversion.Input("inversion", tooltip="The DDIM-inverted reference (DDIM Inversion node)."),
                io.Latent.Input("latent", tooltip="The target latent (Empty Latent Image): size and batch."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the Gaussian noise before AdaIN (same noise as KSampler's seed)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The AdaIN z_T at the inversion's top sigma: the "
                                 "sampler's latent (KSampler, or KSamplerAdvanced with add_noise disabled)."),
                io.Noise.Output(display_name="noise", tooltip="AdaIN noise for SamplerCustomAdvanced (same start)."),
                io.Model.Output(display_name="model", tooltip="Sample with this model: each run starts exactly at the "
                                "AdaIN z_T of its first sigma, the noise drawn from this node's seed. Needs the "
                                "'model' input."),
            ],
        )

    @classmethod
    def execute(cls, inversion, latent, seed, model=None) -> io.NodeOutput:
        with errors_named(NAME):
            check_inversion(NAME, inversion, model)
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
            out["samples"] = inversion.latent_out(noise_source.start_latent(latent))
            out.pop("noise_mask", None)
            # No model connected: nothing to start (the output is only usable with the input).
            started = None if model is None else add_control(model, AdaINStart(inversion, seed,
                                                                                 latent.get("batch_index")))
        return io.NodeOutput(out, noise_source, started)


NODES = [QKVAdaINNoise]
