"""SD3 and SD3.5 (Large, Medium): ComfyUI's MMDiT (``comfy/ldm/modules/diffusionmodules/mmdit.py``).

Each joint block runs one joint attention over ``[text, image]`` (text = the CLIP/T5
context after ``context_embedder``, plus any register tokens; q/k RMS-normed in SD3.5, no
RoPE: positions are added to the image tokens before the first block), called as
``optimized_attention(q, k, v, heads=N)`` with q/k/v ``[B, L, heads*64]``. SD3.5 Medium's
MMDiT-X blocks (``x_block_self_attn_layers``) run a second, image-only self-attention
right after. Block specs name them ``joint:N`` (the joint attention, transformer index 0)
and ``joint:N.1`` (the image self-attention).

The model sets nothing in ``transformer_options`` per block, so the blocks a control
touches get a ``patches_replace["dit"]`` entry (``NamedBlock``) that names the block for
the calls inside it and calls the block as it was (another pack's block patch included).
"""

from __future__ import annotations

from typing import Optional

import comfy.supported_models
from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

from ..attention.layers import AttentionLayer
from .base import CallGeometry, ModelFamily
from .layout import TokenLayout

SECTION = "joint"
# transformer_options entry set by NamedBlock: the index of the joint block being run
BLOCK_INDEX_KEY = "qkv_control.mmdit_block"


class NamedBlock:
    """A ``patches_replace["dit"][("double_block", i)]`` entry that puts the block index in the
    block's ``transformer_options`` and runs the block as it was: ``foreign`` (another
    pack's block patch) or the original block."""

    def __init__(self, index: int, foreign=None):
        self.index = index
        self.foreign = foreign.foreign if isinstance(foreign, NamedBlock) else foreign

    def __call__(self, args: dict, extra: dict):
        options = dict(args.get("transformer_options") or {})
        options[BLOCK_INDEX_KEY] = self.index
        args = {**args, "transformer_options": options}
        if self.foreign is not None:
            return self.foreign(args, extra)
        return extra["original_block"](args)


class MMDiTFamily(ModelFamily):
    name = "SD3 / SD3.5 (MMDiT)"
    config_names = ("SD3",)
    uses_override = True
    diffusion_model_classes = (OpenAISignatureMMDITWrapper,)
    config_classes = (comfy.supported_models.SD3,)

    def discover_layers(self, diffusion_model) -> tuple[AttentionLayer, ...]:
        def entries():
            for index, block in enumerate(diffusion_model.joint_blocks):
                x_block = block.x_block
                yield SECTION, index, 0, x_block.attn.num_heads, x_block.attn.head_dim
                if x_block.x_block_self_attn:  # MMDiT-X: the image tokens' own self-attention
                    yield SECTION, index, 1, x_block.attn2.num_heads, x_block.attn2.head_dim

        return self.joint_layers(entries())

    def block_spec_help(self) -> str:
        return "joint, joint:N, joint:N-M, joint:N.0 (joint attention), joint:N.1 (MMDiT-X image self-attention), #N-M"

    def layer_key(self, transformer_options: dict, length: int, geometry: CallGeometry) -> Optional[tuple]:
        index = transformer_options.get(BLOCK_INDEX_KEY)
        if index is None:
            return None
        # In a block, the joint attention has text + image tokens, MMDiT-X's second attention
        # the image tokens only (a call without text tokens has the joint attention only).
        image_only = length == geometry.n_image and geometry.text_tokens > 0
        return (SECTION, int(index), 1 if image_only else 0)

    def token_layout(self, transformer_options: dict, length: int, geometry: CallGeometry) -> TokenLayout:
        if length == geometry.n_image:
            return TokenLayout.image_only(geometry.grid)
        return TokenLayout.text_first(length, geometry.grid)

    def block_patches(self, layers, transformer_options: dict) -> dict:
        dit = (transformer_options.get("patches_replace") or {}).get("dit", {})
        blocks = sorted({layer.block[1] for layer in layers if layer.section == SECTION})
        return {("double_block", i): NamedBlock(i, dit.get(("double_block", i))) for i in blocks}

    def text_width(self, model_config) -> int:
        embedder = model_config.unet_config.get("context_embedder_config") or {}
        return int(embedder.get("params", {}).get("in_features") or 0)

    def pooled_width(self, model_config) -> int:
        return int(model_config.unet_config.get("adm_in_channels") or 0)

    def empty_text_tokens(self) -> int:
        # CLIP-L/G (77) + T5 (min 77) as comfy/text_encoders/sd3_clip.py encodes an empty prompt
        return 154

