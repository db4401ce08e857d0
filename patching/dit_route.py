"""The attention router for diffusion transformers: ComfyUI's ``optimized_attention_override``.

ComfyUI's DiTs call ``optimized_attention(q, k, v, heads, ..., transformer_options=...)``;
``wrap_attn`` (comfy/ldm/modules/attention.py) hands every such call to
``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` when set,
``func`` being the attention function itself (calling it does not re-enter the wrapper).
The APPLY_MODEL wrapper installs one ``DiTAttentionRoute`` per model call, as it installs
attn1/attn2 replace patches on UNets (``patching.router``):

- the family adapter names the layer of each call (``families.*.layer_key``); calls of
  layers no control touches go straight to the end of the chain;
- controls of a touched layer see an ``AttentionCall`` whose ``tokens`` say which tokens are
  text and which image, and q/k/v in ComfyUI's ``[B, N, heads*dim]`` layout (as on UNets:
  the model's ``[B, heads, N, dim]`` is converted for touched layers only), after the
  model's q/k norms and RoPE;
- the end of the chain is another pack's override if one was installed (before or after
  this pack's nodes: it is in ``transformer_options`` when the model is called; it sees the
  sampler rows only when extra rows are appended, like ``router.SamplerRowsOnly``), else
  ``func``. Never ``optimized_attention`` itself: its ``transformer_options`` still hold
  this override, so that would re-enter it;
- rows whose text context was zero-padded to the call's text length (extra rows with a
  shorter context, ``branch_rows.pad_contexts``) get their padding keys masked (-inf) in
  every joint attention, so padding changes nothing but rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..attention.rows import RowLayout
from ..families.base import CallGeometry
from . import keys
from .control import AttentionCall
from .router import _link

OVERRIDE = "optimized_attention_override"
# ComfyUI's attention functions' positional parameters (attention_pytorch & co.)
_POSITIONAL = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


@dataclass
class AttentionArgs:
    """One ``optimized_attention`` call's arguments, by name."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: int
    mask: Optional[torch.Tensor] = None
    skip_reshape: bool = False
    skip_output_reshape: bool = False
    other: dict = field(default_factory=dict)  # attn_precision, transformer_options, _inside_attn_wrapper ...

    @classmethod
    def parse(cls, args: tuple, kwargs: dict) -> "AttentionArgs":
        named = dict(kwargs)
        for name, value in zip(_POSITIONAL, args):
            named[name] = value
        return cls(named.pop("q"), named.pop("k"), named.pop("v"), int(named.pop("heads")), named.pop("mask", None),
                   bool(named.pop("skip_reshape", False)), bool(named.pop("skip_output_reshape", False)), named)

    @property
    def transformer_options(self) -> dict:
        return self.other.get("transformer_options") or {}

    @property
    def length(self) -> int:
        return int(self.q.shape[2] if self.skip_reshape else self.q.shape[1])

    @property
    def dim_head(self) -> int:
        return int(self.q.shape[-1] if self.skip_reshape else self.q.shape[-1] // self.heads)

    def call(self, func, q, k, v, mask, skip_reshape: bool, skip_output_reshape: bool):
        return func(q, k, v, self.heads, mask=mask, skip_reshape=skip_reshape,
                    skip_output_reshape=skip_output_reshape, **self.other)


def _tokens_last(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, dim] -> [B, N, heads*dim]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _heads_first(x: torch.Tensor, dim_head: int) -> torch.Tensor:
    """[B, N, heads*dim] -> [B, heads, N, dim] (a view of a contiguous tensor)."""
    b, n, inner = x.shape
    return x.reshape(b, n, inner // dim_head, dim_head).transpose(1, 2)


def _with_padding(mask: Optional[torch.Tensor], padding: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The model's additive mask with the text-padding mask ``[B, 1, N]`` added (broadcast)."""
    if padding is None:
        return mask
    if mask is None:
        return padding
    padding = padding.to(mask.dtype)
    return mask + (padding.unsqueeze(1) if mask.ndim == 4 else padding)


def _rows(tensor, n: int, batch: int, extra: bool):
    if tensor is None or not torch.is_tensor(tensor) or tensor.ndim < 3 or tensor.shape[0] != batch:
        return tensor
    return tensor[n:] if extra else tensor[:n]


class DiTAttentionRoute:
    """``transformer_options["optimized_attention_override"]`` for one DiT model call.

    family:   the model's family adapter; run: the RunContext; rows: the call's RowLayout;
    geometry: the call's image grid and text length; text_lengths: each row's own text
              token count when some rows were padded (else None); foreign: the override
              that was installed before (another pack's), the end of the chain.
    """

    def __init__(self, family, run, rows: RowLayout, geometry: CallGeometry,
                 text_lengths: Optional[tuple[int, ...]] = None, foreign=None):
        self.family = family
        self.run = run
        self.rows = rows
        self.geometry = geometry
        self.text_lengths = text_lengths
        self.foreign = foreign.foreign if isinstance(foreign, DiTAttentionRoute) else foreign
        self._padding: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------ the door
    def __call__(self, func, *args, **kwargs):
        call = AttentionArgs.parse(args, kwargs)
        options = call.transformer_options
        key = self.family.layer_key(options, call.length, self.geometry)
        controls = self.run.routes.get(("attn1", key)) if key is not None else None
        if not controls:
            return self._base(func, call, call.q, call.k, call.v, call.mask, call.skip_reshape)
        return self._routed(func, call, key, controls)

    def _routed(self, func, call: AttentionArgs, key, controls):
        layer = self.run.layers_by_key[("attn1", key)]
        tokens = self.family.token_layout(call.transformer_options, call.length, self.geometry)
        dim_head = call.dim_head
        # The call's options without this override: ``plain_attention(call.extra_options)`` (ComfyUI's
        # optimized attention) is then plain attention too, never a way back into the route.
        extra_options = {key: value for key, value in call.transformer_options.items() if key != OVERRIDE}
        extra_options.update({keys.ROWS: self.rows, "n_heads": call.heads, "dim_head": dim_head,
                              "attn_precision": call.other.get("attn_precision")})

        def plain(q, k, v, mask=None):
            return call.call(func, q, k, v, mask, False, False)

        def end_of_chain(q, k, v, mask=None):
            if mask is None and k.shape[1] == call.length:
                mask = call.mask  # the model's own mask applies to the model's own keys
            elif call.mask is not None:
                raise ValueError(f"QKV Control: {layer.describe()} expected the model's keys when the model "
                                 "passes an attention mask, got a control's other keys")
            if call.skip_reshape:
                q, k, v = (_heads_first(t, dim_head) for t in (q, k, v))
            return self._base(func, call, q, k, v, mask, call.skip_reshape, output_tokens_last=True)

        def key_padding(rows):
            if call.mask is not None:
                raise ValueError(f"QKV Control: {layer.describe()} expected no attention mask from the model for a "
                                 "control's own key sets, got one (a model given an attention_mask, e.g. a masked "
                                 "T5 context): not supported by the image-token modes")
            if self.text_lengths is None or all(self.text_lengths[row] == self.geometry.text_tokens for row in rows):
                return None
            mask = self._padding_mask(call, call.q)
            return None if mask is None else mask[rows]

        attention_call = AttentionCall(layer, self.rows, self.run, extra_options, plain=plain,
                                       exclusive=len(controls) == 1 and self.foreign is None,
                                       token_layout=tokens, key_padding=key_padding)
        attend = end_of_chain
        for control in reversed(controls):
            attend = _link(control, attention_call, attend)
        q, k, v = call.q, call.k, call.v
        if call.skip_reshape:
            q, k, v = _tokens_last(q), _tokens_last(k), _tokens_last(v)
        elif v.ndim == 4:  # SD3's MMDiT passes v as [B, N, heads, dim] (ComfyUI's attention views it)
            v = v.reshape(v.shape[0], v.shape[1], -1)
        out = attend(q, k, v)
        if call.skip_output_reshape:
            out = _heads_first(out, dim_head)
        return out

    # ------------------------------------------------------ end of the chain
    def _padding_mask(self, call: AttentionArgs, q: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, 1, N] additive mask: -inf on the padded text keys of each padded row (the
        padding is the end of the text part, where ``branch_rows.pad_contexts`` put it)."""
        if self.text_lengths is None:
            return None
        tokens = self.family.token_layout(call.transformer_options, call.length, self.geometry)
        if tokens.n_text == 0:  # an image-only attention (MMDiT-X)
            return None
        cache_key = (call.length, tokens.text.stop, q.dtype, q.device)
        mask = self._padding.get(cache_key)
        if mask is None:
            mask = torch.zeros((len(self.text_lengths), 1, call.length), dtype=q.dtype, device=q.device)
            for row, own in enumerate(self.text_lengths):
                mask[row, 0, tokens.text.stop - (self.geometry.text_tokens - own):tokens.text.stop] = float("-inf")
            self._padding[cache_key] = mask
        return mask

    def _base(self, func, call: AttentionArgs, q, k, v, mask, skip_reshape: bool, output_tokens_last=False):
        """Plain attention of the model's rows: the foreign override (sampler rows only when
        extra rows are appended) or ``func``, with the text padding masked."""
        length = int(k.shape[2] if skip_reshape else k.shape[1])
        mask = _with_padding(mask, self._padding_mask(call, q) if length == call.length else None)
        skip_output = False if output_tokens_last else call.skip_output_reshape
        if self.foreign is None:
            return call.call(func, q, k, v, mask, skip_reshape, skip_output)
        n, batch = self.rows.n_sampler_rows, q.shape[0]
        if batch <= n:
            return self._foreign(func, call, q, k, v, mask, skip_reshape, skip_output)
        sampler = self._foreign(func, call, q[:n], k[:n], v[:n], _rows(mask, n, batch, False), skip_reshape,
                                skip_output)
        extra = call.call(func, q[n:], k[n:], v[n:], _rows(mask, n, batch, True), skip_reshape, skip_output)
        return torch.cat([sampler, extra.to(sampler.dtype)])

    def _foreign(self, func, call: AttentionArgs, q, k, v, mask, skip_reshape, skip_output):
        return self.foreign(func, q, k, v, call.heads, mask=mask, skip_reshape=skip_reshape,
                            skip_output_reshape=skip_output, **call.other)


def install_dit_route(options: dict, run, rows: RowLayout, geometry: CallGeometry,
                      text_lengths: Optional[tuple[int, ...]] = None) -> dict:
    """``options`` (the call's copied transformer_options, changed in place and returned) with
    this call's route as ``optimized_attention_override``, chaining the one installed before,
    and the family's block-naming patches for the touched blocks (SD3)."""
    family = run.family
    options[OVERRIDE] = DiTAttentionRoute(family, run, rows, geometry, text_lengths, options.get(OVERRIDE))
    touched = [run.layers_by_key[route_key] for route_key in run.routes]
    block_patches = family.block_patches(touched, options)
    if block_patches:
        patches_replace = dict(options.get("patches_replace") or {})
        patches_replace["dit"] = {**patches_replace.get("dit", {}), **block_patches}
        options["patches_replace"] = patches_replace
    return options

