"""An inverted chain as extra batch rows: the "inverted stream" of InDetail-IP (Fig. 3) and
MCA-Ctrl's subject/condition streams.

At every UNet call a control that needs the stream asks ``rows_for(call)`` and returns
the rows from its ``extra_rows``; each row's latent is the chain's latent at the call's
sigma (``InvertedChain.latent_at``: exact on the inversion schedule, a DDIM sub-step
between its sigmas), its text is the inversion prompt, and its own prediction is
discarded unless ``on_output`` is given.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ..attention.rows import ROLE_REFERENCE
from ..patching.control import ExtraRow, ModelCall
from .result import InversionResult


class InvertedStream:
    """Turns an ``InversionResult`` into ``ExtraRow``s for one UNet call.

    role:   row role in the layout (``reference``, ``subject``, ``condition`` ...); the
            control that appends the rows also becomes their ``source``.
    """

    def __init__(self, inversion: InversionResult, role: str = ROLE_REFERENCE, label: str = "reference"):
        self.inversion = inversion
        self.role = role
        self.label = label

    @property
    def rows_per_call(self) -> int:
        return self.inversion.batch

    def check_call(self, call: ModelCall) -> None:
        """Raise a ValueError naming both sides if this call's model cannot run the stream."""
        channels = call.x.shape[1]
        if channels != self.inversion.latent_channels:
            raise ValueError(
                f"{self.label} stream: expected a model with {self.inversion.latent_channels}-channel latents "
                f"(the inversion's), got {channels} channels"
            )
        if call.context is not None and call.context.shape[-1] != self.inversion.context.shape[-1]:
            raise ValueError(
                f"{self.label} stream: expected a {self.inversion.context.shape[-1]}-wide text context "
                f"({self.inversion.model_family or 'inversion model'}), got {call.context.shape[-1]} "
                f"(model family mismatch?)"
            )

    def latents_for(self, call: ModelCall) -> torch.Tensor:
        """The stream's latents [B_ref, C, H, W] at the call's sigma and latent size."""
        height, width = call.x.shape[-2:]
        chain = self.inversion.chain.resized(height, width)
        return chain.latent_at(call.sigma_value).to(device=call.x.device, dtype=call.x.dtype)

    def rows_for(self, call: ModelCall,
                 on_output: Optional[Callable[[int, torch.Tensor], None]] = None) -> list[ExtraRow]:
        """One ExtraRow per reference image. ``on_output(item, prediction)`` receives a
        row's denoised prediction if given (InDetail-IP discards it)."""
        self.check_call(call)
        x = self.latents_for(call)
        context = self.inversion.context
        rows = []
        for item in range(x.shape[0]):
            callback = functools.partial(on_output, item) if on_output is not None else None
            rows.append(ExtraRow(
                role=self.role,
                x=x[item:item + 1],
                context=context,
                conds=dict(self.inversion.conds),
                on_output=callback,
                item=item,
            ))
        return rows
