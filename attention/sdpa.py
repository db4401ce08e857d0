"""Plain scaled-dot-product attention on ComfyUI's ``[batch, tokens, heads*dim]`` layout.

This is the reference every mode is built from and compared against. In a
running model the patching layer passes ComfyUI's optimized attention (or
another pack's replace patch) instead, with the same signature.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

# attend(q, k, v, mask=None) -> out, all [B, N, heads*dim_head]; the head
# count is bound by whoever builds it.
AttendFn = Callable[..., torch.Tensor]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def plain_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q·kᵀ/√d + mask)·v per head. ``mask`` is additive (0 / -inf), broadcastable
    to ``[B, heads, Nq, Nk]`` or given as ``[B, Nq, Nk]``."""
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(
        split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), attn_mask=mask
    )
    return merge_heads(out)


def repeat_tokens(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """A key/value sequence ``[B, N, D]`` repeated to ``tokens`` tokens: attention over a
    sequence repeated r times equals attention over it once (ComfyUI's ``cond_cat`` relies on
    this to batch contexts of different lengths)."""
    n = x.shape[1]
    if tokens % n:
        raise ValueError(f"repeat_tokens: expected a token count that is a multiple of {n}, got {tokens}")
    return x.repeat(1, tokens // n, 1)


def bind_heads(attention: Callable[..., torch.Tensor], heads: int) -> AttendFn:
    """Turn ``attention(q, k, v, heads, mask=None)`` into ``attend(q, k, v, mask=None)``."""

    def attend(q, k, v, mask=None):
        return attention(q, k, v, heads, mask=mask)

    return attend
