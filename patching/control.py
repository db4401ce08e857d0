"""The interface every attention control implements, and the per-call views it gets."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..attention.layers import AttentionLayer
from ..attention.rows import RowLayout

_ids = itertools.count()


@dataclass
class ExtraRow:
    """A batch row a control appends to a UNet call.

    x:       the row's noisy latent at ``sigma``, in the same space as the sampler's
             ``x`` (ComfyUI applies ``calculate_input`` itself), shape [1, C, H, W].
    context: its cross-attention context [1, T, D] (token count may differ from the
             sampler rows'; contexts are repeated to a common length as ComfyUI does).
    sigma:   defaults to the call's sigma.
    conds:   other per-row model inputs by name (e.g. SDXL's ``y``); missing ones
             copy a positive sampler row.
    on_output: called with the row's denoised prediction (a [1, C, H, W] tensor).
    """

    role: str
    x: torch.Tensor
    context: torch.Tensor
    sigma: Optional[torch.Tensor] = None
    conds: dict[str, torch.Tensor] = field(default_factory=dict)
    on_output: Optional[Callable[[torch.Tensor], None]] = None
    item: int = 0


@dataclass
class ModelCall:
    """One UNet call as the APPLY_MODEL wrapper sees it, before extra rows."""

    x: torch.Tensor
    sigma: torch.Tensor
    layout: RowLayout
    context: Optional[torch.Tensor]
    conds: dict[str, Any]
    run: Any
    transformer_options: dict

    @property
    def sigma_value(self) -> float:
        return float(self.sigma.reshape(-1)[0])


@dataclass
class AttentionCall:
    """One attention layer call as a control sees it."""

    layer: AttentionLayer
    layout: RowLayout
    run: Any
    extra_options: dict
    # Plain attention ``(q, k, v, mask=None)`` (ComfyUI's optimized attention, heads bound)
    # for queries/keys that are not the layer's own rows: gathered key subsets, a subset of
    # rows. ``attend_next`` expects the layer's full rows; this bypasses the chain.
    plain: Optional[Callable[..., torch.Tensor]] = None
    # True when the control is the layer's only one and no foreign replace patch is
    # installed, so ``plain`` on a row subset equals ``attend_next`` on those rows.
    exclusive: bool = False

    @property
    def heads(self) -> int:
        return self.extra_options["n_heads"]

    @property
    def sigma_value(self) -> float:
        return float(self.extra_options["sigmas"].reshape(-1)[0])

    def rows(self, role: str, source: str | None = None) -> list[int]:
        return self.layout.indices(role, source)


AttendNext = Callable[..., torch.Tensor]


class AttentionControl:
    """Base class: a control is configuration (immutable after construction);
    anything it accumulates during a run lives in ``run.state(self)``.

    Subclasses override what they need:
      select_layers(layers)          which layers it acts on, resolved per model
      start_run(run) / end_run(run)  set up and free run-scoped state
      extra_rows(call)               rows to append to this UNet call
      rows_without_control(call)     sampler rows of this UNet call that get no
                                     ControlNet residuals (default: none)
      initial_noise(run, noise)      replace the run's initial noise (default: unchanged)
      attend(call, q, k, v, attend_next)  the attention itself; ``attend_next``
                                     is the rest of the chain (other controls,
                                     another pack's replace patch, or ComfyUI's
                                     optimized attention) with the same
                                     ``(q, k, v, mask=None)`` signature.
    """

    kind: str = "attn1"

    def __init__(self) -> None:
        self.name = f"{type(self).__name__}#{next(_ids)}"

    def select_layers(self, layers: tuple[AttentionLayer, ...]) -> tuple[AttentionLayer, ...]:
        return ()

    def start_run(self, run) -> None:
        pass

    def end_run(self, run) -> None:
        pass

    def extra_rows(self, call: ModelCall) -> list[ExtraRow]:
        return []

    def rows_without_control(self, call: ModelCall) -> list[int]:
        """Indices of sampler rows of ``call`` (from ``call.layout`` roles, never fixed
        positions) whose ControlNet residuals are zeroed for this call: ComfyUI computes a
        ControlNet for the whole batch, so "this CFG branch uncontrolled" must be said here.
        Extra rows get zero residuals anyway."""
        return []

    def initial_noise(self, run, noise: torch.Tensor) -> torch.Tensor:
        """The run's initial noise (the sampler's ``noise`` argument, before ComfyUI scales
        it by sigma and adds the latent). Return it unchanged, or a new tensor to start
        sampling elsewhere (e.g. from an inverted latent)."""
        return noise

    def attend(self, call: AttentionCall, q, k, v, attend_next: AttendNext) -> torch.Tensor:
        return attend_next(q, k, v)
