"""Model families: recognition from the ComfyUI model, layer discovery and block specs on real
(full-size, meta-device) and tiny structures, token layouts, and what model_info and the
node-side checks answer for diffusion transformers."""

from __future__ import annotations

import pytest
import torch

import comfy.ldm.flux.model
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

from qkv_control.attention.layers import select_layers
from qkv_control.families.layout import TokenLayout
from qkv_control.families.registry import FAMILIES, family_of
from qkv_control.inversion.checks import check_inversion, check_latent
from qkv_control.patching import model_info
from qkv_control.patching.layers import discover_layers
from qkv_control.tiny.dit import tiny_dit
from qkv_control.tiny.models import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny():
    """One tiny model of every family the adapters cover."""
    models = {name: tiny_dit(name) for name in ("flux", "flux_schnell", "sd35", "chroma", "flux2")}
    models["sd15"] = tiny_checkpoint("sd15")[0]
    models["sdxl"] = tiny_checkpoint("sdxl")[0]
    return models


def _blocks(layers):
    return [(layer.block, layer.transformer_index) for layer in layers]


# ------------------------------------------------------------------ recognition

@pytest.mark.parametrize("name,family", [("sd15", "SD1.5 / SD2.x / SDXL (UNet)"), ("sdxl", "SD1.5 / SD2.x / SDXL (UNet)"),
                                         ("flux", "Flux.1"), ("flux_schnell", "Flux.1"),
                                         ("sd35", "SD3 / SD3.5 (MMDiT)"), ("chroma", "Chroma"), ("flux2", "Flux 2")])
def test_family_is_recognised_from_the_model(tiny, name, family):
    assert family_of(tiny[name]).name == family
    assert model_info.family_name(tiny[name]) == family


def test_family_is_read_from_classes_not_names(tiny):
    """Flux 2 runs ComfyUI's Flux.1 transformer class: its model config tells them apart. A
    model whose diffusion model no adapter knows is an error naming every supported family,
    whatever its config is called."""
    assert type(tiny["flux2"].model.diffusion_model) is type(tiny["flux"].model.diffusion_model)
    assert family_of(tiny["flux2"]) is not family_of(tiny["flux"])

    class Renamed(torch.nn.Module):  # a transformer no adapter was verified on
        pass

    Renamed.__name__ = "Flux"
    with pytest.raises(ValueError) as error:
        family_of(Renamed(), node="QKV DDIM Inversion")
    message = str(error.value)
    assert message.startswith("QKV DDIM Inversion: expected a model of a supported family")
    for family in FAMILIES:
        assert family.name in message
    assert "got Flux" in message


def test_unsupported_real_model_fails_at_sampling_start():
    """The run context asks for the family: an unsupported ComfyUI model gets the error, not a no-op."""
    from qkv_control.patching.run_context import RunContext

    config = comfy.supported_models.AuraFlow({"n_layers": 2, "n_double_layers": 1, "dim": 64, "n_heads": 2,
                                              "global_conddim": 64, "cond_seq_dim": 64, "max_seq": 64,
                                              "dtype": torch.float32})
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_patcher.ModelPatcher(config.get_model({}), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"expected a model of a supported family .*Flux\.1.* got AuraFlow"):
        RunContext(model, (), None)


# -------------------------------------------------------------------- layers

def test_flux1_full_size_blocks():
    """Flux.1 dev's real structure (meta device): 19 double + 38 single blocks, 24 heads of 128."""
    params = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                  mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000,
                  patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
    flux = comfy.ldm.flux.model.Flux(device="meta", operations=comfy.ops.disable_weight_init, **params)
    layers = discover_layers(flux)
    assert _blocks(layers) == [(("double", i), 0) for i in range(19)] + [(("single", i), 0) for i in range(38)]
    assert {(layer.kind, layer.heads, layer.dim_head, layer.level) for layer in layers} == {("attn1", 24, 128, 0)}
    assert [layer.ordinal for layer in layers] == list(range(57))
    assert _blocks(select_layers("double:0-18", layers, "attn1")) == _blocks(layers[:19])
    assert _blocks(select_layers("single:10-37", layers, "attn1")) == _blocks(layers[29:])
    assert _blocks(select_layers("all, -single:1-37", layers, "attn1")) == _blocks(layers[:20])


