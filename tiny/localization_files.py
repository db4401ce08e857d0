"""Tiny random-weight Grounding DINO and SAM files in the ORIGINAL checkpoint layouts.

`write_tiny_localization_files(models_dir)` writes what a user would have, at toy size, so the real
loader nodes run in tests and `make demo`'s tiny mode:

- ``grounding-dino/groundingdino_swint_ogc.pth``: ``{"model": state_dict}`` with the original
  ``backbone.0`` / ``bert`` / ``transformer`` keys (BERT weights inside, as in the release);
- ``grounding-dino/bert-base-uncased/``: a tiny ``vocab.txt`` (special tokens at bert-base-uncased's ids,
  which transformers' Grounding DINO hard-codes: [CLS] 101, [SEP] 102, '.' 1012, '?' 1029) and ``config.json``;
- ``sams/sam_vit_b_01ec64.pth``: a flat segment-anything state dict (tiny, whatever the name says: sizes
  are read from the tensors).

The files carry the released names so the example workflows run unchanged; a file of real size already
there is never overwritten.

Head counts follow the released models (8 for Grounding DINO's transformer and SAM's decoder), because
those are the only sizes the loaders cannot read from tensor shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The released files' names, so example workflows run unchanged on the tiny files in tests and the demo.
GROUNDING_DINO_FILE = "groundingdino_swint_ogc.pth"
SAM_FILE = "sam_vit_b_01ec64.pth"
# Never overwrite a real checkpoint that happens to sit where a tiny file goes.
MAX_TINY_FILE_BYTES = 20 * 2**20
BERT_DIR = "bert-base-uncased"

TINY_WORDS = (
    "a an the and of on in with red green blue yellow white black square circle box object thing cat dog "
    "person car shirt background ball toy bottle cup"
).split()


def tiny_bert_vocab() -> list[str]:
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    while len(vocab) < 1012:
        vocab.append(f"[unused{len(vocab)}]")
    vocab.append(".")
    while len(vocab) < 1029:
        vocab.append(f"[unused{len(vocab)}]")
    vocab += ["?", ",", "!"] + TINY_WORDS
    return vocab


def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tiny_bert_vocab()), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)


def tiny_grounding_dino_config():
    """d_model 64: two channels per group in the 32-group GroupNorms of the input projections, as the
    real model (256: eight) has at least two, so a 1x1 feature level normalises as it does there."""
    from transformers import GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=128,
                          out_indices=[2, 3, 4], out_features=["stage2", "stage3", "stage4"])
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=tiny_bert_config(), d_model=64, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=8, decoder_attention_heads=8,
        encoder_n_points=2, decoder_n_points=2, num_queries=20,
    )


def tiny_sam_config():
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    from ..localization.sam_convert import with_original_eps

    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=8, mlp_dim=64, window_size=3, global_attn_indexes=[1],
                             num_pos_feats=16)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=8, mlp_dim=64,
                                   iou_head_hidden_dim=16)
    return with_original_eps(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))


def tiny_grounding_dino(seed: int = 0):
    """A tiny random transformers Grounding DINO (eval)."""
    from transformers import GroundingDinoForObjectDetection

    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(tiny_grounding_dino_config()).eval()
    with torch.no_grad():
        # Random weights saturate every token probability at ~1; smaller decoder outputs keep the scores
        # spread around 0.5, so thresholds separate detections as they do with a trained model.
        model.model.decoder.layer_norm.weight.mul_(0.05)
    return model


def tiny_sam(seed: int = 0):
    """A tiny random transformers SAM (eval); norms get non-trivial weights so a conversion slip shows."""
    from transformers import SamModel

    torch.manual_seed(seed)
    model = SamModel(tiny_sam_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name or "positional_embedding" in name or "rel_pos" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def grounding_dino_original_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s weights in the original Grounding DINO layout, buffers and BERT pooler included."""
    from ..localization import grounding_dino_convert as gd

    config = model.config
    keys = gd.original_grounding_dino_keys(config)
    original = gd.grounding_dino_hf_to_original(model.state_dict(), keys)
    bert, window = config.text_config, config.backbone_config.window_size
    generator = torch.Generator().manual_seed(1)
    for key in keys:
        if key.endswith("relative_position_index"):
            original[key] = torch.randint(0, (2 * window - 1) ** 2, (window**2, window**2), generator=generator)
        elif key == "bert.embeddings.position_ids":
            original[key] = torch.arange(bert.max_position_embeddings).unsqueeze(0)
        elif key == "bert.pooler.dense.weight":
            original[key] = torch.randn(bert.hidden_size, bert.hidden_size, generator=generator)
        elif key == "bert.pooler.dense.bias":
            original[key] = torch.zeros(bert.hidden_size)
    return original


def sam_original_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s weights in the original segment-anything layout."""
    from ..localization import sam_convert

    return sam_convert.sam_hf_to_original(model.state_dict(), sam_convert.original_sam_keys(model.config))


def write_tiny_bert_dir(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tiny_bert_vocab()) + "\n")
    (folder / "config.json").write_text(json.dumps(tiny_bert_config().to_dict(), indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 64}))
    return folder


def write_tiny_localization_files(models_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny Grounding DINO (+ BERT vocab/config) and SAM files under ``models_dir``.

    Returns the written paths: ``{"grounding_dino", "bert_dir", "sam"}``. Idempotent.
    """
    models_dir = Path(models_dir)
    gdino_dir, sam_dir = models_dir / "grounding-dino", models_dir / "sams"
    gdino_dir.mkdir(parents=True, exist_ok=True)
    sam_dir.mkdir(parents=True, exist_ok=True)
    bert_dir = gdino_dir / BERT_DIR
    gdino_path, sam_path = gdino_dir / GROUNDING_DINO_FILE, sam_dir / SAM_FILE
    # bert-base-uncased's real vocab.txt is 232 kB, the tiny one 12 kB.
    for path, limit in ((gdino_path, MAX_TINY_FILE_BYTES), (sam_path, MAX_TINY_FILE_BYTES), (bert_dir / "vocab.txt", 100_000)):
        if path.is_file() and path.stat().st_size > limit:
            raise FileExistsError(f"tiny localization files: expected no real model at {path}, got a "
                                  f"{path.stat().st_size} byte file; not overwriting it")
    bert_dir = write_tiny_bert_dir(gdino_dir / BERT_DIR)
    torch.save({"model": grounding_dino_original_state_dict(tiny_grounding_dino(seed))}, gdino_path)
    torch.save(sam_original_state_dict(tiny_sam(seed)), sam_path)
    return {"grounding_dino": gdino_path, "bert_dir": bert_dir, "sam": sam_path}
