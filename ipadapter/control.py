"""IP-Adapter as an attention control: image prompt tokens added to cross-attention,
decoupled (IP-Adapter) or joint (DEADiff), per reference and per layer.

One control may carry several references (DEADiff: a style reference routed to the
fine layers, a semantic one to the coarse layers); each has its own per-layer weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..attention.cross_attention import image_attention_sum, joint_attention
from ..attention.layers import resolve_weight_spec
from ..attention.step_window import ALWAYS, StepWindow
from ..patching.control import AttentionCall, AttentionControl
from ..patching.image_prompt_policy import BOTH, POSITIVE_ONLY
from .model import ImageTokens

MODES = ("decoupled", "joint")


@dataclass(frozen=True)
class Reference:
    """One image prompt: its tokens, an overall weight and a weight spec over the
    cross-attention layers (``attention.layers`` syntax, e.g. ``all=1`` or ``#4-8=1``)."""

    name: str
    tokens: ImageTokens
    weight: float = 1.0
    weight_spec: str = "all=1"
    # image [B, H, W, C] -> ImageTokens, for the policy's negative image (encoded at run start)
    encode: Optional[Callable] = None


@dataclass
class _Scratch:
    # per reference: layer key -> weight
    weights: list[dict]
    # per reference: the negative branch's tokens under the run's policy (None: no image prompt)
    negative_tokens: list
    # (layer key, reference, "cond"/"uncond", device, dtype) -> the layer's image (K, V)
    kv: dict = field(default_factory=dict)


class IPAdapterControl(AttentionControl):
    """Image prompt tokens in cross-attention on the rows that see an image prompt
    (``Row.image_prompt``: the positive branch, the negative one as the policy says, and any
    extra row a control marks so), during ``window`` (a step window of the run)."""

    kind = "attn2"
    # Image tokens are keys; the queries may come merged or at any count.
    handles_token_changes = True

    def __init__(self, layer_kv: dict, references: tuple[Reference, ...], mode: str = "decoupled",
                 window: StepWindow = ALWAYS):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"IP-Adapter: expected mode one of {MODES}, got '{mode}'")
        self.layer_kv = layer_kv
        self.references = tuple(references)
        self.mode = mode
        self.window = window

    def layer_weights(self, layers) -> list[dict]:
        """Per reference: layer key -> weight (reference weight x spec weight)."""
        return [
            {key: ref.weight * w for key, w in resolve_weight_spec(ref.weight_spec, layers, "attn2").items()}
            for ref in self.references
        ]

    def select_layers(self, layers):
        weights = self.layer_weights(layers)
        return tuple(layer for layer in layers if layer.kind == "attn2" and layer.key in self.layer_kv
                     and any(w.get(layer.key, 0.0) != 0 for w in weights))

    def start_run(self, run) -> _Scratch:
        # The negative branch's tokens per reference, by the image-prompt policy:
        # positive_only -> none; both -> the same image prompt; negative_image -> the
        # policy's negative image, or without one IP-Adapter's own trained negative (the
        # tokens of an empty image: zero embeddings / a black image).
        policy = run.policy
        negatives = []
        for ref in self.references:
            if policy.mode == POSITIVE_ONLY:
                negatives.append(None)
            elif policy.mode == BOTH:
                negatives.append(ref.tokens.cond)
            elif policy.negative_image is not None and ref.encode is not None:
                negatives.append(ref.encode(policy.negative_image).cond)
            else:
                negatives.append(ref.tokens.uncond)
        return _Scratch(weights=self.layer_weights(run.layers), negative_tokens=negatives)

    def _image_kv(self, run, key, ref_index: int, which: str, like: torch.Tensor):
        """This layer's image K/V of one reference (``[1, T, inner]``), cached for the run."""
        scratch: _Scratch = run.scratch(self)
        entry = (key, ref_index, which, like.device, like.dtype)
        if entry not in scratch.kv:
            if which == "uncond":
                tokens = scratch.negative_tokens[ref_index]
            else:
                tokens = self.references[ref_index].tokens.cond
            tokens = tokens.to(like.device, torch.float32)
            w_k, w_v = self.layer_kv[key]
            k = tokens @ w_k.to(like.device, torch.float32).t()
            v = tokens @ w_v.to(like.device, torch.float32).t()
            scratch.kv[entry] = (k.to(like.dtype), v.to(like.dtype))
        return scratch.kv[entry]

    def attend(self, call: AttentionCall, q, k, v, attend_next):
        if not call.active(self.window):
            return attend_next(q, k, v)
        scratch: _Scratch = call.run.scratch(self)
        weights = [w.get(call.layer.key, 0.0) for w in scratch.weights]
        live = [i for i, w in enumerate(weights) if w != 0]
        # Which rows get which tokens: by the rows' own image_prompt, never by position or role.
        # Under the positive-only (conflict-free) policy the negative branch gets no image tokens.
        rows = call.run.image_prompt_rows(call.layout)
        groups = {"cond": rows.positive, "uncond": rows.negative}
        if not live or not (groups["cond"] or groups["uncond"]):
            return attend_next(q, k, v)
        if self.mode == "decoupled":
            return self._decoupled(call, q, k, v, attend_next, groups, live, weights)
        return self._joint(call, q, k, v, attend_next, groups, live, weights)

    def _row_images(self, call, groups, live, weights, like):
        """Image (k, v, weight) per reference, stacked per image row, and those rows."""
        rows = sorted(groups["cond"] + groups["uncond"])
        which = {r: ("uncond" if r in groups["uncond"] else "cond") for r in rows}
        images = []
        for i in live:
            parts = [self._image_kv(call.run, call.layer.key, i, which[r], like) for r in rows]
            images.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), weights[i]))
        return rows, images

    def _decoupled(self, call, q, k, v, attend_next, groups, live, weights):
        # Text attention through the chain (other controls, another pack's patch), the
        # image attention as plain attention on the image rows only (IP-Adapter eq. 5).
        out = attend_next(q, k, v)
        rows, images = self._row_images(call, groups, live, weights, q)
        index = torch.as_tensor(rows, dtype=torch.long, device=q.device)
        q_rows = q.index_select(0, index)
        extra = image_attention_sum(q_rows, images, call.plain)
        out = out.clone()
        out[index] = out[index] + extra.to(out.dtype)
        return out

    def _joint(self, call, q, k, v, attend_next, groups, live, weights):
        rows, images = self._row_images(call, groups, live, weights, q)
        if len(rows) == q.shape[0]:
            return joint_attention(q, k, v, images, attend_next)
        # Rows without image tokens (e.g. the negative branch under the positive-only
        # policy) keep the chain's attention; ``attend_next`` takes the layer's full rows,
        # so it runs on all of them and the image rows are then replaced by their joint
        # attention (plain attention over text + image keys).
        index = torch.as_tensor(rows, dtype=torch.long, device=q.device)
        joint = joint_attention(q[index], k[index], v[index], images, call.plain)
        if call.exclusive:
            # Nothing else acts on this layer: plain attention on the other rows is
            # exactly what the chain would give them, without recomputing the image rows.
            others = torch.as_tensor([r for r in range(q.shape[0]) if r not in set(rows)], dtype=torch.long,
                                     device=q.device)
            out = q.new_empty(q.shape[:2] + (v.shape[-1],))
            out[others] = call.plain(q[others], k[others], v[others]).to(out.dtype)
        else:
            out = attend_next(q, k, v).clone()
        out[index] = joint.to(out.dtype)
        return out
