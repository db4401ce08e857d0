"""The condition stream of subject generation: generated from noise with its own prompt.

MCA-Ctrl (paper, "Overall Architecture"): for text-conditioned generation the
condition process starts from random Gaussian noise and the target process
shares its initial features. Here each batch item's condition row starts from
that item's own starting latent (so target and condition share their noise)
and is denoised alongside the target by deterministic DDIM steps (Euler on the
sigma grid) from its own predictions, one row per item and step, no CFG.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..attention.rows import ROLE_CONDITION, ROLE_UNCOND
from ..patching.control import ExtraRow, ModelCall


# Role of the optional negative rows of a generated stream with CFG; no attention mode reads them.
ROLE_CONDITION_NEGATIVE = "condition_negative"


class GeneratedStream:
    """Rows of a text-conditioned stream integrated with DDIM from the rows' own outputs.

    context: [1, T, D] cross-attention context of the condition prompt.
    conds:   other per-row model inputs (missing ones copy a positive sampler row).
    cfg:     1 = one row per item and step (no CFG). Above 1, a second row per item runs the
             target's negative prompt (taken from the call's negative rows) and the stream is
             guided, ``D = D_neg + cfg (D_pos - D_neg)``; a call without negative rows (cfg 1
             on the sampler) falls back to one row.
    State lives in the dict the caller passes (the control's run state), as
    ``{item: (sigma, x, denoised or None)}``: the last anchor of each item.
    """

    def __init__(self, context: torch.Tensor, conds: Optional[dict] = None, role: str = ROLE_CONDITION,
                 cfg: float = 1.0):
        self.context = context
        self.conds = dict(conds or {})
        self.role = role
        self.cfg = float(cfg)

    @staticmethod
    def latent_at(anchor, sigma: float) -> torch.Tensor:
        """DDIM (eta 0) from the anchor to ``sigma``: x = D + (x_a - D) * sigma / sigma_a."""
        sigma_a, x_a, denoised = anchor
        if denoised is None or sigma_a <= 0:
            return x_a
        return denoised + (x_a - denoised) * (sigma / sigma_a)

    @staticmethod
    def _row_of(call: ModelCall, item: int, role: Optional[str] = None) -> Optional[int]:
        for i, row in enumerate(call.layout.rows):
            if row.is_sampler_row and row.item == item and (role is None or row.role == role):
                return i
        return None

    def _negative_row(self, call: ModelCall, item: int, x: torch.Tensor, on_output) -> Optional[ExtraRow]:
        index = self._row_of(call, item, ROLE_UNCOND)
        if index is None or call.context is None:
            return None
        batch = call.x.shape[0]
        conds = {name: value[index:index + 1] for name, value in call.conds.items()
                 if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch}
        return ExtraRow(role=ROLE_CONDITION_NEGATIVE, x=x, context=call.context[index:index + 1], conds=conds,
                        on_output=on_output, item=item)

    def rows_for(self, call: ModelCall, anchors: dict, items: list[int],
                 image_prompt: Optional[str] = None) -> list[ExtraRow]:
        """The stream's rows for this call: one per item (and one more per item with CFG).
        ``image_prompt`` is what the positive rows see (``Row.image_prompt``)."""
        sigma = call.sigma_value
        rows, negatives = [], []
        for item in items:
            anchor = anchors.get(item)
            if anchor is None:
                # First call of the run: the target's own starting latent for this item.
                index = self._row_of(call, item)
                anchor = (sigma, call.x[index:index + 1].detach().clone(), None)
                anchors[item] = anchor
            x = self.latent_at(anchor, sigma).to(call.x)

            def update(denoised, item=item, x=x, sigma=sigma):
                current = anchors.get(item)
                # Keep the first prediction at a sigma (cond/uncond may arrive in two calls),
                # and only move forward in the schedule.
                if current is not None and current[2] is not None and sigma >= current[0]:
                    return
                anchors[item] = (sigma, x.detach(), denoised.detach().to(x))

            negative = None
            on_output = update
            if self.cfg != 1.0:
                guided = _GuidedPair(self.cfg, update)
                negative = self._negative_row(call, item, x, guided.negative)
                if negative is not None:
                    on_output = guided.positive
            rows.append(ExtraRow(role=self.role, x=x, context=self.context, conds=dict(self.conds),
                                 on_output=on_output, item=item, image_prompt=image_prompt))
            if negative is not None:
                negatives.append(negative)
        return rows + negatives


class _GuidedPair:
    """The positive and negative predictions of one CFG'ed stream row, in whichever order they
    arrive: once both are in, ``done`` gets ``D_neg + cfg (D_pos - D_neg)``."""

    def __init__(self, cfg: float, done: Callable[[torch.Tensor], None]):
        self.cfg = cfg
        self.done = done
        self.outputs: dict[str, torch.Tensor] = {}

    def _receive(self, which: str, denoised: torch.Tensor) -> None:
        self.outputs[which] = denoised.detach()
        if len(self.outputs) == 2:
            pos, neg = self.outputs["positive"], self.outputs["negative"]
            self.done(neg + self.cfg * (pos - neg))

    def positive(self, denoised: torch.Tensor) -> None:
        self._receive("positive", denoised)

    def negative(self, denoised: torch.Tensor) -> None:
        self._receive("negative", denoised)
