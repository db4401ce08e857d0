"""Subject localization nodes: Grounding DINO and SAM loaders, text prompt -> mask (MCA-Ctrl's Subject
Localization Module), and SAM with point and box prompts in ComfyUI's conventions."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..localization import detection, images, pipeline, prompts
from ..localization.managed import (
    GROUNDING_DINO_FOLDER,
    SAM_FOLDER,
    load_grounding_dino_file,
    load_sam_file,
    model_choices,
    register_model_folders,
    segment_with_prompts,
    segment_with_text,
)
from .naming import errors_named

CATEGORY = "QKV Control/Localization"

GroundingDinoType = io.Custom("QKV_GROUNDING_DINO")
SamType = io.Custom("QKV_SAM")

register_model_folders()

MANAGED = "managed by ComfyUI (moved to the GPU when used, offloaded after)."
KEEP_TOOLTIP = ("union: one mask per image covering every {what}; best: one mask per image, the {best}; "
                "all: every mask (the batch grows; an image with none still gives one empty mask).")


class _LocalizationNode(io.ComfyNode):
    """What every localization node shares: its display name in every error it raises."""

    DISPLAY_NAME = ""

    @classmethod
    def schema(cls, node_id: str, description: str, aliases, inputs: list, outputs: list) -> io.Schema:
        return io.Schema(node_id=node_id, display_name=cls.DISPLAY_NAME, category=CATEGORY, description=description,
                         search_aliases=list(aliases), inputs=inputs, outputs=outputs)

    @classmethod
    def named_errors(cls):
        """Bad files and bad inputs reach the user as ``ValueError("<display name>: ...")``."""
        return errors_named(cls.DISPLAY_NAME)

    @classmethod
    def masks_and_preview(cls, image, result: pipeline.LocalizationResult, *extra) -> io.NodeOutput:
        """MASK, preview IMAGE (shown on the node too, so prompts and thresholds can be tuned at a glance)."""
        preview = pipeline.preview(image, result)
        return io.NodeOutput(result.masks, preview, *extra, ui=ui.PreviewImage(preview, cls=cls))

    @classmethod
    def check_image(cls, image) -> None:
        if image.ndim != 4 or image.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(f"{cls.DISPLAY_NAME}: expected an IMAGE [B, H, W, 1-4 channels], got shape "
                             f"{tuple(image.shape)}")


class _ModelLoader(_LocalizationNode):
    """A loader: one file of a ComfyUI model folder -> a managed model. Subclasses say which."""

    NODE_ID = ""
    FOLDER = ""
    ABOUT = ""
    FILE_TOOLTIP = ""
    OUTPUT = None
    OUTPUT_NAME = ""
    ALIASES: tuple[str, ...] = ()

    @classmethod
    def load(cls, model_name: str):
        raise NotImplementedError

    @classmethod
    def define_schema(cls):
        return cls.schema(
            cls.NODE_ID, cls.ABOUT, cls.ALIASES,
            inputs=[io.Combo.Input("model_name", options=model_choices(cls.FOLDER), tooltip=cls.FILE_TOOLTIP)],
            outputs=[cls.OUTPUT.Output(display_name=cls.OUTPUT_NAME, tooltip=f"The model, {MANAGED}")],
        )

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        with cls.named_errors():
            return io.NodeOutput(cls.load(model_name))


class QKVGroundingDinoLoader(_ModelLoader):
    NODE_ID = "QKVGroundingDinoLoader"
    DISPLAY_NAME = "QKV Load Grounding DINO"
    FOLDER = GROUNDING_DINO_FOLDER
    ABOUT = ("Loads Grounding DINO (IDEA-Research's open-set, text-prompted detector) from models/grounding-dino: "
             "an original checkpoint (groundingdino_swint_ogc.pth, groundingdino_swinb_cogcoor.pth) or a Hugging "
             "Face-format folder. Needs bert-base-uncased's vocab.txt and config.json in a folder next to the "
             "checkpoint (bert-base-uncased/ or a Hugging Face cache models--bert-base-uncased/). Runs with "
             "transformers, offline.")
    FILE_TOOLTIP = ("A file in models/grounding-dino. For a Hugging Face-format model pick any weights file inside "
                    "its folder (the folder's config.json decides). BERT's own files are not listed.")
    OUTPUT = GroundingDinoType
    OUTPUT_NAME = "grounding_dino"
    ALIASES = ("grounding dino", "groundingdino", "gdino", "detect", "detector", "open vocabulary detection",
               "text to box", "load detector")

    @classmethod
    def load(cls, model_name: str):
        return load_grounding_dino_file(model_name)


class QKVSamLoader(_ModelLoader):
    NODE_ID = "QKVSamLoader"
    DISPLAY_NAME = "QKV Load SAM"
    FOLDER = SAM_FOLDER
    ABOUT = ("Loads Segment Anything (SAM, Meta's promptable segmenter) from models/sams: an original "
             "checkpoint (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth; size read from the "
             "weights) or a Hugging Face-format folder. Runs with transformers, as segment-anything's "
             "SamPredictor computes.")
    FILE_TOOLTIP = ("A file in models/sams. For a Hugging Face-format model pick any weights file inside its "
                    "folder.")
    OUTPUT = SamType
    OUTPUT_NAME = "sam"
    ALIASES = ("sam", "segment anything", "segment", "segmenter", "load sam", "mask")

    @classmethod
    def load(cls, model_name: str):
        return load_sam_file(model_name)


class QKVTextSegment(_LocalizationNode):
    DISPLAY_NAME = "QKV Text to Mask (Grounding DINO and SAM)"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            "QKVTextSegment",
            description="Masks what a text prompt names in every image of a batch, as Grounded-SAM chains the "
                        "official libraries: Grounding DINO's predict() finds boxes (query order, unclipped), "
                        "SAM's SamPredictor segments each box. An image where nothing is found gets an empty "
                        "mask (and a warning in the log); the rest of the batch is still processed. The boxes "
                        "also come out as a BOUNDING_BOX for core nodes (Draw BBoxes, SAM3 Detect). MCA-Ctrl's "
                        "Subject Localization Module uses box/text thresholds 0.3/0.25 and a 3x3 dilation.",
            aliases=["mask from text", "text to mask", "segment", "grounded sam", "grounding dino", "sam",
                     "detect", "text segment", "subject mask", "box to mask", "subject localization"],
            inputs=[
                GroundingDinoType.Input("grounding_dino", tooltip="From QKV Load Grounding DINO."),
                SamType.Input("sam", tooltip="From QKV Load SAM."),
                io.Image.Input("image", tooltip="Images to segment (RGB; grey and RGBA are accepted, alpha is "
                                                "ignored)."),
                io.String.Input("prompt", default="subject", tooltip="What to find, e.g. 'dog' or 'red car . "
                                                                      "person' (' . ' separates several things)."),
                io.Float.Input("box_threshold", default=detection.BOX_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="A box is kept when its best token probability exceeds this."),
                io.Float.Input("text_threshold", default=detection.TEXT_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="Tokens above this form a box's phrase (its BOUNDING_BOX label)."),
                io.Combo.Input("keep", options=list(pipeline.KEEP_MODES), default="union",
                               tooltip=KEEP_TOOLTIP.format(what="detection", best="highest-scoring detection")),
                io.Int.Input("dilation", default=0, min=0, max=256,
                             tooltip="Grow each mask by this many pixels (1 = a 3x3 dilation)."),
                io.Int.Input("detection_resolution", default=images.DETECTION_SIZE, min=64, max=2048, step=8,
                             tooltip="Shortest side the image is resized to for Grounding DINO (official: 800, "
                                     "longest side at most 1333). Lower is faster and coarser."),
                io.Boolean.Input("clip_to_box", default=False,
                                 tooltip="Keep each mask inside its detection box (before dilation). SAM can leak "
                                         "past a box on low-contrast images; a replacement region should not."),
                io.Boolean.Input("sort_by_score", default=False, optional=True,
                                 tooltip="Detections best first (masks with keep=all, and the boxes). Off: the "
                                         "model's query order, as the official predict()."),
                io.Boolean.Input("clip_boxes", default=False, optional=True,
                                 tooltip="Clip the boxes to the image before SAM and in the bboxes output. Off: "
                                         "boxes as the model predicts them (they may reach past the edges)."),
                io.Boolean.Input("drop_phraseless", default=False, optional=True,
                                 tooltip="Drop a box whose phrase holds no prompt word (only [CLS]/[SEP]/'.' "
                                         "passed text_threshold). Off: kept, as the official predict()."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="Masks (1 = the prompt's subject), image size."),
                io.Image.Output(display_name="preview", tooltip="Each image with its mask tinted red and its "
                                                               "detection boxes outlined."),
                io.BoundingBox.Output(display_name="bboxes",
                                      tooltip="The detections per image as core's BOUNDING_BOX (pixels; label = "
                                              "phrase, score), in the order the masks use."),
            ],
        )

    @classmethod
    def validate_inputs(cls, prompt: str = "", **kwargs):
        if isinstance(prompt, str) and not prompt.strip(" ."):
            return f"{cls.DISPLAY_NAME}: expected a prompt naming something to find, got {prompt!r}"
        return True

    @classmethod
    def execute(cls, grounding_dino, sam, image, prompt: str, box_threshold: float, text_threshold: float,
                keep: str, dilation: int, detection_resolution: int, clip_to_box: bool = False,
                sort_by_score: bool = False, clip_boxes: bool = False, drop_phraseless: bool = False) -> io.NodeOutput:
        cls.check_image(image)
        options = detection.DetectionOptions(sort_by_score=sort_by_score, clip_boxes=clip_boxes,
                                             drop_phraseless=drop_phraseless)
        with cls.named_errors():
            result = segment_with_text(grounding_dino, sam, image, prompt, box_threshold=box_threshold,
                                       text_threshold=text_threshold, keep=keep, dilation=dilation,
                                       detection_size=detection_resolution, clip_to_box=clip_to_box, options=options)
        return cls.masks_and_preview(image, result, prompts.detections_to_bounding_boxes(result.detections))


class QKVSamSegment(_LocalizationNode):
    DISPLAY_NAME = "QKV SAM Points and Boxes to Mask"

    @classmethod
    def define_schema(cls):
        return cls.schema(
            "QKVSamSegment",
            description="Segment Anything (SAM) with clicked points and boxes, as segment-anything's "
                        "SamPredictor.predict computes: positive/negative points as JSON [{\"x\": .., \"y\": ..}] "
                        "in pixels (the format core SAM3 Detect and points editors use), boxes as core's "
                        "BOUNDING_BOX (from Bounding Box, Create Bounding Boxes, SAM3 Detect, RT-DETR or Text to "
                        "Mask). One prompt per box (the points join each), or one prompt of all the points.",
            aliases=["sam", "segment anything", "segment", "points to mask", "box to mask", "click to mask",
                     "point prompt", "bbox to mask", "mask from points", "sam predictor"],
            inputs=[
                SamType.Input("sam", tooltip="From QKV Load SAM."),
                io.Image.Input("image", tooltip="Images to segment (RGB; grey and RGBA are accepted, alpha is "
                                                "ignored). The prompts apply to every image unless given per "
                                                "image."),
                io.String.Input("positive_coords", default="[]",
                                tooltip="Points on the object, JSON [{\"x\": 120, \"y\": 80}, ...] in image "
                                        "pixels (a list of such lists gives each image its own). Connect a "
                                        "points editor or type them."),
                io.String.Input("negative_coords", default="[]",
                                tooltip="Points not on the object (background), same format."),
                io.Boolean.Input("multimask_output", default=True,
                                 tooltip="SAM predicts 3 candidate masks per prompt and scores them (official "
                                         "default, best for a single click); off: one mask per prompt (better "
                                         "for boxes and several points)."),
                io.Combo.Input("keep", options=list(pipeline.KEEP_MODES), default="union",
                               tooltip=KEEP_TOOLTIP.format(what="prompt's best-scored candidate",
                                                           best="candidate SAM scores highest")),
                io.BoundingBox.Input("bboxes", optional=True, force_input=True,
                                     tooltip="Box prompts (core BOUNDING_BOX: one box, a list for every image, or "
                                             "a list per image). Each box is its own prompt."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="Masks (1 = the object), image size."),
                io.Image.Output(display_name="preview", tooltip="Each image with its mask tinted red, its boxes "
                                                               "outlined and its points marked (green on, red "
                                                               "off the object)."),
            ],
        )

    @classmethod
    def execute(cls, sam, image, positive_coords: str = "[]", negative_coords: str = "[]",
                multimask_output: bool = True, keep: str = "union", bboxes=None) -> io.NodeOutput:
        cls.check_image(image)
        batch = image.shape[0]
        with cls.named_errors():
            positive = prompts.points_per_image(positive_coords, batch, "positive_coords")
            negative = prompts.points_per_image(negative_coords, batch, "negative_coords")
            boxes = prompts.boxes_per_image(bboxes, batch)
            if not any(positive) and not any(negative) and not any(boxes):
                raise ValueError("expected at least one point (positive_coords / negative_coords) or box (bboxes), "
                                 "got none")
            result = segment_with_prompts(sam, image, positive, negative, boxes, multimask_output=multimask_output,
                                          keep=keep)
        return cls.masks_and_preview(image, result)


NODES = [QKVGroundingDinoLoader, QKVSamLoader, QKVTextSegment, QKVSamSegment]
