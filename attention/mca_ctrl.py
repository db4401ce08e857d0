"""MCA-Ctrl attention math: SALQ, SAGI, their masks and their step schedule.

Paper: "Multi-party Collaborative Attention Control for Image Customization"
(``papers/mca-ctrl.txt``); official code: yanghan-yh/MCA-Ctrl, ``masactrl_p2p.py``
(``McaControlReplace`` / ``McaControlGeneration``). Three streams share one batch: the
subject stream (inverted subject image), the condition (the inverted scene; for subject
generation the target itself, as in the official code) and the target (the image being
sampled). Everything here is pure torch on ComfyUI's ``[batch, tokens, heads*dim_head]``
layout; the glue that finds the rows is in ``mca_ctrl/control.py``.

Masks (all in ``[0, 1]``):

- ``subject`` (the paper's M_S): 1 on the subject's foreground in the subject image.
- ``region`` (the paper's 1 - M_C): 1 where the subject goes in the target. The
  condition's background is where ``region < 1``.

One threshold: a drawn MASK is binarised once, a pixel belonging to it when its value is
at least ``MASK_THRESHOLD`` (0.5), so a white mask that loads as 0.996 is a full mask and
an anti-aliased edge splits at the middle grey. Every later step (resizing, key sets,
fusion weights, "empty" and "full") reads that binary mask, so they cannot disagree. Only
the automatic target mask of generation is soft (its official form).

Key sets and fusion, as the official code (additive 0 / ``finfo.min`` masks there; here
gathered keys or 0 / -inf float masks, never score matrices):

- subject keys: tokens where the subject mask is > 0;
- background keys: tokens where the region is < 1, their logits raised by the region
  value (the official code adds the mask itself: 0 for a binary mask, the soft value for
  the automatic one);
- fusion: ``F = region · F_subject + (1 - region) · F_background``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .cover_crop import cover_crop
from .sdpa import AttendFn
from .step_window import StepWindow
from .token_grid import token_grid

PHASE_NONE = "none"
PHASE_SAGI = "sagi"
PHASE_SALQ = "salq"

ORDER_SAGI_FIRST = "sagi_first"
ORDER_SALQ_FIRST = "salq_first"
ORDERS = (ORDER_SAGI_FIRST, ORDER_SALQ_FIRST)

# A pixel of a drawn mask belongs to it when its value reaches this (the one threshold).
MASK_THRESHOLD = 0.5


# ---------------------------------------------------------------------------
# Masks


def as_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK ([H, W] or [B, H, W]) as float [B, 1, H, W]."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mask.float()
    if mask.ndim != 3:
        raise ValueError(f"MCA-Ctrl: expected a MASK of shape [H, W] or [B, H, W], got {tuple(mask.shape)}")
    return mask.float().unsqueeze(1)


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """A drawn MASK as {0, 1} floats [B, 1, H, W]: 1 where the value is >= ``MASK_THRESHOLD``."""
    return (as_mask_batch(mask) >= MASK_THRESHOLD).float()


def coverage(mask: torch.Tensor) -> str:
    """"empty", "full" or "partial": what the binarised ``mask`` covers of its image."""
    m = binarize(mask)
    if not bool(m.any()):
        return "empty"
    return "full" if bool(m.all()) else "partial"


def resize_nearest(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, 1, H, W] (or [H, W], [B, H, W]) to ``grid`` by nearest sampling (``F.interpolate``'s
    default mode, the official code's resizing of its masks to every layer): [B, h*w]."""
    m = as_mask_batch(mask)
    if tuple(m.shape[-2:]) != tuple(grid):
        m = F.interpolate(m, size=tuple(int(s) for s in grid), mode="nearest")
    return m.flatten(1)


