"""Original Segment Anything checkpoints -> transformers' ``SamModel``.

The original release (facebookresearch/segment-anything: ``sam_vit_b_01ec64.pth``,
``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``) is a flat state dict with ``image_encoder.``,
``prompt_encoder.`` and ``mask_decoder.`` modules plus the ``pixel_mean``/``pixel_std`` buffers. The
model size (ViT-B/L/H or anything else) is read from the tensors: embed dim from the patch projection,
depth from the block count, heads from the relative-position table width (= head dim), global-attention
blocks from which tables span the whole token grid.
"""

from __future__ import annotations

import re

import torch

# The mask decoder's head count is not visible in any shape; every released SAM uses 8.
SAM_DECODER_HEADS = 8
# LayerNorm eps of segment-anything's modules: the two-way transformer of the mask decoder uses
# ``nn.LayerNorm`` (1e-5, ``modeling/transformer.py``); the image encoder ``nn.LayerNorm(eps=1e-6)``
# (``build_sam.py``), its neck, the prompt encoder's mask downscaling and the decoder's upscaling
# ``LayerNorm2d`` (1e-6, ``modeling/common.py``). transformers' SAM configs default every one to 1e-6, and
# the decoder's own final norm to 1e-5; its config ``layer_norm_eps`` sets the two-way blocks' norms.
SAM_DECODER_LAYER_NORM_EPS = 1e-5
SAM_ENCODER_LAYER_NORM_EPS = 1e-6
SAM_PROMPT_LAYER_NORM_EPS = 1e-6
# segment-anything's defaults, used when a checkpoint lacks its pixel_mean/pixel_std buffers.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

SHARED_POSITIONAL = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
SHARED_POSITIONAL_TARGETS = (
    "prompt_encoder.shared_embedding.positional_embedding",
    "shared_image_embedding.positional_embedding",
)
PIXEL_STAT_KEYS = ("pixel_mean", "pixel_std")

