"""Original Grounding DINO checkpoints -> transformers' ``GroundingDinoForObjectDetection``.

The original release (IDEA-Research/GroundingDINO: ``groundingdino_swint_ogc.pth``,
``groundingdino_swinb_cogcoor.pth``) stores ``{"model": state_dict}`` with the Swin backbone under
``backbone.0.``, BERT under ``bert.``, and the deformable transformer under ``transformer.``. This module
maps every original key onto transformers' names (fused ``qkv`` / ``in_proj`` matrices are split into
query, key and value), and reads the model size from the tensors, not from the file name.

`original_key_targets` is the single mapping rule; `convert_grounding_dino_state_dict` applies it,
`grounding_dino_hf_to_original` applies it backwards (used to write tiny files in the original layout).
"""

from __future__ import annotations

import math
import re

import torch

# Buffers and heads the original checkpoint carries that inference with transformers does not use:
# Swin's relative_position_index (recomputed), BERT's position_ids/token_type_ids buffers and its pooler
# (Grounding DINO reads the last hidden state, never the pooled output).
DROPPED_ORIGINAL_KEYS = (
    re.compile(r"backbone\.0\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index"),
    re.compile(r"bert\.embeddings\.(position_ids|token_type_ids)"),
    re.compile(r"bert\.pooler\..*"),
)

# Grounding DINO's attention head and sampling-point counts cannot be read from tensor shapes (the heads
# share one projection matrix). Both released checkpoints use 8 heads and 4 points per level.
GROUNDING_DINO_HEADS = 8
MAX_TEXT_LEN = 256

SWIN = "model.backbone.conv_encoder.model"

_SWIN_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_DEFORMABLE = {
    "self_attn.sampling_offsets": "deformable_layer.self_attn.sampling_offsets",
    "self_attn.attention_weights": "deformable_layer.self_attn.attention_weights",
    "self_attn.value_proj": "deformable_layer.self_attn.value_proj",
    "self_attn.output_proj": "deformable_layer.self_attn.output_proj",
    "norm1": "deformable_layer.self_attn_layer_norm",
    "linear1": "deformable_layer.fc1",
    "linear2": "deformable_layer.fc2",
    "norm2": "deformable_layer.final_layer_norm",
}
_TEXT_ENHANCER = {
    "self_attn.out_proj": "text_enhancer_layer.self_attn.out_proj",
    "linear1": "text_enhancer_layer.fc1",
    "linear2": "text_enhancer_layer.fc2",
    "norm1": "text_enhancer_layer.layer_norm_before",
    "norm2": "text_enhancer_layer.layer_norm_after",
}
_FUSION = {
    "gamma_v": "fusion_layer.vision_param",
    "gamma_l": "fusion_layer.text_param",
    "layer_norm_v": "fusion_layer.layer_norm_vision",
    "layer_norm_l": "fusion_layer.layer_norm_text",
    "attn.v_proj": "fusion_layer.attn.vision_proj",
    "attn.l_proj": "fusion_layer.attn.text_proj",
    "attn.values_v_proj": "fusion_layer.attn.values_vision_proj",
    "attn.values_l_proj": "fusion_layer.attn.values_text_proj",
    "attn.out_v_proj": "fusion_layer.attn.out_vision_proj",
    "attn.out_l_proj": "fusion_layer.attn.out_text_proj",
}
_DECODER = {
    "cross_attn.sampling_offsets": "encoder_attn.sampling_offsets",
    "cross_attn.attention_weights": "encoder_attn.attention_weights",
    "cross_attn.value_proj": "encoder_attn.value_proj",
    "cross_attn.output_proj": "encoder_attn.output_proj",
    "norm1": "encoder_attn_layer_norm",
    "ca_text.out_proj": "encoder_attn_text.out_proj",
    "catext_norm": "encoder_attn_text_layer_norm",
    "self_attn.out_proj": "self_attn.out_proj",
    "norm2": "self_attn_layer_norm",
    "linear1": "fc1",
    "linear2": "fc2",
    "norm3": "final_layer_norm",
}
_TOP_LEVEL = {
    "transformer.level_embed": "model.level_embed",
    "transformer.tgt_embed.weight": "model.query_position_embeddings.weight",
    "feat_map.weight": "model.text_projection.weight",
    "feat_map.bias": "model.text_projection.bias",
    "backbone.0.patch_embed.proj.weight": f"{SWIN}.swin.embeddings.patch_embeddings.projection.weight",
    "backbone.0.patch_embed.proj.bias": f"{SWIN}.swin.embeddings.patch_embeddings.projection.bias",
    "backbone.0.patch_embed.norm.weight": f"{SWIN}.swin.embeddings.norm.weight",
    "backbone.0.patch_embed.norm.bias": f"{SWIN}.swin.embeddings.norm.bias",
}
_PREFIXES = (
    ("bert.", "model.text_backbone."),
    ("input_proj.", "model.input_proj_vision."),
    ("transformer.enc_output_norm.", "model.enc_output_norm."),
    ("transformer.enc_output.", "model.enc_output."),
    ("transformer.enc_out_bbox_embed.", "model.encoder_output_bbox_embed."),
    ("transformer.decoder.norm.", "model.decoder.layer_norm."),
    ("transformer.decoder.ref_point_head.", "model.decoder.reference_points_head."),
    ("transformer.decoder.bbox_embed.", "model.decoder.bbox_embed."),
    ("bbox_embed.", "bbox_embed."),
)


