"""Shared by scripts/demo.py and scripts/serve.py: find the pack, ComfyUI and the accelerator."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The pack is imported as ``qkv_control`` (scripts/setup.sh links it into .runtime/import).
sys.path.insert(0, str(ROOT / ".runtime" / "import"))
sys.path.insert(1, str(ROOT))

from client.server import PACK_ROOT, comfyui_path  # noqa: E402


def has_accelerator() -> bool:
    """A CUDA/ROCm/MPS device torch can use: then ComfyUI runs without --cpu."""
    try:
        import torch
    except ImportError:
        return False
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def pack_links(custom_nodes: Path) -> list[Path]:
    """Entries of a custom_nodes folder that resolve to this pack (more than one loads it twice)."""
    if not custom_nodes.is_dir():
        return []
    return sorted(p for p in custom_nodes.iterdir() if p.resolve() == PACK_ROOT)


def import_comfy_for_tiny_models(cpu: bool = True) -> None:
    """Make ComfyUI importable in this process (tiny model file writers build models with it)."""
    comfy = comfyui_path()
    if str(comfy) not in sys.path:
        sys.path.insert(0, str(comfy))
    from comfy.cli_args import args

    args.cpu = cpu
    args.use_pytorch_cross_attention = True
