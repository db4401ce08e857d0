"""MCA-Ctrl nodes: subject replacement / addition (scene image) and subject generation (text)."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention import mca_ctrl as mca
from ..attention.layers import select_layers
from ..inversion.checks import check_inversion
from ..mca_ctrl.config import AutoMask, Masks, Schedule, Streams
from ..mca_ctrl.control import MCACtrl
from ..patching.prompt_tokens import word_token_positions
from ..patching.layers import discover_layers
from ..patching.patch import add_control
from .naming import errors_named
from .step_window_inputs import STEP_FRACTION_MEANING
from .types import Inversion

CATEGORY = "QKV Control/MCA-Ctrl"

MASKS_MEANING = ("Masks are binarised once: a pixel belongs to a mask when its value is at least "
                 f"{mca.MASK_THRESHOLD} (a white PNG that loads as 0.996 is fully in, an anti-aliased edge splits "
                 "at middle grey).")
REPLACE_NAME = "QKV MCA-Ctrl Subject Replace / Add"
GENERATE_NAME = "QKV MCA-Ctrl Subject Generation"


def _schedule_inputs() -> list:
    return [
        io.Float.Input("sagi_steps", default=0.1, min=0.0, max=1.0, step=0.01,
                       tooltip="Share of the sampling steps that run SAGI (global injection of the subject's and "
                               "scene's own masked self-attention). Official code: 0.1 (first 5 of 50 steps; "
                               "generation with the automatic mask starts at step 1). "
                               + STEP_FRACTION_MEANING),
        io.Float.Input("salq_end", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the steps where MCA-Ctrl stops. SALQ (local query) runs between SAGI "
                               "and this point; the two never overlap. Later steps run plain attention. "
                               + STEP_FRACTION_MEANING),
        io.Combo.Input("order", options=list(mca.ORDERS), default=mca.ORDER_SAGI_FIRST,
                       tooltip="sagi_first (paper): SAGI early, SALQ after. salq_first swaps them with the same "
                               "durations (the paper's ablation: clearly worse)."),
        io.String.Input("salq_layers", default="all",
                        tooltip="Self-attention layers where SALQ runs, as a block spec: all (official), output "
                                "(decoder only: starts after the layout formed), input:4-8, #3-15, level:0-1 ... "
                                "'-' excludes."),
        io.String.Input("sagi_layers", default="all",
                        tooltip="Self-attention layers where SAGI runs (block spec, as salq_layers)."),
        io.Int.Input("subject_dilation", default=1, min=1, max=9,
                     tooltip="Dilation kernel of the subject mask at each layer's token grid. 1 = none (the "
                             "official code); 3 = the paper's 3x3, a little transition space around the subject."),
    ]


def _schedule(model, sagi_steps: float, salq_end: float, order: str, salq_layers: str, sagi_layers: str) -> Schedule:
    layers = discover_layers(model)
    for name, spec in (("salq_layers", salq_layers), ("sagi_layers", sagi_layers)):
        try:
            select_layers(spec, layers, "attn1")
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    return Schedule(mca.PhaseSchedule(float(sagi_steps), float(salq_end), order), salq_layers, sagi_layers)


def _validate_schedule(node: str, sagi_steps=0.1, salq_end=1.0, order=mca.ORDER_SAGI_FIRST):
    try:
        mca.PhaseSchedule(float(sagi_steps), float(salq_end), order)
    except ValueError as error:
        return f"{node}: {error}"
    return True


def _check_mask(mask, what: str):
    if mask is None:
        return None
    if mask.ndim not in (2, 3):
        raise ValueError(f"expected a MASK [B, H, W] for {what}, got shape {tuple(mask.shape)}")
    return mask


class QKVMCACtrlReplace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVMCACtrlReplace",
            display_name=REPLACE_NAME,
            category=CATEGORY,
            description="MCA-Ctrl subject replacement and addition: puts the subject of one image into a scene, "
                        "in the region of the target mask, keeping the scene's background. SAGI (Self-Attention "
                        "Global Injection) early, then SALQ (Self-Attention Local Query): the subject and the "
                        "scene run as inverted streams in the same batch, one row each per controlled CFG branch "
                        "with that branch's prompt (the official code), and the generated image starts from the "
                        "scene's inverted noise. Sample with the same steps and scheduler as the inversions, from "
                        "a latent of the scene's size.",
            search_aliases=["subject", "replace", "replace subject", "inpaint subject", "subject addition",
                            "add subject", "insert object", "swap object", "salq", "sagi", "mca-ctrl", "attention",
                            "reference"],
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched clone is returned)."),
                Inversion.Input("subject", tooltip="The DDIM-inverted subject image (DDIM Inversion node). "
                                                   "Another size than the scene is fitted by cover + centre crop."),
                io.Mask.Input("subject_mask", tooltip="The subject's foreground on the subject image (1 = subject): "
                                                      "painted, or from the localization (Grounding DINO + SAM) node. "
                                                      "Must not be empty. " + MASKS_MEANING),
                Inversion.Input("scene", tooltip="The DDIM-inverted scene image the subject goes into."),
                io.Mask.Input("target_mask", tooltip="Where the subject goes in the scene (1 = region): the old "
                                                     "subject to replace, or the empty spot to fill. Everything "
                                                     "outside is kept from the scene. Empty: nothing is replaced "
                                                     "(the image follows the scene's inversion); full: no "
                                                     "background is kept. Both are said in the log when the node "
                                                     "runs. " + MASKS_MEANING),
                *_schedule_inputs(),
                io.Int.Input("target_dilation", default=1, min=1, max=9,
                             tooltip="Dilation kernel of the target mask at each layer's token grid; 3 leaves "
                                     "transition space around a replaced subject. 1 = none."),
            ],
            outputs=[io.Model.Output(tooltip="The model with MCA-Ctrl: sample it with KSampler.")],
        )

    @classmethod
    def validate_inputs(cls, sagi_steps=0.1, salq_end=1.0, order=mca.ORDER_SAGI_FIRST, **kwargs):
        return _validate_schedule(REPLACE_NAME, sagi_steps, salq_end, order)

    @classmethod
    def execute(cls, model, subject, subject_mask, scene, target_mask, sagi_steps, salq_end, order,
                salq_layers, sagi_layers, subject_dilation, target_dilation) -> io.NodeOutput:
        with errors_named(REPLACE_NAME):
            check_inversion(REPLACE_NAME, subject, model, "subject")
            check_inversion(REPLACE_NAME, scene, model, "scene")
            masks = Masks(_check_mask(subject_mask, "subject_mask"), _check_mask(target_mask, "target_mask"),
                          subject_dilation=subject_dilation, region_dilation=target_dilation)
            schedule = _schedule(model, sagi_steps, salq_end, order, salq_layers, sagi_layers)
            control = MCACtrl(Streams(subject, scene=scene), masks, schedule, label=REPLACE_NAME)
        return io.NodeOutput(add_control(model, control))


class QKVMCACtrlGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVMCACtrlGenerate",
            display_name=GENERATE_NAME,
            category=CATEGORY,
            description="MCA-Ctrl subject generation: generates the prompt's scene with the subject of an "
                        "image in it. SAGI (Self-Attention Global Injection) early, then SALQ (Self-Attention Local "
                        "Query): the inverted subject runs as one row per controlled CFG branch (with that "
                        "branch's prompt, as the official code); the image queries the subject's foreground "
                        "inside the target mask and its own background outside. Without a target mask, the mask "
                        "is the subject word's cross-attention in the image (official code: top 30% set to 1, "
                        "the rest soft).",
            search_aliases=["subject", "subject generation", "subject driven", "personalization", "customization",
                            "salq", "sagi", "mca-ctrl", "attention", "reference"],
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched clone is returned)."),
                io.Clip.Input("clip", tooltip="The text encoder, to encode the condition prompt."),
                Inversion.Input("subject", tooltip="The DDIM-inverted subject image (DDIM Inversion node)."),
                io.Mask.Input("subject_mask", tooltip="The subject's foreground on the subject image (1 = subject). "
                                                      "Must not be empty. " + MASKS_MEANING),
                io.String.Input("condition_prompt", multiline=True, default="a photo of a dog on the beach",
                                tooltip="The prompt of the image you generate: type the same text as the positive "
                                        "prompt (a warning says when they differ). subject_word's position is "
                                        "read from it for the automatic mask."),
                io.String.Input("subject_word", default="dog",
                                tooltip="The word of the prompt naming the subject; its cross-attention gives the "
                                        "automatic target mask."),
                io.Mask.Input("target_mask", optional=True,
                              tooltip="Where the subject goes (1 = region). Unconnected: automatic, from the "
                                      "subject word's cross-attention in the image, averaged since the first step "
                                      "at the 16x16 level (official; the first step runs plain). Empty: plain "
                                      "generation; full: the subject's appearance everywhere (said in the log "
                                      "when the node runs). " + MASKS_MEANING),
                io.Float.Input("auto_mask_share", default=0.3, min=0.01, max=1.0, step=0.01,
                               tooltip="Share of the tokens the automatic target mask sets to 1 (official: 0.3); "
                                       "the other tokens keep their normalised attention as a soft weight."),
                *_schedule_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with MCA-Ctrl: sample it with KSampler.")],
        )

    @classmethod
    def validate_inputs(cls, sagi_steps=0.1, salq_end=1.0, order=mca.ORDER_SAGI_FIRST, **kwargs):
        return _validate_schedule(GENERATE_NAME, sagi_steps, salq_end, order)

    @classmethod
    def execute(cls, model, clip, subject, subject_mask, condition_prompt, subject_word, auto_mask_share,
                sagi_steps, salq_end, order, salq_layers, sagi_layers, subject_dilation,
                target_mask=None) -> io.NodeOutput:
        with errors_named(GENERATE_NAME):
            check_inversion(GENERATE_NAME, subject, model, "subject")
            schedule = _schedule(model, sagi_steps, salq_end, order, salq_layers, sagi_layers)
            context = clip.encode_from_tokens(clip.tokenize(condition_prompt))
            if context.shape[-1] != subject.context_dim:
                raise ValueError(f"expected a text encoder of width {subject.context_dim} (the subject inversion's "
                                 f"model), got {context.shape[-1]}")
            context = context[:1].detach()
            auto = None
            if target_mask is None:
                tokens = word_token_positions(clip, condition_prompt, subject_word, GENERATE_NAME)
                auto = AutoMask(tuple(tokens), fraction=auto_mask_share, prompt_context=context)
            masks = Masks(_check_mask(subject_mask, "subject_mask"), _check_mask(target_mask, "target_mask"),
                          subject_dilation=subject_dilation, auto=auto)
            control = MCACtrl(Streams(subject), masks, schedule, label=GENERATE_NAME)
        return io.NodeOutput(add_control(model, control))


NODES = [QKVMCACtrlReplace, QKVMCACtrlGenerate]
