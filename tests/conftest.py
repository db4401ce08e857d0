"""Test bootstrap: the real ComfyUI tree provisioned by scripts/setup.sh, on CPU with SDPA.

ComfyUI's startup flags must be set before anything imports
``comfy.model_management``, so this runs before any test module is collected.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = Path(os.environ.get("QKV_RUNTIME", ROOT / ".runtime"))


def _comfyui_path() -> Path:
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    marker = RUNTIME / "comfyui_path"
    if not marker.exists():
        raise RuntimeError("ComfyUI runtime missing: run `make test` (it runs scripts/setup.sh first)")
    return Path(marker.read_text().strip())


COMFYUI_PATH = _comfyui_path()
sys.path.insert(0, str(COMFYUI_PATH))
sys.path.insert(0, str(RUNTIME / "import"))

import torch  # noqa: E402

torch.set_num_threads(1)

from comfy.cli_args import args  # noqa: E402

args.cpu = True
args.use_pytorch_cross_attention = True
args.disable_smart_memory = True



@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    return COMFYUI_PATH
