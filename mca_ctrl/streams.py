"""The condition stream of subject generation: generated from noise with its own prompt.

MCA-Ctrl (paper, "Overall Architecture"): for text-conditioned generation the
condition process starts from random Gaussian noise and the target process
shares its initial features. Here each batch item's condition row starts from
that item's own starting latent (so target and condition share their noise)
and is denoised alongside the target by deterministic DDIM steps (Euler on the
sigma grid) from its own predictions, one row per item and step, no CFG.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..attention.rows import ROLE_CONDITION
from ..patching.control import ExtraRow, ModelCall


class GeneratedStream:
    """Rows of a text-conditioned stream integrated with DDIM from the rows' own outputs.

    context: [1, T, D] cross-attention context of the condition prompt.
    conds:   other per-row model inputs (missing ones copy a positive sampler row).
    State lives in the dict the caller passes (the control's run state), as
    ``{item: (sigma, x, denoised or None)}``: the last anchor of each item.
    """

    def __init__(self, context: torch.Tensor, conds: Optional[dict] = None, role: str = ROLE_CONDITION):
        self.context = context
        self.conds = dict(conds or {})
        self.role = role

    @staticmethod
    def latent_at(anchor, sigma: float) -> torch.Tensor:
        """DDIM (eta 0) from the anchor to ``sigma``: x = D + (x_a - D) * sigma / sigma_a."""
        sigma_a, x_a, denoised = anchor
        if denoised is None or sigma_a <= 0:
            return x_a
        return denoised + (x_a - denoised) * (sigma / sigma_a)

    def rows_for(self, call: ModelCall, anchors: dict, items: list[int]) -> list[ExtraRow]:
        sigma = call.sigma_value
        rows = []
        for item in items:
            anchor = anchors.get(item)
            if anchor is None:
                # First call of the run: the target's own starting latent for this item.
                index = [i for i, row in enumerate(call.layout.rows) if row.is_sampler_row and row.item == item][0]
                anchor = (sigma, call.x[index:index + 1].detach().clone(), None)
                anchors[item] = anchor
            x = self.latent_at(anchor, sigma).to(call.x)

            def on_output(denoised, item=item, x=x, sigma=sigma):
                current = anchors.get(item)
                # Keep the first prediction at a sigma (cond/uncond may arrive in two calls),
                # and only move forward in the schedule.
                if current is not None and current[2] is not None and sigma >= current[0]:
                    return
                anchors[item] = (sigma, x.detach(), denoised.detach().to(x))

            rows.append(ExtraRow(role=self.role, x=x, context=self.context, conds=dict(self.conds),
                                 on_output=on_output, item=item))
        return rows
