"""IP-Adapter family nodes: loader, apply (decoupled / joint), DEADiff style + content
routing, e-commerce condition and mask guidance, word attention maps."""

from __future__ import annotations

import functools
import logging
import os

import comfy.samplers
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..ipadapter.control import MODES, IPAdapterControl, Reference
from ..ipadapter.files import load_file
from ..ipadapter.guidance import AttentionMapCapture, ConditionGuidanceControl, MaskGuidanceControl
from ..ipadapter.model import IPAdapterModel
from ..ipadapter.routing import AUTO, layer_names, routing_specs
from ..patching.prompt_tokens import prompt_token_count, word_token_positions
from ..attention.cross_attention import KV_SHARE_MODES
from ..attention.layers import resolve_weight_spec, select_layers
from ..patching.layers import discover_layers
from ..patching.patch import add_control

logger = logging.getLogger("qkv_control")

CATEGORY = "QKV Control/IP-Adapter"
FOLDER = "ipadapter"
EXTENSIONS = {".bin", ".safetensors", ".sft"}

IPAdapterType = io.Custom("QKV_IPADAPTER")


def register_folder() -> None:
    """``models/ipadapter`` in folder_paths, keeping paths another pack or
    ``extra_model_paths.yaml`` already added (ComfyUI creates such entries with no
    extensions, so ours are added)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    paths = list(paths)
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | EXTENSIONS)


register_folder()


def _sigma_window(model, start_at: float, end_at: float) -> tuple[float, float]:
    """Percent of sampling -> sigma (the window is checked in sigma space, so it holds for
    any sampler, scheduler and step count)."""
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at))


def _context_dim(model) -> int:
    return int(model.model.model_config.unet_config.get("context_dim") or 0)


def _layer_kv(model, adapter: IPAdapterModel, node: str):
    return adapter.layer_map(discover_layers(model), _context_dim(model), node)


def _conditioning_context(conditioning, node: str):
    if not conditioning:
        raise ValueError(f"{node}: expected a CONDITIONING with one entry, got an empty one")
    context = conditioning[0][0]
    return context[:1]


_START = io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                        tooltip="Fraction of sampling where it starts acting (0 = first step); "
                                "converted to a sigma, so it holds for any scheduler.")
_END = io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                      tooltip="Fraction of sampling where it stops acting (1 = last step).")


def _window_inputs():
    return [io.Float.Input(i.id, default=i.default, min=0.0, max=1.0, step=0.01, tooltip=i.tooltip)
            for i in (_START, _END)]


class QKVIPAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVIPAdapterLoader",
            display_name="QKV IP-Adapter Loader",
            category=CATEGORY,
            description="Loads IP-Adapter weights for image prompts (sd15, sd15_light, sd15_plus, plus-face, sdxl, "
                        "sdxl_vit-h, plus_sdxl_vit-h; .safetensors or .bin, read without running pickled code) from "
                        "models/ipadapter.",
            search_aliases=["ip adapter", "ipadapter", "load ip adapter", "image prompt", "reference"],
            inputs=[
                io.Combo.Input("ipadapter_file", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A file in models/ipadapter (or an ipadapter path of extra_model_paths.yaml)."),
            ],
            outputs=[IPAdapterType.Output(display_name="IPADAPTER",
                                          tooltip="The loaded IP-Adapter: image projection and per-layer K/V weights.")],
        )

    @classmethod
    def execute(cls, ipadapter_file: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, ipadapter_file)
        adapter = IPAdapterModel(load_file(path), name=f"QKV IP-Adapter Loader ({ipadapter_file})")
        logger.info("QKV IP-Adapter: loaded %s: %s", ipadapter_file, adapter.describe())
        return io.NodeOutput(adapter)


class QKVIPAdapterApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVIPAdapterApply",
            display_name="QKV IP-Adapter Apply",
            category=CATEGORY,
            description="IP-Adapter image prompt in the model's cross-attention: decoupled (IP-Adapter: text attention + "
                        "weight x image attention) or joint (DEADiff: one softmax over text and image tokens). Honours "
                        "conflict-free guidance (the positive-only image-prompt policy).",
            search_aliases=["ip adapter", "ipadapter", "image prompt", "reference", "style transfer",
                            "decoupled cross-attention", "joint attention", "attention"],
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (a patched clone is returned)."),
                IPAdapterType.Input("ipadapter", tooltip="From QKV IP-Adapter Loader."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision encoder the IP-Adapter was trained "
                                                           "with (ViT-H for most, ViT-bigG for ip-adapter_sdxl)."),
                io.Image.Input("image", tooltip="Reference image(s); several images form one longer image prompt."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Scale of the image attention (0 = no effect)."),
                io.Combo.Input("mode", options=list(MODES), default="decoupled",
                               tooltip="decoupled: IP-Adapter's separate image attention added to the text "
                                       "attention; joint: one attention over text + image tokens (DEADiff)."),
                *_window_inputs(),
                io.String.Input("layer_weights", default="all=1",
                                tooltip="Per-layer weight spec 'selector=weight, ...' (e.g. 'all=1, input=0.5', "
                                        "'#4-8=0'); multiplied by weight."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the image prompt in its cross-attention.")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight, mode, start_at, end_at,
                layer_weights) -> io.NodeOutput:
        node = "QKV IP-Adapter Apply"
        if weight == 0:
            return io.NodeOutput(model)
        if mode == "joint" and weight < 0:
            raise ValueError(f"{node}: expected a weight >= 0 in joint mode (it scales the image tokens' share of "
                             f"one softmax), got {weight}")
        layers = discover_layers(model)
        resolve_weight_spec(layer_weights, layers, "attn2")
        layer_kv = _layer_kv(model, ipadapter, node)
        tokens = ipadapter.encode(clip_vision, image)
        sigma_start, sigma_end = _sigma_window(model, start_at, end_at)
        control = IPAdapterControl(layer_kv, (Reference("image", tokens, weight, layer_weights,
                                                        functools.partial(ipadapter.encode, clip_vision)),), mode,
                                   sigma_start, sigma_end)
        return io.NodeOutput(add_control(model, control))


class QKVIPAdapterStyleContent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVIPAdapterStyleContent",
            display_name="QKV IP-Adapter Style and Content (DEADiff)",
            category=CATEGORY,
            description="DEADiff style transfer: disentangled conditioning with an IP-Adapter; the style image goes to the "
                        "fine, high-resolution cross-attention layers, the content (semantic) image to the coarse ones, so "
                        "the style image's subject does not leak into the result.",
            search_aliases=["deadiff", "style transfer", "style", "content", "style and content", "ip adapter",
                            "disentangled", "reference", "image prompt"],
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (a patched clone is returned)."),
                IPAdapterType.Input("ipadapter", tooltip="From QKV IP-Adapter Loader."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision encoder the IP-Adapter was trained with."),
                io.Image.Input("style_image", tooltip="Image whose style (colour, texture, brushwork) is wanted."),
                io.Float.Input("style_weight", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="Scale of the style image in the style layers (0 = off)."),
                io.Float.Input("content_weight", default=0.5, min=0.0, max=5.0, step=0.05,
                               tooltip="Scale of the content image in the semantic layers (0 = off)."),
                io.Combo.Input("mode", options=list(MODES), default="decoupled",
                               tooltip="decoupled (IP-Adapter's trained form) or joint (DEADiff's one softmax "
                                       "over text and image tokens)."),
                *_window_inputs(),
                io.String.Input("style_layers", default=AUTO,
                                tooltip="'auto' = DEADiff's split (every layer but the semantic ones), or a "
                                        "weight spec like 'all=1, #4-8=0'."),
                io.String.Input("content_layers", default=AUTO,
                                tooltip="'auto' = DEADiff's semantic layers (SD1.5: layers 4-8 of 16), or a "
                                        "weight spec like '#4-8=1'."),
                io.Image.Input("content_image", optional=True,
                               tooltip="Image whose subject/semantics are wanted; leave empty for style only."),
            ],
            outputs=[io.Model.Output(tooltip="The model with style and content image prompts routed by layer.")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, style_image, style_weight, content_weight, mode, start_at,
                end_at, style_layers, content_layers, content_image=None) -> io.NodeOutput:
        node = "QKV IP-Adapter Style and Content"
        layers = discover_layers(model)
        style_spec, content_spec = routing_specs(layers, style_layers, content_layers)
        layer_kv = _layer_kv(model, ipadapter, node)
        references = []
        if style_weight != 0:
            references.append(Reference("style", ipadapter.encode(clip_vision, style_image), style_weight, style_spec,
                                        functools.partial(ipadapter.encode, clip_vision)))
        if content_image is not None and content_weight != 0:
            references.append(Reference("content", ipadapter.encode(clip_vision, content_image), content_weight,
                                        content_spec, functools.partial(ipadapter.encode, clip_vision)))
        if not references:
            return io.NodeOutput(model)
        logger.info("QKV DEADiff routing: content layers %s",
                    layer_names(layers, resolve_weight_spec(content_spec, layers, "attn2")))
        sigma_start, sigma_end = _sigma_window(model, start_at, end_at)
        control = IPAdapterControl(layer_kv, tuple(references), mode, sigma_start, sigma_end)
        return io.NodeOutput(add_control(model, control))


class QKVConditionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVConditionGuidance",
            display_name="QKV Condition Guidance (e-commerce)",
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
                *_window_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with shared cross-attention K/V.")],
        )

    @classmethod
    def execute(cls, model, preset, mode, layers, start_at, end_at) -> io.NodeOutput:
        node = "QKV Condition Guidance"
        select_layers(layers, discover_layers(model), "attn2")
        context = _conditioning_context(preset, node)
        if context.shape[-1] != _context_dim(model):
            raise ValueError(f"{node}: expected a preset condition of width {_context_dim(model)} (the model's "
                             f"context), got {context.shape[-1]}")
        sigma_start, sigma_end = _sigma_window(model, start_at, end_at)
        control = ConditionGuidanceControl(context, mode, layers, sigma_start, sigma_end)
        return io.NodeOutput(add_control(model, control))


def _encode(clip, text: str):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


class QKVMaskGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVMaskGuidance",
            display_name="QKV Mask Guidance (e-commerce)",
            category=CATEGORY,
            description="E-commerce mask guidance: the cross-attention map of chosen prompt words, thresholded, "
                        "multiplies their values in the chosen layers, holding the product's composition. "
                        "Also outputs the prompt's conditioning: use it as the positive prompt.",
            search_aliases=["mask guidance", "e-commerce", "ecommerce", "product", "attention mask", "word mask",
                            "attention"],
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched clone is returned)."),
                io.Clip.Input("clip", tooltip="The text encoder; its tokenizer locates the words."),
                io.String.Input("text", multiline=True, default="a photo of a product",
                                tooltip="The positive prompt (encoded here, see the conditioning output)."),
                io.String.Input("words", default="product",
                                tooltip="Comma-separated words or phrases of the prompt to guide with."),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the map's peak above which a position belongs to the mask."),
                io.Float.Input("strength", default=0.5, min=0.0, max=5.0, step=0.05,
                               tooltip="How much the words' values are amplified inside the mask (0 = off)."),
                io.String.Input("layers", default="-level:0",
                                tooltip="Block spec of the cross-attention layers to guide ('-level:0' = all "
                                        "but the full-resolution ones)."),
                *_window_inputs(),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with mask guidance."),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="The encoded prompt; wire it to the sampler's positive."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, text, words, threshold, strength, layers, start_at, end_at) -> io.NodeOutput:
        node = "QKV Mask Guidance"
        select_layers(layers, discover_layers(model), "attn2")
        positions = word_token_positions(clip, text, words, node)
        positive = _encode(clip, text)
        if strength == 0:
            return io.NodeOutput(model, positive)
        sigma_start, sigma_end = _sigma_window(model, start_at, end_at)
        control = MaskGuidanceControl(positions, prompt_token_count(clip, text), threshold, strength, layers,
                                      sigma_start, sigma_end)
        return io.NodeOutput(add_control(model, control), positive)


class QKVAttentionMap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVAttentionMap",
            display_name="QKV Word Attention Map (sampler)",
            category=CATEGORY,
            description="Samples like KSampler and records the cross-attention maps of chosen prompt words, "
                        "averaged over layers, heads, words and steps: a MASK (e.g. for MCA-Ctrl's target "
                        "mask or ThresholdMask) and a preview IMAGE, to see what mask guidance uses.",
            search_aliases=["attention map", "cross-attention map", "word mask", "mask from text", "heatmap",
                            "e-commerce", "attention"],
            inputs=[
                io.Model.Input("model", tooltip="The model (patched or not)."),
                io.Clip.Input("clip", tooltip="The text encoder; its tokenizer locates the words."),
                io.String.Input("text", multiline=True, default="a photo of a product",
                                tooltip="The positive prompt (encoded here)."),
                io.String.Input("words", default="product", tooltip="Comma-separated words or phrases to map."),
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
        import nodes as comfy_nodes

        node = "QKV Word Attention Map"
        select_layers(layers, discover_layers(model), "attn2")
        positions = word_token_positions(clip, text, words, node)
        sink: dict = {}
        capture = AttentionMapCapture(positions, prompt_token_count(clip, text), layers, sink)
        patched = add_control(model, capture)
        (latent,) = comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler,
                                                _encode(clip, text), negative, latent_image, denoise=denoise)
        samples = latent["samples"]
        maps = sink.get("maps")
        if maps is None:
            raise ValueError(f"{node}: expected the sampler to run the prompt branch, got no attention maps "
                             "(cfg 0 or denoise 0?)")
        maps = maps[: samples.shape[0]] if maps.shape[0] >= samples.shape[0] else maps.expand(samples.shape[0], -1, -1)
        peak = maps.flatten(1).amax(dim=1).clamp(min=1e-8).view(-1, 1, 1)
        mask = torch.nn.functional.interpolate((maps / peak).unsqueeze(1), scale_factor=8, mode="bilinear",
                                               align_corners=False)[:, 0].clamp(0, 1)
        preview = mask.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
        # Shown on the node too, so thresholds can be tuned without a Preview Image node.
        return io.NodeOutput(latent, mask, preview, ui=ui.PreviewImage(preview, cls=cls))


NODES = [QKVIPAdapterLoader, QKVIPAdapterApply, QKVIPAdapterStyleContent, QKVConditionGuidance, QKVMaskGuidance,
         QKVAttentionMap]
