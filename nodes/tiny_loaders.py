"""Loader nodes for tiny random-weight models.

ComfyUI's core loaders recognise real checkpoints only, so the test suite and
`make demo`'s tiny mode substitute these for CheckpointLoaderSimple and
CLIPVisionLoader. Registered only when QKV_CONTROL_TINY_MODELS=1.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..tiny.models import cached_clip_vision, checkpoint_families, tiny_checkpoint


class QKVTinyCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVTinyCheckpointLoader",
            display_name="QKV Tiny Checkpoint (test)",
            category="QKV Control/testing",
            description="Builds a tiny random-weight checkpoint (SD1.5, SDXL, Flux.1 dev or schnell, SD3.5) "
                        "with ComfyUI's own model and text-encoder classes. For tests and the demo without model "
                        "files; images are noise-like.",
            search_aliases=["tiny", "test", "random checkpoint"],
            inputs=[
                io.Combo.Input("family", options=list(checkpoint_families()), default="sd15",
                               tooltip="Which real model family's block structure the tiny model copies: sd15, "
                                       "sdxl (UNets), flux (Flux.1 dev: guidance embedding), flux_schnell, sd35 "
                                       "(MMDiT with q/k norms and one MMDiT-X block)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random weights; the same seed gives the same model."),
            ],
            outputs=[
                io.Model.Output(tooltip="The tiny UNet or diffusion transformer."),
                io.Clip.Output(tooltip="A tiny text encoder of the family's ComfyUI classes (CLIP; Flux.1: CLIP-L + "
                                       "T5; SD3.5: CLIP-L + CLIP-G) using ComfyUI's bundled tokenizers."),
                io.Vae.Output(tooltip="A random-weight TAESD autoencoder (4 latent channels; 16 for Flux.1/SD3.5)."),
            ],
        )

    @classmethod
    def execute(cls, family: str, seed: int) -> io.NodeOutput:
        model, clip, vae = tiny_checkpoint(family, seed)
        return io.NodeOutput(model, clip, vae)


class QKVTinyCLIPVisionLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVTinyCLIPVisionLoader",
            display_name="QKV Tiny CLIP Vision (test)",
            category="QKV Control/testing",
            description="Builds a tiny random-weight CLIP vision model (ViT, width 64) for tests and the demo.",
            search_aliases=["tiny", "test", "random clip vision"],
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random weights; the same seed gives the same model."),
            ],
            outputs=[io.ClipVision.Output(tooltip="The tiny CLIP vision model.")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        return io.NodeOutput(cached_clip_vision(seed))


NODES = [QKVTinyCheckpointLoader, QKVTinyCLIPVisionLoader]
