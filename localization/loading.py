"""Loading Grounding DINO and SAM from original checkpoints or Hugging Face-format folders, offline.

A *file* in the original layout is converted key by key (`grounding_dino_convert`, `sam_convert`); a
file that sits in a folder with a transformers ``config.json`` (or the folder itself) is loaded with
``from_pretrained(local_files_only=True)``. Grounding DINO also needs bert-base-uncased's ``vocab.txt``
and ``config.json`` (its BERT weights are inside the original checkpoint); `bert_files` says where they
are looked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import grounding_dino_convert as gd
from . import sam_convert
from .bert_files import bert_candidates, bert_config_for, config_model_type, find_bert_dir, searched_places
from .checkpoint_io import SAFE_FILE, CheckpointError, read_state_dict, refused_pickle

logger = logging.getLogger("qkv_control")

GROUNDING_DINO = "a Grounding DINO checkpoint"
SAM = "a Segment Anything (SAM) checkpoint"


@dataclass
class GroundingDinoBundle:
    """A loaded Grounding DINO: transformers model (eval, fp32, CPU until managed) and its BERT tokenizer."""

    model: torch.nn.Module
    tokenizer: object
    source: str


@dataclass
class SamBundle:
    """A loaded SAM: transformers model plus the pixel statistics (0-255 scale) its encoder expects."""

    model: torch.nn.Module
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    source: str


def _describe(state_dict: dict) -> str:
    if gd.is_original_grounding_dino(state_dict):
        return "a Grounding DINO checkpoint"
    if sam_convert.is_original_sam(state_dict):
        return "a SAM checkpoint"
    if any(k.startswith("model.diffusion_model.") for k in state_dict):
        return "a Stable Diffusion checkpoint"
    return f"a state dict with keys like {', '.join(sorted(state_dict)[:3])}"


def hf_folder_for(path: Path, model_type: str) -> Path | None:
    """The Hugging Face-format folder ``path`` is (or sits in), if its config.json names ``model_type``."""
    folder = path if path.is_dir() else path.parent
    return folder if config_model_type(folder) == model_type else None


def _from_pretrained(model_class, folder: Path, what: str, **kwargs) -> torch.nn.Module:
    """``model_class.from_pretrained(folder)`` offline, its failures named: a pickled weights file that holds
    code is refused (transformers reads ``.bin`` files with ``weights_only=True``) with the file's name."""
    try:
        return model_class.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        named = folder / pickles[0] if len(pickles) == 1 else folder / ("{" + ",".join(pickles) + "}")
        raise refused_pickle(named, what, error) from error
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"expected {what} in the Hugging Face-format folder {folder}, got one transformers "
                              f"cannot load offline: {error}. {SAFE_FILE}") from error


def load_bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    # BertTokenizer(vocab_file=...) ignores the file on transformers 5.x; from_pretrained reads the folder.
    try:
        return BertTokenizer.from_pretrained(str(folder), local_files_only=True, do_lower_case=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"expected bert-base-uncased's vocab.txt in {folder}, got one the tokenizer "
                              f"cannot read: {error}") from error


