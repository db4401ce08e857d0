"""The attention router: one replace patch per touched layer, chaining every control
registered on the model and, at the end of the chain, whatever attention was there
before (another pack's replace patch, or ComfyUI's optimized attention)."""

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

    def __call__(self, q, k, v, extra_options):
        plain = plain_attention(extra_options)
        call = AttentionCall(self.layer, extra_options[keys.ROWS], self.run, extra_options, plain=plain,
                             exclusive=len(self.controls) == 1 and self.foreign is None)
        attend = self._base(extra_options, plain)
        for control in reversed(self.controls):
            attend = _link(control, call, attend)
        return attend(q, k, v)


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
        n = extra_options[keys.ROWS].n_sampler_rows
        if q.shape[0] <= n:  # the sampler rows (or a control's subset of rows)
            return self.foreign(q, k, v, extra_options)
        sampler = self.foreign(q[:n], k[:n], v[:n], extra_options)
        extra = plain_attention(extra_options)(q[n:], k[n:], v[n:])
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
