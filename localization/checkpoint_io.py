"""Reading checkpoint files safely: pickles with ``weights_only=True``, or safetensors.

A wrong or truncated file gives a `CheckpointError` that names the file and what was expected,
never a bare unpickling traceback.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A model file that cannot be read, or does not hold what the loader expects."""


SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from ``path`` onto the CPU.

    ``what`` names the expected content for error messages ("a Grounding DINO checkpoint").
    Pickled files are loaded with ``weights_only=True``: no code from the file runs. A top-level
    ``{"model": state_dict}`` wrapper (the original Grounding DINO release) and a ``module.``
    prefix (DistributedDataParallel saves) are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"expected {what} at {path}, got no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"expected {what} in {path}, got an empty file")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        raw = _read_safetensors(path, what)
    else:
        raw = _read_pickle(path, what)
    return _flatten(raw, path, what)


def _read_safetensors(path: Path, what: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"expected {what} in {path}, got a file safetensors cannot read (wrong or truncated file?): {error}"
        ) from error


def _read_pickle(path: Path, what: str) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise refused_pickle(path, what, error) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as error:
        raise CheckpointError(
            f"expected {what} in {path}, got a file torch cannot read (wrong or truncated file?): {error}"
        ) from error


SAFE_FILE = ("A safe file is a .safetensors file, or a .pth/.bin that holds only a plain state dict "
             "({name: tensor}, as torch.save(model.state_dict()) writes).")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def refused_pickle(path: Path, what: str, error: pickle.UnpicklingError) -> CheckpointError:
    """The error for a pickle ``torch.load(weights_only=True)`` refused, in plain words.

    torch's own message advises re-running with ``weights_only=False``, which would run the file's code:
    that advice is not passed on. A pickle that names a Python global (a class or function it would call
    while loading) holds code; one the safe loader cannot parse at all is not a torch.save file.
    """
    found = _GLOBAL.search(str(error))
    if found:
        return CheckpointError(
            f"expected {what} in {path}, got a file that holds code (loading it would call {found.group(1)}): "
            f"it was refused and nothing in it ran. {SAFE_FILE}")
    return CheckpointError(
        f"expected {what} in {path}, got a file the safe loader cannot read (not a torch.save file: wrong or "
        f"truncated, or a plain Python pickle, which can hold code): it was refused and nothing in it ran. "
        f"{SAFE_FILE}")


def _flatten(raw: object, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], dict):
        raw = raw["model"]
    elif isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"expected {what} in {path}, got {type(raw).__name__} instead of a state dict")
    tensors = {}
    for key, value in raw.items():
        if isinstance(value, torch.Tensor):
            tensors[key.removeprefix("module.")] = value
    if not tensors:
        raise CheckpointError(f"expected {what} in {path}, got a dict with no tensors")
    return tensors


def require_keys(state_dict: dict, keys: list[str], path: str | Path, what: str) -> None:
    """Raise a `CheckpointError` naming the first missing key if ``state_dict`` lacks any of ``keys``."""
    missing = [key for key in keys if key not in state_dict]
    if missing:
        sample = ", ".join(sorted(state_dict)[:3])
        raise CheckpointError(
            f"expected {what} in {path} (with key {missing[0]!r}), got a state dict with other keys (e.g. {sample})"
        )
