"""Condition guidance (Li 2024, §3.2.1): the user-prompt rows take the preset text condition's
cross-attention K/V (replace) or attend to both theirs and its (concat)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention.cross_attention import share_kv
from ..attention.layers import select_layers
from ..attention.rows import ROLE_COND
from ..attention.step_window import ALWAYS, StepWindow
from ..patching.control import AttentionCall, AttentionControl
from ..patching.layers import attention_modules


@dataclass
class _Scratch:
    # layer key -> the CrossAttention module ComfyUI runs there
    modules: dict
    # (layer key, device, dtype) -> the preset's (K, V) in that layer
    kv: dict = field(default_factory=dict)


class ConditionGuidanceControl(AttentionControl):
    """Condition guidance in the chosen cross-attention layers, on the sampler's positive
    (user-prompt) rows.

    The paper batches the preset condition with the prompt and shares that row's K/V.
    Cross-attention K/V depend on the context only (``K = to_k(context)``,
    ``V = to_v(context)``), so they are projected here from the preset context with the
    layer's own ``to_k``/``to_v`` instead of running the preset as an extra UNet row:
    the same K/V at no row's cost. The paper's image K/V are the same in both batch rows (the
    same image features), so sharing the text K/V shares both; an IP-Adapter on the model adds
    the image term to the prompt rows as usual."""

    kind = "attn2"
    # Shares text keys/values: the queries may come merged or at any count.
    handles_token_changes = True

    def __init__(self, context: torch.Tensor, mode: str = "concat", layers: str = "all",
                 window: StepWindow = ALWAYS):
        super().__init__()
        self.context = context
        self.mode = mode
        self.layers = layers
        self.window = window

    def select_layers(self, layers):
        return select_layers(self.layers, layers, "attn2")

    def start_run(self, run) -> _Scratch:
        modules = attention_modules(run.model_patcher, self.select_layers(run.layers))
        return _Scratch(modules={key: module for (_, key), module in modules.items()})

    def _preset_kv(self, call: AttentionCall, like: torch.Tensor):
        """This layer's preset K/V (``[1, T, inner]``), projected once per layer for the run.

        ``to_k``/``to_v`` are the modules ComfyUI runs: with weight patches on the model
        (LoRA) they compute with the patched weights, as in the UNet's own forward (ComfyUI
        patches weights in place when it loads the model, or casts them with the patches
        applied in low-VRAM mode); weights that hook keyframes change within a run are
        read once, at the first step of the window. The context is cast to the layer's compute
        dtype, as ComfyUI casts ``c_crossattn`` before the UNet. An ``attn2_patch`` of another
        pack (one that rewrites the context before ``attn2``) does not see the preset."""
        scratch: _Scratch = call.run.scratch(self)
        entry = (call.layer.key, like.device, like.dtype)
        if entry not in scratch.kv:
            attn = scratch.modules[call.layer.key]
            context = self.context.to(device=like.device, dtype=like.dtype)
            with torch.no_grad():
                scratch.kv[entry] = (attn.to_k(context), attn.to_v(context))
        return scratch.kv[entry]

    def attend(self, call: AttentionCall, q, k, v, attend_next):
        targets = call.rows(ROLE_COND)
        if not targets or not call.active(self.window):
            return attend_next(q, k, v)
        k, v = share_kv(k, v, targets, self._preset_kv(call, q), self.mode)
        return attend_next(q, k, v)