def _split_param(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def original_key_targets(key: str) -> list[str] | None:
    """The transformers key(s) one original key becomes, or None if the key is not recognised.

    A fused query/key/value tensor maps to three keys (query, key, value order, equal thirds along
    dim 0, as ``nn.MultiheadAttention`` and timm-style Swin store them).
    """
    if key in _TOP_LEVEL:
        return [_TOP_LEVEL[key]]

    match = re.fullmatch(r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
    if match:
        stage, block, rest = match.groups()
        prefix = f"{SWIN}.swin.encoder.layers.{stage}.blocks.{block}."
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            param = rest.rsplit(".", 1)[1]
            return [f"{prefix}attention.{p}_proj.{param}" for p in ("q", "k", "v")]
        if rest == "attn.relative_position_bias_table":
            return [prefix + _SWIN_BLOCK[rest]]
        module, param = _split_param(rest)
        if module in _SWIN_BLOCK:
            return [f"{prefix}{_SWIN_BLOCK[module]}.{param}"]
        return None
    match = re.fullmatch(r"backbone\.0\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", key)
    if match:
        return [f"{SWIN}.swin.encoder.layers.{match.group(1)}.downsample.{match.group(2)}"]
    match = re.fullmatch(r"backbone\.0\.norm(\d+)\.(weight|bias)", key)
    if match:
        # The original names its output norms by stage index from 0, transformers by stage from 1.
        return [f"{SWIN}.hidden_states_norms.stage{int(match.group(1)) + 1}.{match.group(2)}"]

    match = re.fullmatch(r"transformer\.encoder\.(layers|text_layers|fusion_layers)\.(\d+)\.(.+)", key)
    if match:
        kind, layer, rest = match.groups()
        prefix = f"model.encoder.layers.{layer}."
        if kind == "text_layers" and rest in ("self_attn.in_proj_weight", "self_attn.in_proj_bias"):
            param = "weight" if rest.endswith("weight") else "bias"
            return [f"{prefix}text_enhancer_layer.self_attn.{p}.{param}" for p in ("query", "key", "value")]
        table = {"layers": _DEFORMABLE, "text_layers": _TEXT_ENHANCER, "fusion_layers": _FUSION}[kind]
        if rest in table:  # fusion gammas are bare parameters
            return [prefix + table[rest]]
        module, param = _split_param(rest)
        if module in table:
            return [f"{prefix}{table[module]}.{param}"]
        return None

    match = re.fullmatch(r"transformer\.decoder\.layers\.(\d+)\.(.+)", key)
    if match:
        layer, rest = match.groups()
        prefix = f"model.decoder.layers.{layer}."
        fused = re.fullmatch(r"(self_attn|ca_text)\.in_proj_(weight|bias)", rest)
        if fused:
            module = "self_attn" if fused.group(1) == "self_attn" else "encoder_attn_text"
            return [f"{prefix}{module}.{p}.{fused.group(2)}" for p in ("query", "key", "value")]
        module, param = _split_param(rest)
        if module in _DECODER:
            return [f"{prefix}{_DECODER[module]}.{param}"]
        return None

    for original, converted in _PREFIXES:
        if key.startswith(original):
            return [converted + key[len(original):]]
    return None


def is_dropped_original_key(key: str) -> bool:
    return any(pattern.fullmatch(key) for pattern in DROPPED_ORIGINAL_KEYS)


def is_original_grounding_dino(state_dict: dict) -> bool:
    return "transformer.level_embed" in state_dict and any(k.startswith("backbone.0.") for k in state_dict)


def convert_grounding_dino_state_dict(original: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an original Grounding DINO state dict onto transformers' names.

    Returns ``(converted, unrecognised)``: ``unrecognised`` lists original keys no rule maps (the
    known-unused buffers of `DROPPED_ORIGINAL_KEYS` are dropped silently).
    """
    converted: dict[str, torch.Tensor] = {}
    unrecognised = []
    for key, tensor in original.items():
        if is_dropped_original_key(key):
            continue
        targets = original_key_targets(key)
        if targets is None:
            unrecognised.append(key)
            continue
        if len(targets) == 1:
            converted[targets[0]] = tensor
        else:
            for target, part in zip(targets, tensor.chunk(len(targets), dim=0)):
                converted[target] = part.clone()
    return converted, unrecognised


def grounding_dino_hf_to_original(hf: dict[str, torch.Tensor], original_keys: list[str]) -> dict[str, torch.Tensor]:
    """The inverse of `convert_grounding_dino_state_dict` for the listed original keys (tiny test files).

    Dropped keys (buffers, BERT pooler) have no transformers counterpart: the caller supplies them.
    """
    out = {}
    for key in original_keys:
        if is_dropped_original_key(key):
            continue
        targets = original_key_targets(key)
        if targets is None:
            raise KeyError(f"no transformers key for original key {key!r}")
        out[key] = torch.cat([hf[t] for t in targets], dim=0) if len(targets) > 1 else hf[targets[0]].clone()
    return out


def _count(state_dict: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for key in state_dict if (m := regex.match(key))}
    return max(found) + 1 if found else 0


def infer_grounding_dino_config(original: dict[str, torch.Tensor], text_config):
    """Build a ``GroundingDinoConfig`` from tensor shapes of an original checkpoint.

    Read from shapes: Swin embed dim, patch size, depths, per-stage heads (bias-table columns), window
    (bias-table rows = (2w-1)^2), MLP ratio, output stages (which ``norm{i}`` exist); d_model, feature
    levels, queries, encoder/decoder depth and FFN sizes, sampling points. ``text_config`` is BERT's
    config (see `localization.loading.bert_config_for`).
    """
    from transformers import GroundingDinoConfig, SwinConfig

    sd = original
    proj = sd["backbone.0.patch_embed.proj.weight"]
    embed_dim, patch_size = proj.shape[0], proj.shape[-1]
    stages = _count(sd, r"backbone\.0\.layers\.(\d+)\.")
    depths = [_count(sd, rf"backbone\.0\.layers\.{i}\.blocks\.(\d+)\.") for i in range(stages)]
    heads = [sd[f"backbone.0.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(stages)]
    table_rows = sd["backbone.0.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (math.isqrt(table_rows) + 1) // 2
    mlp_ratio = sd["backbone.0.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    out_indices = sorted(int(m.group(1)) + 1 for k in sd if (m := re.fullmatch(r"backbone\.0\.norm(\d+)\.weight", k)))
    backbone = SwinConfig(
        embed_dim=embed_dim,
        patch_size=patch_size,
        depths=depths,
        num_heads=heads,
        window_size=window,
        mlp_ratio=mlp_ratio,
        # Only used for absolute position embeddings, which Grounding DINO's Swin does not have.
        image_size=32 * window,
        out_features=[f"stage{i}" for i in out_indices],
        out_indices=out_indices,
    )

    levels, d_model = sd["transformer.level_embed"].shape
    encoder_layers = _count(sd, r"transformer\.encoder\.layers\.(\d+)\.")
    decoder_layers = _count(sd, r"transformer\.decoder\.layers\.(\d+)\.")
    enc_offsets = sd["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"].shape[0]
    dec_offsets = sd["transformer.decoder.layers.0.cross_attn.sampling_offsets.weight"].shape[0]
    return GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text_config,
        d_model=d_model,
        num_feature_levels=levels,
        num_queries=sd["transformer.tgt_embed.weight"].shape[0],
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_ffn_dim=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        decoder_ffn_dim=sd["transformer.decoder.layers.0.linear1.weight"].shape[0],
        encoder_attention_heads=GROUNDING_DINO_HEADS,
        decoder_attention_heads=GROUNDING_DINO_HEADS,
        encoder_n_points=enc_offsets // (GROUNDING_DINO_HEADS * levels * 2),
        decoder_n_points=dec_offsets // (GROUNDING_DINO_HEADS * levels * 2),
        max_text_len=MAX_TEXT_LEN,
    )


def original_grounding_dino_keys(config) -> list[str]:
    """Every key of an original Grounding DINO checkpoint with this config, enumerated from the original
    repository's module tree (``groundingdino/models/GroundingDINO``), buffers and BERT pooler included."""
    keys: list[str] = []

    def wb(prefix: str) -> None:
        keys.extend((f"{prefix}.weight", f"{prefix}.bias"))

    bb = config.backbone_config
    wb("backbone.0.patch_embed.proj")
    wb("backbone.0.patch_embed.norm")
    for stage, depth in enumerate(bb.depths):
        for block in range(depth):
            p = f"backbone.0.layers.{stage}.blocks.{block}"
            wb(f"{p}.norm1")
            keys += [f"{p}.attn.relative_position_bias_table", f"{p}.attn.relative_position_index"]
            wb(f"{p}.attn.qkv")
            wb(f"{p}.attn.proj")
            wb(f"{p}.norm2")
            wb(f"{p}.mlp.fc1")
            wb(f"{p}.mlp.fc2")
        if stage < len(bb.depths) - 1:
            keys.append(f"backbone.0.layers.{stage}.downsample.reduction.weight")
            wb(f"backbone.0.layers.{stage}.downsample.norm")
    for index in bb.out_indices:
        wb(f"backbone.0.norm{index - 1}")

    tc = config.text_config
    keys += [f"bert.embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    wb("bert.embeddings.LayerNorm")
    keys.append("bert.embeddings.position_ids")
    for layer in range(tc.num_hidden_layers):
        p = f"bert.encoder.layer.{layer}"
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):
            wb(f"{p}.{n}")
    wb("bert.pooler.dense")
    wb("feat_map")
    for level in range(config.num_feature_levels):
        wb(f"input_proj.{level}.0")
        wb(f"input_proj.{level}.1")

    keys += ["transformer.level_embed", "transformer.tgt_embed.weight"]
    wb("transformer.enc_output")
    wb("transformer.enc_output_norm")
    for i in range(3):
        wb(f"transformer.enc_out_bbox_embed.layers.{i}")
    for layer in range(config.encoder_layers):
        p = f"transformer.encoder.layers.{layer}"
        for n in ("self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
                  "self_attn.output_proj", "norm1", "linear1", "linear2", "norm2"):
            wb(f"{p}.{n}")
        p = f"transformer.encoder.text_layers.{layer}"
        keys += [f"{p}.self_attn.in_proj_weight", f"{p}.self_attn.in_proj_bias"]
        for n in ("self_attn.out_proj", "linear1", "linear2", "norm1", "norm2"):
            wb(f"{p}.{n}")
        p = f"transformer.encoder.fusion_layers.{layer}"
        keys += [f"{p}.gamma_v", f"{p}.gamma_l"]
        for n in ("layer_norm_v", "layer_norm_l", "attn.v_proj", "attn.l_proj", "attn.values_v_proj",
                  "attn.values_l_proj", "attn.out_v_proj", "attn.out_l_proj"):
            wb(f"{p}.{n}")
    for layer in range(config.decoder_layers):
        p = f"transformer.decoder.layers.{layer}"
        for n in ("cross_attn.sampling_offsets", "cross_attn.attention_weights", "cross_attn.value_proj",
                  "cross_attn.output_proj", "norm1"):
            wb(f"{p}.{n}")
        keys += [f"{p}.ca_text.in_proj_weight", f"{p}.ca_text.in_proj_bias"]
        wb(f"{p}.ca_text.out_proj")
        wb(f"{p}.catext_norm")
        keys += [f"{p}.self_attn.in_proj_weight", f"{p}.self_attn.in_proj_bias"]
        wb(f"{p}.self_attn.out_proj")
        for n in ("norm2", "linear1", "linear2", "norm3"):
            wb(f"{p}.{n}")
    wb("transformer.decoder.norm")
    for i in range(2):
        wb(f"transformer.decoder.ref_point_head.layers.{i}")
    for layer in range(config.decoder_layers):
        for i in range(3):
            wb(f"transformer.decoder.bbox_embed.{layer}.layers.{i}")
            wb(f"bbox_embed.{layer}.layers.{i}")
    return keys
