"""Fitting a latent (or a mask drawn on it) to another latent size: scale to cover the target
keeping the aspect ratio, centre-crop, nearest-exact sampling.

One policy for every stream of another size than the target's (inverted references, subjects,
scenes) and for the masks drawn on them, so a mask stays on its image. Nearest sampling keeps
every value a value of the source, so a noisy latent keeps its per-pixel noise statistics
(bilinear would average the noise and shrink its variance). No ComfyUI import here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cover_crop(x: torch.Tensor, target_hw: tuple[int, int]) -> torch.Tensor:
    """``x`` [..., h, w] (any leading dims) scaled to cover ``target_hw`` and centre-cropped."""
    h, w = x.shape[-2:]
    height, width = int(target_hw[0]), int(target_hw[1])
    if (h, w) == (height, width):
        return x
    scale = max(height / h, width / w)
    sh, sw = max(height, round(h * scale)), max(width, round(w * scale))
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, h, w)
    up = F.interpolate(flat.float(), size=(sh, sw), mode="nearest-exact").to(x.dtype)
    top, left = (sh - height) // 2, (sw - width) // 2
    return up[..., top:top + height, left:left + width].reshape(*lead, height, width)
