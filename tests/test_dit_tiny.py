"""Tiny diffusion transformers (``tiny/dit.py``): built with ComfyUI's classes, outputs that depend on
their inputs, the tiny loader's new families, and tiny mode for DiT workflows (separate model, text
encoder and VAE loaders), through the real server."""

from __future__ import annotations

import pytest
import torch

from qkv_control.client import workflow_format as wf
from qkv_control.families.registry import family_of
from qkv_control.nodes.tiny_loaders import QKVTinyCheckpointLoader
from dit_helpers import LATENT_CHANNELS, dit_kit


def predict(model, x, sigma, positive):
    context, extra = positive[0]
    conds = {}
    if "pooled_output" in extra:
        conds["y"] = extra["pooled_output"]
    if model.model.model_config.unet_config.get("guidance_embed") or family_of(model).name == "Chroma":
        conds["guidance"] = torch.tensor([3.5])
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([sigma]), c_crossattn=context, **conds)


@pytest.mark.parametrize("family", ["flux", "flux_schnell", "sd35", "chroma", "flux2"])
def test_tiny_dit_predictions_depend_on_latent_sigma_and_text(family):
    model, positive, negative = dit_kit(family)
    shape = (1, LATENT_CHANNELS[family], 16, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = predict(model, x, 0.6, positive)
    velocity = (x - out) / 0.6
    assert 0.5 < float(velocity.std()) < 2.0  # calibrated like a trained flow model's velocity
    assert (predict(model, x * 0.5, 0.6, positive) - out).abs().max() > 1e-2
    assert (predict(model, x, 0.3, positive) - out).abs().max() > 1e-2
    assert (predict(model, x, 0.6, negative) - out).abs().max() > 1e-3


@pytest.mark.parametrize("family,config,text", [("flux", "Flux", (256, 64)), ("flux_schnell", "FluxSchnell", (256, 64)),
                                                ("sd35", "SD3", (77, 4096))])
def test_tiny_checkpoint_loader_builds_dit_checkpoints(family, config, text):
    model, clip, vae = QKVTinyCheckpointLoader.execute(family, 0).args
    assert type(model.model.model_config).__name__ == config
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a red fox"), return_pooled=True)
    other, _ = clip.encode_from_tokens(clip.tokenize("a blue car"), return_pooled=True)
    assert tuple(cond.shape[1:]) == text and (cond - other).abs().max() > 1e-3
    assert pooled.shape[-1] == (128 if family == "sd35" else 64)
    latent = vae.encode(torch.rand(1, 64, 64, 3))
    assert tuple(latent.shape) == (1, 16, 8, 8) and vae.decode(latent).shape == (1, 64, 64, 3)
    guidance = model.model.diffusion_model.params.guidance_embed if family != "sd35" else None
    assert guidance is {"flux": True, "flux_schnell": False}.get(family)
    with pytest.raises(ValueError, match="tiny models: expected family one of .*'sd35'.* got 'sd4'"):
        QKVTinyCheckpointLoader.execute("sd4", 0)


def dit_api_prompt(unet_name, clip_loader):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": clip_loader,
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "seed": 0, "steps": 2, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "dit_tiny"}},
    }


FLUX_CLIP = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                        "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}}
SD3_CLIP = {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "clip_g.safetensors",
                                                         "clip_name3": "t5xxl_fp16.safetensors"}}


def test_tiny_substitution_of_dit_loaders():
    """Every loader of a DiT workflow becomes the tiny checkpoint of the workflow's family, its one
    output taken from the matching slot (MODEL 0, CLIP 1, VAE 2)."""
    prompt, replaced = wf.apply_tiny_substitutions(dit_api_prompt("flux1-dev.safetensors", FLUX_CLIP))
    assert len(replaced) == 3
    for node_id in ("1", "2", "3"):
        assert prompt[node_id] == {"class_type": "QKVTinyCheckpointLoader", "inputs": {"family": "flux", "seed": 0}}
    assert prompt["7"]["inputs"]["model"] == ["1", 0]
    assert prompt["4"]["inputs"]["clip"] == ["2", 1] and prompt["8"]["inputs"]["vae"] == ["3", 2]
    prompt, _ = wf.apply_tiny_substitutions(dit_api_prompt("sd3.5_medium.safetensors", SD3_CLIP))
    assert {prompt[i]["inputs"]["family"] for i in ("1", "2", "3")} == {"sd35"}
    assert wf.family_hint("t5xxl_fp16.safetensors") is None  # T5-XXL is no SDXL hint
    assert wf.family_hint("flux1-schnell-fp8.safetensors") == "flux_schnell"
    assert wf.family_hint("sd_xl_base_1.0.safetensors") == "sdxl"


@pytest.mark.server
@pytest.mark.parametrize("unet_name,clip_loader", [("flux1-dev.safetensors", FLUX_CLIP),
                                                   ("sd3.5_large.safetensors", SD3_CLIP)])
def test_dit_workflow_runs_in_tiny_mode_through_the_server(comfy_server, unet_name, clip_loader):
    entry = comfy_server.run(dit_api_prompt(unet_name, clip_loader))
    paths = comfy_server.output_paths(entry)
    assert len(paths) == 1 and paths[0].stat().st_size > 0
