"""What one MCA-Ctrl application is made of, grouped: the streams, the masks, the schedule.

Configuration only (frozen); the control (``mca_ctrl.control.MCACtrl``) validates it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..attention import mca_ctrl as mca
from ..inversion.result import InversionResult


@dataclass(frozen=True, eq=False)
class Streams:
    """subject: the inverted subject image (one image). scene: the inverted scene
    (replacement / addition); None for subject generation, where, as in the official code, the
    target's own keys/values outside the mask are the background (no condition stream)."""

    subject: InversionResult
    scene: Optional[InversionResult] = None


@dataclass(frozen=True)
class AutoMask:
    """The automatic target mask of generation (official code): the subject word's
    cross-attention in the target's positive row (tokens ``subject_tokens`` of the prompt),
    averaged over every ``layers`` cross-attention call since the run's first step; its top
    ``fraction`` of tokens set to 1, the rest keeping their normalised value.

    prompt_context: the encoded prompt the tokens were found in ([1, T, D]), to warn when the
    sampler's positive prompt is another one; None skips the check."""

    subject_tokens: tuple[int, ...]
    layers: str = "level:2"
    fraction: float = 0.3
    prompt_context: Optional[torch.Tensor] = field(default=None, compare=False)


@dataclass(frozen=True, eq=False)
class Masks:
    """subject: MASK [1, H, W] of the subject's foreground on the subject image (M_S).
    region:  MASK [1 or B, H, W] of where the subject goes in the target / scene (1 - M_C);
             None with ``auto`` (generation only).
    Both are binarised at ``attention.mca_ctrl.MASK_THRESHOLD``. Dilation kernels apply at
    each layer's token grid (1 = none, the official code; the paper dilates by 3)."""

    subject: torch.Tensor
    region: Optional[torch.Tensor] = None
    subject_dilation: int = 1
    region_dilation: int = 1
    auto: Optional[AutoMask] = None


@dataclass(frozen=True)
class Schedule:
    """When (the SAGI/SALQ phases, step windows) and where (block specs of self-attention layers)."""

    phases: mca.PhaseSchedule = field(default_factory=mca.PhaseSchedule)
    salq_layers: str = "all"
    sagi_layers: str = "all"
