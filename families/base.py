"""What every model-family adapter answers, read from the ComfyUI model itself.

A family adapter knows one kind of diffusion model as ComfyUI builds it: whether a model
is one (from its diffusion-model and model-config classes, never a display string), its
attention layers and how block specs name them, the image grid of its tokens, where the
text and image tokens of an attention call lie, its text width, and how its layers are
reached (UNet: attn1/attn2 replace patches; DiT: ``optimized_attention_override``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..attention.layers import AttentionLayer
from .layout import TokenLayout


@dataclass(frozen=True)
class CallGeometry:
    """What one model call's attention calls share: the image grid (height x width in patches)
    and the text tokens per row of the call's context (its padded length)."""

    grid: tuple[int, int]
    text_tokens: int = 0

    @property
    def n_image(self) -> int:
        return self.grid[0] * self.grid[1]


def diffusion_model_of(model):
    """The diffusion model (UNet or transformer) of a ModelPatcher, a BaseModel or itself."""
    if hasattr(model, "model") and hasattr(model.model, "diffusion_model"):
        model = model.model
    if hasattr(model, "diffusion_model"):
        model = model.diffusion_model
    return model


def model_config_of(model):
    """The ComfyUI model config (``comfy.supported_models.*``) of a ModelPatcher or BaseModel, or None."""
    if hasattr(model, "model") and hasattr(model.model, "model_config"):
        return model.model.model_config
    return getattr(model, "model_config", None)


class ModelFamily:
    """Base class of the family adapters (``families.unet``, ``families.flux``, ``families.mmdit``).

    name:          the family as users know it (error messages, docs)
    config_names:  the ComfyUI model configs it covers
    uses_override: True when its attention is reached through ComfyUI's
                   ``optimized_attention_override`` (diffusion transformers)
    """

    name: str = ""
    config_names: tuple[str, ...] = ()
    uses_override: bool = False
    # ComfyUI classes the adapter was verified on: (diffusion-model classes, model-config classes)
    diffusion_model_classes: tuple[type, ...] = ()
    config_classes: tuple[type, ...] = ()

    # ------------------------------------------------------------ recognition
    def matches(self, model) -> bool:
        """Whether ``model`` (ModelPatcher, BaseModel or diffusion model) is of this family:
        its diffusion model's class is one of ours (exactly: a subclass may compute otherwise)
        and, where the model config is known, so is the config's."""
        if type(diffusion_model_of(model)) not in self.diffusion_model_classes:
            return False
        config = model_config_of(model)
        return config is None or not self.config_classes or type(config) in self.config_classes

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.config_names)})" if self.config_names else self.name

    # ----------------------------------------------------------------- layers
    def discover_layers(self, diffusion_model) -> tuple[AttentionLayer, ...]:
        raise NotImplementedError

    @staticmethod
    def joint_layers(entries) -> tuple[AttentionLayer, ...]:
        """DiT layers from ``(section, block, transformer_index, heads, dim_head)`` in forward order:
        joint (self-)attention, kind attn1, one resolution level."""
        return tuple(AttentionLayer("attn1", (section, block), sub, ordinal, 0, int(heads), int(dim_head))
                     for ordinal, (section, block, sub, heads, dim_head) in enumerate(entries))

    def block_spec_help(self) -> str:
        """How block specs name this family's blocks (for error messages and docs)."""
        return ""

    # ---------------------------------------------------------------- geometry
    def patch_size(self, diffusion_model) -> int:
        return int(getattr(diffusion_model, "patch_size", 1))

    def image_grid(self, diffusion_model, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """(height, width) in patches of a latent of size ``latent_hw`` after patchify (padded to a
        multiple of the patch size, as SD3's PatchEmbed does)."""
        p = self.patch_size(diffusion_model)
        return math.ceil(int(latent_hw[0]) / p), math.ceil(int(latent_hw[1]) / p)

    def layer_key(self, transformer_options: dict, length: int, geometry: CallGeometry) -> Optional[tuple]:
        """DiTs: the key of the layer an attention call belongs to (``AttentionLayer.key``), from
        the call's ``transformer_options`` and sequence length; None for a call of no layer."""
        return None

    def token_layout(self, transformer_options: dict, length: int, geometry: CallGeometry) -> TokenLayout:
        """DiTs: where the text and image tokens of one attention call lie."""
        return TokenLayout.image_only(geometry.grid)

    def block_patches(self, layers, transformer_options: dict) -> dict:
        """DiTs whose model does not name its blocks in ``transformer_options``: the
        ``patches_replace["dit"]`` entries that do it for ``layers`` (default: none)."""
        return {}

    # ------------------------------------------------------------------- text
    def text_width(self, model_config) -> int:
        """Width of the text context the diffusion model takes (0 when it has none)."""
        return 0

    def pooled_width(self, model_config) -> int:
        """Width of the pooled text vector it takes (0 when it takes none)."""
        return 0

    def empty_text_tokens(self) -> int:
        """Token count of the zero text context used when no prompt is given."""
        return 77

    def empty_conditioning(self, model_config):
        """A zero CONDITIONING of the model's widths (no prompt connected)."""
        extra = {}
        pooled = self.pooled_width(model_config)
        if pooled:
            extra["pooled_output"] = torch.zeros((1, pooled))
        return [[torch.zeros((1, self.empty_text_tokens(), self.text_width(model_config))), extra]]
