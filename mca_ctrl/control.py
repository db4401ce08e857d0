"""The MCA-Ctrl attention control: the streams in one batch, SALQ and SAGI in the target's
self-attention, as the official code (yanghan-yh/MCA-Ctrl) runs them.

Rows of a UNet call while MCA-Ctrl is active:

- target: the sampler's own rows (cond / uncond, any batch size). Replacement / addition
  start it from the scene's inverted latent (``start_latent``).
- subject: the inverted subject image at the call's sigma, one row per CFG branch the call
  controls, run with that branch's text. The official pipeline runs every stream inside
  CFG (its batch is ``[streams..., target] x (uncond, cond)``), so the negative branch's
  target sees a subject row with the negative prompt, the positive branch's one with the
  positive prompt. The rows' own predictions are discarded (the next step takes the
  inverted latent again).
- condition: replacement / addition: the inverted scene, one row per controlled branch
  likewise. Subject generation: none; the target's own keys/values outside the mask are the
  background (official).

Which branches: both, as the official code, unless an Image Prompt Guidance node says
otherwise (``positive_only`` / ``negative_image``: the negative branch runs plain and each
stream costs one row). One image at CFG: replacement 6 rows per step (official 6),
generation 4 (official 4); conflict-free 4 and 3. Outside the scheduled steps no row is
appended and every layer runs plain attention.

Where the streams' attention inputs come from is a detail (design note 5): one
``inversion.reference_kv.ReferenceKV`` per (stream, CFG branch) says whether a call must run that
row (not when the K/V bank holds the step for that branch's text) and hands ``attend`` the
stream's keys/values, and during SAGI its queries too (SAGI is the streams' own masked attention),
from this call's row or from the bank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..attention import mca_ctrl as mca
from ..attention.cross_attention import word_attention_probs
from ..attention.layers import select_layers
from ..attention.rows import ROLE_COND, ROLE_CONDITION, ROLE_SUBJECT, ROLE_UNCOND, take_rows
from ..attention.token_grid import token_grid
from ..inversion.reference_kv import FIELDS_CONTEXT, FIELDS_KV, FIELDS_QKV, ReferenceKV
from ..inversion.stream import InvertedStream
from ..patching.control import AttentionControl, ExtraRow, kept_outputs, write_image_tokens
from ..patching.image_prompt_policy import BOTH
from ..patching.prompt_tokens import expand_positions, positions_in_text
from .config import Masks, Schedule, Streams

logger = logging.getLogger("qkv_control")

NAME = "MCA-Ctrl"

# A stream row serving a CFG branch carries the branch's ComfyUI code as its ``item``.
_BRANCH_CODE = {ROLE_COND: 0, ROLE_UNCOND: 1}


def controls_both_branches(run) -> bool:
    """Whether MCA-Ctrl controls the negative CFG branch too: yes without an Image Prompt
    Guidance node on the model (the official code) or under ``both``; the conflict-free
    ``positive_only`` and ``negative_image`` (MCA-Ctrl has no negative subject) leave the
    negative branch plain."""
    return not run.policy_set or run.policy.mode == BOTH


def sampler_row_text(call, index: int) -> tuple[Optional[torch.Tensor], dict]:
    """(context [1, T, D] or None, per-row model inputs such as SDXL's ``y``) of sampler row
    ``index``: the text a stream row serving that row's CFG branch runs with."""
    batch = call.x.shape[0]
    conds = {name: value[index:index + 1] for name, value in call.conds.items()
             if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch}
    context = None if call.context is None else call.context[index:index + 1]
    return context, conds


def _check_aspect(label, mask, latent_hw, what, image) -> None:
    """A mask must be drawn on its image: same aspect ratio as the image's latent (10% slack
    for the latent's rounding to multiples of 8 pixels)."""
    mh, mw = mask.shape[-2:]
    lh, lw = int(latent_hw[0]), int(latent_hw[1])
    if abs((mh / mw) / (lh / lw) - 1.0) > 0.1:
        raise ValueError(f"{label}: expected a {what} with the {image}'s aspect ratio (about {lh * 8}x{lw * 8} "
                         f"pixels, H x W), got a {mh}x{mw} mask")


@dataclass
class _WordMaps:
    """The subject word's cross-attention, summed per batch item since the run's first step."""

    grid: tuple[int, int]
    sums: dict = field(default_factory=dict)    # item -> [N] summed head-mean maps
    counts: dict = field(default_factory=dict)  # item -> number of maps summed

    def mean(self, item: int) -> Optional[torch.Tensor]:
        total = self.sums.get(item)
        return None if total is None else total / self.counts[item]


@dataclass
class _Scratch:
    phase_layers: dict                        # phase -> frozenset of layer keys
    auto_layers: frozenset = frozenset()      # cross-attention layers of the automatic mask
    both_branches: bool = True
    masks: dict = field(default_factory=dict)         # (latent hw, tokens, version) -> LayerMasks
    latent_masks: dict = field(default_factory=dict)  # latent hw -> (subject [1,1,h,w], region or None)
    word_maps: Optional[_WordMaps] = None
    auto_version: int = 0
    warned: set = field(default_factory=set)
    sources: dict = field(default_factory=dict)       # (stream role, branch code) -> ReferenceKV
    latent_hw: Optional[tuple[int, int]] = None      # DiTs: the target's latent size (from the model call)


def new_scratch(phase_layers=None, auto_layers=frozenset(), both_branches=True) -> _Scratch:
    """An empty scratch space (also for calling the mask helpers outside a run)."""
    return _Scratch(phase_layers=phase_layers or {}, auto_layers=auto_layers, both_branches=both_branches)


class MCACtrl(AttentionControl):
    """Configuration of one MCA-Ctrl application (immutable); run state in ``run.scratch(self)``.

    streams:  the subject inversion, and the scene inversion (replacement / addition) or
              none (generation)
    masks:    the subject mask, the target mask (or the automatic one), dilations
    schedule: SAGI/SALQ phases and their layers
    """

    kind = "attn1"
    # On a DiT, SALQ / SAGI act on the image tokens of the joint attention, masks at the patch grid.
    dit_ready = True

    def __init__(self, streams: Streams, masks: Masks, schedule: Schedule = Schedule(), label: str = NAME):
        super().__init__()
        subject, scene = streams.subject, streams.scene
        if subject.batch != 1:
            raise ValueError(f"{label}: expected one subject image, got a batch of {subject.batch}")
        if scene is not None and scene.batch != 1:
            raise ValueError(f"{label}: expected one scene image, got a batch of {scene.batch}")
        if masks.region is None and (scene is not None or masks.auto is None or not masks.auto.subject_tokens):
            raise ValueError(f"{label}: expected a target mask (or, for generation, a subject word found in "
                             f"the prompt for the automatic mask), got neither")
        subject_mask = mca.as_mask_batch(masks.subject)
        if subject_mask.shape[0] != 1:
            raise ValueError(f"{label}: expected one subject mask, got a batch of {subject_mask.shape[0]}")
        if mca.coverage(subject_mask) == "empty":
            raise ValueError(f"{label}: expected a subject mask with a foreground (pixels >= "
                             f"{mca.MASK_THRESHOLD}), got none (largest value {float(subject_mask.max()):.3f})")
        _check_aspect(label, subject_mask, subject.chain.latent_shape[1:], "subject mask", "subject image")
        if masks.region is not None and scene is not None:
            _check_aspect(label, mca.as_mask_batch(masks.region), scene.chain.latent_shape[1:],
                          "target mask", "scene image")
        if masks.auto is not None and not 0.0 < masks.auto.fraction <= 1.0:
            raise ValueError(f"{label}: expected an automatic-mask share in (0, 1], got {masks.auto.fraction}")
        self.streams = streams
        self.masks = masks
        self.schedule = schedule
        self.label = label
        self.subject_mask = subject_mask
        self.region_mask = None if masks.region is None else mca.as_mask_batch(masks.region)
        self.subject_stream = InvertedStream(subject, ROLE_SUBJECT, f"{label} subject")
        self.scene_stream = None if scene is None else InvertedStream(scene, ROLE_CONDITION, f"{label} scene")
        self._say_what_the_target_mask_does()

    def _say_what_the_target_mask_does(self) -> None:
        """A full or empty target mask is valid; say before sampling what it will do."""
        if self.region_mask is None:
            return
        covered = mca.coverage(self.region_mask)
        threshold = f"(no pixel >= {mca.MASK_THRESHOLD})"
        if covered == "empty" and self.scene is not None:
            logger.warning("%s: the target mask is empty %s: nothing is replaced; the image follows the scene's "
                           "inversion (its reconstruction)", self.label, threshold)
        elif covered == "empty":
            logger.warning("%s: the target mask is empty %s: the subject is not placed; the image is the prompt's "
                           "plain generation", self.label, threshold)
        elif covered == "full":
            logger.warning("%s: the target mask covers the whole image (every pixel >= %s): no background is "
                           "kept; the whole image takes the subject's appearance", self.label, mca.MASK_THRESHOLD)

    @property
    def subject(self):
        return self.streams.subject

    @property
    def scene(self):
        return self.streams.scene

    @property
    def automatic_mask(self) -> bool:
        return self.region_mask is None

    # ------------------------------------------------------------------ layers
    def _auto_layers(self, layers):
        attn2 = [layer for layer in layers if layer.kind == "attn2"]
        if not attn2:
            return self._joint_auto_layers(layers)
        try:
            return select_layers(self.masks.auto.layers, layers, "attn2")
        except ValueError:
            # The model has no cross-attention at that level: take its coarsest one.
            coarsest = max(layer.level for layer in attn2)
            return tuple(layer for layer in attn2 if layer.level == coarsest)

    def _joint_auto_layers(self, layers):
        """A DiT has no cross-attention: the word map is the image queries' attention to the text
        keys of its joint attention, in the layers of the spec, else the double-stream blocks
        (Flux: text and image with their own projections, as in a cross-attention) or every
        joint block (SD3)."""
        try:
            return select_layers(self.masks.auto.layers, layers, "attn1")
        except ValueError:
            joint = select_layers("all", layers, "attn1")
            return tuple(layer for layer in joint if layer.section == "double") or \
                tuple(layer for layer in joint if layer.transformer_index == 0)

    def _phase_layers(self, layers) -> dict[str, frozenset]:
        spec = {mca.PHASE_SALQ: self.schedule.salq_layers, mca.PHASE_SAGI: self.schedule.sagi_layers}
        return {phase: frozenset(layer.key for layer in select_layers(s, layers, "attn1"))
                for phase, s in spec.items()}

    def select_layers(self, layers):
        by_phase = self._phase_layers(layers)
        wanted = by_phase[mca.PHASE_SALQ] | by_phase[mca.PHASE_SAGI]
        chosen = tuple(layer for layer in layers if layer.kind == "attn1" and layer.key in wanted)
        if self.automatic_mask:
            # (a DiT's word-map layers are attn1 layers, maybe chosen already: each layer once)
            chosen += tuple(layer for layer in self._auto_layers(layers) if layer not in chosen)
        return chosen

    # --------------------------------------------------------------------- run
    def start_run(self, run) -> _Scratch:
        auto = frozenset(layer.key for layer in self._auto_layers(run.layers)) if self.automatic_mask else frozenset()
        st = new_scratch(self._phase_layers(run.layers), auto, controls_both_branches(run))

        # SALQ reads the streams' keys/values, SAGI their queries too and, on a DiT, their own text keys
        sagi_fields = FIELDS_QKV + FIELDS_CONTEXT if run.family.uses_override else FIELDS_QKV

        def needs(sigma):
            phase = self.phase(run, sigma)
            if phase == mca.PHASE_NONE:
                return {}
            return dict.fromkeys(st.phase_layers[phase], sagi_fields if phase == mca.PHASE_SAGI else FIELDS_KV)

        for stream in (self.subject_stream, self.scene_stream):
            for role, code in (() if stream is None else _BRANCH_CODE.items()):
                branch = "positive" if role == ROLE_COND else "negative"
                st.sources[(stream.role, code)] = ReferenceKV(run, stream, needs, f"{stream.label} ({branch} text)")
        return st

    def phase(self, run, sigma: float) -> str:
        """The phase MCA-Ctrl runs at ``sigma``: the schedule's, except that the automatic mask
        needs one step of cross-attention maps, so its first step is plain (official: SAGI
        from step 1)."""
        if self.automatic_mask and run.clock.step(sigma) == 0:
            return mca.PHASE_NONE
        return self.schedule.phases.phase(run.clock.step(sigma), run.clock.steps)

    def end_sigma(self, run) -> Optional[float]:
        """The inversions' clean level: the official pipeline (MasaCtrl's DDIM with
        ``set_alpha_to_one=False``) ends its last step at ᾱ₀ = sigma_min, as its inversion starts
        there; a clean level 0 (the DDIM Inversion node's ``zero``) ends at 0."""
        clean = self.subject.clean_sigma
        return clean if clean > 0 else None

    def start_latent(self, run, noise: torch.Tensor) -> Optional[torch.Tensor]:
        """Replacement / addition: the target starts from the scene's inverted latent at the
        run's first sigma (paper: the target shares the condition's initial features)."""
        if self.scene is None:
            return None
        if noise.shape[1] != self.scene.latent_channels:
            raise ValueError(f"{self.label}: expected {self.scene.latent_channels}-channel latents "
                             f"(the scene inversion's), got {noise.shape[1]}")
        height, width = noise.shape[-2:]
        return self.scene.chain.resized(height, width).latent_at(run.clock.first_sigma)

    # -------------------------------------------------------------------- rows
    def target_rows(self, st: _Scratch, layout) -> list[int]:
        """Sampler rows MCA-Ctrl controls: the positive branch, and the negative one too unless
        the guidance policy is conflict-free (``controls_both_branches``)."""
        roles = (ROLE_COND, ROLE_UNCOND) if st.both_branches else (ROLE_COND,)
        return [i for i, row in enumerate(layout.rows) if row.is_sampler_row and row.role in roles]

    def _stream_rows(self, call, st: _Scratch, stream: InvertedStream, targets: list[int]) -> list[ExtraRow]:
        """One row of ``stream`` per CFG branch among ``targets``, with the branch's own text
        (that of the branch's first target row; batch items share it), where the K/V bank does
        not hold the step for that text."""
        stream.check_call(call)
        rows = []
        for role, code in _BRANCH_CODE.items():
            first = next((t for t in targets if call.layout.rows[t].role == role), None)
            if first is None:
                continue
            context, conds = sampler_row_text(call, first)
            if context is None:
                context, conds = stream.inversion.context, dict(stream.inversion.conds)
            if st.sources[(stream.role, code)].needs_row(call, (context, conds)):
                x = stream.latents_for(call)
                rows.append(ExtraRow(role=stream.role, x=x[:1], context=context, conds=conds, item=code))
        return rows

    def extra_rows(self, call):
        run = call.run
        st: _Scratch = run.scratch(self)
        if self.automatic_mask:
            self._check_prompt(call, st)
        st.latent_hw = tuple(int(s) for s in call.x.shape[-2:])
        targets = self.target_rows(st, call.layout)
        if not targets:
            return []
        if self.phase(run, call.sigma_value) == mca.PHASE_NONE:
            return []
        rows = self._stream_rows(call, st, self.subject_stream, targets)
        if self.scene_stream is not None:
            rows += self._stream_rows(call, st, self.scene_stream, targets)
        return rows

    # -------------------------------------------------------------------- masks
    def _latent_masks(self, st: _Scratch, latent_hw):
        """The drawn masks on the target's latent: binarised, fitted (cover + centre crop)."""
        cached = st.latent_masks.get(latent_hw)
        if cached is None:
            subject_hw = tuple(self.subject.chain.latent_shape[1:])
            subject = mca.fit_mask(self.subject_mask, subject_hw, latent_hw)
            if float(subject.max()) <= 0:
                raise ValueError(
                    f"{self.label}: expected the subject to stay in view when the subject image "
                    f"({subject_hw[0] * 8}x{subject_hw[1] * 8}) is centre-cropped to the target's aspect ratio "
                    f"({latent_hw[0] * 8}x{latent_hw[1] * 8}), got an empty subject mask after the crop: crop the "
                    f"subject image around the subject first"
                )
            region = None
            if self.region_mask is not None:
                scene_hw = tuple(self.scene.chain.latent_shape[1:]) if self.scene is not None else latent_hw
                region = mca.fit_mask(self.region_mask, scene_hw, latent_hw)
            cached = (subject, region)
            st.latent_masks[latent_hw] = cached
        return cached

    def _layer_masks(self, st: _Scratch, latent_hw, n_tokens, items, grid=None) -> Optional[mca.LayerMasks]:
        """The masks at a layer of ``n_tokens`` image tokens: at ``grid`` (a DiT's patch grid), else
        the UNet level of that many tokens."""
        version = st.auto_version if self.automatic_mask else 0
        key = (latent_hw, n_tokens, version)
        masks = st.masks.get(key)
        if masks is not None:
            return masks
        subject, region = self._latent_masks(st, latent_hw)
        dilation = self.masks.subject_dilation
        if region is not None:
            masks = mca.layer_masks(subject, region, latent_hw, n_tokens, dilation, self.masks.region_dilation,
                                    grid=grid)
        else:
            maps = st.word_maps
            per_item = [None if maps is None else maps.mean(item) for item in range(max(items) + 1)]
            if any(m is None for m in per_item):
                return None
            # Row b of the region is batch item b (``_mca_attention`` picks each target's).
            layer_grid = token_grid(latent_hw, n_tokens) if grid is None else grid
            region_tokens = mca.automatic_region(torch.stack(per_item), maps.grid, layer_grid,
                                                 self.masks.auto.fraction)
            subject_keys = mca.layer_masks(subject, torch.zeros_like(subject), latent_hw, n_tokens,
                                           dilation, grid=grid).subject_keys
            masks = mca.LayerMasks(subject_keys=subject_keys, region=region_tokens)
        st.masks = {k: v for k, v in st.masks.items() if k[2] == version}
        st.masks[key] = masks
        return masks

    def _capture_word_map(self, call, st: _Scratch, q, k) -> None:
        """Automatic target mask (official code): the subject word's cross-attention probabilities
        of the target's positive rows, averaged over heads, summed over the word's tokens and
        accumulated over every call of the mask's layers since the run's first step."""
        layout = call.layout
        rows = [i for i, row in enumerate(layout.rows) if row.is_sampler_row and row.role == ROLE_COND]
        if not rows:
            return
        auto = self.masks.auto
        q, k = take_rows(q, rows), take_rows(k, rows)
        if call.joint:
            # A DiT: the image queries against the row's own text keys (softmax over the text
            # keys only: a cross-attention map, never the joint N x N one), positions unrepeated.
            q, k = call.image_part(q), self._own_text(call, k, rows)
            tokens = positions_in_text(list(auto.subject_tokens), k.shape[1])
            grid = call.tokens.grid
        else:
            context_tokens = auto.prompt_context.shape[1] if auto.prompt_context is not None else 77
            tokens = expand_positions(list(auto.subject_tokens), context_tokens, k.shape[1])
            grid = None
        if not tokens:
            return
        probs = word_attention_probs(q, k, call.heads, tokens)
        word_map = probs.mean(dim=1).sum(dim=-1)          # [rows, N]: head mean, then the word's tokens
        if grid is None:
            latent_hw = tuple(int(s) for s in call.extra_options["original_shape"][-2:])
            grid = token_grid(latent_hw, q.shape[1])
        if st.word_maps is None or st.word_maps.grid != grid:
            st.word_maps = _WordMaps(grid)
        maps = st.word_maps
        for row, item in zip(range(word_map.shape[0]), (layout.rows[i].item for i in rows)):
            value = word_map[row].detach().float().cpu()
            maps.sums[item] = value if item not in maps.sums else maps.sums[item] + value
            maps.counts[item] = maps.counts.get(item, 0) + 1
        st.auto_version += 1

    @staticmethod
    def _own_text(call, k, rows):
        """The text keys of ``rows`` (sampler rows of one CFG branch: one text length), without the
        zero padding a longer extra row's text gave them."""
        text = call.tokens.text_tokens(k)
        padding = call.text_padding_mask(rows)
        if padding is not None:
            own = int((call.tokens.text_tokens(padding, dim=-1)[0, 0] == 0).sum())
            text = text[:, :own]
        return text

    def _check_prompt(self, call, st: _Scratch) -> None:
        """Warn once per run when the sampler's positive prompt is not the node's prompt (the
        subject word's token positions come from the node's)."""
        expected = self.masks.auto.prompt_context
        positive = call.layout.indices(ROLE_COND)
        if expected is None or "prompt" in st.warned or call.context is None or not positive:
            return
        st.warned.add("prompt")
        actual = call.context[positive[0]:positive[0] + 1]
        if actual.shape != expected.shape or not torch.allclose(actual.float().cpu(), expected.float().cpu(),
                                                                 rtol=1e-2, atol=1e-2):
            logger.warning("%s: the positive prompt is not the node's condition_prompt; the automatic mask "
                           "reads the subject word at the condition prompt's token positions %s",
                           self.label, list(self.masks.auto.subject_tokens))

    # ---------------------------------------------------------------- attention
    def _partners(self, call, st: _Scratch, targets, q, k, v):
        """For each target row the subject's and the condition's ``StreamQKV``: the streams of its
        CFG branch (this call's rows or the K/V bank); in generation the condition is the target
        row itself (official: no condition stream), None there. None when a stream is missing."""
        layout = call.layout
        taken = {}

        def inputs(stream, code):
            if (stream.role, code) not in taken:
                rows = [i for i in call.rows(stream.role, self.name) if layout.rows[i].item == code]
                taken[(stream.role, code)] = st.sources[(stream.role, code)].take(call, rows, q, k, v)
            return taken[(stream.role, code)]

        subject_for, condition_for = [], []
        for t in targets:
            code = _BRANCH_CODE[layout.rows[t].role]
            subject = inputs(self.subject_stream, code)
            condition = inputs(self.scene_stream, code) if self.scene_stream is not None else None
            if subject is None or (self.scene_stream is not None and condition is None):
                return None
            subject_for.append(subject)
            condition_for.append(condition)
        return subject_for, condition_for

    def attend(self, call, q, k, v, attend_next):
        st: _Scratch = call.run.scratch(self)
        if call.layer.kind == "attn2":
            if call.layer.key in st.auto_layers:
                self._capture_word_map(call, st, q, k)
            return attend_next(q, k, v)
        if call.joint and call.layer.key in st.auto_layers:
            self._capture_word_map(call, st, q, k)  # a DiT's word map: its joint attention's image -> text part
        phase = self.phase(call.run, call.sigma_value)
        if phase == mca.PHASE_NONE or call.layer.key not in st.phase_layers.get(phase, ()):
            return attend_next(q, k, v)
        targets = self.target_rows(st, call.layout)
        partners = self._partners(call, st, targets, q, k, v) if targets else None
        if partners is None:
            return attend_next(q, k, v)
        items = [call.layout.rows[t].item for t in targets]
        if call.token_layout is not None:  # a DiT: masks at the patch grid of the image tokens
            masks = self._layer_masks(st, st.latent_hw, call.tokens.n_image, items, grid=call.tokens.grid)
        else:
            latent_hw = tuple(int(s) for s in call.extra_options["original_shape"][-2:])
            masks = self._layer_masks(st, latent_hw, q.shape[1], items)
        if masks is None:  # automatic mask not available yet
            return attend_next(q, k, v)
        return self._mca_attention(call, phase, masks, targets, *partners, q, k, v, attend_next)

    @staticmethod
    def _context_keys(call, k, v, rows) -> Optional[mca.ContextKeys]:
        """On a DiT, the text (and reference-latent) keys of ``rows``, their padding not kept."""
        if not call.joint:
            return None
        return mca.ContextKeys(*call.non_image_keys(rows, k, v))

    def _mca_attention(self, call, phase, masks, targets, subject_for, condition_for, q, k, v, attend_next):
        """SALQ / SAGI on the targets' image-token queries, the streams' image keys; every other
        row, and the targets' text tokens on a DiT, as the rest of the chain computes them."""
        layout = call.layout
        device = q.device
        plain = call.plain
        # Only the stream rows (and untouched sampler rows) need plain attention, unless other
        # controls or another pack's patch follow: they expect the full rows.
        out = kept_outputs(call, q, k, v, attend_next, targets)
        image = call.image_part

        region = masks.region.to(device)
        if region.shape[0] > 1:
            items = [min(layout.rows[t].item, region.shape[0] - 1) for t in targets]
            region = region.index_select(0, torch.tensor(items, device=device))
        # The streams' image-token inputs (``ReferenceKV.take``: image tokens only on a DiT).
        k_s, v_s = _stacked([s.k for s in subject_for]), _stacked([s.v for s in subject_for])
        if self.scene_stream is None:  # generation: the target rows' own keys/values are the background
            q_c, k_c, v_c = (image(take_rows(t, targets)) for t in (q, k, v))
        else:
            k_c, v_c = _stacked([c.k for c in condition_for]), _stacked([c.v for c in condition_for])
        subject_keys = masks.subject_keys.to(device)
        if phase == mca.PHASE_SALQ:
            out_targets = mca.salq(image(take_rows(q, targets)), k_s, v_s, k_c, v_c, subject_keys, region,
                                   plain, context=self._context_keys(call, k, v, targets))
        else:
            q_s = _stacked([s.q for s in subject_for])
            if self.scene_stream is not None:
                q_c = _stacked([c.q for c in condition_for])
            # On a DiT each stream's queries attend its own text keys (``FIELDS_CONTEXT``: from this
            # call's row or the bank); generation's condition is the target rows themselves.
            context_subject = context_condition = None
            if call.joint:
                context_subject = _stream_context(subject_for)
                context_condition = (self._context_keys(call, k, v, targets) if self.scene_stream is None
                                     else _stream_context(condition_for))
            out_targets = mca.sagi(q_s, k_s, v_s, q_c, k_c, v_c, subject_keys, region, plain,
                                   context_subject=context_subject, context_condition=context_condition)
        write_image_tokens(call, out, targets, out_targets)
        return out


def _stacked(tensors: list) -> torch.Tensor:
    """The streams' tensors as one batch: the tensor itself when there is one (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _stream_context(streams) -> mca.ContextKeys:
    """The streams' own non-image keys (``StreamQKV.k_context``, one per target row), the shorter
    ones zero-padded and not kept: the branches' texts may differ in length."""
    length = max(s.k_context.shape[1] for s in streams)
    rows = sum(s.k_context.shape[0] for s in streams)
    first = streams[0].k_context
    if all(s.k_context.shape[1] == length for s in streams):
        return mca.ContextKeys(_stacked([s.k_context for s in streams]), _stacked([s.v_context for s in streams]))

    def padded(t):
        return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1]))

    keep = torch.zeros((rows, length), dtype=torch.bool, device=first.device)
    start = 0
    for s in streams:
        keep[start:start + s.k_context.shape[0], :s.k_context.shape[1]] = True
        start += s.k_context.shape[0]
    return mca.ContextKeys(torch.cat([padded(s.k_context) for s in streams]),
                           torch.cat([padded(s.v_context) for s in streams]), keep)
