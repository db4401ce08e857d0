"""Tiny model files written into a ComfyUI ``models/`` folder before a test or demo server starts.

Some loaders read files (IP-Adapter weights, localization models, ...) rather than
building models in memory. Each writer takes the server's models directory and writes
its tiny files into the right sub-folder (``models/ipadapter/...``) under the filename a
workflow uses. To add one, import it and append it to ``WRITERS`` (one line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

ModelFileWriter = Callable[[Path], None]

WRITERS: list[ModelFileWriter] = []

from .ipadapter_files import write_ipadapter_files  # noqa: E402

WRITERS.append(write_ipadapter_files)
from .localization_files import write_tiny_localization_files  # noqa: E402
WRITERS.append(write_tiny_localization_files)


def write_all(models_dir: Path) -> list[str]:
    """Call every writer on ``models_dir``; returns the writers' names, in order."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for writer in WRITERS:
        writer(models_dir)
        names.append(getattr(writer, "__qualname__", repr(writer)))
    return names