_RENAMES = (
    (r"image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"image_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"image_encoder\.blocks\.(\d+)\.", r"vision_encoder.layers.\1."),
    (r"image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"image_encoder\.pos_embed", "vision_encoder.pos_embed"),
    (r"prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.", r"prompt_encoder.\1."),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"mask_decoder\.transformer\.", "mask_decoder.transformer."),
    (r"mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    (r"mask_decoder\.(iou_token|mask_tokens)\.", r"mask_decoder.\1."),
)
# The original MLP heads are ``layers.0 .. layers.{n-1}``; transformers names the first ``proj_in``,
# the last ``proj_out`` and the ones between ``layers.{k-1}``.
_MLP_HEAD = re.compile(r"mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.(weight|bias)")


def original_key_target(key: str, head_depth: int = 3) -> str | None:
    """The transformers key one original SAM key becomes (None: not recognised). The shared positional
    matrix and the pixel statistics are handled by `convert_sam_state_dict` itself."""
    match = _MLP_HEAD.fullmatch(key)
    if match:
        head, index, param = match.group(1), int(match.group(2)), match.group(3)
        name = "proj_in" if index == 0 else "proj_out" if index == head_depth - 1 else f"layers.{index - 1}"
        return f"mask_decoder.{head}.{name}.{param}"
    for pattern, replacement in _RENAMES:
        match = re.match(pattern, key)
        if match:
            return match.expand(replacement) + key[match.end():]
    return None


def is_original_sam(state_dict: dict) -> bool:
    return "image_encoder.patch_embed.proj.weight" in state_dict and "mask_decoder.iou_token.weight" in state_dict


def _head_depth(original: dict) -> int:
    return 1 + max(int(m.group(2)) for k in original if (m := _MLP_HEAD.fullmatch(k)) and "iou" in m.group(1))


def convert_sam_state_dict(original: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an original SAM state dict onto transformers' names: ``(converted, unrecognised_keys)``.

    ``pixel_mean``/``pixel_std`` are not model weights in transformers (its image processor holds them);
    read them with `sam_pixel_statistics`.
    """
    depth = _head_depth(original)
    converted: dict[str, torch.Tensor] = {}
    unrecognised = []
    for key, tensor in original.items():
        if key in PIXEL_STAT_KEYS:
            continue
        if key == SHARED_POSITIONAL:
            for target in SHARED_POSITIONAL_TARGETS:
                converted[target] = tensor
            continue
        target = original_key_target(key, depth)
        if target is None:
            unrecognised.append(key)
        else:
            converted[target] = tensor
    return converted, unrecognised


def sam_pixel_statistics(original: dict[str, torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel on the 0-255 scale, from the checkpoint when it has them."""
    if all(k in original for k in PIXEL_STAT_KEYS):
        return tuple(original["pixel_mean"].flatten().tolist()), tuple(original["pixel_std"].flatten().tolist())
    return SAM_PIXEL_MEAN, SAM_PIXEL_STD


def infer_sam_config(original: dict[str, torch.Tensor]):
    """Build a ``SamConfig`` from the tensor shapes of an original SAM checkpoint."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    sd = original
    proj = sd["image_encoder.patch_embed.proj.weight"]
    hidden, patch = proj.shape[0], proj.shape[-1]
    grid = sd["image_encoder.pos_embed"].shape[1]
    blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)))
    head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    table_rows = [sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(blocks)]
    # A global block's table covers the whole grid (2*grid-1 offsets); a windowed one 2*window-1.
    global_blocks = [i for i, rows in enumerate(table_rows) if rows == 2 * grid - 1]
    windowed = [rows for rows in table_rows if rows != 2 * grid - 1]
    window = (windowed[0] + 1) // 2 if windowed else 0
    out_channels = sd["image_encoder.neck.0.weight"].shape[0]
    vision = SamVisionConfig(
        hidden_size=hidden,
        output_channels=out_channels,
        num_hidden_layers=blocks,
        num_attention_heads=hidden // head_dim,
        image_size=grid * patch,
        patch_size=patch,
        mlp_dim=sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0],
        window_size=window,
        global_attn_indexes=global_blocks,
        num_pos_feats=sd[SHARED_POSITIONAL].shape[1],
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=out_channels,
        image_size=grid * patch,
        patch_size=patch,
        mask_input_channels=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
    )
    decoder_hidden = sd["mask_decoder.iou_token.weight"].shape[1]
    cross_dim = sd["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0]
    decoder = SamMaskDecoderConfig(
        hidden_size=decoder_hidden,
        num_hidden_layers=1 + max(int(m.group(1)) for k in sd if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))),
        num_attention_heads=SAM_DECODER_HEADS,
        mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        attention_downsample_rate=decoder_hidden // cross_dim,
        num_multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=_head_depth(sd),
        iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
    )
    return with_original_eps(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))


def with_original_eps(config):
    """``config`` (a ``SamConfig``) with every LayerNorm eps segment-anything uses (see the constants above);
    a Hugging Face-format SAM's config.json carries transformers' 1e-6 for the mask decoder too."""
    config.vision_config.layer_norm_eps = SAM_ENCODER_LAYER_NORM_EPS
    config.prompt_encoder_config.layer_norm_eps = SAM_PROMPT_LAYER_NORM_EPS
    config.mask_decoder_config.layer_norm_eps = SAM_DECODER_LAYER_NORM_EPS
    return config


def sam_hf_to_original(hf: dict[str, torch.Tensor], original_keys: list[str],
                       pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD) -> dict[str, torch.Tensor]:
    """The inverse of `convert_sam_state_dict` for the listed original keys (tiny test files)."""
    depth = 1 + max(int(m.group(2)) for k in original_keys if (m := _MLP_HEAD.fullmatch(k)) and "iou" in m.group(1))
    out = {}
    for key in original_keys:
        if key == "pixel_mean":
            out[key] = torch.tensor(pixel_mean).view(-1, 1, 1)
        elif key == "pixel_std":
            out[key] = torch.tensor(pixel_std).view(-1, 1, 1)
        elif key == SHARED_POSITIONAL:
            out[key] = hf[SHARED_POSITIONAL_TARGETS[0]].clone()
        else:
            target = original_key_target(key, depth)
            if target is None:
                raise KeyError(f"no transformers key for original key {key!r}")
            out[key] = hf[target].clone()
    return out


def original_sam_keys(config) -> list[str]:
    """Every key of an original SAM checkpoint with this config, enumerated from segment-anything's
    module tree (``segment_anything/modeling``)."""
    keys: list[str] = ["pixel_mean", "pixel_std"]

    def wb(prefix: str) -> None:
        keys.extend((f"{prefix}.weight", f"{prefix}.bias"))

    vc, dc = config.vision_config, config.mask_decoder_config
    keys.append("image_encoder.pos_embed")
    wb("image_encoder.patch_embed.proj")
    for i in range(vc.num_hidden_layers):
        p = f"image_encoder.blocks.{i}"
        wb(f"{p}.norm1")
        wb(f"{p}.attn.qkv")
        wb(f"{p}.attn.proj")
        keys += [f"{p}.attn.rel_pos_h", f"{p}.attn.rel_pos_w"]
        wb(f"{p}.norm2")
        wb(f"{p}.mlp.lin1")
        wb(f"{p}.mlp.lin2")
    keys.append("image_encoder.neck.0.weight")
    wb("image_encoder.neck.1")
    keys.append("image_encoder.neck.2.weight")
    wb("image_encoder.neck.3")

    keys.append(SHARED_POSITIONAL)
    keys += [f"prompt_encoder.point_embeddings.{i}.weight" for i in range(4)]
    keys += ["prompt_encoder.not_a_point_embed.weight", "prompt_encoder.no_mask_embed.weight"]
    for i in (0, 1, 3, 4, 6):
        wb(f"prompt_encoder.mask_downscaling.{i}")

    for layer in range(dc.num_hidden_layers):
        p = f"mask_decoder.transformer.layers.{layer}"
        for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                wb(f"{p}.{attn}.{proj}")
        for n in ("norm1", "norm2", "norm3", "norm4", "mlp.lin1", "mlp.lin2"):
            wb(f"{p}.{n}")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        wb(f"mask_decoder.transformer.final_attn_token_to_image.{proj}")
    wb("mask_decoder.transformer.norm_final_attn")
    keys += ["mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"]
    for i in (0, 1, 3):
        wb(f"mask_decoder.output_upscaling.{i}")
    for m in range(dc.num_multimask_outputs + 1):
        for i in range(3):
            wb(f"mask_decoder.output_hypernetworks_mlps.{m}.layers.{i}")
    for i in range(dc.iou_head_depth):
        wb(f"mask_decoder.iou_prediction_head.layers.{i}")
    return keys
