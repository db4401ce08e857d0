"""`make subgraphs`: write the pack's subgraph blueprints (``subgraphs/*.json``) from the workflows.

Each method's blueprint is the wiring of one of ``workflows/*.json`` (the nodes between the
loaders / image loaders and the image output) behind the inputs a user changes: model, CLIP
and VAE come in as inputs (the user's own loaders, LoRAs and model patches stay outside), the
reference images and masks as inputs, prompts, strengths and sampling settings as promoted
widgets. The method's own model files (IP-Adapter, CLIP vision) are loaded inside, their file
names promoted. Defaults are the papers' settings at real size (the workflows use small ones so
that they run quickly on a CPU).

    python scripts/subgraph_blueprints.py [--url http://127.0.0.1:8188]

tests/test_subgraph_blueprints.py checks that each blueprint, placed in its workflow, queues
the workflow's own prompt; tests/test_browser.py drops each one on the canvas and runs it.
Blueprints can also be edited in ComfyUI (node library -> edit blueprint) and saved back here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import _runtime  # noqa: F401  (sys.path for the pack)
from _runtime import ROOT

from client.blueprints import BlueprintSpec, Promotion, extract_blueprint
from workflows_api import fetch_object_info  # a throw-away server's /object_info without --url

logger = logging.getLogger("qkv_control.subgraph_blueprints")

WORKFLOWS = ROOT / "workflows"
SUBGRAPHS = ROOT / "subgraphs"
CATEGORY = "QKV Control"
SOURCE_KEY = "qkv_source_workflow"
CHECKPOINT = 1  # the Load Checkpoint node of every source workflow: MODEL, CLIP, VAE
MODEL_CLIP_VAE = {(CHECKPOINT, 0): "model", (CHECKPOINT, 1): "clip", (CHECKPOINT, 2): "vae"}


def _sampling(sampler: int, latent: int | None = None, extra_steps=(), steps=50, cfg=7.5,
              size=512) -> tuple[Promotion, ...]:
    """seed / steps / cfg of an inner KSampler (steps shared with ``extra_steps``, the inversions:
    inversion and sampling use the same schedule), and width / height of an Empty Latent Image."""
    promotions = (Promotion("seed", ((sampler, "seed"),)),
                  Promotion("steps", ((sampler, "steps"), *extra_steps), steps),
                  Promotion("cfg", ((sampler, "cfg"),), cfg))
    if latent is not None:
        promotions += (Promotion("width", ((latent, "width"),), size), Promotion("height", ((latent, "height"),), size))
    return promotions


def _mca_scene_blueprint(name: str, description: str) -> BlueprintSpec:
    """MCA-Ctrl replacement and addition: the same wiring (their workflows differ in the target dilation)."""
    return BlueprintSpec(
        name=name, description=description, category=CATEGORY, inner=(2, 3, 5, 6, 8, 9, 12, 13, 14),
        inputs={**MODEL_CLIP_VAE, (4, 0): "subject_image", (10, 0): "subject_mask", (7, 0): "scene_image",
                (11, 0): "target_mask"}, outputs={(14, 0): "IMAGE"},
        promotions=(Promotion("positive", ((2, "text"),)), Promotion("negative", ((3, "text"),)),
                    Promotion("target_dilation", ((12, "target_dilation"),)),
                    *_sampling(13, extra_steps=((6, "steps"), (9, "steps")))))


SPECS: dict[str, tuple[str, BlueprintSpec]] = {
    "indetail_ip": ("indetail_ip_image_variation.json", BlueprintSpec(
        name="QKV Image Prompt (InDetail-IP)",
        description=("InDetail-IP image prompt: new images that keep the reference's fine details (colours, "
                     "textures, patterns). The reference is DDIM-inverted and its K/V reach the decoder "
                     "self-attention through Stratified Attention, then KV concatenation; conflict-free guidance "
                     "keeps it out of the negative CFG branch; AdaIN noise starts from the reference's statistics. "
                     "Leave the inversion prompt empty for cross-prompt generation."),
        category=CATEGORY, inner=(3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16),
        inputs={**MODEL_CLIP_VAE, (2, 0): "reference_image"}, outputs={(13, 0): "IMAGE"},
        promotions=(Promotion("positive", ((4, "text"),)), Promotion("negative", ((5, "text"),)),
                    Promotion("inversion_prompt", ((6, "text"),)), Promotion("schedule", ((8, "schedule"),)),
                    Promotion("lambda_reference", ((8, "lambda_reference"),)),
                    Promotion("seed", ((12, "noise_seed"), (11, "seed"))),
                    Promotion("steps", ((12, "steps"), (7, "steps")), 50), Promotion("cfg", ((12, "cfg"),), 7.5),
                    Promotion("width", ((10, "width"),), 512), Promotion("height", ((10, "height"),), 512)))),
    "mca_generation": ("mca_ctrl_subject_generation.json", BlueprintSpec(
        name="QKV Subject Generation (MCA-Ctrl)",
        description=("MCA-Ctrl subject generation: a scene from text with the subject of an image in it. SAGI "
                     "(Self-Attention Global Injection) early, SALQ (Self-Attention Local Query) after; the target "
                     "mask comes from the subject word's cross-attention. Subject image and mask in; the subject "
                     "is DDIM-inverted inside."),
        category=CATEGORY, inner=(2, 3, 5, 6, 8, 9, 10, 11),
        inputs={**MODEL_CLIP_VAE, (4, 0): "subject_image", (7, 0): "subject_mask"}, outputs={(11, 0): "IMAGE"},
        promotions=(Promotion("positive", ((2, "text"),)), Promotion("negative", ((3, "text"),)),
                    Promotion("condition_prompt", ((8, "condition_prompt"),)),
                    Promotion("subject_word", ((8, "subject_word"),)),
                    *_sampling(10, 9, extra_steps=((6, "steps"),))))),
    "mca_replacement": ("mca_ctrl_subject_replacement.json", _mca_scene_blueprint(
        "QKV Subject Replacement (MCA-Ctrl)",
        "MCA-Ctrl subject replacement: replaces a region of a scene (target mask) with the subject of another "
        "image (subject mask), keeping the scene's background. SAGI (Self-Attention Global Injection) early, "
        "SALQ (Self-Attention Local Query) after; subject and scene are DDIM-inverted inside. Masks from Load "
        "Image (as Mask) or from text (QKV Text to Mask).")),
    "mca_addition": ("mca_ctrl_subject_addition.json", _mca_scene_blueprint(
        "QKV Subject Addition (MCA-Ctrl)",
        "MCA-Ctrl subject addition: adds the subject of an image into an empty region of a scene (target mask), "
        "keeping everything else. SAGI (Self-Attention Global Injection) early, SALQ (Self-Attention Local "
        "Query) after; subject and scene are DDIM-inverted inside.")),
    "deadiff": ("ipadapter_deadiff_style_content.json", BlueprintSpec(
        name="QKV Style and Content (DEADiff)",
        description=("DEADiff style transfer with an IP-Adapter: the style image drives the fine cross-attention "
                     "layers, the (optional) content image the coarse ones, so the style image's subject does not "
                     "leak. Loads the IP-Adapter and CLIP vision files inside."),
        category=CATEGORY, inner=(2, 3, 6, 7, 8, 9, 10, 11),
        inputs={**MODEL_CLIP_VAE, (4, 0): "style_image", (5, 0): "content_image"}, outputs={(11, 0): "IMAGE"},
        promotions=(Promotion("positive", ((7, "text"),)), Promotion("negative", ((8, "text"),)),
                    Promotion("style_weight", ((6, "style_weight"),)),
                    Promotion("content_weight", ((6, "content_weight"),)),
                    Promotion("ipadapter_file", ((3, "ipadapter_file"),)),
                    Promotion("clip_vision_file", ((2, "clip_name"),)),
                    *_sampling(10, 9, steps=30, cfg=6.0)))),
    "ecommerce": ("ipadapter_ecommerce_style_consistent.json", BlueprintSpec(
        name="QKV Product Style (e-commerce)",
        description=("E-commerce style-consistent product images: an IP-Adapter image prompt plus condition "
                     "guidance (the prompt shares the preset condition's cross-attention K/V) and mask guidance "
                     "(the product words' thresholded cross-attention map multiplied into V). The second output "
                     "is the words' attention map, computed only when connected."),
        category=CATEGORY, inner=(2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 14),
        inputs={**MODEL_CLIP_VAE, (4, 0): "product_image"}, outputs={(12, 0): "IMAGE", (14, 2): "attention_map"},
        promotions=(Promotion("prompt", ((6, "text"), (14, "text"))), Promotion("words", ((6, "words"), (14, "words"))),
                    Promotion("preset", ((7, "text"),)), Promotion("negative", ((8, "text"),)),
                    Promotion("image_weight", ((5, "weight"),)), Promotion("mask_strength", ((6, "strength"),)),
                    Promotion("ipadapter_file", ((3, "ipadapter_file"),)),
                    Promotion("clip_vision_file", ((2, "clip_name"),)),
                    Promotion("seed", ((11, "seed"), (14, "seed"))),
                    Promotion("steps", ((11, "steps"), (14, "steps")), 30),
                    Promotion("cfg", ((11, "cfg"), (14, "cfg")), 6.0),
                    Promotion("width", ((10, "width"),), 512), Promotion("height", ((10, "height"),), 512)))),
}


def blueprint_path(spec: BlueprintSpec) -> Path:
    return SUBGRAPHS / f"{spec.name}.json"


def render(blueprint: dict) -> str:
    return json.dumps(blueprint, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running ComfyUI server with the pack (default: start one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    object_info = fetch_object_info(args.url)
    SUBGRAPHS.mkdir(exist_ok=True)
    for source, spec in SPECS.values():
        workflow = json.loads((WORKFLOWS / source).read_text())
        path = blueprint_path(spec)
        blueprint = extract_blueprint(workflow, spec, object_info)
        blueprint["extra"][SOURCE_KEY] = source  # which workflow the tests compare it with
        path.write_text(render(blueprint))
        logger.info("wrote %s (from workflows/%s)", path.relative_to(ROOT), source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
