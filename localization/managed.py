"""ComfyUI glue for the localization models: model folders, model management, progress, interrupt.

Models folders (registered with ``folder_paths``): ``models/grounding-dino`` (``grounding-dino``) and
``models/sams`` (``sams``), the names other ComfyUI localization packs use, so files users already have
are found. Grounding DINO's BERT files are looked for next to the checkpoint, then in every
``grounding-dino`` folder and in ``models/`` (`localization.bert_files`); files of a BERT folder are not
offered in the Grounding DINO dropdown.

Each loaded model sits in a `ManagedLocalizationModel`: a ``comfy.model_patcher.ModelPatcher`` around it
lets ``comfy.model_management.load_models_gpu`` move it to the compute device when it is used and
offload it when memory is needed elsewhere, like any ComfyUI model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths

from . import bert_files, loading, pipeline

GROUNDING_DINO_FOLDER = "grounding-dino"
SAM_FOLDER = "sams"
MODEL_EXTENSIONS = {".pth", ".pt", ".safetensors", ".bin", ".sft"}


def register_model_folders() -> None:
    """Add ``grounding-dino`` and ``sams`` to ``folder_paths`` (keeping paths another pack or
    extra_model_paths.yaml already added)."""
    for name in (GROUNDING_DINO_FOLDER, SAM_FOLDER):
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, extensions = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            folder_paths.folder_names_and_paths[name] = (paths, set(extensions) | MODEL_EXTENSIONS)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(MODEL_EXTENSIONS))


def _inside_bert_folder(name: str, folder: str) -> bool:
    """Whether the listed file ``name`` (relative to one of ``folder``'s paths) sits in a BERT folder."""
    full = folder_paths.get_full_path(folder, name)
    if full is None:
        return False
    parts = Path(name.replace("\\", "/")).parts
    root = Path(full).parents[len(parts) - 1]
    return any(bert_files.is_bert_folder(root.joinpath(*parts[:k])) for k in range(1, len(parts)))


def model_choices(folder: str) -> list[str]:
    """Model files of ``folder``, without the files of BERT folders (bert-base-uncased's own weights)."""
    return [n for n in folder_paths.get_filename_list(folder) if not _inside_bert_folder(n, folder)]


def bert_search_roots() -> list[Path]:
    """Folders searched for the BERT files after the checkpoint's own: every grounding-dino folder, models/."""
    roots = [Path(p) for p in folder_paths.get_folder_paths(GROUNDING_DINO_FOLDER)]
    return roots + [Path(folder_paths.models_dir)]


class _DeviceHolder(torch.nn.Module):
    """ModelPatcher writes ``model.device``, a read-only property on transformers models: hold the
    transformers model one level down."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.device = None


@dataclass
class ManagedLocalizationModel:
    """A loaded Grounding DINO or SAM bundle and the ModelPatcher that manages its device."""

    bundle: loading.GroundingDinoBundle | loading.SamBundle
    patcher: comfy.model_patcher.ModelPatcher

    @property
    def net(self) -> torch.nn.Module:
        return self.bundle.model


def manage(bundle) -> ManagedLocalizationModel:
    holder = _DeviceHolder(bundle.model)
    patcher = comfy.model_patcher.ModelPatcher(
        holder,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    return ManagedLocalizationModel(bundle, patcher)


def load_grounding_dino_file(name: str) -> ManagedLocalizationModel:
    path = folder_paths.get_full_path_or_raise(GROUNDING_DINO_FOLDER, name)
    return manage(loading.load_grounding_dino(path, bert_search_roots()))


def load_sam_file(name: str) -> ManagedLocalizationModel:
    path = folder_paths.get_full_path_or_raise(SAM_FOLDER, name)
    return manage(loading.load_sam(path))


def _batch_hooks(images: torch.Tensor) -> pipeline.Hooks:
    """An interrupt check before each image and a progress bar over the batch."""
    progress = comfy.utils.ProgressBar(images.shape[0])
    return pipeline.Hooks(before_image=lambda i: comfy.model_management.throw_exception_if_processing_interrupted(),
                          after_image=lambda i: progress.update(1))


def segment_with_text(gdino: ManagedLocalizationModel, sam: ManagedLocalizationModel, images: torch.Tensor,
                      prompt: str, **options) -> pipeline.LocalizationResult:
    """`pipeline.text_to_masks` with both models loaded by ComfyUI's model management."""
    comfy.model_management.load_models_gpu([gdino.patcher, sam.patcher])
    return pipeline.text_to_masks(gdino.bundle, sam.bundle, images, prompt, hooks=_batch_hooks(images), **options)


def segment_with_prompts(sam: ManagedLocalizationModel, images: torch.Tensor, positive, negative, boxes,
                         **options) -> pipeline.LocalizationResult:
    """`pipeline.prompts_to_masks` with SAM loaded by ComfyUI's model management."""
    comfy.model_management.load_models_gpu([sam.patcher])
    return pipeline.prompts_to_masks(sam.bundle, images, positive, negative, boxes, hooks=_batch_hooks(images),
                                     **options)
