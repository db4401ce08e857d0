"""The spatial grid of a UNet attention layer's tokens.

A UNet layer at resolution level L attends over the latent halved L times, each halving
rounding up (ComfyUI's stride-2 ``Downsample`` with padding 1), so odd latent sizes resolve
too. No ComfyUI import here.
"""

from __future__ import annotations

import math


def token_grid(latent_hw: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    """(h, w) of a layer with ``n_tokens`` tokens in a UNet whose latent is ``latent_hw``."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    while h * w > n_tokens and h > 0 and w > 0:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h == 1 and w == 1:
            break
    if h * w != n_tokens:
        raise ValueError(
            f"token grid: expected a token count of the latent {latent_hw[0]}x{latent_hw[1]} halved per level, "
            f"got {n_tokens} tokens"
        )
    return h, w


def layer_grid(extra_options: dict, n_tokens: int) -> tuple[int, int]:
    """(h, w) of the tokens of one attention call, from ComfyUI's ``extra_options``: the
    transformer's input shape (``activations_shape``) when it matches, else the latent's
    (``original_shape``) halved per level."""
    activations = extra_options.get("activations_shape")
    if activations is not None and len(activations) == 4 and activations[-2] * activations[-1] == n_tokens:
        return int(activations[-2]), int(activations[-1])
    return token_grid(tuple(int(s) for s in extra_options["original_shape"][-2:]), n_tokens)