def fit_mask(mask: torch.Tensor, source_hw: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    """A drawn MASK on an image whose latent is ``source_hw``, on a ``target_hw`` latent:
    binarised, nearest-resized to the source latent, then cover-cropped like the source's
    stream (``attention.cover_crop``). Binary [B, 1, h, w].

    For a mask on the target's own image, nearest to the latent and then nearest to a layer
    grid (a power-of-two fraction of it) samples the same pixels as nearest from the pixels
    to that grid, which is what the official code does."""
    m = binarize(mask)
    if tuple(m.shape[-2:]) != tuple(source_hw):
        m = F.interpolate(m, size=tuple(int(s) for s in source_hw), mode="nearest")
    return cover_crop(m, tuple(target_hw))


def dilate(mask_tokens: torch.Tensor, grid: tuple[int, int], kernel: int) -> torch.Tensor:
    """Grey-level dilation (max filter) of [B, h*w] tokens with a ``kernel`` x ``kernel`` window.

    The paper's Subject Localization Module dilates with 3x3 to leave transition space
    around the subject; the official code dilates nothing. ``kernel`` <= 1 is a no-op.
    """
    if kernel <= 1:
        return mask_tokens
    b = mask_tokens.shape[0]
    m = mask_tokens.view(b, 1, grid[0], grid[1])
    # Even kernels are padded asymmetrically so the output keeps the grid size.
    left = (kernel - 1) // 2
    right = kernel - 1 - left
    m = F.pad(m, (left, right, left, right), value=0.0)
    return F.max_pool2d(m, kernel, stride=1).flatten(1)


@dataclass(frozen=True)
class LayerMasks:
    """The masks of one layer resolution, as token vectors.

    subject_keys: bool [1, N]    subject tokens SALQ and SAGI attend (subject mask > 0)
    region:       float [Bt, N]  target region weight (1 - M_C), per target row or shared (Bt = 1)
    """

    subject_keys: torch.Tensor
    region: torch.Tensor

    @property
    def background_keys(self) -> torch.Tensor:
        """bool [Bt, N]: background tokens (the paper's M_C): region < 1."""
        return self.region < 1.0


def layer_masks(subject_mask: torch.Tensor, region_mask: torch.Tensor, latent_hw: tuple[int, int],
                n_tokens: int, dilation: int = 1, region_dilation: int = 1,
                grid: Optional[tuple[int, int]] = None) -> LayerMasks:
    """Latent-size masks ([B, 1, h, w]: binary subject, binary or soft region) at one layer's
    token grid (``grid``, a diffusion transformer's patch grid; by default the UNet level of
    ``n_tokens`` tokens): nearest-resized, then dilated.

    A subject that nearest sampling misses at a coarse grid (smaller than one token there)
    keeps the tokens it touches (max pooling), so the subject branch always has keys; the
    official code would attend all subject tokens uniformly there (every logit at finfo.min).
    """
    grid = token_grid(latent_hw, n_tokens) if grid is None else tuple(grid)
    subject = resize_nearest(subject_mask, grid)
    if subject.shape[0] != 1:
        raise ValueError(f"MCA-Ctrl: expected one subject mask, got a batch of {subject.shape[0]}")
    if not bool(subject.any()):
        subject = F.adaptive_max_pool2d(as_mask_batch(subject_mask), grid).flatten(1)
    subject = dilate(subject, grid, dilation)
    region = dilate(resize_nearest(region_mask, grid), grid, region_dilation)
    return LayerMasks(subject_keys=subject > 0, region=region)


# ---------------------------------------------------------------------------
# Masked-key attention, SALQ and SAGI


def masked_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                         attend: AttendFn, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(q K^T / sqrt(d) + b) V`` over the keys ``keep`` (bool [1 or B, Nk]) only, with
    an optional logit ``bias`` [1 or B, Nk] on them (the official code's additive mask).

    q: [B, Nq, C]; k, v: [1 or B, Nk, C]. A key set and bias shared by every row ([1, Nk]) is
    gathered (fewer keys; a mask only for a non-zero bias); per-row sets become an additive
    float mask [B, 1, Nk] (0 or the bias on kept keys, -inf elsewhere), which every ComfyUI
    attention backend applies. A row without any kept key attends to all keys instead: the
    callers give such a row a zero fusion weight, and a finite value times 0 stays 0.
    """
    rows = q.shape[0]
    if bias is not None and not bool((bias.to(q.device) * keep).ne(0).any()):
        bias = None  # a binary mask adds 0 to every kept key
    shared = keep.shape[0] == 1 and (bias is None or bias.shape[0] == 1)
    if shared:
        index = keep[0].nonzero().squeeze(1)
        k_sel, v_sel = k.index_select(1, index), v.index_select(1, index)
        if k_sel.shape[0] != rows:
            k_sel, v_sel = k_sel.expand(rows, -1, -1), v_sel.expand(rows, -1, -1)
        if bias is None:
            return attend(q, k_sel, v_sel)
        return attend(q, k_sel, v_sel, mask=bias[:, index].to(q.dtype).unsqueeze(1))
    keep = keep.expand(rows, -1) if keep.shape[0] != rows else keep
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
    if bias is not None:
        mask = mask + bias.to(device=q.device, dtype=q.dtype).expand(rows, -1)
    mask = mask.masked_fill(~keep, float("-inf"))
    if k.shape[0] != rows:
        k, v = k.expand(rows, -1, -1), v.expand(rows, -1, -1)
    return attend(q, k, v, mask=mask.unsqueeze(1))


@dataclass(frozen=True)
class ContextKeys:
    """Keys every query of a masked attention attends besides the masked image keys: on a
    diffusion transformer the querying row's own text (and reference-latent) tokens, so that
    SALQ / SAGI keep the text conditioning a UNet keeps in its cross-attention.

    k, v: [B, T, C], one row per query row; keep: bool [B, T] (False: a zero-padded text
    token), or None when every token is kept."""

    k: torch.Tensor
    v: torch.Tensor
    keep: Optional[torch.Tensor] = None


def _with_context(k, v, keep, bias, context: Optional[ContextKeys]):
    """``(k, v, keep, bias)`` with ``context``'s keys in front (kept, no bias); unchanged without."""
    if context is None:
        return k, v, keep, bias
    rows, tokens = context.k.shape[0], context.k.shape[1]
    k, v = (t.expand(rows, -1, -1) if t.shape[0] != rows else t for t in (k, v))
    kept = context.keep if context.keep is not None else torch.ones((rows, tokens), dtype=torch.bool,
                                                                     device=keep.device)
    keep = torch.cat([kept.to(keep.device), keep.expand(rows, -1)], dim=-1)
    if bias is not None:
        bias = torch.cat([bias.new_zeros((rows, tokens)), bias.expand(rows, -1)], dim=-1)
    return torch.cat([context.k, k], dim=1), torch.cat([context.v, v], dim=1), keep, bias


def _check_rows(region: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    if region.shape[0] not in (1, rows):
        raise ValueError(f"MCA-Ctrl {what}: expected a region mask for 1 or {rows} rows, got {region.shape[0]}")
    return region


def _check_subject_keys(subject_keys: torch.Tensor, what: str) -> None:
    if not bool(subject_keys.any()):
        raise ValueError(f"MCA-Ctrl {what}: expected a non-empty subject mask (the subject's foreground) at "
                         f"this layer's resolution, got an empty one")


def fuse(region: torch.Tensor, subject_part, background_part) -> torch.Tensor:
    """``region · F_subject + (1 - region) · F_background`` (the paper's fusion, both SALQ and
    SAGI). Each part is a function of the query tokens it must compute (a token index, or None
    for every token) and runs only for the tokens whose weight is non-zero in some row: with a
    binary region (a drawn mask) each query computes one branch instead of both, the same
    result as the official code's two full attentions blended (the other branch's weight is 0
    there, and a finite value times 0 adds nothing). region: [1 or B, N]; parts: [B, n, C]."""
    out = None
    for weight, part in ((region, subject_part), (1.0 - region, background_part)):
        needed = (weight > 0).any(dim=0)
        count = int(needed.sum())  # one device sync per branch
        if count == 0:
            continue
        if count == needed.numel():
            values = weight.unsqueeze(-1) * part(None)
            out = values if out is None else out + values
            continue
        index = needed.nonzero().squeeze(1)
        values = weight.index_select(1, index).unsqueeze(-1) * part(index)
        if out is None:
            out = values.new_zeros((values.shape[0], weight.shape[1], values.shape[-1]))
        out.index_add_(1, index, values)
    return out


def salq(q: torch.Tensor,
         k_subject: torch.Tensor, v_subject: torch.Tensor,
         k_condition: torch.Tensor, v_condition: torch.Tensor,
         subject_keys: torch.Tensor, region: torch.Tensor,
         attend: AttendFn, context: Optional[ContextKeys] = None) -> torch.Tensor:
    """Self-Attention Local Query (paper, SALQ; official ``attn_batch(..., is_mask_attn=True)``):

        F_TS = Attn(Q_T, K_S[M_S], V_S[M_S])           subject foreground keys only
        F_TC = Attn(Q_T, K_C[M_C], V_C[M_C])           condition background keys only
        F*_T = M_C · F_TC + (1 - M_C) · F_TS            with M_C = 1 - region

    q:              [B, Nq, C] target queries
    k_/v_subject:   [1 or B, Nk, C] each target row's subject keys/values
    k_/v_condition: [1 or B, Nk, C] each target row's condition keys/values (the scene; in
                    generation the target row's own)
    subject_keys:   bool [1, Nk]; region: float [1 or B, N] in [0, 1]
    attend:         attend(q, k, v, mask=None)
    context:        a DiT target row's own text keys, attended by both branches (``ContextKeys``)
    """
    return _masked_fusion(q, q, k_subject, v_subject, k_condition, v_condition, subject_keys, region, attend,
                          "SALQ", context, context)


def sagi(q_subject: torch.Tensor, k_subject: torch.Tensor, v_subject: torch.Tensor,
         q_condition: torch.Tensor, k_condition: torch.Tensor, v_condition: torch.Tensor,
         subject_keys: torch.Tensor, region: torch.Tensor, attend: AttendFn,
         context_subject: Optional[ContextKeys] = None,
         context_condition: Optional[ContextKeys] = None) -> torch.Tensor:
    """Self-Attention Global Injection, the official form (``attn_batch2``): the target's
    output is the streams' own masked self-attention, the target's q/k/v unused:

        F^I_S = Attn(Q_S, K_S[M_S], V_S[M_S])          the subject's attention over its foreground
        F^I_C = Attn(Q_C, K_C[M_C], V_C[M_C])          the condition's attention over its background
        F*_T  = M_C · F^I_C + (1 - M_C) · F^I_S

    The paper writes ``F^I_S = M_S ⊙ F_S`` (all-key outputs multiplied by the masks); the
    official code restricts the keys instead, which is what runs here (docs/mca_ctrl.md).
    Every tensor has one row per target row ([B, N, C]; the subject and condition rows
    that target row uses, repeated as needed); region: [1 or B, N]. On a DiT each stream's
    queries also attend its own text keys (``context_subject`` / ``context_condition``).
    """
    return _masked_fusion(q_subject, q_condition, k_subject, v_subject, k_condition, v_condition, subject_keys,
                          region, attend, "SAGI", context_subject, context_condition)


def _masked_fusion(q_fg, q_bg, k_subject, v_subject, k_condition, v_condition, subject_keys, region, attend,
                   what: str, context_fg: Optional[ContextKeys] = None,
                   context_bg: Optional[ContextKeys] = None) -> torch.Tensor:
    """``region · Attn(q_fg, K_S[M_S]) + (1 - region) · Attn(q_bg, K_C[M_C], bias region)``: SALQ
    with the target's queries on both sides, SAGI with each stream's own; each key set with the
    querying rows' ``ContextKeys`` in front (DiTs)."""
    region = _check_rows(region.to(q_fg), q_fg.shape[0], what)

    def queries(q, index):
        return q if index is None else q.index_select(1, index)

    def subject_part(index):
        _check_subject_keys(subject_keys, what)
        k, v, keep, _ = _with_context(k_subject, v_subject, subject_keys, None, context_fg)
        return masked_key_attention(queries(q_fg, index), k, v, keep, attend)

    def background_part(index):
        k, v, keep, bias = _with_context(k_condition, v_condition, region < 1.0, region, context_bg)
        return masked_key_attention(queries(q_bg, index), k, v, keep, attend, bias=bias)

    return fuse(region, subject_part, background_part)


# ---------------------------------------------------------------------------
# Schedule


@dataclass(frozen=True)
class PhaseSchedule:
    """Which sampling steps run SAGI and which SALQ (paper: SAGI early, SALQ after,
    never overlapping; the reversed order is the paper's ablation), as step windows
    (``attention.step_window``: fractions of the run's steps, step i of N in ``a-b`` when
    a <= i/N < b).

    sagi_fraction: share of the steps SAGI runs (official code: first 10%).
    salq_end:      fraction of the steps where SALQ stops (1.0 = to the end).
    order:         ``sagi_first`` (SAGI [0, p), SALQ [p, e)) or ``salq_first``
                   (SALQ [0, e - p), SAGI [e - p, e)): the same durations, swapped.
    """

    sagi_fraction: float = 0.1
    salq_end: float = 1.0
    order: str = ORDER_SAGI_FIRST

    def __post_init__(self):
        if not 0.0 <= self.sagi_fraction <= 1.0:
            raise ValueError(f"MCA-Ctrl: expected sagi_fraction in [0, 1], got {self.sagi_fraction}")
        if not 0.0 <= self.salq_end <= 1.0:
            raise ValueError(f"MCA-Ctrl: expected salq_end in [0, 1], got {self.salq_end}")
        if self.sagi_fraction > self.salq_end:
            raise ValueError(
                f"MCA-Ctrl: expected sagi_fraction <= salq_end (SAGI and SALQ share the window), "
                f"got {self.sagi_fraction} > {self.salq_end}"
            )
        if self.order not in ORDERS:
            raise ValueError(f"MCA-Ctrl: expected order in {ORDERS}, got '{self.order}'")

    def windows(self) -> dict[str, StepWindow]:
        """The step window of each phase."""
        p, e = self.sagi_fraction, self.salq_end
        if self.order == ORDER_SAGI_FIRST:
            return {PHASE_SAGI: StepWindow(0.0, p), PHASE_SALQ: StepWindow(p, e)}
        return {PHASE_SALQ: StepWindow(0.0, e - p), PHASE_SAGI: StepWindow(e - p, e)}

    def phase(self, step: int, steps: int) -> str:
        for name, window in self.windows().items():
            if window.contains(step, steps):
                return name
        return PHASE_NONE


# ---------------------------------------------------------------------------
# Automatic target mask (subject generation)


def normalise_min_max(word_map: torch.Tensor) -> torch.Tensor:
    """Each row of [B, N] scaled to [0, 1] by its minimum and maximum (official
    ``aggregate_cross_attn_map``); a constant row becomes 0."""
    low = word_map.amin(dim=-1, keepdim=True)
    span = word_map.amax(dim=-1, keepdim=True) - low
    return torch.where(span > 0, (word_map - low) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(word_map))


def automatic_region(word_map: torch.Tensor, map_grid: tuple[int, int], grid: tuple[int, int],
                     fraction: float = 0.3) -> torch.Tensor:
    """The official automatic target mask at one layer's ``grid``: the subject word's
    accumulated cross-attention map ``word_map`` [B, h*w] (at ``map_grid``), min-max
    normalised, nearest-resized to the layer, and its ``int(N * fraction)`` highest tokens set
    to 1; the other tokens keep their normalised value (a soft mask). [B, N]."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"MCA-Ctrl: expected a top fraction in (0, 1], got {fraction}")
    m = normalise_min_max(word_map.float()).view(-1, 1, *map_grid)
    m = resize_nearest(m, grid)
    count = int(m.shape[-1] * fraction)
    out = m.clone()
    for row in range(m.shape[0]):
        if count > 0:
            # One row at a time, as the official code ranks its single map (same tie order).
            index = torch.topk(m[row].contiguous(), count, sorted=False).indices
            out[row, index] = 1.0
    return out
