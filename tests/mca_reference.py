"""The official MCA-Ctrl layer, written from its conventions as a test reference.

yanghan-yh/MCA-Ctrl ``masactrl_p2p.py``: each masked attention is ``softmax(q k^T * scale +
bias) v`` with a full score matrix and an additive mask (the mask value on kept keys,
``finfo.min`` elsewhere); masks are sampled to each layer by ``F.interpolate`` (nearest); the
target's output is ``m · F_subject + (1 - m) · F_background``. Only tests build these score
matrices; the pack gathers keys or passes 0/-inf masks to ComfyUI's attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN = torch.finfo(torch.float32).min


def masked_attention(q, k, v, bias, heads):
    """``softmax(q k^T / sqrt(d) + bias) v`` per head; q, k, v [1, N, C], bias [Nk]."""
    n, c = q.shape[1], q.shape[2]
    d = c // heads
    qh, kh, vh = (t.float().reshape(1, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    sim = qh @ kh.transpose(-1, -2) * d ** -0.5 + bias.float().view(1, 1, 1, -1)
    return (sim.softmax(-1) @ vh).transpose(1, 2).reshape(1, n, c)


def subject_bias(m_s):
    """Official subject keys: kept where the mask is non-zero (adding the mask value)."""
    return m_s.masked_fill(m_s == 0, MIN)


def background_bias(m_t):
    """Official background keys: kept where the target mask is not 1 (adding its value)."""
    return m_t.masked_fill(m_t == 1, MIN)


def nearest(mask_pixels, grid):
    """A [1, H, W] pixel mask sampled to ``grid`` as the official code does: [h*w]."""
    return F.interpolate(mask_pixels.float()[None], size=tuple(grid)).flatten()


def official_target_output(phase, q, k, v, t, s, c, m_s, m_t, heads):
    """The official output of target row ``t`` with subject row ``s`` and condition row ``c``
    (the scene row; in generation ``t`` itself). SALQ: the target's queries; SAGI: each
    stream's own queries (``attn_batch2``)."""
    q_fg, q_bg = (q[t:t + 1], q[t:t + 1]) if phase == "salq" else (q[s:s + 1], q[c:c + 1])
    fg = masked_attention(q_fg, k[s:s + 1], v[s:s + 1], subject_bias(m_s), heads)
    bg = masked_attention(q_bg, k[c:c + 1], v[c:c + 1], background_bias(m_t), heads)
    m = m_t.view(1, -1, 1)
    return m * fg + (1 - m) * bg


def automatic_mask(maps, map_grid, grid, fraction=0.3):
    """The official automatic mask from the list of a row's word maps so far ([N16] each):
    their mean, min-max normalised, nearest to ``grid``, top ``int(N * fraction)`` set to 1."""
    mean = torch.stack(maps).mean(0)
    norm = (mean - mean.min()) / (mean.max() - mean.min())
    resized = F.interpolate(norm.view(1, 1, *map_grid), size=tuple(grid)).flatten()
    out = resized.clone()
    out[torch.topk(resized, int(resized.numel() * fraction), sorted=False).indices] = 1
    return out
