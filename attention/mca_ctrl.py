"""MCA-Ctrl attention math: SALQ, SAGI, their masks and their step schedule.

Paper: "Multi-party Collaborative Attention Control for Image Customization"
(``papers/mca-ctrl.txt``). Three streams share one batch: the subject stream
(inverted subject image), the condition stream (inverted scene, or a stream
generated from noise with its own prompt) and the target stream (the image
being sampled). Everything here is pure torch on ComfyUI's
``[batch, tokens, heads*dim_head]`` layout; the glue that finds the rows is in
``patching/mca_ctrl.py``.

Mask conventions used throughout (all in ``[0, 1]``):

- ``subject_mask`` (the paper's M_S): 1 on the subject's foreground in the
  subject image. Dilated (3x3 by default) at each layer's token grid.
- ``region`` (the paper's 1 - M_C): 1 where the subject goes in the target,
  i.e. the region to replace or fill in the scene. The condition stream's
  background is ``1 - region`` (the paper's M_C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sdpa import AttendFn
from .cover_crop import cover_crop
from .step_window import StepWindow
from .token_grid import token_grid

PHASE_NONE = "none"
PHASE_SAGI = "sagi"
PHASE_SALQ = "salq"

ORDER_SAGI_FIRST = "sagi_first"
ORDER_SALQ_FIRST = "salq_first"
ORDERS = (ORDER_SAGI_FIRST, ORDER_SALQ_FIRST)

# A token takes part in a masked key set when its resized mask value reaches this.
KEY_THRESHOLD = 0.5


# ---------------------------------------------------------------------------
# Token grids and masks


def as_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK ([H, W] or [B, H, W]) as float [B, 1, H, W]."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mask.float()
    if mask.ndim != 3:
        raise ValueError(f"MCA-Ctrl: expected a MASK of shape [H, W] or [B, H, W], got {tuple(mask.shape)}")
    return mask.float().unsqueeze(1)


def resize_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area-average a mask ([H, W], [B, H, W] or [B, 1, H, W]) to ``grid``: [B, h*w].

    Area averaging keeps a small subject visible at coarse levels as a partial
    value instead of dropping it the way nearest sampling would.
    """
    m = as_mask_batch(mask)
    m = F.adaptive_avg_pool2d(m, grid)
    return m.flatten(1).clamp(0.0, 1.0)


def dilate(mask_tokens: torch.Tensor, grid: tuple[int, int], kernel: int) -> torch.Tensor:
    """Grey-level dilation (max filter) of [B, h*w] tokens with a ``kernel`` x ``kernel`` window.

    Paper (Subject Localization Module): the mask is dilated with a 3x3 kernel
    to leave transition space around the subject. ``kernel`` <= 1 is a no-op.
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

    subject_keys: bool [1, N]      subject tokens whose K/V SALQ queries (M_S, dilated)
    subject_fg:   float [1, N]     the subject foreground weight SAGI filters with (M_S, dilated)
    region:       float [Bt, N]    target region weight (1 - M_C), per target row or shared (Bt = 1)
    """

    subject_keys: torch.Tensor
    subject_fg: torch.Tensor
    region: torch.Tensor

    @property
    def background_keys(self) -> torch.Tensor:
        """bool [Bt, N]: condition tokens SALQ queries (the paper's M_C, the scene background)."""
        return self.region < KEY_THRESHOLD


def layer_masks(subject_mask: torch.Tensor, region_mask: torch.Tensor, latent_hw: tuple[int, int],
                n_tokens: int, dilation: int = 3, region_dilation: int = 0) -> LayerMasks:
    """Resize the image-space masks to one layer's token grid and dilate them."""
    grid = token_grid(latent_hw, n_tokens)
    subject = resize_mask(subject_mask, grid)
    if subject.shape[0] != 1:
        raise ValueError(f"MCA-Ctrl: expected one subject mask, got a batch of {subject.shape[0]}")
    subject = dilate(subject, grid, dilation)
    region = dilate(resize_mask(region_mask, grid), grid, region_dilation)
    return LayerMasks(subject_keys=key_tokens(subject), subject_fg=subject, region=region)


def key_tokens(mask_tokens: torch.Tensor) -> torch.Tensor:
    """bool [B, N]: tokens at or above the key threshold. A subject smaller than one token
    at a coarse level keeps its strongest tokens instead of vanishing."""
    peak = mask_tokens.amax(dim=-1, keepdim=True)
    threshold = torch.where(peak > 0, peak.clamp(max=KEY_THRESHOLD), torch.full_like(peak, KEY_THRESHOLD))
    return mask_tokens >= threshold


# ---------------------------------------------------------------------------
# SALQ and SAGI


def _select_keys(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, rows: int):
    """K/V restricted to ``keep`` tokens, for ``rows`` query rows.

    A key set shared by every row ([1, N]) is gathered (fewer keys, no mask);
    per-row key sets become an additive 0/-inf float mask [rows, 1, N], which
    every ComfyUI attention backend applies correctly (boolean masks are not).
    Returns (k, v, mask or None).
    """
    if keep.shape[0] == 1:
        index = keep[0].nonzero().squeeze(1)
        k_sel, v_sel = k.index_select(1, index), v.index_select(1, index)
        if k_sel.shape[0] != rows:
            k_sel, v_sel = k_sel.expand(rows, -1, -1), v_sel.expand(rows, -1, -1)
        return k_sel, v_sel, None
    # A row without any key has a zero fusion weight for this branch (checked by the caller);
    # let it attend everything so it yields finite values instead of NaN (NaN * 0 = NaN).
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    mask = torch.zeros(keep.shape, dtype=k.dtype, device=k.device).masked_fill(~keep, float("-inf"))
    if k.shape[0] != rows:
        k, v = k.expand(rows, -1, -1), v.expand(rows, -1, -1)
    return k, v, mask.unsqueeze(1)


