"""Self-attention modes that bring an image prompt's keys/values into a generated image's
self-attention (InDetail-IP Sec. 3-4.2, Fig. 7). All take ComfyUI's ``[B, N, heads*dim]``
layout and an ``attend(q, k, v, mask=None)`` (plain attention with the heads bound: ComfyUI's
optimized attention in a running model, ``sdpa.plain_attention`` in tests), so no mode ever
materialises an N x N score matrix.

Notation: G = the generated image (the row's own K/V), P = the image prompt (reference K/V).
"""

from __future__ import annotations

from typing import Optional

import torch

from .sdpa import AttendFn


def reference_tokens(k_ref: torch.Tensor, rows: int) -> torch.Tensor:
    """Reference K or V ``[R, N_ref, D]`` (R reference images) as one token sequence per target
    row, ``[rows, R*N_ref, D]``: every target row attends to every reference image's tokens."""
    flat = k_ref.reshape(1, -1, k_ref.shape[-1])
    return flat.expand(rows, -1, -1)


def kv_replace(q: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor, attend: AttendFn) -> torch.Tensor:
    """KV replacement (Fig. 7b): softmax(Q_G·K_Pᵀ/√d)·V_P, the prompt's keys/values only."""
    return attend(q, k_ref, v_ref)


def kv_concat(q: torch.Tensor, k_self: torch.Tensor, v_self: torch.Tensor, k_ref: torch.Tensor,
              v_ref: torch.Tensor, attend: AttendFn, self_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KV concatenation (eq. 1, Fig. 7c): one softmax over [K_P ⊕ K_G]. Reference tokens come
    first, as in the official code (the order does not change the result).

    ``self_mask``: an additive mask ``[B, 1, N_G]`` over the row's own keys (a diffusion
    transformer's zero-padded text keys at -inf), extended with 0 for the reference keys."""
    k, v = torch.cat([k_ref, k_self], dim=1), torch.cat([v_ref, v_self], dim=1)
    if self_mask is None:
        return attend(q, k, v)
    reference = self_mask.new_zeros(self_mask.shape[:-1] + (k_ref.shape[1],))
    return attend(q, k, v, mask=torch.cat([reference, self_mask], dim=-1))


def stratified_attention(q: torch.Tensor, k_self: torch.Tensor, v_self: torch.Tensor, k_ref: torch.Tensor,
                         v_ref: torch.Tensor, weight_self: float, weight_ref: float, attend: AttendFn,
                         out_self: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Stratified Attention (eq. 3, Fig. 7d): separate softmaxes, weighted sum

        (λG·softmax(Q·K_Gᵀ/√d)·V_G + λP·softmax(Q·K_Pᵀ/√d)·V_P) / (λG + λP)

    The division by λG + λP is the official code's; with the paper's λG + λP = 1 it is eq. 3
    exactly. ``out_self`` is the row's own attention if already computed (it is the
    unpatched self-attention, so a caller that has it passes it instead of recomputing).
    λP = 0 returns the unpatched self-attention exactly.
    """
    total = float(weight_self) + float(weight_ref)
    if total <= 0:
        raise ValueError(f"stratified attention: expected λG + λP > 0, got λG={weight_self}, λP={weight_ref}")
    if out_self is None:
        out_self = attend(q, k_self, v_self)
    if weight_ref == 0:
        return out_self
    out_ref = attend(q, k_ref, v_ref)
    if weight_self == 0:
        return out_ref
    return out_self * (float(weight_self) / total) + out_ref * (float(weight_ref) / total)