def _without_weight_init():
    """Skip random initialisation of weights the checkpoint overwrites anyway (5.7 s -> 0.8 s for the
    Swin-T Grounding DINO on one CPU thread)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5.x
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4.x
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _build(model_class, config) -> torch.nn.Module:
    with _without_weight_init():
        return model_class(config)


def _load_converted(model: torch.nn.Module, converted: dict, path: Path, what: str) -> None:
    try:
        result = model.load_state_dict(converted, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"expected {what} in {path}, got tensors of other shapes: {error}") from error
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    # Weights transformers itself declares unused (Swin's final norm inside Grounding DINO): give them
    # their default values rather than the uninitialised memory _build leaves.
    for key in result.missing_keys:
        if any(p.search(key) for p in ignored):
            module = model.get_submodule(key.rsplit(".", 1)[0])
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    missing = [k for k in result.missing_keys if not any(p.search(k) for p in ignored)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"expected {what} in {path}, got one that leaves {len(missing)} weights missing "
            f"(e.g. {missing[:3]}) and {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )


def load_grounding_dino(path: str | Path, bert_roots: list[Path] = ()) -> GroundingDinoBundle:
    """Load Grounding DINO from an original ``.pth``/``.safetensors`` or a Hugging Face-format folder.

    The BERT files are looked for next to the checkpoint, then in ``bert_roots`` (see
    `bert_files.bert_candidates`); a Hugging Face-format folder with its own vocab.txt uses that one.
    """
    from transformers import GroundingDinoForObjectDetection

    path = Path(path)
    candidates = bert_candidates(path, list(bert_roots))
    searched = searched_places(path, list(bert_roots))
    folder = hf_folder_for(path, "grounding-dino")
    if folder is not None:
        model = _from_pretrained(GroundingDinoForObjectDetection, folder, GROUNDING_DINO)
        tokenizer = load_bert_tokenizer(find_bert_dir([folder, *candidates], [str(folder), *searched]))
        return GroundingDinoBundle(model.eval().float(), tokenizer, str(folder))

    original = read_state_dict(path, GROUNDING_DINO)
    if not gd.is_original_grounding_dino(original):
        raise CheckpointError(f"expected {GROUNDING_DINO} in {path}, got {_describe(original)}")
    bert_dir = find_bert_dir(candidates, searched)
    config = gd.infer_grounding_dino_config(original, bert_config_for(original, bert_dir))
    converted, unrecognised = gd.convert_grounding_dino_state_dict(original)
    if unrecognised:
        logger.warning("Grounding DINO %s: %d keys not used (e.g. %s)", path.name, len(unrecognised), unrecognised[:3])
    model = _build(GroundingDinoForObjectDetection, config)
    _load_converted(model, converted, path, GROUNDING_DINO)
    tokenizer = load_bert_tokenizer(bert_dir)
    if len(tokenizer) > config.text_config.vocab_size:
        raise CheckpointError(
            f"expected a vocab.txt of at most {config.text_config.vocab_size} tokens (the checkpoint's BERT) "
            f"in {bert_dir}, got {len(tokenizer)}"
        )
    return GroundingDinoBundle(model.eval(), tokenizer, str(path))


def _hf_sam_pixel_statistics(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        data = json.loads(processor.read_text())
        if "image_mean" in data and "image_std" in data:
            return tuple(255.0 * m for m in data["image_mean"]), tuple(255.0 * s for s in data["image_std"])
    return sam_convert.SAM_PIXEL_MEAN, sam_convert.SAM_PIXEL_STD


def load_sam(path: str | Path) -> SamBundle:
    """Load SAM (any ViT size) from an original ``sam_vit_*.pth`` or a Hugging Face-format folder.

    Either way the mask decoder's LayerNorms get the original's eps (`sam_convert.with_original_eps`).
    """
    from transformers import SamConfig, SamModel

    path = Path(path)
    folder = hf_folder_for(path, "sam")
    if folder is not None:
        try:
            config = SamConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"expected {SAM} config.json in {folder}, got one that cannot be read: "
                                  f"{error}") from error
        model = _from_pretrained(SamModel, folder, SAM, config=sam_convert.with_original_eps(config))
        mean, std = _hf_sam_pixel_statistics(folder)
        return SamBundle(model.eval().float(), mean, std, str(folder))

    original = read_state_dict(path, SAM)
    if not sam_convert.is_original_sam(original):
        raise CheckpointError(f"expected {SAM} in {path}, got {_describe(original)}")
    config = sam_convert.infer_sam_config(original)
    converted, unrecognised = sam_convert.convert_sam_state_dict(original)
    if unrecognised:
        logger.warning("SAM %s: %d keys not used (e.g. %s)", path.name, len(unrecognised), unrecognised[:3])
    model = _build(SamModel, config)
    _load_converted(model, converted, path, SAM)
    mean, std = sam_convert.sam_pixel_statistics(original)
    return SamBundle(model.eval(), mean, std, str(path))
