"""The attention router: one replace patch per touched layer, chaining every control
registered on the model and, at the end of the chain, whatever attention was there
before (another pack's replace patch, or ComfyUI's optimized attention).

Other patches may reshape what reaches a layer: HyperTile folds image tiles into the batch
(``(b tiles) tokens``), ToMe merges the queries of self-attention. The router checks every call
against the row layout and the layer's own grid:

- a batch that is not the layout's rows (tiles, or anything else): the rows cannot be told
  apart, so every control passes the layer through to the rest of the chain;
- rows intact but fewer or other tokens than the layer's grid (merged queries or keys): the
  controls whose ``handles_token_changes`` is True act on the tensors as they come (their math
  holds for any token count), the others pass the layer through.

A control passed through is logged once per run, so the user knows which layers it skipped.
"""

from __future__ import annotations

import torch

from ..attention.layers import AttentionLayer
from ..attention.rows import RowLayout
from . import keys
from .control import AttentionCall
from .plain_attention import plain_attention


class RoutedAttention:
    """A replace patch ``fn(q, k, v, extra_options)`` for one layer."""

    def __init__(self, layer: AttentionLayer, controls, foreign, run):
        self.layer = layer
        self.controls = tuple(controls)
        self.foreign = foreign
        self.run = run

    def _base(self, extra_options, plain):
        foreign = self.foreign

        def attend(q, k, v, mask=None):
            if foreign is not None and mask is None:
                return foreign(q, k, v, extra_options)
            return plain(q, k, v, mask=mask)

        return attend

    def _acting(self, layout: RowLayout, q, k, extra_options) -> tuple:
        """The controls that act on this call (see the module docstring for reshaped calls)."""
        reshape = reshaped(layout, self.layer.kind, q, k, extra_options)
        if reshape is None:
            return self.controls
        acting = tuple(c for c in self.controls if reshape == TOKENS_CHANGED and c.handles_token_changes)
        for control in self.controls:
            if control not in acting:
                self.run.warn_once(
                    ("reshaped", control.name, reshape),
                    "QKV Control: %s passes through the layers where another patch %s "
                    "(first at %s: %d rows of %d tokens, the layout has %d rows)",
                    control.name, "changed the batch (HyperTile-style tiles)" if reshape == BATCH_CHANGED
                    else "changed the token count (ToMe-style merging)", self.layer.describe(),
                    q.shape[0], q.shape[1], len(layout))
        return acting

    def __call__(self, q, k, v, extra_options):
        plain = plain_attention(extra_options)
        layout = extra_options[keys.ROWS]
        controls = self._acting(layout, q, k, extra_options)
        call = AttentionCall(self.layer, layout, self.run, extra_options, plain=plain,
                             exclusive=len(controls) == 1 and self.foreign is None)
        attend = self._base(extra_options, plain)
        for control in reversed(controls):
            attend = _link(control, call, attend)
        return attend(q, k, v)


BATCH_CHANGED = "batch"
TOKENS_CHANGED = "tokens"


def reshaped(layout: RowLayout, kind: str, q, k, extra_options) -> str | None:
    """How another patch reshaped this call, or None when it reaches the layer as the UNet made
    it: ``layout``'s rows, and the layer grid's tokens (queries; and keys, for self-attention)."""
    if q.shape[0] != len(layout):
        return BATCH_CHANGED
    shape = extra_options.get("activations_shape")
    if shape is None or len(shape) != 4:
        return None
    tokens = int(shape[-2]) * int(shape[-1])
    if q.shape[1] != tokens or (kind == "attn1" and k.shape[1] != tokens):
        return TOKENS_CHANGED
    return None


def _link(control, call, attend_next):
    def attend(q, k, v, mask=None):
        if mask is not None:
            # A control further up the chain asked for masked attention: that is
            # plain attention for the controls below, not their business.
            return attend_next(q, k, v, mask=mask)
        return control.attend(call, q, k, v, attend_next)

    return attend


class SamplerRowsOnly:
    """Another pack's replace patch, called on the sampler rows only.

    Such patches expect the batch ComfyUI built: equal chunks, one per entry of
    ``cond_or_uncond`` (IPAdapter_plus, for one, slices its image tokens by
    ``batch // len(cond_or_uncond)``). Extra branch rows (always appended after the
    sampler rows) are plain UNet passes and get plain attention."""

    def __init__(self, foreign):
        self.foreign = foreign

    def __call__(self, q, k, v, extra_options):
        layout = extra_options[keys.ROWS]
        rows, n = len(layout), layout.n_sampler_rows
        if q.shape[0] <= n:  # the sampler rows (or a control's subset of rows)
            return self.foreign(q, k, v, extra_options)
        # Another patch may have folded tiles into the batch of some of q/k/v (HyperTile tiles
        # the queries only: q is (b tiles) x tokens/tiles, k and v stay b x tokens), batch
        # outermost as ComfyUI's HyperTile (einops ``(b nh nw)``) does: each tensor's sampler
        # part is its first n x (its batch / rows) entries.
        if any(t.shape[0] % rows for t in (q, k, v)):
            return self.foreign(q, k, v, extra_options)
        cut = [n * (t.shape[0] // rows) for t in (q, k, v)]
        sampler = self.foreign(q[:cut[0]], k[:cut[1]], v[:cut[2]], extra_options)
        extra = plain_attention(extra_options)(q[cut[0]:], k[cut[1]:], v[cut[2]:])
        return torch.cat([sampler, extra.to(sampler.dtype)])


_ATTENTION_KINDS = ("attn1", "attn2")


def _sampler_rows_only(patches_replace: dict) -> dict:
    """``patches_replace`` with every other pack's attention patch wrapped in SamplerRowsOnly."""
    result = dict(patches_replace)
    for kind in _ATTENTION_KINDS:
        if kind in result:
            result[kind] = {key: fn if isinstance(fn, (RoutedAttention, SamplerRowsOnly)) else SamplerRowsOnly(fn)
                            for key, fn in result[kind].items()}
    return result


def install_routes(patches_replace: dict, run, layout: RowLayout) -> dict:
    """A copy of ``patches_replace`` with a RoutedAttention on every layer a control
    touches; whatever was installed there is kept as the end of the chain. When the
    call has extra rows, other packs' patches see only the sampler rows."""
    result = dict(patches_replace)
    if len(layout) > layout.n_sampler_rows:
        result = _sampler_rows_only(result)
    for (kind, key), controls in run.routes.items():
        slot = dict(result.get(kind, {}))
        block_key = key[:2]
        foreign = slot.get(key, slot.get(block_key))
        if isinstance(foreign, RoutedAttention):  # ours from an outer call: never nest
            foreign = foreign.foreign
        slot[key] = RoutedAttention(run.layers_by_key[(kind, key)], controls, foreign, run)
        result[kind] = slot
    return result
