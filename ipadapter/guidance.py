"""E-commerce condition and mask guidance (Li 2024, §3.2.1 and §3.2.2), and the capture
of word cross-attention maps, as attention controls on the cross-attention layers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention.cross_attention import mask_guidance, share_kv, word_attention_map
from ..attention.layers import select_layers
from ..attention.rows import ROLE_COND, ROLE_CONDITION
from ..patching.control import AttentionCall, AttentionControl, ExtraRow, ModelCall
from .control import in_window
from ..patching.prompt_tokens import expand_positions


class ConditionGuidanceControl(AttentionControl):
    """Condition guidance (§3.2.1): one extra row carries the preset text condition (and,
    with an IP-Adapter on the model, the image tokens); in the chosen cross-attention
    layers the user-prompt rows take that row's K/V (replace) or attend to both (concat).

    The shared image K/V equal the prompt row's own (the same image features are batched
    with both texts, as in the paper), so sharing the text K/V shares both."""

    kind = "attn2"

    def __init__(self, context: torch.Tensor, conds: dict, mode: str = "concat", layers: str = "all",
                 sigma_start: float = math.inf, sigma_end: float = 0.0):
        super().__init__()
        self.context = context
        self.conds = conds
        self.mode = mode
        self.layers = layers
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end

    def select_layers(self, layers):
        return select_layers(self.layers, layers, "attn2")

    def _active(self, sigma: float) -> bool:
        return in_window(sigma, self.sigma_start, self.sigma_end)

    def extra_rows(self, call: ModelCall) -> list[ExtraRow]:
        # Cross-attention K/V depend on the context only, so the row's latent is irrelevant
        # to what is shared; it copies a prompt row's. Only calls with prompt rows need it.
        cond_rows = call.layout.indices(ROLE_COND)
        if not cond_rows or not self._active(call.sigma_value):
            return []
        r = cond_rows[0]
        return [ExtraRow(ROLE_CONDITION, x=call.x[r:r + 1], context=self.context, conds=dict(self.conds))]

    def attend(self, call: AttentionCall, q, k, v, attend_next):
        sources = call.rows(ROLE_CONDITION, self.name)
        targets = call.rows(ROLE_COND)
        if not sources or not targets:
            return attend_next(q, k, v)
        k, v = share_kv(k, v, targets, sources[0], self.mode)
        return attend_next(q, k, v)


class MaskGuidanceControl(AttentionControl):
    """Mask guidance (§3.2.2) on the prompt rows of the chosen layers: the thresholded
    cross-attention map of the chosen words multiplies their values
    (``attention.cross_attention.mask_guidance``)."""

    kind = "attn2"

    def __init__(self, positions: list[int], context_tokens: int, threshold: float = 0.5, strength: float = 0.5,
                 layers: str = "all", sigma_start: float = math.inf, sigma_end: float = 0.0):
        super().__init__()
        self.positions = list(positions)
        self.context_tokens = context_tokens
        self.threshold = threshold
        self.strength = strength
        self.layers = layers
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end

    def select_layers(self, layers):
        if self.strength == 0:
            return ()
        return select_layers(self.layers, layers, "attn2")

    def attend(self, call: AttentionCall, q, k, v, attend_next):
        rows = call.rows(ROLE_COND)
        if not rows or not in_window(call.sigma_value, self.sigma_start, self.sigma_end):
            return attend_next(q, k, v)
        tokens = expand_positions(self.positions, self.context_tokens, k.shape[1])
        return mask_guidance(q, k, v, call.heads, tokens, self.threshold, self.strength, attend_next,
                             guide_rows=rows)


class AttentionMapCapture(AttentionControl):
    """Averages the cross-attention maps of chosen words over the chosen layers, heads,
    words and sampling steps, per batch item of the prompt rows. Only ``N x tokens``
    cross-attention maps are built, and only in the chosen layers. The result is written
    to ``sink["maps"]`` (``[items, H, W]`` at latent resolution) when the run ends."""

    kind = "attn2"

    def __init__(self, positions: list[int], context_tokens: int, layers: str, sink: dict):
        super().__init__()
        self.positions = list(positions)
        self.context_tokens = context_tokens
        self.layers = layers
        self.sink = sink

    def select_layers(self, layers):
        return select_layers(self.layers, layers, "attn2")

    def start_run(self, run) -> None:
        state = run.state(self)
        state["sum"], state["count"] = None, 0
        latent = run.latent_image
        state["size"] = tuple(latent.shape[-2:]) if latent is not None else None

    def attend(self, call: AttentionCall, q, k, v, attend_next):
        rows = call.rows(ROLE_COND)
        if rows:
            self._record(call, q[rows], k[rows])
        return attend_next(q, k, v)

    @torch.no_grad()
    def _record(self, call: AttentionCall, q, k) -> None:
        state = call.run.state(self)
        tokens = expand_positions(self.positions, self.context_tokens, k.shape[1])
        maps = word_attention_map(q, k, call.heads, tokens)            # [R, Nq]
        h, w = _spatial_shape(call.extra_options, maps.shape[1])
        maps = maps.reshape(-1, 1, h, w)
        size = state["size"] or (h, w)
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0].cpu()
        items = call.layout.items(ROLE_COND)
        if state["sum"] is None:
            state["sum"] = torch.zeros((max(items) + 1,) + tuple(size))
            state["hits"] = torch.zeros(max(items) + 1)
        if max(items) >= state["sum"].shape[0]:
            grow = max(items) + 1 - state["sum"].shape[0]
            state["sum"] = torch.cat([state["sum"], torch.zeros((grow,) + tuple(size))])
            state["hits"] = torch.cat([state["hits"], torch.zeros(grow)])
        for m, item in zip(maps, items):
            state["sum"][item] += m
            state["hits"][item] += 1

    def end_run(self, run) -> None:
        state = run.state(self)
        if state.get("sum") is not None:
            self.sink["maps"] = state["sum"] / state["hits"].clamp(min=1).view(-1, 1, 1)


def _spatial_shape(extra_options: dict, tokens: int) -> tuple[int, int]:
    """(h, w) of a layer's query grid: the transformer's input shape, else estimated
    from the latent's aspect ratio."""
    activations = extra_options.get("activations_shape")
    if activations is not None and len(activations) == 4 and activations[-2] * activations[-1] == tokens:
        return int(activations[-2]), int(activations[-1])
    shape = extra_options.get("original_shape")
    if shape is not None:
        height, width = shape[-2], shape[-1]
        scale = math.sqrt(height * width / tokens)
        h, w = round(height / scale), round(width / scale)
        if h * w == tokens:
            return h, w
        # Odd sizes: ComfyUI's downsampling rounds up; search around the estimate.
        for dh in range(-2, 3):
            if h + dh > 0 and tokens % (h + dh) == 0:
                return h + dh, tokens // (h + dh)
    side = int(round(math.sqrt(tokens)))
    return side, tokens // side
