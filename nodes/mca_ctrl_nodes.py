"""MCA-Ctrl nodes: subject replacement / addition (scene image) and subject generation (text)."""

from __future__ import annotations

import contextlib

from comfy_api.latest import io

from ..attention import mca_ctrl as mca
from ..attention.layers import select_layers
from ..indetail_ip.compat import check_inversion
from ..inversion.result import INVERSION_TYPE
from ..mca_ctrl.control import MCACtrl
from ..patching.prompt_tokens import word_token_positions
from ..patching.layers import discover_layers
from ..patching.patch import add_control

Inversion = io.Custom(INVERSION_TYPE)
CATEGORY = "QKV Control/MCA-Ctrl"
REPLACE_NAME = "QKV MCA-Ctrl Subject Replace / Add"
GENERATE_NAME = "QKV MCA-Ctrl Subject Generation"


def _schedule_inputs() -> list:
    return [
        io.Float.Input("sagi_steps", default=0.1, min=0.0, max=1.0, step=0.01,
                       tooltip="Share of the sampling steps that run SAGI (global injection of the subject's and "
                               "scene's own self-attention outputs). Official code: 0.1 (first 5 of 50 steps)."),
        io.Float.Input("salq_end", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the steps where MCA-Ctrl stops. SALQ (local query) runs between SAGI "
                               "and this point; the two never overlap. Later steps run plain attention."),
        io.Combo.Input("order", options=list(mca.ORDERS), default=mca.ORDER_SAGI_FIRST,
                       tooltip="sagi_first (paper): SAGI early, SALQ after. salq_first swaps them with the same "
                               "durations (the paper's ablation: clearly worse)."),
        io.String.Input("salq_layers", default="all",
                        tooltip="Self-attention layers where SALQ runs, as a block spec: all (official), output "
                                "(decoder only: starts after the layout formed), input:4-8, #3-15, level:0-1 ... "
                                "'-' excludes."),
        io.String.Input("sagi_layers", default="all",
                        tooltip="Self-attention layers where SAGI runs (block spec, as salq_layers)."),
        io.Int.Input("subject_dilation", default=3, min=1, max=9,
                     tooltip="Dilation kernel of the subject mask at each layer's token grid (paper: 3x3); "
                             "1 = no dilation."),
    ]


def _check_layers(node: str, model, salq_layers: str, sagi_layers: str) -> None:
    layers = discover_layers(model)
    for name, spec in (("salq_layers", salq_layers), ("sagi_layers", sagi_layers)):
        try:
            select_layers(spec, layers, "attn1")
        except ValueError as error:
            raise ValueError(f"{node}: {name}: {error}") from None


def _schedule(node: str, sagi_steps: float, salq_end: float, order: str) -> mca.PhaseSchedule:
    try:
        return mca.PhaseSchedule(float(sagi_steps), float(salq_end), order)
    except ValueError as error:
        raise ValueError(f"{node}: {error}") from None


def _validate_schedule(node: str, sagi_steps=0.1, salq_end=1.0, order=mca.ORDER_SAGI_FIRST):
    try:
        mca.PhaseSchedule(float(sagi_steps), float(salq_end), order)
    except ValueError as error:
        return f"{node}: {error}"
    return True


