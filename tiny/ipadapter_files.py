"""Tiny IP-Adapter files in the released key layouts, for the tiny SD1.5/SDXL models.

Same keys and layout as the real files (``image_proj.*``, ``ip_adapter.N.to_k_ip.weight``
...), widths of the tiny models: context width ``TEXT_WIDTH``, CLIP vision image embeds
``VISION_PROJECTION`` and hidden states ``VISION_WIDTH`` (``tiny/models.py``), one K/V pair
per cross-attention layer of the tiny UNet, numbered in diffusers' order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models import TEXT_WIDTH, VISION_PROJECTION, VISION_WIDTH, unet_config

# filename -> (family, projection kind); the names users have, so workflows use them.
FILES = {
    "ip-adapter_sd15.safetensors": ("sd15", "linear"),
    "ip-adapter_sd15.bin": ("sd15", "linear"),
    "ip-adapter_sd15_light_v11.bin": ("sd15", "linear"),
    "ip-adapter-plus_sd15.safetensors": ("sd15", "resampler"),
    "ip-adapter-plus-face_sd15.safetensors": ("sd15", "resampler"),
    "ip-adapter_sdxl.safetensors": ("sdxl", "linear"),
    "ip-adapter_sdxl_vit-h.safetensors": ("sdxl", "linear"),
    "ip-adapter-plus_sdxl_vit-h.safetensors": ("sdxl", "resampler"),
    "ip-adapter-plus_sdxl_vit-h.bin": ("sdxl", "resampler"),
}

LINEAR_TOKENS = 4
RESAMPLER_QUERIES = 16
RESAMPLER_DEPTH = 4
RESAMPLER_INNER = 64   # one 64-wide head, as the released files' dim_head


def attn2_widths(family: str) -> tuple[int, ...]:
    """Inner widths of the tiny UNet's cross-attention layers in diffusers' order (down
    blocks, up blocks, mid block), read from its config: a transformer's width is its
    block's channel count."""
    config = unet_config(family)
    mc, mult, nrb = config["model_channels"], config["channel_mult"], config["num_res_blocks"]
    # ComfyUI pops output depths from the end of the list (openaimodel.UNetModel).
    depth_in, depth_out = config["transformer_depth"], config["transformer_depth_output"][::-1]
    down, up = [], []
    i = 0
    for level, blocks in enumerate(nrb):
        for _ in range(blocks):
            down += [mc * mult[level]] * depth_in[i]
            i += 1
    i = 0
    for level in reversed(range(len(mult))):
        for _ in range(nrb[level] + 1):
            up += [mc * mult[level]] * depth_out[i]
            i += 1
    middle = [mc * mult[-1]] * config["transformer_depth_middle"]
    return tuple(down + up + middle)


def _weight(generator, rows: int, cols: int) -> torch.Tensor:
    return torch.randn((rows, cols), generator=generator) / cols ** 0.5


def image_proj_state(kind: str, generator: torch.Generator, cross_dim: int = TEXT_WIDTH) -> dict:
    if kind == "linear":
        return {
            "proj.weight": _weight(generator, LINEAR_TOKENS * cross_dim, VISION_PROJECTION),
            "proj.bias": torch.zeros(LINEAR_TOKENS * cross_dim),
            "norm.weight": torch.ones(cross_dim),
            "norm.bias": torch.zeros(cross_dim),
        }
    dim = cross_dim
    state = {
        "latents": torch.randn((1, RESAMPLER_QUERIES, dim), generator=generator) / dim ** 0.5,
        "proj_in.weight": _weight(generator, dim, VISION_WIDTH),
        "proj_in.bias": torch.zeros(dim),
        "proj_out.weight": _weight(generator, cross_dim, dim),
        "proj_out.bias": torch.zeros(cross_dim),
        "norm_out.weight": torch.ones(cross_dim),
        "norm_out.bias": torch.zeros(cross_dim),
    }
    for i in range(RESAMPLER_DEPTH):
        p = f"layers.{i}."
        state.update({
            p + "0.norm1.weight": torch.ones(dim), p + "0.norm1.bias": torch.zeros(dim),
            p + "0.norm2.weight": torch.ones(dim), p + "0.norm2.bias": torch.zeros(dim),
            p + "0.to_q.weight": _weight(generator, RESAMPLER_INNER, dim),
            p + "0.to_kv.weight": _weight(generator, 2 * RESAMPLER_INNER, dim),
            p + "0.to_out.weight": _weight(generator, dim, RESAMPLER_INNER),
            p + "1.0.weight": torch.ones(dim), p + "1.0.bias": torch.zeros(dim),
            p + "1.1.weight": _weight(generator, 4 * dim, dim),
            p + "1.3.weight": _weight(generator, dim, 4 * dim),
        })
    return state


def adapter_state(family: str, kind: str, seed: int = 0, widths: tuple[int, ...] | None = None,
                  cross_dim: int = TEXT_WIDTH) -> dict:
    """The nested state ``{"image_proj": ..., "ip_adapter": ...}`` of a tiny file."""
    generator = torch.Generator().manual_seed(seed)
    widths = attn2_widths(family) if widths is None else widths
    ip_adapter = {}
    for i, width in enumerate(widths):
        ip_adapter[f"{2 * i + 1}.to_k_ip.weight"] = _weight(generator, width, cross_dim)
        ip_adapter[f"{2 * i + 1}.to_v_ip.weight"] = _weight(generator, width, cross_dim)
    return {"image_proj": image_proj_state(kind, generator, cross_dim), "ip_adapter": ip_adapter}


def save(state: dict, path: Path) -> None:
    """Write ``state`` as the released files are: flat keys in .safetensors, nested in .bin."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        import safetensors.torch

        flat = {f"{group}.{key}": value.contiguous() for group, values in state.items() for key, value in values.items()}
        safetensors.torch.save_file(flat, str(path))


def write_ipadapter_files(models_dir: Path) -> None:
    """Writer for ``tiny.model_files.WRITERS``: every tiny file into ``<models_dir>/ipadapter``."""
    folder = Path(models_dir) / "ipadapter"
    for seed, (name, (family, kind)) in enumerate(FILES.items()):
        save(adapter_state(family, kind, seed=seed), folder / name)
