"""Conflict-free guidance node: where image prompts go in classifier-free guidance."""

from __future__ import annotations

from comfy_api.latest import io

from ..inversion.checks import check_inversion
from ..patching import keys
from ..patching.image_prompt_policy import BOTH, NEGATIVE_IMAGE, POSITIVE_ONLY, ImagePromptPolicy
from ..patching.patch import set_transformer_option
from .naming import errors_named
from .types import Inversion

NAME = "QKV Image Prompt Guidance"
POLICIES = [POSITIVE_ONLY, BOTH, NEGATIVE_IMAGE]


class QKVImagePromptGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVImagePromptGuidance",
            display_name=NAME,
            category="QKV Control/guidance",
            description="Conflict-free guidance (InDetail-IP Sec. 4.1): image prompts condition only the positive "
                        "CFG branch, so the negative branch does not push away from them. Honoured by every image-"
                        "prompt control of the pack. 'both' is the conflicting baseline (each branch with its own "
                        "reference text, the official ablation); 'negative_image' gives the negative branch another "
                        "image (Suppl. E).",
            search_aliases=["conflict-free guidance", "cfg", "negative prompt image", "image prompt", "guidance",
                            "positive only", "indetail"],
            inputs=[
                io.Model.Input("model", tooltip="The model whose image-prompt controls follow this policy."),
                io.Combo.Input("policy", options=POLICIES, default=POSITIVE_ONLY,
                               tooltip="positive_only: conflict-free (default, the paper). both: the image prompt in "
                                       "both branches (conflicting baseline; InDetail-IP's negative branch reads a "
                                       "reference row with the DDIM Inversion's 'negative' text, official: the empty "
                                       "prompt). negative_image: the negative branch gets the negative "
                                       "image/inversion below."),
                Inversion.Input("negative_inversion", optional=True,
                                tooltip="For negative_image with self-attention controls (InDetail-IP): the DDIM-"
                                        "inverted negative image."),
                io.Image.Input("negative_image", optional=True,
                               tooltip="For negative_image with image-encoder controls (IP-Adapter): the negative image."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the guidance policy set.")],
        )

    @classmethod
    def validate_inputs(cls, policy=POSITIVE_ONLY, **kwargs):
        if policy not in POLICIES:
            return f"{NAME}: expected a policy in {', '.join(POLICIES)}, got '{policy}'"
        return True

    @classmethod
    def execute(cls, model, policy, negative_inversion=None, negative_image=None) -> io.NodeOutput:
        with errors_named(NAME):
            if policy == NEGATIVE_IMAGE:
                if negative_inversion is None and negative_image is None:
                    raise ValueError("expected negative_inversion or negative_image for policy 'negative_image', "
                                     "got neither")
                if negative_inversion is not None:
                    check_inversion(NAME, negative_inversion, model, "negative_inversion")
            value = ImagePromptPolicy(policy, negative_image=negative_image,
                                      negative_inversion=negative_inversion if policy == NEGATIVE_IMAGE else None)
        return io.NodeOutput(set_transformer_option(model, keys.IMAGE_PROMPT_POLICY, value))


NODES = [QKVImagePromptGuidance]
