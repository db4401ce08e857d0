"""Attention-layer discovery from real model structures, and block/weight specs."""

import pytest

import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from qkv_control.attention.layers import resolve_weight_spec, select_layers
from qkv_control.patching.layers import discover_layers
from qkv_control.tiny.models import tiny_checkpoint


def _full_size_unet(name):
    """A full-size UNet of a real family on the meta device (structure only, no memory)."""
    configs = {
        "sd15": {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False, 'adm_in_channels': None,
                 'in_channels': 4, 'model_channels': 320, 'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
                 'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False, 'context_dim': 768, 'num_heads': 8,
                 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], 'use_temporal_attention': False, 'use_temporal_resblock': False},
        "sdxl": {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False,
                 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4, 'model_channels': 320,
                 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10], 'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10,
                 'use_linear_in_transformer': True, 'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
                 'use_temporal_attention': False, 'use_temporal_resblock': False},
    }
    return UNetModel(**configs[name], device="meta", operations=comfy.ops.disable_weight_init)


def _blocks(layers, kind="attn1"):
    return sorted({(layer.block, layer.transformer_index) for layer in layers if layer.kind == kind})


def test_sd15_full_size_structure():
    layers = discover_layers(_full_size_unet("sd15"))
    attn1 = [layer for layer in layers if layer.kind == "attn1"]
    assert len(attn1) == 16 and len([layer for layer in layers if layer.kind == "attn2"]) == 16
    blocks = [layer.block for layer in attn1]
    assert blocks == [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", i) for i in range(3, 12)]
    assert [layer.ordinal for layer in attn1] == list(range(16))
    # levels: 64x64 -> input 1,2 at 0; 4,5 at 1; 7,8 at 2; middle 3; output 3-5 at 2, 6-8 at 1, 9-11 at 0
    assert [layer.level for layer in attn1] == [0, 0, 1, 1, 2, 2, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]
    assert all(layer.heads == 8 for layer in attn1)


def test_sdxl_full_size_structure():
    layers = discover_layers(_full_size_unet("sdxl"))
    attn1 = [layer for layer in layers if layer.kind == "attn1"]
    assert len(attn1) == 2 * 2 + 2 * 10 + 10 + 3 * 2 + 3 * 10 == 70
    assert {layer.block for layer in attn1 if layer.section == "input"} == {("input", i) for i in (4, 5, 7, 8)}
    assert {layer.block for layer in attn1 if layer.section == "output"} == {("output", i) for i in range(0, 6)}
    assert max(layer.transformer_index for layer in attn1 if layer.block == ("middle", 0)) == 9
    assert {layer.level for layer in attn1} == {1, 2}
    assert {layer.heads for layer in attn1 if layer.level == 1} == {10} and {layer.heads for layer in attn1 if layer.level == 2} == {20}


@pytest.mark.parametrize("family,expected_attn1", [("sd15", 16), ("sdxl", 22)])
def test_tiny_models_keep_family_structure(family, expected_attn1):
    model, _, _ = tiny_checkpoint(family)
    layers = discover_layers(model)
    assert len([layer for layer in layers if layer.kind == "attn1"]) == expected_attn1
    full = discover_layers(_full_size_unet(family))
    # same blocks as the real family (SDXL's depths are cut from 10 to 2)
    assert {layer.block for layer in layers} == {layer.block for layer in full}


def test_block_specs_resolve_against_the_model():
    layers = discover_layers(_full_size_unet("sd15"))
    assert [layer.block for layer in select_layers("output", layers, "attn1")] == [("output", i) for i in range(3, 12)]
    assert [layer.ordinal for layer in select_layers("#4-8", layers, "attn2")] == [4, 5, 6, 7, 8]
    assert [layer.block for layer in select_layers("input:4-5, middle", layers, "attn1")] == [("input", 4), ("input", 5), ("middle", 0)]
    assert [layer.block for layer in select_layers("all, -input, -middle", layers, "attn1")] == [("output", i) for i in range(3, 12)]
    assert [layer.block for layer in select_layers("level:0", layers, "attn1")] == [("input", 1), ("input", 2), ("output", 9), ("output", 10), ("output", 11)]
    with pytest.raises(ValueError, match="selects no attn1 layer; this model has: input:1.0"):
        select_layers("input:0", layers, "attn1")
    with pytest.raises(ValueError, match="expected all, input"):
        select_layers("decoder", layers, "attn1")


def test_weight_spec():
    layers = discover_layers(_full_size_unet("sd15"))
    weights = resolve_weight_spec("all=1.0, #4-8=0.25", layers, "attn2")
    assert [weights[layer.key] for layer in layers if layer.kind == "attn2"] == [1.0] * 4 + [0.25] * 5 + [1.0] * 7
    with pytest.raises(ValueError, match="selector=weight"):
        resolve_weight_spec("#4-8", layers, "attn2")
    with pytest.raises(ValueError, match="expected a number"):
        resolve_weight_spec("#4=high", layers, "attn2")
