"""Subject localization nodes: Grounding DINO and SAM loaders, text prompt -> mask (MCA-Ctrl's Subject
Localization Module)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..localization import pipeline
from ..localization.checkpoint_io import CheckpointError
from ..localization.managed import (
    GROUNDING_DINO_FOLDER,
    SAM_FOLDER,
    load_grounding_dino_file,
    load_sam_file,
    model_choices,
    register_model_folders,
)

CATEGORY = "QKV Control/Localization"

GroundingDinoType = io.Custom("QKV_GROUNDING_DINO")
SamType = io.Custom("QKV_SAM")

register_model_folders()


class QKVGroundingDinoLoader(io.ComfyNode):
    DISPLAY_NAME = "QKV Load Grounding DINO"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVGroundingDinoLoader",
            display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            description="Loads Grounding DINO (open-set text-prompted detector) from models/grounding-dino: "
                        "an original checkpoint (groundingdino_swint_ogc.pth, groundingdino_swinb_cogcoor.pth) "
                        "or a Hugging Face-format folder. Needs bert-base-uncased's vocab.txt in "
                        "models/grounding-dino/bert-base-uncased/. Runs with transformers, offline.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices(GROUNDING_DINO_FOLDER),
                               tooltip="A file in models/grounding-dino. For a Hugging Face-format model pick "
                                       "any weights file inside its folder (the folder's config.json decides)."),
            ],
            outputs=[GroundingDinoType.Output(display_name="grounding_dino",
                                              tooltip="The detector, managed by ComfyUI (moved to the GPU "
                                                      "when used, offloaded after).")],
        )

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        try:
            return io.NodeOutput(load_grounding_dino_file(model_name))
        except CheckpointError as error:
            raise ValueError(f"{cls.DISPLAY_NAME}: {error}") from error


class QKVSamLoader(io.ComfyNode):
    DISPLAY_NAME = "QKV Load SAM"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVSamLoader",
            display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            description="Loads Segment Anything from models/sams: an original checkpoint (sam_vit_b_01ec64.pth, "
                        "sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth; size read from the weights) or a Hugging "
                        "Face-format folder. Runs with transformers.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices(SAM_FOLDER),
                               tooltip="A file in models/sams. For a Hugging Face-format model pick any weights "
                                       "file inside its folder."),
            ],
            outputs=[SamType.Output(display_name="sam",
                                    tooltip="The segmenter, managed by ComfyUI (moved to the GPU when used, "
                                            "offloaded after).")],
        )

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        try:
            return io.NodeOutput(load_sam_file(model_name))
        except CheckpointError as error:
            raise ValueError(f"{cls.DISPLAY_NAME}: {error}") from error


class QKVTextSegment(io.ComfyNode):
    DISPLAY_NAME = "QKV Text to Mask (Grounding DINO and SAM)"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVTextSegment",
            display_name=cls.DISPLAY_NAME,
            category=CATEGORY,
            description="Masks what a text prompt names in every image of a batch: Grounding DINO finds boxes, "
                        "SAM segments each box. An image where nothing is found gets an empty mask (and a "
                        "warning in the log); the rest of the batch is still processed. MCA-Ctrl's subject "
                        "localization uses box/text thresholds 0.3/0.25 and a 3x3 dilation (dilation 1).",
            inputs=[
                GroundingDinoType.Input("grounding_dino", tooltip="From Load Grounding DINO (QKV)."),
                SamType.Input("sam", tooltip="From Load SAM (QKV)."),
                io.Image.Input("image", tooltip="Images to segment (RGB; grey and RGBA are accepted, alpha is "
                                                "ignored)."),
                io.String.Input("prompt", default="subject", tooltip="What to find, e.g. 'dog' or 'red car . "
                                                                      "person' (' . ' separates several things)."),
                io.Float.Input("box_threshold", default=pipeline.BOX_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="A box is kept when its best prompt-token probability exceeds this."),
                io.Float.Input("text_threshold", default=pipeline.TEXT_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="Prompt tokens above this form a box's phrase; a box with no such token "
                                       "is dropped."),
                io.Combo.Input("keep", options=list(pipeline.KEEP_MODES), default="union",
                               tooltip="union: one mask per image covering every detection; best: one mask per "
                                       "image, the highest-scoring detection; all: one mask per detection "
                                       "(the batch grows; an image with none still gives one empty mask)."),
                io.Int.Input("dilation", default=0, min=0, max=256,
                             tooltip="Grow each mask by this many pixels (1 = a 3x3 dilation)."),
                io.Int.Input("detection_resolution", default=pipeline.DETECTION_SIZE, min=64, max=2048, step=8,
                             tooltip="Shortest side the image is resized to for Grounding DINO (official: 800, "
                                     "longest side at most 1333). Lower is faster and coarser."),
                io.Boolean.Input("clip_to_box", default=False,
                                 tooltip="Keep each mask inside its detection box (before dilation). SAM can leak "
                                         "past a box on low-contrast images; a replacement region should not."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="Masks (1 = the prompt's subject), image size."),
                io.Image.Output(display_name="preview", tooltip="Each image with its mask tinted red and its "
                                                               "detection boxes outlined."),
            ],
        )

    @classmethod
    def validate_inputs(cls, prompt: str = "", **kwargs):
        if isinstance(prompt, str) and not prompt.strip(" ."):
            return f"{cls.DISPLAY_NAME}: expected a prompt naming something to find, got {prompt!r}"
        return True

    @classmethod
    def execute(cls, grounding_dino, sam, image, prompt: str, box_threshold: float, text_threshold: float,
                keep: str, dilation: int, detection_resolution: int, clip_to_box: bool = False) -> io.NodeOutput:
        from ..localization.managed import segment_with_text

        if image.ndim != 4 or image.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(f"{cls.DISPLAY_NAME}: expected an IMAGE [B, H, W, 1-4 channels], "
                             f"got shape {tuple(image.shape)}")
        result = segment_with_text(grounding_dino, sam, image, prompt, box_threshold=box_threshold,
                                   text_threshold=text_threshold, keep=keep, dilation=dilation,
                                   detection_size=detection_resolution, clip_to_box=clip_to_box)
        preview = pipeline.preview(image, result)
        # Shown on the node too, so prompts and thresholds can be tuned at a glance.
        return io.NodeOutput(result.masks, preview, ui=ui.PreviewImage(preview, cls=cls))


NODES = [QKVGroundingDinoLoader, QKVSamLoader, QKVTextSegment]
