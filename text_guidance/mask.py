"""Mask guidance (Li 2024, §3.2.2): the thresholded cross-attention map of chosen prompt words
multiplies their values (``attention.cross_attention.mask_guidance``)."""

from __future__ import annotations

from ..attention.cross_attention import mask_guidance
from ..attention.layers import select_layers
from ..attention.rows import ROLE_COND
from ..attention.step_window import ALWAYS, StepWindow
from ..patching.control import AttentionCall, AttentionControl
from ..patching.prompt_tokens import expand_positions


class MaskGuidanceControl(AttentionControl):
    """Mask guidance on the sampler's positive (user-prompt) rows of the chosen layers."""

    kind = "attn2"
    # The gate is per query, normalised over the queries it gets.
    handles_token_changes = True

    def __init__(self, positions: list[int], context_tokens: int, threshold: float = 0.5, strength: float = 0.5,
                 layers: str = "all", window: StepWindow = ALWAYS):
        super().__init__()
        self.positions = list(positions)
        self.context_tokens = context_tokens
        self.threshold = threshold
        self.strength = strength
        self.layers = layers
        self.window = window

    def select_layers(self, layers):
        if self.strength == 0:
            return ()
        return select_layers(self.layers, layers, "attn2")

    def attend(self, call: AttentionCall, q, k, v, attend_next):
        rows = call.rows(ROLE_COND)
        if not rows or not call.active(self.window):
            return attend_next(q, k, v)
        tokens = expand_positions(self.positions, self.context_tokens, k.shape[1])
        return mask_guidance(q, k, v, call.heads, tokens, self.threshold, self.strength, attend_next,
                             guide_rows=rows)
