"""E-commerce text guidance nodes (Li 2024, §3.2): condition guidance, mask guidance, and the
word attention map mask guidance thresholds. The controls live in ``text_guidance/``."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io, ui

from ..attention.cross_attention import KV_SHARE_MODES
from ..attention.layers import select_layers
from ..patching.layers import discover_layers
from ..patching.model_info import context_dim
from ..patching.patch import add_control
from ..patching.prompt_tokens import prompt_token_count, word_token_positions
from ..text_guidance.attention_map import encode_prompt, sample_with_word_maps
from ..text_guidance.condition import ConditionGuidanceControl
from ..text_guidance.mask import MaskGuidanceControl
from .naming import errors_named
from .step_window_inputs import step_window, window_inputs

# The e-commerce paper builds on IP-Adapter; its nodes sit next to the IP-Adapter ones.
CATEGORY = "QKV Control/IP-Adapter"
CONDITION_NAME = "QKV Condition Guidance (e-commerce)"
MASK_NAME = "QKV Mask Guidance (e-commerce)"
MAP_NAME = "QKV Word Attention Map (sampler)"


def _prompt_word_inputs(text_tooltip: str, words_tooltip: str) -> list:
    """The text encoder, the prompt and the words of it whose cross-attention is used."""
    return [
        io.Clip.Input("clip", tooltip="The text encoder; its tokenizer locates the words."),
        io.String.Input("text", multiline=True, default="a photo of a product", tooltip=text_tooltip),
        io.String.Input("words", default="product", tooltip=words_tooltip),
    ]


def _preset_context(preset, model):
    if not preset:
        raise ValueError("expected a CONDITIONING with one entry, got an empty one")
    context = preset[0][0][:1]
    if context.shape[-1] != context_dim(model):
        raise ValueError(f"expected a preset condition of width {context_dim(model)} (the model's context), "
                         f"got {context.shape[-1]}")
    return context


class QKVConditionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVConditionGuidance",
            display_name=CONDITION_NAME,
            category=CATEGORY,
            description="E-commerce condition guidance: in the chosen cross-attention layers the prompt rows "
                        "take the keys/values of a preset text condition (replace) or attend to both theirs and "
                        "its (concat), so a wild prompt cannot break the style. The preset's keys/values are "
                        "projected directly in each layer: no extra batch row.",
            search_aliases=["condition guidance", "e-commerce", "ecommerce", "product", "style consistency",
                            "kv share", "preset prompt", "attention"],
            inputs=[
                io.Model.Input("model", tooltip="The model (usually after QKV IP-Adapter Apply)."),
                io.Conditioning.Input("preset", tooltip="The preset text condition (e.g. a style description of "
                                                        "the product photo), from CLIP Text Encode."),
                io.Combo.Input("mode", options=list(KV_SHARE_MODES), default="concat",
                               tooltip="concat: prompt rows attend to preset + own text (the prompt still "
                                       "counts); replace: preset keys/values only (the prompt is ignored in "
                                       "these layers)."),
                io.String.Input("layers", default="all",
                                tooltip="Block spec of the cross-attention layers to share in (e.g. 'all', "
                                        "'output', 'level:0-1')."),
                *window_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with shared cross-attention K/V.")],
        )

    @classmethod
    def execute(cls, model, preset, mode, layers, start_at, end_at) -> io.NodeOutput:
        with errors_named(CONDITION_NAME):
            window = step_window(start_at, end_at)
            select_layers(layers, discover_layers(model), "attn2")
            control = ConditionGuidanceControl(_preset_context(preset, model), mode, layers, window)
        return io.NodeOutput(add_control(model, control))


class QKVMaskGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVMaskGuidance",
            display_name=MASK_NAME,
            category=CATEGORY,
            description="E-commerce mask guidance: the cross-attention map of chosen prompt words, thresholded, "
                        "multiplies their values in the chosen layers, holding the product's composition. "
                        "Also outputs the prompt's conditioning: use it as the positive prompt.",
            search_aliases=["mask guidance", "e-commerce", "ecommerce", "product", "attention mask", "word mask",
                            "attention"],
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched clone is returned)."),
                *_prompt_word_inputs("The positive prompt (encoded here, see the conditioning output).",
                                     "Comma-separated words or phrases of the prompt to guide with."),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the map's peak above which a position belongs to the mask."),
                io.Float.Input("strength", default=0.5, min=0.0, max=5.0, step=0.05,
                               tooltip="How much the words' values are amplified inside the mask (0 = off)."),
                io.String.Input("layers", default="-level:0",
                                tooltip="Block spec of the cross-attention layers to guide ('-level:0' = all "
                                        "but the full-resolution ones)."),
                *window_inputs(),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with mask guidance."),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="The encoded prompt; wire it to the sampler's positive."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, text, words, threshold, strength, layers, start_at, end_at) -> io.NodeOutput:
        with errors_named(MASK_NAME):
            window = step_window(start_at, end_at)
            select_layers(layers, discover_layers(model), "attn2")
            positions = word_token_positions(clip, text, words, MASK_NAME)
            positive = encode_prompt(clip, text)
            if strength == 0:
                return io.NodeOutput(model, positive)
            control = MaskGuidanceControl(positions, prompt_token_count(clip, text), threshold, strength, layers,
                                          window)
        return io.NodeOutput(add_control(model, control), positive)


class QKVAttentionMap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVAttentionMap",
            display_name=MAP_NAME,
            category=CATEGORY,
            description="Samples like KSampler and records the cross-attention maps of chosen prompt words, "
                        "averaged over layers, heads, words and steps: a MASK (e.g. for MCA-Ctrl's target "
                        "mask or ThresholdMask) and a preview IMAGE, to see what mask guidance uses.",
            search_aliases=["attention map", "cross-attention map", "word mask", "mask from text", "heatmap",
                            "e-commerce", "attention"],
            inputs=[
                io.Model.Input("model", tooltip="The model (patched or not)."),
                *_prompt_word_inputs("The positive prompt (encoded here).",
                                     "Comma-separated words or phrases to map."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (sets the size)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, tooltip="CFG scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="Scheduler."),
                io.String.Input("layers", default="level:2",
                                tooltip="Block spec of the cross-attention layers averaged ('level:2' = 16x16 "
                                        "at 512 px on SD1.5, as MCA-Ctrl and Prompt-to-Prompt use)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Denoise strength."),
            ],
            outputs=[
                io.Latent.Output(tooltip="The sampled latent."),
                io.Mask.Output(tooltip="Word attention map at image resolution, 0..1 (max-normalised per image)."),
                io.Image.Output(display_name="preview", tooltip="The map as a grey-scale image."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, text, words, negative, latent_image, seed, steps, cfg, sampler_name,
                scheduler, layers, denoise) -> io.NodeOutput:
        with errors_named(MAP_NAME):
            latent, mask = sample_with_word_maps(model, clip, text, words, negative, latent_image, seed, steps, cfg,
                                                 sampler_name, scheduler, layers, denoise, MAP_NAME)
        preview = mask.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
        # Shown on the node too, so thresholds can be tuned without a Preview Image node.
        return io.NodeOutput(latent, mask, preview, ui=ui.PreviewImage(preview, cls=cls))


NODES = [QKVConditionGuidance, QKVMaskGuidance, QKVAttentionMap]
