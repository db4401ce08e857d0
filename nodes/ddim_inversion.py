"""DDIM Inversion node (InDetail-IP Sec. 3): a reference latent -> the inverted chain."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..inversion.checks import check_latent
from ..inversion.invert import CLEAN_LEVELS, DEFAULT_CLEAN_LEVEL, invert
from .naming import errors_named
from .types import Inversion

NAME = "QKV DDIM Inversion"


class QKVDDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVDDIMInversion",
            display_name=NAME,
            category="QKV Control/InDetail-IP",
            description="DDIM inversion (an unsampler) of a VAE-encoded reference image: the latent at every "
                        "sigma of the schedule (one model row per step, no CFG), for InDetail-IP's reference and "
                        "MCA-Ctrl's subject and scene streams, starting from the clean level alpha_bar_0 as the "
                        "official code does; flow models (Flux, SD3) are inverted along their "
                        "Euler ODE from sigma 0. Use the same steps and scheduler as the KSampler. Cached by image, "
                        "model, schedule and prompt: re-queuing does not invert again.",
            search_aliases=["inversion", "ddim inversion", "unsampler", "invert image", "noise from image",
                            "reverse sampling", "reference", "indetail", "mca-ctrl"],
            inputs=[
                io.Model.Input("model", tooltip="The model to invert with (the one you sample with)."),
                io.Latent.Input("latent", tooltip="The reference image, VAE-encoded (VAE Encode). A batch inverts "
                                                  "several references; all of them become the image prompt."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Inversion steps; match the sampler's steps for an exact chain."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="ddim_uniform",
                               tooltip="Scheduler of the inversion schedule; match the sampler's."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Inversion prompt: the caption for image variation, an empty "
                                              "prompt for cross-prompt generation (the paper's choice). "
                                              "Unconnected: a zero text context."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The reference's text in the negative CFG branch, used only where "
                                              "Image Prompt Guidance gives that branch the image prompt ('both'): "
                                              "the official code uses the empty prompt (a CLIP Text Encode with no "
                                              "text), in a second reference row. Unconnected (or the same text as "
                                              "positive): one reference row with the positive text serves both."),
                io.Combo.Input("clean_level", options=list(CLEAN_LEVELS), default=DEFAULT_CLEAN_LEVEL, optional=True,
                               tooltip="The noise level the reference latent is taken to be at. sigma_min (default, "
                                       "the official code: diffusers' DDIM with set_alpha_to_one=False treats it as "
                                       "the latent at alpha_bar_0, sigma 0.0292 on SD): the inversion starts there "
                                       "and InDetail-IP sampling ends there. zero: sigma = 0, ComfyUI's own end of "
                                       "sampling; better to reconstruct the reference with a plain sampler run."),
            ],
            outputs=[
                Inversion.Output(display_name="inversion", tooltip="The inverted chain (QKV_INVERSION)."),
                io.Latent.Output(display_name="z_T", tooltip="The most-noised inverted latent. Sampled with "
                                 "KSamplerAdvanced (add_noise disabled, same steps/scheduler) it reconstructs the "
                                 "reference on SD1.5/SD2/SDXL. Flow models (Flux, SD3) start at sigma 1 from the "
                                 "sampler's noise alone, so this latent does not start them there."),
            ],
        )

    @classmethod
    def validate_inputs(cls, steps=50, scheduler="ddim_uniform", clean_level=DEFAULT_CLEAN_LEVEL, **kwargs):
        if clean_level not in CLEAN_LEVELS:
            return f"{NAME}: expected a clean_level in {', '.join(CLEAN_LEVELS)}, got '{clean_level}'"
        if scheduler not in comfy.samplers.SCHEDULER_NAMES:
            return f"{NAME}: expected a scheduler in {', '.join(comfy.samplers.SCHEDULER_NAMES)}, got '{scheduler}'"
        if int(steps) < 1:
            return f"{NAME}: expected steps >= 1, got {steps}"
        return True

    @classmethod
    def execute(cls, model, latent, steps, scheduler, positive=None, negative=None,
                clean_level=DEFAULT_CLEAN_LEVEL) -> io.NodeOutput:
        with errors_named(NAME):
            check_latent(NAME, model, latent, "reference latent")
            for name, conditioning in (("positive", positive), ("negative", negative)):
                if conditioning is not None and len(conditioning) == 0:
                    raise ValueError(f"expected a CONDITIONING with at least one entry ({name}), got an empty list")
            result, _ = invert(model, latent["samples"], steps, scheduler, positive, clean_level=clean_level,
                               negative=negative)
        z_t = {"samples": result.latent_out(result.chain.z_top).clone()}
        return io.NodeOutput(result, z_t)


NODES = [QKVDDIMInversion]
