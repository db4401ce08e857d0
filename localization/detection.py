"""Grounding DINO detection with the official ``predict()`` conventions (groundingdino-py 0.4.0,
``groundingdino/util/inference.py``):

- caption lower-cased, stripped, ending with "." (``preprocess_caption``);
- image resized as `images.grounding_dino_pixels` does;
- ``probs = sigmoid(pred_logits)`` over the 256 text positions (positions past the caption are -inf, so 0);
  a query is a detection when ``probs.max() > box_threshold``; its score is that maximum (special tokens
  [CLS], [SEP] and "." included, as in the original);
- its phrase is ``tokenizer.decode(ids at the positions where probs > text_threshold).replace(".", "")``
  (``get_phrases_from_posmap``: special tokens included, an empty phrase kept);
- detections in query order, boxes not clipped; pixel boxes are ``box_convert(cxcywh * [W, H, W, H],
  "cxcywh", "xyxy")`` as ``Model.post_process_result`` does.

What the official code does not do is an explicit option of `DetectionOptions` (off by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .images import DETECTION_MAX_SIZE, DETECTION_SIZE, grounding_dino_pixels

BOX_THRESHOLD = 0.3  # MCA-Ctrl's values (Grounding DINO's demo uses 0.35 / 0.25)
TEXT_THRESHOLD = 0.25


@dataclass(frozen=True)
class Detection:
    """One Grounding DINO detection: box ``(x0, y0, x1, y1)`` in pixels of the input image, the query it
    came from (its index among the model's queries)."""

    box: tuple[float, float, float, float]
    score: float
    phrase: str
    query: int = -1


@dataclass(frozen=True)
class DetectionOptions:
    """Extras beyond the official ``predict()``; every one off by default.

    ``sort_by_score``: detections best first (the official order is the model's query order).
    ``clip_boxes``: boxes clipped to the image (the official boxes may reach past its edges).
    ``drop_phraseless``: drop a detection whose phrase holds no prompt word (only [CLS]/[SEP]/"." passed
    ``text_threshold``); the official code keeps it with the phrase it decodes.
    """

    sort_by_score: bool = False
    clip_boxes: bool = False
    drop_phraseless: bool = False


OFFICIAL = DetectionOptions()


def prepare_caption(prompt: str) -> str:
    """Grounding DINO's caption convention (``preprocess_caption``): lower case, stripped, ending with '.'."""
    caption = prompt.lower().strip()
    return caption if caption.endswith(".") else caption + "."


def tokenize_caption(tokenizer, caption: str, max_length: int) -> dict[str, torch.Tensor]:
    """The caption's tokens, cut to ``max_length``: the original model slices its tokens to ``max_text_len``
    (it does not let the tokenizer truncate, which would keep [SEP])."""
    tokens = tokenizer(caption, return_tensors="pt")
    return {name: value[:, :max_length] for name, value in tokens.items()}


def _special_ids(tokenizer) -> set[int]:
    ids = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    ids.update(tokenizer.convert_tokens_to_ids([".", "?"]))
    return {i for i in ids if i is not None}


@torch.no_grad()
def detect(model, tokenizer, image_rgb: torch.Tensor, prompt: str, box_threshold: float = BOX_THRESHOLD,
           text_threshold: float = TEXT_THRESHOLD, size: int = DETECTION_SIZE,
           max_size: int | None = DETECTION_MAX_SIZE, options: DetectionOptions = OFFICIAL) -> list[Detection]:
    """Grounding DINO detections of ``prompt`` in one ``[H, W, 3]`` image (0..1)."""
    device = next(model.parameters()).device
    height, width = image_rgb.shape[:2]
    caption = prepare_caption(prompt)
    max_length = min(model.config.max_text_len, model.config.text_config.max_position_embeddings)
    tokens = {k: v.to(device) for k, v in tokenize_caption(tokenizer, caption, max_length).items()}
    pixels = grounding_dino_pixels(image_rgb, size, max_size).to(device)
    outputs = model(pixel_values=pixels, **tokens)
    # The phrases index the caption's full token list (``tokenizer(caption)`` in the original).
    input_ids = tokenizer(caption, return_tensors="pt")["input_ids"][0]
    return detections_from_outputs(outputs.logits[0].cpu(), outputs.pred_boxes[0].cpu(), input_ids, tokenizer,
                                   box_threshold, text_threshold, height, width, options)


def detections_from_outputs(logits: torch.Tensor, pred_boxes: torch.Tensor, input_ids: torch.Tensor, tokenizer,
                            box_threshold: float, text_threshold: float, height: int, width: int,
                            options: DetectionOptions = OFFICIAL) -> list[Detection]:
    """One image's outputs (``logits [queries, 256]``, ``pred_boxes [queries, 4]`` relative cx, cy, w, h)
    -> detections, as ``predict()`` + ``post_process_result``."""
    probs = logits.float().sigmoid()
    scores = probs.max(dim=1).values
    kept = (scores > box_threshold).nonzero().flatten().tolist()

    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    cx, cy, w, h = (pred_boxes.float() * scale).unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)  # box_convert
    if options.clip_boxes:
        xyxy = torch.minimum(xyxy.clamp(min=0), scale)

    ids = input_ids.tolist()
    special = _special_ids(tokenizer)
    detections = []
    for query in kept:
        positions = [i for i in (probs[query] > text_threshold).nonzero().flatten().tolist() if i < len(ids)]
        if options.drop_phraseless and not any(ids[i] not in special for i in positions):
            continue
        phrase = tokenizer.decode([ids[i] for i in positions]).replace(".", "")
        detections.append(Detection(tuple(xyxy[query].tolist()), float(scores[query]), phrase, query))
    if options.sort_by_score:
        detections.sort(key=lambda d: d.score, reverse=True)  # stable: ties keep query order
    return detections
