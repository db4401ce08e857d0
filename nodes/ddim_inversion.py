"""DDIM Inversion node (InDetail-IP Sec. 3): a reference latent -> the inverted chain."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..indetail_ip.compat import check_latent
from ..inversion.invert import invert
from ..inversion.result import INVERSION_TYPE

Inversion = io.Custom(INVERSION_TYPE)
NAME = "QKV DDIM Inversion"


class QKVDDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVDDIMInversion",
            display_name=NAME,
            category="QKV Control/InDetail-IP",
            description="DDIM inversion (an unsampler) of a VAE-encoded reference image: the latent at every sigma of "
                        "the schedule (one UNet row per step, no CFG), for InDetail-IP's reference and MCA-Ctrl's subject "
                        "and scene streams. Use the same steps and scheduler as the KSampler. Cached by image, model, "
                        "schedule and prompt: re-queuing does not invert again.",
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
            ],
            outputs=[
                Inversion.Output(display_name="inversion", tooltip="The inverted chain (QKV_INVERSION)."),
                io.Latent.Output(display_name="z_T", tooltip="The most-noised inverted latent. Sampled with "
                                 "KSamplerAdvanced (add_noise disabled, same steps/scheduler) it reconstructs the reference."),
            ],
        )

    @classmethod
    def validate_inputs(cls, steps=50, scheduler="ddim_uniform", **kwargs):
        if scheduler not in comfy.samplers.SCHEDULER_NAMES:
            return f"{NAME}: expected a scheduler in {', '.join(comfy.samplers.SCHEDULER_NAMES)}, got '{scheduler}'"
        if int(steps) < 1:
            return f"{NAME}: expected steps >= 1, got {steps}"
        return True

    @classmethod
    def execute(cls, model, latent, steps, scheduler, positive=None) -> io.NodeOutput:
        check_latent(NAME, model, latent, "reference latent")
        if positive is not None and len(positive) == 0:
            raise ValueError(f"{NAME}: expected a CONDITIONING with at least one entry, got an empty list")
        result, _ = invert(model, latent["samples"], steps, scheduler, positive)
        z_t = {"samples": result.latent_out(result.chain.z_top).clone()}
        return io.NodeOutput(result, z_t)


NODES = [QKVDDIMInversion]
