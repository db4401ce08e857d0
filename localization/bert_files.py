"""Where Grounding DINO's BERT files are found, and BERT's config.

The original Grounding DINO checkpoint holds its BERT weights, but not the tokenizer's vocabulary nor
BERT's config (the official configs name ``text_encoder_type = "bert-base-uncased"`` and the library
fetches it from the Hugging Face hub). Offline, a folder with bert-base-uncased's ``vocab.txt`` (and its
``config.json``) is needed; `bert_candidates` lists, in order, where it is looked for:

1. next to the checkpoint: a ``bert-base-uncased/`` folder, a Hugging Face cache
   ``models--bert-base-uncased/snapshots/*/`` (or ``models--google-bert--bert-base-uncased/``), then any
   other folder holding ``vocab.txt`` + a BERT ``config.json``;
2. the same two names in each further folder given (ComfyUI's ``grounding-dino`` folders, then ``models/``).

Pure python: the ComfyUI folders come from `localization.managed`.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import torch

from .checkpoint_io import CheckpointError

BERT_DIR_NAME = "bert-base-uncased"
# Hugging Face cache folders of bert-base-uncased: its old repository name, and google-bert/ (its name since 2024).
HF_CACHE_DIR_NAMES = ("models--bert-base-uncased", "models--google-bert--bert-base-uncased")
BERT_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
              "type_vocab_size")


@lru_cache(maxsize=256)
def _model_type(config: Path, modified: float) -> str | None:
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def config_model_type(folder: Path) -> str | None:
    """``model_type`` of ``folder/config.json`` (None without a readable one)."""
    config = Path(folder) / "config.json"
    return _model_type(config, config.stat().st_mtime) if config.is_file() else None


def is_bert_folder(folder: Path) -> bool:
    """A folder holding BERT itself (not a model that uses it): named bert-base-uncased, a Hugging Face
    cache of it, or a ``config.json`` whose ``model_type`` is ``bert``."""
    folder = Path(folder)
    return folder.name in (BERT_DIR_NAME, *HF_CACHE_DIR_NAMES) or config_model_type(folder) == "bert"


def hf_cache_snapshots(root: Path) -> list[Path]:
    """``root/models--bert-base-uncased/snapshots/*`` (and the google-bert/ cache): per cache the snapshot
    ``refs/main`` names first, then the others."""
    found = []
    for name in HF_CACHE_DIR_NAMES:
        cache = Path(root) / name
        snapshots = sorted(p for p in (cache / "snapshots").glob("*") if p.is_dir())
        ref = cache / "refs" / "main"
        main = ref.read_text().strip() if ref.is_file() else ""
        found += sorted(snapshots, key=lambda p: p.name != main)
    return found


def _named(root: Path) -> list[Path]:
    return [Path(root) / BERT_DIR_NAME, *hf_cache_snapshots(root)]


def bert_candidates(checkpoint: Path, other_roots: list[Path]) -> list[Path]:
    """Folders that may hold the BERT files, in search order (see the module docstring)."""
    near = Path(checkpoint).parent
    siblings = sorted(p for p in near.iterdir() if p.is_dir() and p.name not in (BERT_DIR_NAME, *HF_CACHE_DIR_NAMES)
                      and (p / "vocab.txt").is_file() and config_model_type(p) == "bert") if near.is_dir() else []
    candidates = [*_named(near), *siblings]
    for root in other_roots:
        candidates += _named(root)
    unique: list[Path] = []
    for folder in candidates:
        if folder not in unique:
            unique.append(folder)
    return unique


def find_bert_dir(candidates: list[Path], searched: list[str] | None = None) -> Path:
    """The first candidate holding ``vocab.txt``; else an error listing every place looked."""
    for folder in candidates:
        if (Path(folder) / "vocab.txt").is_file():
            return Path(folder)
    listed = "; ".join(searched or [str(c) for c in candidates]) or "(no folder)"
    raise CheckpointError(
        "expected bert-base-uncased's tokenizer files (vocab.txt and config.json) for Grounding DINO, got none "
        f"offline. Put the bert-base-uncased folder next to the checkpoint. Looked in: {listed}"
    )


def searched_places(checkpoint: Path, other_roots: list[Path]) -> list[str]:
    """The places `bert_candidates` looks, as a user reads them (for the not-found error)."""
    places = []
    for root in [Path(checkpoint).parent, *other_roots]:
        places += [str(root / BERT_DIR_NAME), *(str(root / name / "snapshots" / "*") for name in HF_CACHE_DIR_NAMES)]
        if root == Path(checkpoint).parent:
            places.append(str(root / "*") + " (any folder with vocab.txt and a BERT config.json)")
    return list(dict.fromkeys(places))


def bert_shapes(original: dict[str, torch.Tensor]) -> dict[str, int]:
    """BERT's sizes as the checkpoint's ``bert.`` tensors give them (all but the head count)."""
    words = original["bert.embeddings.word_embeddings.weight"]
    layers = 1 + max(int(m.group(1)) for k in original if (m := re.match(r"bert\.encoder\.layer\.(\d+)\.", k)))
    return dict(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        num_hidden_layers=layers,
        intermediate_size=original["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=original["bert.embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=original["bert.embeddings.token_type_embeddings.weight"].shape[0],
    )


def bert_config_for(original: dict[str, torch.Tensor], bert_dir: Path | None):
    """BERT's config for the checkpoint's BERT weights.

    Read from ``bert_dir/config.json`` when there is one (its sizes must match the weights). Without it,
    only bert-base-uncased (the BERT the official configs name) is known: weights of exactly its sizes get
    its config (transformers' ``BertConfig()`` defaults, 12 heads). Any other BERT's head count cannot be
    read from the weights (the heads share one projection matrix), so its config.json is required.
    """
    from transformers import BertConfig

    shapes = bert_shapes(original)
    json_path = Path(bert_dir) / "config.json" if bert_dir is not None else None
    if json_path is not None and json_path.is_file():
        try:
            config = BertConfig.from_dict(json.loads(json_path.read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise CheckpointError(f"expected BERT's config.json in {json_path}, got one that cannot be read: "
                                  f"{error}") from error
        differing = {k: (getattr(config, k), v) for k, v in shapes.items() if getattr(config, k) != v}
        if differing:
            described = ", ".join(f"{k} {a} (the checkpoint's BERT has {b})" for k, (a, b) in differing.items())
            raise CheckpointError(f"expected a config.json in {bert_dir} for the checkpoint's BERT, got one "
                                  f"for another BERT: {described}")
        return config
    base = BertConfig()
    if all(getattr(base, k) == v for k, v in shapes.items()):
        return base
    sizes = ", ".join(f"{k} {v}" for k, v in shapes.items())
    raise CheckpointError(
        f"expected BERT's config.json next to vocab.txt in {bert_dir}, got none; the checkpoint's BERT is not "
        f"bert-base-uncased ({sizes}), and its head count cannot be read from the weights")
