"""Original Grounding DINO / SAM checkpoint layouts -> transformers, key by key, and size inference.

Full-size models are built on the meta device (no memory, no time) so the real ViT/Swin shapes are
checked without weights; tiny models check values.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    SamConfig,
    SamModel,
    SamVisionConfig,
    SwinConfig,
)

from qkv_control.localization import grounding_dino_convert as gd
from qkv_control.localization import sam_convert
from qkv_control.tiny.localization_files import (
    grounding_dino_original_state_dict,
    sam_original_state_dict,
    tiny_grounding_dino,
    tiny_sam,
)

SWIN = "model.backbone.conv_encoder.model"
UNUSED_HF_KEYS = {f"{SWIN}.swin.layernorm.weight", f"{SWIN}.swin.layernorm.bias"}


# Keys as they appear in groundingdino_swint_ogc.pth, with the transformers keys they must become.
GROUNDING_DINO_KEY_EXPECTATIONS = {
    "backbone.0.patch_embed.proj.weight": [f"{SWIN}.swin.embeddings.patch_embeddings.projection.weight"],
    "backbone.0.layers.2.blocks.5.attn.qkv.weight": [
        f"{SWIN}.swin.encoder.layers.2.blocks.5.attention.q_proj.weight",
        f"{SWIN}.swin.encoder.layers.2.blocks.5.attention.k_proj.weight",
        f"{SWIN}.swin.encoder.layers.2.blocks.5.attention.v_proj.weight",
    ],
    "backbone.0.layers.0.blocks.1.attn.relative_position_bias_table": [
        f"{SWIN}.swin.encoder.layers.0.blocks.1.attention.relative_position_bias.relative_position_bias_table"],
    "backbone.0.layers.1.blocks.0.norm1.bias": [f"{SWIN}.swin.encoder.layers.1.blocks.0.layernorm_before.bias"],
    "backbone.0.layers.1.downsample.reduction.weight": [f"{SWIN}.swin.encoder.layers.1.downsample.reduction.weight"],
    "backbone.0.norm1.weight": [f"{SWIN}.hidden_states_norms.stage2.weight"],
    "backbone.0.norm3.bias": [f"{SWIN}.hidden_states_norms.stage4.bias"],
    "bert.encoder.layer.11.attention.self.query.weight": [
        "model.text_backbone.encoder.layer.11.attention.self.query.weight"],
    "feat_map.weight": ["model.text_projection.weight"],
    "input_proj.3.1.bias": ["model.input_proj_vision.3.1.bias"],
    "transformer.level_embed": ["model.level_embed"],
    "transformer.tgt_embed.weight": ["model.query_position_embeddings.weight"],
    "transformer.enc_output_norm.weight": ["model.enc_output_norm.weight"],
    "transformer.enc_out_bbox_embed.layers.2.bias": ["model.encoder_output_bbox_embed.layers.2.bias"],
    "transformer.encoder.layers.4.self_attn.sampling_offsets.weight": [
        "model.encoder.layers.4.deformable_layer.self_attn.sampling_offsets.weight"],
    "transformer.encoder.layers.0.norm2.weight": ["model.encoder.layers.0.deformable_layer.final_layer_norm.weight"],
    "transformer.encoder.text_layers.3.self_attn.in_proj_bias": [
        "model.encoder.layers.3.text_enhancer_layer.self_attn.query.bias",
        "model.encoder.layers.3.text_enhancer_layer.self_attn.key.bias",
        "model.encoder.layers.3.text_enhancer_layer.self_attn.value.bias",
    ],
    "transformer.encoder.fusion_layers.2.gamma_v": ["model.encoder.layers.2.fusion_layer.vision_param"],
    "transformer.encoder.fusion_layers.2.attn.values_l_proj.weight": [
        "model.encoder.layers.2.fusion_layer.attn.values_text_proj.weight"],
    "transformer.decoder.layers.5.ca_text.in_proj_weight": [
        "model.decoder.layers.5.encoder_attn_text.query.weight",
        "model.decoder.layers.5.encoder_attn_text.key.weight",
        "model.decoder.layers.5.encoder_attn_text.value.weight",
    ],
    "transformer.decoder.layers.0.norm2.weight": ["model.decoder.layers.0.self_attn_layer_norm.weight"],
    "transformer.decoder.layers.0.catext_norm.bias": ["model.decoder.layers.0.encoder_attn_text_layer_norm.bias"],
    "transformer.decoder.norm.weight": ["model.decoder.layer_norm.weight"],
    "transformer.decoder.ref_point_head.layers.1.bias": ["model.decoder.reference_points_head.layers.1.bias"],
    "transformer.decoder.bbox_embed.3.layers.2.weight": ["model.decoder.bbox_embed.3.layers.2.weight"],
    "bbox_embed.3.layers.2.weight": ["bbox_embed.3.layers.2.weight"],
}

SAM_KEY_EXPECTATIONS = {
    "image_encoder.patch_embed.proj.weight": "vision_encoder.patch_embed.projection.weight",
    "image_encoder.pos_embed": "vision_encoder.pos_embed",
    "image_encoder.blocks.7.norm1.weight": "vision_encoder.layers.7.layer_norm1.weight",
    "image_encoder.blocks.7.attn.rel_pos_h": "vision_encoder.layers.7.attn.rel_pos_h",
    "image_encoder.blocks.7.mlp.lin2.bias": "vision_encoder.layers.7.mlp.lin2.bias",
    "image_encoder.neck.0.weight": "vision_encoder.neck.conv1.weight",
    "image_encoder.neck.3.bias": "vision_encoder.neck.layer_norm2.bias",
    "prompt_encoder.point_embeddings.2.weight": "prompt_encoder.point_embed.2.weight",
    "prompt_encoder.mask_downscaling.4.weight": "prompt_encoder.mask_embed.layer_norm2.weight",
    "prompt_encoder.mask_downscaling.6.bias": "prompt_encoder.mask_embed.conv3.bias",
    "prompt_encoder.no_mask_embed.weight": "prompt_encoder.no_mask_embed.weight",
    "mask_decoder.transformer.layers.1.norm4.weight": "mask_decoder.transformer.layers.1.layer_norm4.weight",
    "mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj.bias":
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj.bias",
    "mask_decoder.transformer.norm_final_attn.weight": "mask_decoder.transformer.layer_norm_final_attn.weight",
    "mask_decoder.output_upscaling.1.weight": "mask_decoder.upscale_layer_norm.weight",
    "mask_decoder.output_upscaling.3.bias": "mask_decoder.upscale_conv2.bias",
    "mask_decoder.output_hypernetworks_mlps.3.layers.0.weight": "mask_decoder.output_hypernetworks_mlps.3.proj_in.weight",
    "mask_decoder.output_hypernetworks_mlps.3.layers.1.weight": "mask_decoder.output_hypernetworks_mlps.3.layers.0.weight",
    "mask_decoder.output_hypernetworks_mlps.3.layers.2.bias": "mask_decoder.output_hypernetworks_mlps.3.proj_out.bias",
    "mask_decoder.iou_prediction_head.layers.1.bias": "mask_decoder.iou_prediction_head.layers.0.bias",
    "mask_decoder.iou_prediction_head.layers.2.weight": "mask_decoder.iou_prediction_head.proj_out.weight",
}


@pytest.mark.parametrize("original,expected", list(GROUNDING_DINO_KEY_EXPECTATIONS.items()))
def test_grounding_dino_original_key_maps_to_transformers_key(original, expected):
    assert gd.original_key_targets(original) == expected


@pytest.mark.parametrize("key", [
    "backbone.0.layers.0.blocks.0.attn.relative_position_index",
    "bert.embeddings.position_ids",
    "bert.pooler.dense.weight",
])
def test_grounding_dino_unused_buffers_are_dropped(key):
    assert gd.is_dropped_original_key(key)
    converted, unrecognised = gd.convert_grounding_dino_state_dict({key: torch.zeros(1)})
    assert converted == {} and unrecognised == []


def test_fused_qkv_is_split_in_query_key_value_order():
    fused = torch.arange(12.0).view(6, 2)  # 3 x (2 rows) for a width-2 layer
    converted, _ = gd.convert_grounding_dino_state_dict({"transformer.decoder.layers.0.self_attn.in_proj_weight": fused})
    for index, name in enumerate(("query", "key", "value")):
        assert torch.equal(converted[f"model.decoder.layers.0.self_attn.{name}.weight"], fused[2 * index: 2 * index + 2])


def test_unknown_original_key_is_reported_not_dropped():
    _, unrecognised = gd.convert_grounding_dino_state_dict({"transformer.something_new.weight": torch.zeros(1)})
    assert unrecognised == ["transformer.something_new.weight"]


@pytest.mark.parametrize("name,swin,expected", [
    ("swint_ogc", dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7), 4),
    ("swinb_cogcoor", dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12), 4),
])
def test_full_size_grounding_dino_converts_with_no_missing_or_unexpected_keys(name, swin, expected):
    config = GroundingDinoConfig(backbone_config=SwinConfig(out_indices=[2, 3, 4], out_features=["stage2", "stage3", "stage4"], **swin),
                                 text_config=BertConfig())
    with torch.device("meta"):
        model = GroundingDinoForObjectDetection(config)
    hf = model.state_dict()
    original = gd.grounding_dino_hf_to_original(hf, gd.original_grounding_dino_keys(config))
    converted, unrecognised = gd.convert_grounding_dino_state_dict(original)
    assert unrecognised == []
    assert set(hf) - set(converted) == UNUSED_HF_KEYS  # Swin's final norm: unused by Grounding DINO
    assert set(converted) - set(hf) == set()
    assert all(converted[k].shape == hf[k].shape for k in converted)

    inferred = gd.infer_grounding_dino_config(original, BertConfig())
    backbone = inferred.backbone_config
    assert (backbone.embed_dim, list(backbone.depths), list(backbone.num_heads), backbone.window_size) == (
        swin["embed_dim"], swin["depths"], swin["num_heads"], swin["window_size"])
    assert list(backbone.out_indices) == [2, 3, 4]
    assert (inferred.d_model, inferred.num_queries, inferred.encoder_layers, inferred.decoder_layers) == (256, 900, 6, 6)
    assert (inferred.encoder_n_points, inferred.decoder_n_points, inferred.num_feature_levels) == (expected, expected, 4)
    assert (inferred.encoder_ffn_dim, inferred.decoder_ffn_dim) == (2048, 2048)


def test_tiny_grounding_dino_round_trips_value_by_value():
    model = tiny_grounding_dino()
    original = grounding_dino_original_state_dict(model)
    assert set(original) == set(gd.original_grounding_dino_keys(model.config))
    converted, unrecognised = gd.convert_grounding_dino_state_dict(original)
    assert unrecognised == []
    hf = model.state_dict()
    assert set(converted) == set(hf) - UNUSED_HF_KEYS
    for key, tensor in converted.items():
        assert torch.equal(tensor, hf[key]), key


@pytest.mark.parametrize("original,expected", list(SAM_KEY_EXPECTATIONS.items()))
def test_sam_original_key_maps_to_transformers_key(original, expected):
    assert sam_convert.original_key_target(original) == expected


@pytest.mark.parametrize("size,hidden,depth,heads,global_blocks", [
    ("vit_b", 768, 12, 12, [2, 5, 8, 11]),
    ("vit_l", 1024, 24, 16, [5, 11, 17, 23]),
    ("vit_h", 1280, 32, 16, [7, 15, 23, 31]),
])
def test_full_size_sam_converts_and_its_size_is_read_from_tensors(size, hidden, depth, heads, global_blocks):
    config = SamConfig(vision_config=SamVisionConfig(hidden_size=hidden, num_hidden_layers=depth,
                                                     num_attention_heads=heads, global_attn_indexes=global_blocks))
    with torch.device("meta"):
        model = SamModel(config)
    hf = model.state_dict()
    original = sam_convert.sam_hf_to_original(hf, sam_convert.original_sam_keys(config))
    converted, unrecognised = sam_convert.convert_sam_state_dict(original)
    assert unrecognised == []
    assert set(converted) == set(hf)
    assert all(converted[k].shape == hf[k].shape for k in converted)
    vision = sam_convert.infer_sam_config(original).vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (hidden, depth, heads)
    assert list(vision.global_attn_indexes) == global_blocks
    assert (vision.window_size, vision.image_size, vision.patch_size, vision.mlp_dim) == (14, 1024, 16, 4 * hidden)


def test_tiny_sam_round_trips_value_by_value():
    model = tiny_sam()
    original = sam_original_state_dict(model)
    converted, unrecognised = sam_convert.convert_sam_state_dict(original)
    assert unrecognised == []
    hf = model.state_dict()
    assert set(converted) == set(hf)
    for key, tensor in converted.items():
        assert torch.equal(tensor, hf[key]), key
    # The one shared matrix feeds both positional embeddings.
    assert torch.equal(converted["shared_image_embedding.positional_embedding"],
                       original["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    mean, std = sam_convert.sam_pixel_statistics(original)
    assert mean == pytest.approx(sam_convert.SAM_PIXEL_MEAN) and std == pytest.approx(sam_convert.SAM_PIXEL_STD)
