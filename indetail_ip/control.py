"""The InDetail-IP attention control: an inverted reference stream as extra batch rows, and
the generated rows' self-attention fed with the reference's keys/values (KV replacement,
KV concatenation or Stratified Attention, per step from the attention-fusion schedule).

Guidance routing (``patching.image_prompt_policy``): under conflict-free guidance (default,
the official ``sain: cond``) only positive rows see the reference; negative rows run their
own plain attention and the reference row is appended only to calls that hold positive rows.
``both`` (the official ``sain: all``) gives each CFG branch the reference row computed with
that branch's reference text: the inversion prompt for the positive rows, the inversion's
negative text (official: the empty prompt) for the negative rows, as a second row; when the
two texts are the same, the two rows would be identical and one row serves both branches.
``negative_image`` gives the negative rows a second inverted stream.

End of the run: the official code's DDIM ends at ᾱ₀ (``set_alpha_to_one=False``), the level
the inversion starts from; ``end_sigma`` asks for the inversion's clean level
(``patching.sampler_start``), so a run that would end at sigma 0 ends there.

ControlNet: extra rows get no residuals (``patching.branch_rows``); with
``negative_control_until`` > 0 the negative rows get none either during that first fraction of
the steps (``rows_without_control``), as the official code does with ControlNet (its
``unet_forward`` zeroes the negative half's residuals for ``cur_tsidx < gm_end_tsidx``, 10 of
50 steps: the default 0.2).

Where the reference K/V come from is a detail (design note 5): one ``inversion.reference_kv.
ReferenceKV`` per stream says whether a call must run the reference row (not when the K/V bank
holds the step, or an earlier call at the same sigma computed it: cond and uncond in separate
calls) and gives ``_reference_kv`` the layer's K/V, from this call's rows or from what it holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional


from ..attention import fusion_schedule as fs
from ..attention.kv_modes import kv_concat, kv_replace, reference_tokens, stratified_attention
from ..attention.layers import select_layers
from ..attention.rows import ROLE_REFERENCE, ROLE_UNCOND, take_rows
from ..attention.step_window import StepWindow
from ..inversion.reference_kv import FIELDS_KV, ReferenceKV
from ..inversion.result import InversionResult
from ..inversion.stream import InvertedStream
from ..patching.control import AttentionCall, AttentionControl, ModelCall, kept_outputs, write_image_tokens
from ..patching.image_prompt_policy import BOTH, NEGATIVE_IMAGE

logger = logging.getLogger("qkv_control")

ROLE_NEGATIVE_REFERENCE = "negative_reference"
DEFAULT_BLOCKS = "output"
# The official ControlNet configuration: gm_end_tsidx 10 of 50 steps without ControlNet in the negative half.
DEFAULT_NEGATIVE_CONTROL_UNTIL = 0.2


@dataclass
class _Scratch:
    layers: frozenset                             # keys of the layers this control acts on
    negative_stream: Optional[InvertedStream]     # what the negative rows see, if not the reference row
    shared: bool = False                          # the negative rows see the (positive) reference row
    kv: dict = field(default_factory=dict)        # stream role -> ReferenceKV


class ReferenceAttentionControl(AttentionControl):
    """InDetail-IP on the self-attention layers chosen by ``blocks`` (default: the decoder's)."""

    kind = "attn1"
    # The modes are attention of the rows' queries over reference + own keys: any token count.
    handles_token_changes = True
    # On a DiT the modes act on the image tokens of the joint attention (``attend``).
    dit_ready = True

    def __init__(self, inversion: InversionResult, blocks: str = DEFAULT_BLOCKS,
                 schedule: str = fs.DEFAULT_SPEC, weight_ref: float = 0.5, weight_self: float = 0.5,
                 negative_control_until: float = DEFAULT_NEGATIVE_CONTROL_UNTIL):
        super().__init__()
        if weight_ref < 0 or weight_self < 0 or weight_ref + weight_self <= 0:
            raise ValueError(
                f"InDetail-IP: expected λP >= 0, λG >= 0 and λP + λG > 0, got λP={weight_ref}, λG={weight_self}"
            )
        if not 0.0 <= negative_control_until <= 1.0:
            raise ValueError(
                f"InDetail-IP: expected negative_control_until in 0-1 (a fraction of the steps), "
                f"got {negative_control_until}"
            )
        self.inversion = inversion
        self.blocks = blocks
        self.schedule = fs.parse_fusion_schedule(schedule)
        self.weight_ref = float(weight_ref)
        self.weight_self = float(weight_self)
        self.uncontrolled_negative = StepWindow(0.0, float(negative_control_until))
        self.stream = InvertedStream(inversion, ROLE_REFERENCE, label="InDetail-IP reference")

    # ------------------------------------------------------------------ run
    def select_layers(self, layers):
        return select_layers(self.blocks, layers, "attn1")

    def start_run(self, run) -> _Scratch:
        policy = run.policy
        negative = None
        if policy.mode == NEGATIVE_IMAGE and isinstance(policy.negative_inversion, InversionResult):
            negative = InvertedStream(policy.negative_inversion, ROLE_NEGATIVE_REFERENCE, label="negative image")
        elif policy.mode == BOTH and self.inversion.negative_reference is not None:
            negative = InvertedStream(self.inversion.negative_reference, ROLE_NEGATIVE_REFERENCE,
                                      label="InDetail-IP negative-branch reference")
        scratch = _Scratch(layers=run.layers_of(self), negative_stream=negative,
                           shared=policy.mode == BOTH and negative is None)

        def needs(sigma):  # every layer's K/V at a step that reads the reference
            return {} if self.mode_at(run, sigma) == fs.NONE else dict.fromkeys(scratch.layers, FIELDS_KV)

        scratch.kv[ROLE_REFERENCE] = ReferenceKV(run, self.stream, needs)
        if negative is not None:
            scratch.kv[ROLE_NEGATIVE_REFERENCE] = ReferenceKV(run, negative, needs)
        return scratch

    def end_sigma(self, run) -> Optional[float]:
        """The inversion's clean level (sigma_min, the official ᾱ₀), or None for a clean level 0."""
        clean = self.inversion.clean_sigma
        return clean if clean > 0 else None

    def mode_at(self, run, sigma: float) -> str:
        return self.schedule.mode_at(run.clock.step(sigma), run.clock.steps)

    def rows_without_control(self, call: ModelCall) -> list[int]:
        """The negative rows during the first ``negative_control_until`` of the steps (the
        official code's negative branch without ControlNet for its first ``gm_end_tsidx`` steps)."""
        if self.uncontrolled_negative.empty or not call.layout.has(ROLE_UNCOND):
            return []
        if not call.active(self.uncontrolled_negative):
            return []
        return call.layout.indices(ROLE_UNCOND)

    # ------------------------------------------------------------ extra rows
    def extra_rows(self, call: ModelCall):
        run = call.run
        scratch: _Scratch = run.scratch(self)
        sigma = call.sigma_value
        if self.mode_at(run, sigma) == fs.NONE:
            return []
        seeing = run.image_prompt_rows(call.layout)
        rows = []
        needs_ref = bool(seeing.positive) or (bool(seeing.negative) and scratch.shared)
        if needs_ref and scratch.kv[ROLE_REFERENCE].needs_row(call):
            rows += self.stream.rows_for(call)
        negative = scratch.negative_stream if seeing.negative else None
        if negative is not None and scratch.kv[ROLE_NEGATIVE_REFERENCE].needs_row(call):
            rows += negative.rows_for(call)
        return rows

    # -------------------------------------------------------------- attention
    def _reference_kv(self, call: AttentionCall, role: str, k, v):
        """Reference K/V [R, N, D] of this layer at this sigma (this call's rows, the K/V bank or
        an earlier call at the same sigma), else None. On a DiT's joint sequence, the reference's
        image tokens only (``ReferenceKV.take``), never its text."""
        source: ReferenceKV = call.run.scratch(self).kv[role]
        taken = source.take(call, call.layout.indices(role, self.name), None, k, v)
        return None if taken is None else (taken.k, taken.v)

    def _groups(self, call: AttentionCall, k, v):
        """(target rows, (reference K, reference V)) per group of rows that see an image prompt
        (``Row.image_prompt`` under the run's policy)."""
        seeing = call.run.image_prompt_rows(call.layout)
        scratch: _Scratch = call.run.scratch(self)
        ref = self._reference_kv(call, ROLE_REFERENCE, k, v)
        groups = []
        if scratch.shared:
            if seeing.all and ref is not None:
                groups.append((seeing.all, ref))
            return groups
        if seeing.positive and ref is not None:
            groups.append((seeing.positive, ref))
        if seeing.negative and scratch.negative_stream is not None:
            negative = self._reference_kv(call, ROLE_NEGATIVE_REFERENCE, k, v)
            if negative is not None:
                groups.append((seeing.negative, negative))
        return groups

    def attend(self, call: AttentionCall, q, k, v, attend_next):
        """The modes on the target rows' image-token queries (on UNets every token is one); their
        text tokens and every other row keep the model's output (``kept_outputs``)."""
        mode = self.mode_at(call.run, call.sigma_value)
        if mode == fs.NONE:
            return attend_next(q, k, v)
        groups = self._groups(call, k, v)
        if not groups:
            return attend_next(q, k, v)
        plain = call.plain
        targets = sorted(i for rows, _ in groups for i in rows)
        # Stratified Attention reuses every row's own attention for its λG term; concat/replace
        # as the layer's only control compute the target rows' image tokens below only.
        out = kept_outputs(call, q, k, v, attend_next, targets, own_images=mode == fs.STRATIFIED)
        for rows, (k_ref, v_ref) in groups:
            qg = call.image_part(take_rows(q, rows))
            kp = reference_tokens(k_ref, len(rows))
            vp = reference_tokens(v_ref, len(rows))
            if mode == fs.STRATIFIED:
                own = call.image_part(take_rows(out, rows))
                result = stratified_attention(qg, None, None, kp, vp, self.weight_self, self.weight_ref, plain,
                                              out_self=own)
            elif mode == fs.CONCAT:
                # [K_P ⊕ the row's own keys]: on a DiT its whole joint sequence (text included)
                result = kv_concat(qg, take_rows(k, rows), take_rows(v, rows), kp, vp, plain,
                                   self_mask=call.text_padding_mask(rows))
            elif not call.joint:
                result = kv_replace(qg, kp, vp, plain)
            else:
                # DiT replacement: the reference's image keys in place of the row's own image keys;
                # its text (and reference-latent) keys stay (Stable Flow's KV injection).
                tokens = call.tokens
                padding = call.text_padding_mask(rows)
                result = kv_concat(qg, tokens.non_image_tokens(take_rows(k, rows)),
                                   tokens.non_image_tokens(take_rows(v, rows)), kp, vp, plain,
                                   self_mask=None if padding is None else tokens.non_image_tokens(padding, dim=-1))
            write_image_tokens(call, out, rows, result)
        return out
