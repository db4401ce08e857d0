"""InDetail-IP reference attention node: the image prompt through self-attention."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention import fusion_schedule as fs
from ..attention.layers import select_layers
from ..inversion.checks import check_inversion
from ..families.registry import family_of
from ..indetail_ip.blocks import AUTO, STABLE_FLOW_VITAL_LAYERS, resolve_blocks
from ..indetail_ip.control import DEFAULT_NEGATIVE_CONTROL_UNTIL, ReferenceAttentionControl
from ..patching.layers import discover_layers
from ..patching.patch import add_control
from .naming import errors_named
from .step_window_inputs import STEP_FRACTION_MEANING
from .types import Inversion

NAME = "QKV InDetail-IP Reference Attention"


class QKVInDetailReferenceAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVInDetailReferenceAttention",
            display_name=NAME,
            category="QKV Control/InDetail-IP",
            description="InDetail-IP image prompt by self-attention: runs the inverted reference as an extra batch "
                        "row and lets the generated image's self-attention read its keys/values: Stratified "
                        "Attention early, KV concatenation after (paper default), or KV replacement. On Flux.1 "
                        "and SD3.5 the modes act on the image tokens of the joint attention (text tokens as the "
                        "model computes them). Under "
                        "conflict-free guidance (the default) only positive CFG rows see the reference unless an "
                        "Image Prompt Guidance node says otherwise. The negative branch runs without "
                        "ControlNet for the first 20% of the steps (official code).",
            search_aliases=["reference", "reference only", "image prompt", "stratified attention", "kv concat",
                            "self-attention", "attention", "style transfer", "image variation", "texture", "detail",
                            "indetail"],
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched clone is returned)."),
                Inversion.Input("inversion", tooltip="The DDIM-inverted reference (DDIM Inversion node)."),
                io.String.Input("blocks", default=AUTO,
                                tooltip="Self-attention layers to patch, as a block spec. auto: the model family's "
                                        "default: output (the decoder, the paper's choice) on SD1.5/SDXL; Flux.1, "
                                        "Chroma, Flux 2: the later single blocks (single:20-37 on Flux.1, after "
                                        "RF-Solver-Edit/FireFlow); SD3.5: the later half of the joint blocks. Or "
                                        "any spec: all, output, input:4-8, #0-3, level:0-1, double:0-18, "
                                        f"single:10-37, joint:12-23 ... (Stable Flow's Flux vital layers: "
                                        f"{STABLE_FLOW_VITAL_LAYERS}). Prefix '-' excludes."),
                io.String.Input("schedule", default=fs.DEFAULT_SPEC,
                                tooltip="Attention fusion: 'mode:start-end, ...' over fractions of the sampling "
                                        "steps. Modes: stratified, concat, replace, none. Paper: 'stratified:0-0.2, "
                                        "concat:0.2-1' (first 10 of 50 steps); with ControlNet 'stratified:0-0.5, "
                                        "concat:0.5-1'. " + STEP_FRACTION_MEANING),
                io.Float.Input("lambda_reference", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="λP: weight of the attention to the image prompt in Stratified Attention "
                                       "(paper: 0.5, recommended 0.3-0.7). 0 = reference ignored."),
                io.Float.Input("lambda_self", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="λG: weight of the generated image's own attention in Stratified Attention."),
                io.Float.Input("negative_control_until", default=DEFAULT_NEGATIVE_CONTROL_UNTIL, min=0.0, max=1.0,
                               step=0.01, optional=True,
                               tooltip="Fraction of the sampling steps during which the negative CFG branch gets no "
                                       "ControlNet residuals (the positive branch keeps them). Default 0.2: the "
                                       "official code's first 10 of 50 steps (gm_end_tsidx). 0 = off (ControlNet "
                                       "as the core nodes apply it). Without a ControlNet it has no effect. "
                                       + STEP_FRACTION_MEANING),
            ],
            outputs=[io.Model.Output(tooltip="The model with InDetail-IP reference attention.")],
        )

    @classmethod
    def validate_inputs(cls, schedule=fs.DEFAULT_SPEC, lambda_reference=0.5, lambda_self=0.5, **kwargs):
        try:
            fs.parse_fusion_schedule(schedule)
        except ValueError as error:
            return f"{NAME}: {error}"
        if lambda_reference + lambda_self <= 0:
            return f"{NAME}: expected lambda_reference + lambda_self > 0, got {lambda_reference} + {lambda_self}"
        return True

    @classmethod
    def execute(cls, model, inversion, blocks, schedule, lambda_reference, lambda_self,
                negative_control_until=DEFAULT_NEGATIVE_CONTROL_UNTIL) -> io.NodeOutput:
        with errors_named(NAME):
            check_inversion(NAME, inversion, model)
            layers = discover_layers(model)
            blocks = resolve_blocks(blocks, family_of(model), layers)
            select_layers(blocks, layers, "attn1")
            control = ReferenceAttentionControl(inversion, blocks, schedule, lambda_reference, lambda_self,
                                                negative_control_until)
        return io.NodeOutput(add_control(model, control))


NODES = [QKVInDetailReferenceAttention]
