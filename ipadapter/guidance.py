"""E-commerce condition and mask guidance (Li 2024, §3.2.1 and §3.2.2), and the capture
of word cross-attention maps, as attention controls on the cross-attention layers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention.cross_attention import mask_guidance, share_kv, word_attention_map
from ..attention.layers import select_layers
from ..attention.rows import ROLE_COND
from ..patching.control import AttentionCall, AttentionControl
from ..patching.layers import attention_modules
from .control import in_window
from ..patching.prompt_tokens import expand_positions


class ConditionGuidanceControl(AttentionControl):
    """Condition guidance (Li 2024, §3.2.1): in the chosen cross-attention layers the
    user-prompt rows take the preset text condition's K/V (replace) or attend to both
    theirs and its (concat).

    The paper batches the preset condition with the prompt and shares that row's K/V.
    Cross-attention K/V depend on the context only (``K = to_k(context)``,
    ``V = to_v(context)``), so they are projected here from the preset context with the
    layer's own ``to_k``/``to_v`` instead of running the preset as an extra UNet row:
    the same K/V at no row's cost. The paper's image K/V are the same in both batch rows (the same image
    features), so sharing the text K/V shares both; an IP-Adapter on the model adds the
    image term to the prompt rows as usual."""

    kind = "attn2"

    def __init__(self, context: torch.Tensor, mode: str = "concat", layers: str = "all",
                 sigma_start: float = math.inf, sigma_end: float = 0.0):
        super().__init__()
        self.context = context
        self.mode = mode
        self.layers = layers
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end

    def select_layers(self, layers):
        return select_layers(self.layers, layers, "attn2")

    def _active(self, sigma: float) -> bool:
        return in_window(sigma, self.sigma_start, self.sigma_end)

    def start_run(self, run) -> None:
        state = run.state(self)
        modules = attention_modules(run.model_patcher, self.select_layers(run.layers))
        state["modules"] = {key: module for (_, key), module in modules.items()}
        state["kv"] = {}

    def end_run(self, run) -> None:
        state = run.state(self)
        state.pop("modules", None)
        state.pop("kv", None)

    def _preset_kv(self, call: AttentionCall, like: torch.Tensor):
        """This layer's preset K/V (``[1, T, inner]``), projected once per layer for the run.

        ``to_k``/``to_v`` are the modules ComfyUI runs: with weight patches on the model
        (LoRA) they compute with the patched weights, as in the UNet's own forward (ComfyUI
        patches weights in place when it loads the model, or casts them with the patches
        applied in low-VRAM mode); weights that hook keyframes change within a run are
        read once, at the first step of the window. The context is cast to the layer's compute dtype, as
        ComfyUI casts ``c_crossattn`` before the UNet. An ``attn2_patch`` of another pack
        (one that rewrites the context before ``attn2``) does not see the preset."""
        state = call.run.state(self)
        entry = (call.layer.key, like.device, like.dtype)
        cache = state["kv"]
        if entry not in cache:
            attn = state["modules"][call.layer.key]
            context = self.context.to(device=like.device, dtype=like.dtype)
            with torch.no_grad():
                cache[entry] = (attn.to_k(context), attn.to_v(context))
        return cache[entry]

    def attend(self, call: AttentionCall, q, k, v, attend_next):
        targets = call.rows(ROLE_COND)
        if not targets or not self._active(call.sigma_value):
            return attend_next(q, k, v)
        k, v = share_kv(k, v, targets, self._preset_kv(call, q), self.mode)
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