def _check_nonempty(keep: torch.Tensor, needed: torch.Tensor, what: str) -> None:
    """Rows that need a branch (``needed`` [rows]) must have at least one key in it."""
    empty = ~keep.any(dim=-1)
    if empty.shape[0] == 1:
        empty = empty.expand(needed.shape[0])
    if bool((empty & needed).any()):
        raise ValueError(f"MCA-Ctrl SALQ: expected a non-empty {what} at this layer's resolution, got an empty one")


def salq(q: torch.Tensor,
         k_subject: torch.Tensor, v_subject: torch.Tensor,
         k_condition: torch.Tensor, v_condition: torch.Tensor,
         subject_keys: torch.Tensor, region: torch.Tensor,
         attend: AttendFn) -> torch.Tensor:
    """Self-Attention Local Query (paper, SALQ):

        F_TS = Attn(Q_T, K_S[M_S], V_S[M_S])          subject foreground keys only
        F_TC = Attn(Q_T, K_C[M_C], V_C[M_C])          condition background keys only
        F*_T = M_C · F_TC + (1 - M_C) · F_TS          with M_C = 1 - region

    q:            [B, Nq, C] target queries
    k_/v_subject: [1 or B, Nk, C] the subject row's keys/values (broadcast to B)
    k_/v_condition: [1 or B, Nk, C] each target row's condition keys/values
    subject_keys: bool [1 or B, Nk]; region: float [1 or B, Nq] in [0, 1]
    attend:       attend(q, k, v, mask=None), the rest of the attention chain

    A branch whose fusion weight is zero for every row is not computed, so an
    all-ones region is pure subject attention and an all-zeros region pure
    condition attention.
    """
    rows = q.shape[0]
    region = region.to(q)
    if region.shape[0] not in (1, rows):
        raise ValueError(f"MCA-Ctrl SALQ: expected a region mask for 1 or {rows} rows, got {region.shape[0]}")
    background_keys = region < KEY_THRESHOLD
    # A row needs a branch where its fusion weight is non-zero somewhere.
    need_subject = (region > 0).any(dim=-1).expand(rows)
    need_condition = (region < 1).any(dim=-1).expand(rows)
    out = None
    if bool(need_subject.any()):
        _check_nonempty(subject_keys, need_subject, "subject mask (the subject's foreground)")
        k, v, mask = _select_keys(k_subject, v_subject, subject_keys, rows)
        f_subject = attend(q, k, v, mask=mask) if mask is not None else attend(q, k, v)
        out = region.unsqueeze(-1) * f_subject
    if bool(need_condition.any()):
        _check_nonempty(background_keys, need_condition, "scene background (outside the target mask)")
        k, v, mask = _select_keys(k_condition, v_condition, background_keys, rows)
        f_condition = attend(q, k, v, mask=mask) if mask is not None else attend(q, k, v)
        part = (1.0 - region).unsqueeze(-1) * f_condition
        out = part if out is None else out + part
    return out


def sagi(out_subject: torch.Tensor, out_condition: torch.Tensor,
         subject_fg: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Self-Attention Global Injection (paper, SAGI):

        F^I_S = M_S ⊙ F_S,  F^I_C = M_C ⊙ F_C,   F*_T = M_C · F^I_C + (1 - M_C) · F^I_S

    with M_C = 1 - region. The condition's background filter and its fusion
    weight are the same mask, applied once (identical for binary masks).
    out_subject / out_condition: [1 or B, N, C] the streams' own self-attention
    outputs; subject_fg: [1, N]; region: [1 or B, N]. Returns [B', N, C].
    """
    region = region.to(out_subject).unsqueeze(-1)
    fg = subject_fg.to(out_subject).unsqueeze(-1)
    return (1.0 - region) * out_condition + region * (fg * out_subject)


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
# Automatic target mask


def top_fraction_mask(token_map: torch.Tensor, fraction: float = 0.3) -> torch.Tensor:
    """Binary mask of the ``fraction`` highest tokens of each row of ``token_map`` [B, N].

    Official MCA-Ctrl code: the target mask is the top 30% of the subject word's
    cross-attention at 16x16.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"MCA-Ctrl: expected a top fraction in (0, 1], got {fraction}")
    n = token_map.shape[-1]
    count = max(1, round(fraction * n))
    index = token_map.topk(count, dim=-1).indices
    return torch.zeros_like(token_map).scatter_(-1, index, 1.0)




# ---------------------------------------------------------------------------
# Aligning masks with the latents the streams run at


def fit_mask(mask: torch.Tensor, source_hw: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor:
    """A MASK drawn on an image whose latent is ``source_hw``, on a ``target_hw`` latent:
    area-resized to the source latent, then cover-cropped like the source's stream
    (``attention.cover_crop``). [B, 1, H, W]."""
    m = F.adaptive_avg_pool2d(as_mask_batch(mask), tuple(source_hw))
    return cover_crop(m, tuple(target_hw)).clamp(0.0, 1.0)


def resize_tokens(tokens: torch.Tensor, grid_from: tuple[int, int], grid_to: tuple[int, int]) -> torch.Tensor:
    """[B, h*w] token values from one grid to another (area down, bilinear up)."""
    if tuple(grid_from) == tuple(grid_to):
        return tokens
    m = tokens.view(tokens.shape[0], 1, grid_from[0], grid_from[1]).float()
    if grid_to[0] <= grid_from[0] and grid_to[1] <= grid_from[1]:
        m = F.adaptive_avg_pool2d(m, grid_to)
    else:
        m = F.interpolate(m, size=grid_to, mode="bilinear", align_corners=False)
    return m.flatten(1).clamp(0.0, 1.0)
