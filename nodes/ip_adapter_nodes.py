"""IP-Adapter family nodes: loader, apply (decoupled / joint), DEADiff style + content routing."""

from __future__ import annotations

import functools
import logging
import os

import folder_paths
from comfy_api.latest import io

from ..attention.layers import resolve_weight_spec
from ..ipadapter.control import MODES, IPAdapterControl, Reference
from ..ipadapter.files import load_file
from ..ipadapter.model import IPAdapterModel
from ..ipadapter.routing import AUTO, layer_names, routing_specs
from ..patching.layers import discover_layers
from ..patching.model_info import context_dim
from ..patching.patch import add_control
from .naming import errors_named
from .step_window_inputs import step_window, window_inputs

logger = logging.getLogger("qkv_control")

CATEGORY = "QKV Control/IP-Adapter"
FOLDER = "ipadapter"
EXTENSIONS = {".bin", ".safetensors", ".sft"}
LOADER_NAME = "QKV IP-Adapter Loader"
APPLY_NAME = "QKV IP-Adapter Apply"
STYLE_CONTENT_NAME = "QKV IP-Adapter Style and Content (DEADiff)"

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


def _layer_kv(model, adapter: IPAdapterModel, node: str):
    return adapter.layer_map(discover_layers(model), context_dim(model), node)


def _check_layer_weights(mode: str, weight: float, spec: str, layers) -> None:
    """The weight spec resolves on this model; in joint mode, which scales the image tokens' share
    of one softmax, weight x layer weight >= 0 in every layer: said here, before sampling."""
    layer_weights = resolve_weight_spec(spec, layers, "attn2")
    if mode != "joint":
        return
    negative = [w for w in layer_weights.values() if weight * w < 0]
    if negative:
        raise ValueError(f"expected weight x layer weight >= 0 in every layer in joint mode (one softmax over "
                         f"text and image tokens), got {weight} x {min(negative, key=lambda w: weight * w)} "
                         f"from '{spec}'")


class QKVIPAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVIPAdapterLoader",
            display_name=LOADER_NAME,
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
        with errors_named(LOADER_NAME):
            path = folder_paths.get_full_path_or_raise(FOLDER, ipadapter_file)
            adapter = IPAdapterModel(load_file(path), name=f"{LOADER_NAME} ({ipadapter_file})")
        logger.info("QKV IP-Adapter: loaded %s: %s", ipadapter_file, adapter.describe())
        return io.NodeOutput(adapter)


class QKVIPAdapterApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVIPAdapterApply",
            display_name=APPLY_NAME,
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
                *window_inputs(),
                io.String.Input("layer_weights", default="all=1",
                                tooltip="Per-layer weight spec 'selector=weight, ...' (e.g. 'all=1, input=0.5', "
                                        "'#4-8=0'); multiplied by weight."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the image prompt in its cross-attention.")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight, mode, start_at, end_at,
                layer_weights) -> io.NodeOutput:
        if weight == 0:
            return io.NodeOutput(model)
        with errors_named(APPLY_NAME):
            window = step_window(start_at, end_at)
            _check_layer_weights(mode, weight, layer_weights, discover_layers(model))
            layer_kv = _layer_kv(model, ipadapter, APPLY_NAME)
            tokens = ipadapter.encode(clip_vision, image)
            reference = Reference("image", tokens, weight, layer_weights, functools.partial(ipadapter.encode, clip_vision))
            control = IPAdapterControl(layer_kv, (reference,), mode, window)
        return io.NodeOutput(add_control(model, control))


class QKVIPAdapterStyleContent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVIPAdapterStyleContent",
            display_name=STYLE_CONTENT_NAME,
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
                *window_inputs(),
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
        with errors_named(STYLE_CONTENT_NAME):
            window = step_window(start_at, end_at)
            layers = discover_layers(model)
            style_spec, content_spec = routing_specs(layers, style_layers, content_layers)
            _check_layer_weights(mode, style_weight, style_spec, layers)
            if content_image is not None:
                _check_layer_weights(mode, content_weight, content_spec, layers)
            layer_kv = _layer_kv(model, ipadapter, STYLE_CONTENT_NAME)
            encode = functools.partial(ipadapter.encode, clip_vision)
            references = []
            if style_weight != 0:
                references.append(Reference("style", encode(style_image), style_weight, style_spec, encode))
            if content_image is not None and content_weight != 0:
                references.append(Reference("content", encode(content_image), content_weight, content_spec, encode))
            if not references:
                return io.NodeOutput(model)
            logger.info("QKV DEADiff routing: content layers %s",
                        layer_names(layers, resolve_weight_spec(content_spec, layers, "attn2")))
            control = IPAdapterControl(layer_kv, tuple(references), mode, window)
        return io.NodeOutput(add_control(model, control))


NODES = [QKVIPAdapterLoader, QKVIPAdapterApply, QKVIPAdapterStyleContent]
