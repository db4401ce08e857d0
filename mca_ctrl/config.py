"""What one MCA-Ctrl application is made of, grouped: the streams, the masks, the schedule.

Configuration only (frozen); the control (``mca_ctrl.control.MCACtrl``) validates it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..attention import mca_ctrl as mca
from ..inversion.result import InversionResult


@dataclass(frozen=True)
class ConditionPrompt:
    """The condition stream of subject generation, generated from the target's noise with its
    own prompt (``mca_ctrl.streams.GeneratedStream``).

    context: [1, T, D] cross-attention context of the condition prompt.
    conds:   other per-row model inputs (missing ones copy a positive sampler row).
    cfg:     1 = one row per image and step, no CFG; above 1 a second row runs the target's
             negative prompt and the stream is guided.
    """

    context: torch.Tensor
    conds: Optional[dict] = None
    cfg: float = 1.0


@dataclass(frozen=True, eq=False)
class Streams:
    """subject: the inverted subject image (one image). Then either ``scene``, the inverted
    scene (replacement / addition), or ``prompt``, a generated condition stream (generation)."""

    subject: InversionResult
    scene: Optional[InversionResult] = None
    prompt: Optional[ConditionPrompt] = None


@dataclass(frozen=True)
class AutoMask:
    """The automatic target mask of generation: the top ``fraction`` of the subject word's
    cross-attention (tokens ``subject_tokens`` of the condition prompt) at ``layers``."""

    subject_tokens: tuple[int, ...]
    layers: str = "level:2"
    fraction: float = 0.3


@dataclass(frozen=True, eq=False)
class Masks:
    """subject: MASK [1, H, W] of the subject's foreground on the subject image (M_S).
    region:  MASK [1 or B, H, W] of where the subject goes in the target / scene (1 - M_C);
             None with ``auto`` (generation only).
    Dilation kernels apply at each layer's token grid (1 = none)."""

    subject: torch.Tensor
    region: Optional[torch.Tensor] = None
    subject_dilation: int = 3
    region_dilation: int = 0
    auto: Optional[AutoMask] = None


@dataclass(frozen=True)
class Schedule:
    """When (the SAGI/SALQ phases, step windows) and where (block specs of self-attention layers)."""

    phases: mca.PhaseSchedule = field(default_factory=mca.PhaseSchedule)
    salq_layers: str = "all"
    sagi_layers: str = "all"