def test_sd35_medium_full_size_blocks():
    """SD3.5 Medium's structure: 24 joint blocks of 24 heads x 64, MMDiT-X self-attention in 0-12."""
    mmdit = OpenAISignatureMMDITWrapper(device="meta", operations=comfy.ops.disable_weight_init, patch_size=2,
                                        in_channels=16, out_channels=16, depth=24, adm_in_channels=2048,
                                        context_embedder_config={"target": "torch.nn.Linear",
                                                                 "params": {"in_features": 4096, "out_features": 1536}},
                                        num_patches=384 * 384, pos_embed_max_size=384, qk_norm="rms",
                                        x_block_self_attn_layers=list(range(13)))
    layers = discover_layers(mmdit)
    expected = []
    for i in range(24):
        expected.append((("joint", i), 0))
        if i <= 12:
            expected.append((("joint", i), 1))
    assert _blocks(layers) == expected
    assert {(layer.heads, layer.dim_head) for layer in layers} == {(24, 64)}
    assert _blocks(select_layers("joint:3", layers, "attn1")) == [(("joint", 3), 0), (("joint", 3), 1)]
    assert _blocks(select_layers("joint:0-23.0", layers, "attn1")) == [(("joint", i), 0) for i in range(24)]


def test_tiny_layers_match_the_modules(tiny):
    flux = tiny["flux"].model.diffusion_model
    layers = discover_layers(tiny["flux"])
    assert len(layers) == len(flux.double_blocks) + len(flux.single_blocks) == 5
    assert all(layer.heads * layer.dim_head == flux.hidden_size for layer in layers)
    assert _blocks(discover_layers(tiny["sd35"])) == [(("joint", 0), 0), (("joint", 0), 1), (("joint", 1), 0),
                                                        (("joint", 2), 0)]
    assert _blocks(discover_layers(tiny["chroma"])) == _blocks(discover_layers(tiny["flux2"])) == _blocks(layers)


def test_block_specs_of_another_family_are_errors_naming_what_exists(tiny):
    with pytest.raises(ValueError, match=r"block spec 'output' selects no attn1 layer; this model has: double:0.0, "):
        select_layers("output", discover_layers(tiny["flux"]), "attn1")
    with pytest.raises(ValueError, match=r"selects no attn1 layer; this model has: input:1.0"):
        select_layers("double", discover_layers(tiny["sd15"]), "attn1")
    with pytest.raises(ValueError, match="selects no attn2 layer; this model has no attn2 layers"):  # joint only
        select_layers("all", discover_layers(tiny["sd35"]), "attn2")


# -------------------------------------------------------------- token layouts

def test_token_layout_parts():
    layout = TokenLayout.text_first(20 + 12 + 6, (3, 4), (6,))
    assert (layout.text, layout.image, layout.extra) == (slice(0, 20), slice(20, 32), (slice(32, 38),))
    x = torch.arange(38.0).reshape(1, 38, 1)
    assert layout.image_tokens(x).flatten().tolist() == list(range(20, 32))
    edited = layout.with_image(x, torch.zeros(1, 12, 1))
    assert torch.equal(edited[:, :20], x[:, :20]) and torch.equal(edited[:, 32:], x[:, 32:])
    assert edited[:, 20:32].abs().sum() == 0 and x[:, 20:32].abs().sum() > 0
    assert TokenLayout.image_only((2, 5)).image_only_call
    with pytest.raises(ValueError, match="expected at least 18 tokens"):
        TokenLayout.text_first(17, (3, 4), (6,))
    with pytest.raises(ValueError, match="expected 3x4 = 12 image tokens, got 11"):
        TokenLayout(30, slice(0, 19), slice(19, 30), (3, 4))


