"""Cross-attention modes of the IP-Adapter family, as pure torch.

All tensors use ComfyUI's ``[batch, tokens, heads*dim_head]`` layout. ``attend`` is
``attend(q, k, v, mask=None)`` with the head count bound (see ``sdpa.bind_heads``):
in a running model it is the rest of the attention chain, in tests plain SDPA.

- decoupled_attention: IP-Adapter (Ye et al. 2023, eq. 5),
  ``attn(q, K_t, V_t) + w * attn(q, K_i, V_i)``.
- joint_attention: DEADiff (Qi et al. 2024, Fig. 2b, eq. 1-3), one softmax over the
  concatenated text and image keys/values.
- share_kv: e-commerce condition guidance (Li 2024, §3.2.1), a row's keys/values
  replaced by, or concatenated with, those of the preset condition.
- word_attention_map / mask_guidance: e-commerce mask guidance (§3.2.2).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .sdpa import repeat_tokens, split_heads

AttendFn = Callable[..., torch.Tensor]

KV_SHARE_MODES = ("replace", "concat")


def decoupled_attention(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                        images: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                        attend: AttendFn) -> torch.Tensor:
    """IP-Adapter decoupled cross-attention (Ye et al. 2023, eq. 5):
    ``Z = attn(q, K_t, V_t) + sum_r w_r * attn(q, K_r, V_r)`` over image references
    ``images = [(k_img, v_img, weight), ...]``; references with weight 0 cost nothing."""
    return attend(q, k_text, v_text) + image_attention_sum(q, images, attend)


def image_attention_sum(q: torch.Tensor, images: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                        attend: AttendFn) -> torch.Tensor:
    """The image part of decoupled cross-attention: ``sum_r w_r * attn(q, K_r, V_r)``."""
    out = torch.zeros_like(q[:, :, :images[0][1].shape[-1]]) if images else torch.zeros_like(q)
    for k_img, v_img, weight in images:
        if weight == 0:
            continue
        out = out + weight * attend(q, k_img, v_img)
    return out


def joint_attention(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                    images: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                    attend: AttendFn) -> torch.Tensor:
    """DEADiff joint text-image cross-attention (Qi et al. 2024, eq. 1-3):
    ``softmax(q [K_t; K_i]^T / sqrt(d)) [V_t; V_i]``, one softmax over all tokens.

    DEADiff has no weight; ours enters as a logit bias ``log w`` on the image keys
    (the image tokens' unnormalised attention scaled by ``w``): ``w = 1`` is exactly
    the paper's layer, ``w -> 0`` tends continuously to text-only attention and
    ``w = 0`` is text-only attention exactly. A weight other than 0 and 1 needs a
    float mask; at weight 1 no mask is passed, so the chain below stays unmasked.
    """
    live = [(k, v, w) for k, v, w in images if w != 0]
    if not live:
        return attend(q, k_text, v_text)
    k = torch.cat([k_text] + [k_i for k_i, _, _ in live], dim=1)
    v = torch.cat([v_text] + [v_i for _, v_i, _ in live], dim=1)
    if all(w == 1 for _, _, w in live):
        return attend(q, k, v)
    bias = [torch.zeros(k_text.shape[1], dtype=q.dtype, device=q.device)]
    for k_i, _, w in live:
        if w < 0:
            raise ValueError(f"joint attention: expected a weight >= 0, got {w}")
        bias.append(torch.full((k_i.shape[1],), math.log(w), dtype=q.dtype, device=q.device))
    # [1, 1, Nk] broadcasts over batch, heads and queries.
    mask = torch.cat(bias).view(1, 1, -1)
    return attend(q, k, v, mask=mask)


def share_kv(k: torch.Tensor, v: torch.Tensor, target_rows: Sequence[int],
             source: int | tuple[torch.Tensor, torch.Tensor], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """E-commerce condition guidance (Li 2024, §3.2.1): the keys/values of
    ``target_rows`` (the user-prompt rows) taken from the preset condition's.

    ``source`` is a batch row (the preset condition as a row) or ``(k_src, v_src)``
    (``[1, T, inner]``, the preset condition's keys/values projected directly). When
    ``T`` differs from the batch's token count, both are repeated to their least common
    multiple, exactly as a preset row batched with the others would be (ComfyUI's
    ``cond_cat``; attention over a sequence repeated r times equals attention over it once).

    replace: ``K_target = K_source``, ``V_target = V_source``.
    concat:  ``K_target = [K_source; K_target]`` (one softmax over both, source first
             as in KV-concatenation elsewhere in the pack); other rows get their own
             keys twice, which leaves their attention unchanged, so the batch keeps
             one token count and one attention call.
    """
    if mode not in KV_SHARE_MODES:
        raise ValueError(f"share_kv: expected mode one of {KV_SHARE_MODES}, got '{mode}'")
    if isinstance(source, int):
        k_src, v_src = k[source:source + 1].clone(), v[source:source + 1].clone()
    else:
        k_src, v_src = (t.to(device=k.device, dtype=k.dtype) for t in source)
        if k_src.shape[1] != k.shape[1]:
            tokens = math.lcm(k.shape[1], k_src.shape[1])
            k, v = repeat_tokens(k, tokens), repeat_tokens(v, tokens)
            k_src, v_src = repeat_tokens(k_src, tokens), repeat_tokens(v_src, tokens)
    targets = torch.as_tensor(list(target_rows), dtype=torch.long, device=k.device)
    if mode == "replace":
        k, v = k.clone(), v.clone()
        k[targets] = k_src.expand(len(targets), -1, -1)
        v[targets] = v_src.expand(len(targets), -1, -1)
        return k, v
    k2, v2 = torch.cat([k, k], dim=1), torch.cat([v, v], dim=1)
    n = k.shape[1]
    k2[targets, :n] = k_src.expand(len(targets), -1, -1)
    v2[targets, :n] = v_src.expand(len(targets), -1, -1)
    return k2, v2


def word_attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, tokens: Sequence[int]) -> torch.Tensor:
    """Cross-attention probabilities of the chosen key ``tokens``: ``softmax(q K^T/sqrt(d))``
    over all keys, columns ``tokens`` kept: ``[B, heads, Nq, len(tokens)]``.

    Only an ``Nq x Nk`` cross-attention map (Nk = text tokens, 77 per chunk) is built,
    in float32, never a self-attention matrix."""
    qh = split_heads(q, heads).float()
    kh = split_heads(k, heads).float()
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * (qh.shape[-1] ** -0.5)
    probs = scores.softmax(dim=-1)
    index = torch.as_tensor(list(tokens), dtype=torch.long, device=q.device)
    return probs.index_select(-1, index)


def word_attention_map(q: torch.Tensor, k: torch.Tensor, heads: int, tokens: Sequence[int]) -> torch.Tensor:
    """Cross-attention map of the chosen words, averaged over heads and tokens: ``[B, Nq]``."""
    return word_attention_probs(q, k, heads, tokens).mean(dim=(1, 3))


def normalize_map(attention_map: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of ``[B, N]`` maps to a maximum of 1 (the threshold is relative)."""
    peak = attention_map.amax(dim=-1, keepdim=True)
    return attention_map / (peak + eps)


def threshold_map(attention_map: torch.Tensor, threshold: float) -> torch.Tensor:
    """The e-commerce paper's threshold map: 1 where the max-normalised map reaches
    ``threshold``, else 0 (``[B, N]``, float)."""
    return (normalize_map(attention_map) >= threshold).to(attention_map.dtype)


def mask_guidance(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, tokens: Sequence[int],
                  threshold: float, strength: float, attend: AttendFn,
                  guide_rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """E-commerce mask guidance (Li 2024, §3.2.2): the thresholded cross-attention map of
    the chosen words multiplies their values.

    With ``A = softmax(q K^T / sqrt(d))`` over the text tokens, ``S`` the chosen word
    tokens and ``M_q`` the threshold map (head- and word-averaged ``A[:, S]``,
    max-normalised per image, ``>= threshold``), each query sees the chosen words'
    values scaled by ``1 + strength * M_q``:

        ``Z_q = sum_k A_qk v_k (1 + strength * M_q * [k in S])
              = attn(q, K, V)_q + strength * M_q * sum_{s in S} A_qs v_s``.

    Inside the words' region their values are amplified, outside nothing changes;
    ``strength = 0`` is plain attention. Rows not in ``guide_rows`` (default all) are
    left as ``attend`` returns them.
    """
    out = attend(q, k, v)
    if strength == 0 or not tokens:
        return out
    rows = list(range(q.shape[0])) if guide_rows is None else list(guide_rows)
    if not rows:
        return out
    index = torch.as_tensor(rows, dtype=torch.long, device=q.device)
    qr, kr, vr = q[index], k[index], v[index]
    probs = word_attention_probs(qr, kr, heads, tokens)                   # [R, H, Nq, S]
    gate = threshold_map(probs.mean(dim=(1, 3)), threshold)             # [R, Nq]
    token_index = torch.as_tensor(list(tokens), dtype=torch.long, device=q.device)
    v_words = split_heads(vr.index_select(1, token_index), heads).float()  # [R, H, S, d]
    words_out = torch.matmul(probs, v_words)                            # [R, H, Nq, d]
    words_out = words_out.transpose(1, 2).reshape(qr.shape[0], qr.shape[1], -1)
    extra = (strength * gate.unsqueeze(-1) * words_out).to(out.dtype)
    out = out.clone()
    out[index] = out[index] + extra
    return out