@contextlib.contextmanager
def _errors_named(node: str):
    """Errors of the control's own checks, prefixed with the node's name (once)."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        raise ValueError(message if message.startswith(node) else f"{node}: {message}") from None


def _check_mask(node: str, mask, what: str):
    if mask is None:
        return None
    if mask.ndim not in (2, 3):
        raise ValueError(f"{node}: expected a MASK [B, H, W] for {what}, got shape {tuple(mask.shape)}")
    return mask


class QKVMCACtrlReplace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVMCACtrlReplace",
            display_name=REPLACE_NAME,
            category=CATEGORY,
            description="MCA-Ctrl subject replacement and addition: puts the subject of one image into a scene, in the "
                        "region of the target mask, keeping the scene's background. SAGI (Self-Attention Global Injection) "
                        "early, then SALQ (Self-Attention Local Query): the subject and the scene run as inverted streams in "
                        "the same batch (one row each per step, no CFG) and the generated image starts from the scene's "
                        "inverted noise. Sample with the same steps and scheduler as the inversions, from a latent of the "
                        "scene's size.",
            search_aliases=["subject", "replace", "replace subject", "inpaint subject", "subject addition",
                            "add subject", "insert object", "swap object", "salq", "sagi", "mca-ctrl", "attention",
                            "reference"],
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched clone is returned)."),
                Inversion.Input("subject", tooltip="The DDIM-inverted subject image (DDIM Inversion node). "
                                                   "Another size than the scene is fitted by cover + centre crop."),
                io.Mask.Input("subject_mask", tooltip="The subject's foreground on the subject image (1 = subject): "
                                                      "painted, or from the localization (Grounding DINO + SAM) node."),
                Inversion.Input("scene", tooltip="The DDIM-inverted scene image the subject goes into."),
                io.Mask.Input("target_mask", tooltip="Where the subject goes in the scene (1 = region): the old "
                                                     "subject to replace, or the empty spot to fill. Everything "
                                                     "outside is kept from the scene."),
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
        check_inversion(REPLACE_NAME, subject, model, "subject")
        check_inversion(REPLACE_NAME, scene, model, "scene")
        _check_layers(REPLACE_NAME, model, salq_layers, sagi_layers)
        with _errors_named(REPLACE_NAME):
            control = MCACtrl(subject, _check_mask(REPLACE_NAME, subject_mask, "subject_mask"),
                              _check_mask(REPLACE_NAME, target_mask, "target_mask"), condition=scene,
                              schedule=_schedule(REPLACE_NAME, sagi_steps, salq_end, order),
                              salq_layers=salq_layers, sagi_layers=sagi_layers,
                              subject_dilation=subject_dilation, region_dilation=target_dilation,
                              label=REPLACE_NAME)
        return io.NodeOutput(add_control(model, control))


class QKVMCACtrlGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVMCACtrlGenerate",
            display_name=GENERATE_NAME,
            category=CATEGORY,
            description="MCA-Ctrl subject generation: generates the condition prompt's scene with the subject of an image "
                        "in it. SAGI (Self-Attention Global Injection) early, then SALQ (Self-Attention Local Query): a "
                        "condition stream is generated from the same noise with the condition prompt (one row per image, no "
                        "CFG) and the inverted subject runs as one row; the target queries the subject's foreground inside "
                        "the target mask and the condition's background outside. Without a target mask, the mask is the top "
                        "share of the subject word's cross-attention (official code).",
            search_aliases=["subject", "subject generation", "subject driven", "personalization", "customization",
                            "salq", "sagi", "mca-ctrl", "attention", "reference"],
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched clone is returned)."),
                io.Clip.Input("clip", tooltip="The text encoder, to encode the condition prompt."),
                Inversion.Input("subject", tooltip="The DDIM-inverted subject image (DDIM Inversion node)."),
                io.Mask.Input("subject_mask", tooltip="The subject's foreground on the subject image (1 = subject)."),
                io.String.Input("condition_prompt", multiline=True, default="a photo of a dog on the beach",
                                tooltip="Prompt of the condition stream: the scene, naming the subject's class."),
                io.String.Input("subject_word", default="dog",
                                tooltip="The word of the condition prompt naming the subject; its cross-attention "
                                        "gives the automatic target mask."),
                io.Mask.Input("target_mask", optional=True,
                              tooltip="Where the subject goes (1 = region). Unconnected: automatic, from the "
                                      "subject word's cross-attention (top share at the 16x16 level)."),
                io.Float.Input("auto_mask_share", default=0.3, min=0.01, max=1.0, step=0.01,
                               tooltip="Share of the tokens the automatic target mask keeps (official: 0.3)."),
                io.Float.Input("condition_cfg", default=1.0, min=1.0, max=30.0, step=0.1,
                               tooltip="CFG of the condition stream. 1 = one row per image and step, no CFG "
                                       "(4 rows per step in all). Above 1 (e.g. 7.5, the official setting) a "
                                       "second row runs the KSampler's negative prompt: a cleaner condition "
                                       "image for one more row per step."),
                *_schedule_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with MCA-Ctrl: sample it with KSampler.")],
        )

    @classmethod
    def validate_inputs(cls, sagi_steps=0.1, salq_end=1.0, order=mca.ORDER_SAGI_FIRST, **kwargs):
        return _validate_schedule(GENERATE_NAME, sagi_steps, salq_end, order)

    @classmethod
    def execute(cls, model, clip, subject, subject_mask, condition_prompt, subject_word, auto_mask_share,
                condition_cfg, sagi_steps, salq_end, order, salq_layers, sagi_layers, subject_dilation,
                target_mask=None) -> io.NodeOutput:
        check_inversion(GENERATE_NAME, subject, model, "subject")
        _check_layers(GENERATE_NAME, model, salq_layers, sagi_layers)
        subject_tokens = None
        if target_mask is None:
            subject_tokens = word_token_positions(clip, condition_prompt, subject_word, GENERATE_NAME)
        tokens = clip.tokenize(condition_prompt)
        context = clip.encode_from_tokens(tokens)
        if context.shape[-1] != subject.context_dim:
            raise ValueError(f"{GENERATE_NAME}: expected a text encoder of width {subject.context_dim} (the "
                             f"subject inversion's model), got {context.shape[-1]}")
        with _errors_named(GENERATE_NAME):
            control = MCACtrl(subject, _check_mask(GENERATE_NAME, subject_mask, "subject_mask"),
                              _check_mask(GENERATE_NAME, target_mask, "target_mask"),
                              condition_context=context[:1].detach(),
                              schedule=_schedule(GENERATE_NAME, sagi_steps, salq_end, order),
                              salq_layers=salq_layers, sagi_layers=sagi_layers,
                              subject_dilation=subject_dilation, subject_tokens=subject_tokens,
                              auto_mask_fraction=auto_mask_share, condition_cfg=condition_cfg,
                              label=GENERATE_NAME)
        return io.NodeOutput(add_control(model, control))


NODES = [QKVMCACtrlReplace, QKVMCACtrlGenerate]