def test_flux_layouts_from_transformer_options(tiny):
    from qkv_control.families.base import CallGeometry

    family = family_of(tiny["flux"])
    geometry = CallGeometry((8, 8), 256)
    assert family.image_grid(tiny["flux"].model.diffusion_model, (16, 15)) == (8, 8)  # Flux rounds (h + 1) // 2
    double = {"block_type": "double", "block_index": 1}
    assert family.layer_key(double, 320, geometry) == ("double", 1, 0)
    assert family.token_layout(double, 320, geometry).text == slice(0, 256)
    kontext = {"block_type": "single", "block_index": 0, "img_slice": [256, 384], "reference_image_num_tokens": [64]}
    layout = family.token_layout(kontext, 384, geometry)
    assert (layout.image, layout.extra) == (slice(256, 320), (slice(320, 384),))
    with pytest.raises(ValueError, match=r"expected img_slice \[256, 384\]"):
        family.token_layout({**kontext, "img_slice": [200, 384]}, 384, geometry)
    assert family.layer_key({}, 320, geometry) is None  # a call outside the blocks


# --------------------------------------------------------- model info, checks

@pytest.mark.parametrize("name,channels,width,pooled", [("sd15", 4, 64, 0), ("sdxl", 4, 64, 64), ("flux", 16, 64, 64),
                                                        ("flux_schnell", 16, 64, 64), ("sd35", 16, 4096, 128),
                                                        ("chroma", 16, 64, 0), ("flux2", 128, 64, 0)])
def test_model_info(tiny, name, channels, width, pooled):
    model = tiny[name]
    assert model_info.latent_channels(model) == channels
    assert model_info.context_dim(model) == width
    assert model_info.pooled_dim(model) == pooled


def test_model_info_on_full_size_configs():
    """The widths come from the configs ComfyUI detects for the real files."""
    flux = comfy.supported_models.Flux({"image_model": "flux", "guidance_embed": True, "context_in_dim": 4096,
                                        "vec_in_dim": 768})
    sd3 = comfy.supported_models.SD3({"in_channels": 16, "adm_in_channels": 2048, "context_embedder_config": {
        "target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}}})
    flux_family, sd3_family = FAMILIES[1], FAMILIES[2]
    assert (flux_family.text_width(flux), flux_family.pooled_width(flux)) == (4096, 768)
    assert (sd3_family.text_width(sd3), sd3_family.pooled_width(sd3)) == (4096, 2048)
    assert flux.latent_format.latent_channels == sd3.latent_format.latent_channels == 16


def test_node_checks_name_dit_families(tiny):
    from qkv_control.inversion.result import InversionResult

    with pytest.raises(ValueError, match="N: expected a 16-channel latent for this Flux model .* got 4 channels"):
        check_latent("N", tiny["flux"], {"samples": torch.zeros(1, 4, 8, 8)})
    check_latent("N", tiny["sd35"], {"samples": torch.zeros(1, 16, 8, 8)})
    made_on_sd35 = InversionResult(chain=None, context=torch.zeros(1, 77, 4096), latent_channels=16, context_dim=4096,
                                   model_family="SD3", prediction="flow")
    with pytest.raises(ValueError, match="N: expected a SD3 model .* got Flux"):
        check_inversion("N", made_on_sd35, tiny["flux"])
    assert check_inversion("N", made_on_sd35, tiny["sd35"]) is made_on_sd35
    wrong_width = InversionResult(chain=None, context=torch.zeros(1, 256, 32), latent_channels=16, context_dim=32,
                                  model_family="Flux", prediction="flow")
    with pytest.raises(ValueError, match="expected a model with 32-wide text context .* got 64"):
        check_inversion("N", wrong_width, tiny["flux"])
