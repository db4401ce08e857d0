"""Double-/single-stream transformers: Flux.1 (dev, schnell), Chroma, Flux 2 (ComfyUI's
``comfy/ldm/flux`` and ``comfy/ldm/chroma``).

Double blocks run one joint attention over ``[text, image]`` (separate projections, q/k
RMS-normed, RoPE applied, then ``optimized_attention(q, k, v, heads, skip_reshape=True)``
with q/k/v ``[B, heads, L, dim]``); single blocks run it over the concatenated stream.
ComfyUI names every call in ``transformer_options``: ``block_type`` ("double"/"single"),
``block_index``, ``total_blocks``, and in single blocks ``img_slice`` = [text tokens,
sequence length]. Kontext-style reference latents are appended after the image
(``reference_image_num_tokens``). Block specs: ``double:0-18``, ``single:10-37``.
"""

from __future__ import annotations

from typing import Optional

import comfy.ldm.chroma.model
import comfy.ldm.flux.model
import comfy.supported_models

from ..attention.layers import AttentionLayer
from .base import CallGeometry, ModelFamily
from .layout import TokenLayout

SECTIONS = ("double", "single")


class DoubleSingleStreamFamily(ModelFamily):
    uses_override = True

    def __init__(self, name: str, configs: tuple[type, ...], diffusion_models: tuple[type, ...], empty_tokens: int):
        self.name = name
        self.config_classes = configs
        self.config_names = tuple(c.__name__ for c in configs)
        self.diffusion_model_classes = diffusion_models
        self._empty_tokens = empty_tokens

    def discover_layers(self, diffusion_model) -> tuple[AttentionLayer, ...]:
        return self.joint_layers((section, index, 0, block.num_heads, block.hidden_size // block.num_heads)
                                 for section in SECTIONS
                                 for index, block in enumerate(getattr(diffusion_model, f"{section}_blocks")))

    def block_spec_help(self) -> str:
        return "double, single, double:N, double:N-M, single:N-M, #N-M (double blocks first)"

    def image_grid(self, diffusion_model, latent_hw: tuple[int, int]) -> tuple[int, int]:
        # Flux's own rounding (comfy/ldm/flux/model.py _forward): (h + p // 2) // p
        p = self.patch_size(diffusion_model)
        return (int(latent_hw[0]) + p // 2) // p, (int(latent_hw[1]) + p // 2) // p

    def layer_key(self, transformer_options: dict, length: int, geometry: CallGeometry) -> Optional[tuple]:
        block_type = transformer_options.get("block_type")
        index = transformer_options.get("block_index")
        if block_type not in SECTIONS or index is None:
            return None
        return (block_type, int(index), 0)

    def token_layout(self, transformer_options: dict, length: int, geometry: CallGeometry) -> TokenLayout:
        grid = geometry.grid
        references = tuple(int(n) for n in transformer_options.get("reference_image_num_tokens", ()) or ())
        rest = length - geometry.text_tokens - geometry.n_image
        if not references and geometry.text_tokens and rest > 0:
            # Reference-image tokens (Kontext) after the image, where ComfyUI does not name their
            # counts (older versions): whatever follows the call's text and image is one reference part.
            references = (rest,)
        layout = TokenLayout.text_first(length, grid, references)
        img_slice = transformer_options.get("img_slice")
        if transformer_options.get("block_type") == "single" and img_slice is not None \
                and (int(img_slice[0]) != layout.n_text or int(img_slice[1]) != length):
            raise ValueError(f"{self.name} token layout: expected img_slice [{layout.n_text}, {length}] "
                             f"({grid[0]}x{grid[1]} image tokens), got {list(img_slice)}")
        return layout

    def text_width(self, model_config) -> int:
        return int(model_config.unet_config.get("context_in_dim") or 0)

    def pooled_width(self, model_config) -> int:
        return int(model_config.unet_config.get("vec_in_dim") or 0)

    def empty_text_tokens(self) -> int:
        return self._empty_tokens


# Flux.1's T5 context is padded to 256 tokens (comfy/text_encoders/flux.py), Flux 2's to 512
# (model_base.Flux2); Chroma's is not padded (comfy/text_encoders/pixart_t5.py: min_length 1).
FLUX1 = DoubleSingleStreamFamily("Flux.1", (comfy.supported_models.Flux, comfy.supported_models.FluxSchnell),
                                 (comfy.ldm.flux.model.Flux,), empty_tokens=256)
FLUX2 = DoubleSingleStreamFamily("Flux 2", (comfy.supported_models.Flux2,), (comfy.ldm.flux.model.Flux,),
                                 empty_tokens=512)
CHROMA = DoubleSingleStreamFamily("Chroma", (comfy.supported_models.Chroma,), (comfy.ldm.chroma.model.Chroma,),
                                  empty_tokens=1)
