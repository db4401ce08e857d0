"""The MCA-Ctrl attention control: three streams in one batch, SALQ and SAGI in the
target's self-attention.

Rows of a UNet call while MCA-Ctrl is active (paper, "Overall Architecture"):

- target: the sampler's own rows (cond / uncond, any batch size); starts from the
  condition stream's initial latent (``start_latent``);
- subject: one row, the inverted subject image at the call's sigma (no CFG);
- condition: one row, the inverted scene (replacement / addition), or one row per
  batch item generated from the target's noise with its own prompt (generation).

So a CFG step costs 4 rows for one image (the official code runs 6). Outside the
scheduled steps no row is appended and every layer runs plain attention.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..attention import mca_ctrl as mca
from ..attention.cross_attention import word_attention_map
from ..attention.layers import select_layers
from ..attention.rows import PROMPT_POSITIVE, ROLE_CONDITION, ROLE_SUBJECT
from ..attention.token_grid import token_grid
from ..inversion.stream import InvertedStream
from ..patching.control import AttentionControl
from ..patching.image_prompt_policy import BOTH
from ..patching.prompt_tokens import expand_positions
from .config import Masks, Schedule, Streams
from .streams import GeneratedStream

logger = logging.getLogger("qkv_control")

NAME = "MCA-Ctrl"


def target_rows(run, layout) -> list[int]:
    """Sampler rows MCA-Ctrl controls: those that see the image prompt (``Row.image_prompt``)
    under the run's policy. The positive branch always; the negative branch too under ``both``
    (the official code's setting). Under ``positive_only`` (the default, conflict-free) and
    ``negative_image`` (MCA-Ctrl has no negative subject) the negative rows run plain attention."""
    seeing = run.image_prompt_rows(layout)
    rows = seeing.all if run.policy.mode == BOTH else seeing.positive
    return [i for i in rows if layout.rows[i].is_sampler_row]


def _check_aspect(label, mask, latent_hw, what, image) -> None:
    """A mask must be drawn on its image: same aspect ratio as the image's latent (10% slack
    for the latent's rounding to multiples of 8 pixels)."""
    mh, mw = mask.shape[-2:]
    lh, lw = int(latent_hw[0]), int(latent_hw[1])
    if abs((mh / mw) / (lh / lw) - 1.0) > 0.1:
        raise ValueError(f"{label}: expected a {what} with the {image}'s aspect ratio (about {lh * 8}x{lw * 8} "
                         f"pixels, H x W), got a {mh}x{mw} mask")


@dataclass
class _AutoCapture:
    """The automatic mask being summed over the layers of one step."""

    step: int
    grid: tuple[int, int]
    sum: torch.Tensor       # [items, N] summed word maps
    count: int = 1


@dataclass
class _Scratch:
    phase_layers: dict                        # phase -> frozenset of layer keys
    auto_layers: frozenset                    # cross-attention layers of the automatic mask
    anchors: dict = field(default_factory=dict)       # generated condition stream, per item
    masks: dict = field(default_factory=dict)         # (latent hw, tokens, version) -> LayerMasks
    latent_masks: dict = field(default_factory=dict)  # latent hw -> (subject [1,1,H,W], region or None)
    auto: Optional[_AutoCapture] = None               # automatic mask of the current step
    auto_region: Optional[tuple] = None               # (grid, region [items, N]) in use
    auto_version: int = 0
    warned: set = field(default_factory=set)


def new_scratch(phase_layers=None, auto_layers=frozenset()) -> _Scratch:
    """An empty scratch space (also for calling the mask helpers outside a run)."""
    return _Scratch(phase_layers=phase_layers or {}, auto_layers=auto_layers)


class MCACtrl(AttentionControl):
    """Configuration of one MCA-Ctrl application (immutable); run state in ``run.scratch(self)``.

    streams:  the subject inversion and the scene inversion or a generated condition prompt
    masks:    the subject mask, the target mask (or the automatic one), dilations
    schedule: SAGI/SALQ phases and their layers
    """

    kind = "attn1"

    def __init__(self, streams: Streams, masks: Masks, schedule: Schedule = Schedule(), label: str = NAME):
        super().__init__()
        subject, scene, prompt = streams.subject, streams.scene, streams.prompt
        if subject.batch != 1:
            raise ValueError(f"{label}: expected one subject image, got a batch of {subject.batch}")
        if (scene is None) == (prompt is None):
            raise ValueError(f"{label}: expected either a scene inversion or a condition prompt, got "
                             f"{'both' if scene is not None else 'neither'}")
        if scene is not None and scene.batch != 1:
            raise ValueError(f"{label}: expected one scene image, got a batch of {scene.batch}")
        if masks.region is None and (scene is not None or masks.auto is None or not masks.auto.subject_tokens):
            raise ValueError(f"{label}: expected a target mask (or, for generation, a subject word found in "
                             f"the condition prompt for the automatic mask), got neither")
        subject_mask = mca.as_mask_batch(masks.subject)
        if subject_mask.shape[0] != 1:
            raise ValueError(f"{label}: expected one subject mask, got a batch of {subject_mask.shape[0]}")
        if float(subject_mask.max()) <= 0:
            raise ValueError(f"{label}: expected a subject mask with a foreground, got an empty mask")
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
        self.generated = None if prompt is None else GeneratedStream(prompt.context, prompt.conds, cfg=prompt.cfg)
        self.subject_stream = InvertedStream(subject, ROLE_SUBJECT, f"{label} subject")
        self.condition_stream = None if scene is None else InvertedStream(scene, ROLE_CONDITION, f"{label} scene")

    @property
    def subject(self):
        return self.streams.subject

    @property
    def condition(self):
        return self.streams.scene

    # ------------------------------------------------------------------ layers
    @property
    def automatic_mask(self) -> bool:
        return self.region_mask is None

    def _auto_layers(self, layers):
        try:
            return select_layers(self.masks.auto.layers, layers, "attn2")
        except ValueError:
            # The model has no cross-attention at that level: take its coarsest one.
            attn2 = [layer for layer in layers if layer.kind == "attn2"]
            coarsest = max(layer.level for layer in attn2)
            return tuple(layer for layer in attn2 if layer.level == coarsest)

    def _phase_layers(self, layers) -> dict[str, frozenset]:
        spec = {mca.PHASE_SALQ: self.schedule.salq_layers, mca.PHASE_SAGI: self.schedule.sagi_layers}
        return {phase: frozenset(layer.key for layer in select_layers(s, layers, "attn1"))
                for phase, s in spec.items()}

    def select_layers(self, layers):
        by_phase = self._phase_layers(layers)
        wanted = by_phase[mca.PHASE_SALQ] | by_phase[mca.PHASE_SAGI]
        chosen = tuple(layer for layer in layers if layer.kind == "attn1" and layer.key in wanted)
        if self.automatic_mask:
            chosen += self._auto_layers(layers)
        return chosen

    # --------------------------------------------------------------------- run
    def start_run(self, run) -> _Scratch:
        auto = frozenset(layer.key for layer in self._auto_layers(run.layers)) if self.automatic_mask else frozenset()
        return new_scratch(self._phase_layers(run.layers), auto)

    def phase(self, run, sigma: float) -> str:
        return self.schedule.phases.phase(run.clock.step(sigma), run.clock.steps)

    def start_latent(self, run, noise: torch.Tensor) -> Optional[torch.Tensor]:
        """Replacement / addition: the target starts from the scene's inverted latent at the
        run's first sigma (paper: the target shares the condition's initial features)."""
        if self.condition is None:
            return None
        if noise.shape[1] != self.condition.latent_channels:
            raise ValueError(f"{self.label}: expected {self.condition.latent_channels}-channel latents "
                             f"(the scene inversion's), got {noise.shape[1]}")
        height, width = noise.shape[-2:]
        return self.condition.chain.resized(height, width).latent_at(run.clock.first_sigma)

    # -------------------------------------------------------------------- rows
    def extra_rows(self, call):
        run = call.run
        if self.phase(run, call.sigma_value) == mca.PHASE_NONE:
            return []
        if not target_rows(run, call.layout):
            return []
        rows = self.subject_stream.rows_for(call)
        if self.condition_stream is not None:
            rows += self.condition_stream.rows_for(call)
        else:
            items = sorted({row.item for row in call.layout.rows if row.is_sampler_row})
            # The generated condition stream is a text-to-image stream like the target: it sees
            # the positive image prompt of other controls (an IP-Adapter on the model).
            rows += self.generated.rows_for(call, run.scratch(self).anchors, items, image_prompt=PROMPT_POSITIVE)
        return rows

    # -------------------------------------------------------------------- masks
    def _latent_masks(self, st: _Scratch, latent_hw):
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
                scene_hw = tuple(self.condition.chain.latent_shape[1:]) if self.condition is not None else latent_hw
                region = mca.fit_mask(self.region_mask, scene_hw, latent_hw)
                if float(region.max()) <= 0 and "empty" not in st.warned:
                    st.warned.add("empty")
                    logger.warning("%s: the target mask is empty; the scene is reconstructed unchanged", self.label)
            cached = (subject, region)
            st.latent_masks[latent_hw] = cached
        return cached

    def _layer_masks(self, st: _Scratch, latent_hw, n_tokens) -> Optional[mca.LayerMasks]:
        version = st.auto_version if self.automatic_mask else 0
        key = (latent_hw, n_tokens, version)
        masks = st.masks.get(key)
        if masks is not None:
            return masks
        subject, region = self._latent_masks(st, latent_hw)
        if region is None:
            if st.auto_region is None:
                return None
            grid, region_tokens = st.auto_region
            layer_grid = token_grid(latent_hw, n_tokens)
            region_tokens = mca.resize_tokens(region_tokens, grid, layer_grid)
            region = region_tokens.view(-1, 1, *layer_grid)
        masks = mca.layer_masks(subject, region, latent_hw, n_tokens, self.masks.subject_dilation,
                                self.masks.region_dilation)
        st.masks = {k: v for k, v in st.masks.items() if k[2] == version}
        st.masks[key] = masks
        return masks

    def _capture_word_map(self, call, st: _Scratch, q, k, condition_rows) -> None:
        """Automatic target mask (official code): top 30% of the subject word's cross-attention
        of the condition stream at 16x16, summed over that level's layers of a step. Until a
        step has seen all of them, the previous step's complete mask stays in use."""
        auto = self.masks.auto
        tokens = expand_positions(list(auto.subject_tokens), self.generated.context.shape[1], k.shape[1])
        if not tokens:
            return
        rows = torch.tensor(condition_rows, device=q.device)
        word_map = word_attention_map(q.index_select(0, rows), k.index_select(0, rows), call.heads, tokens)
        latent_hw = tuple(int(s) for s in call.extra_options["original_shape"][-2:])
        grid = token_grid(latent_hw, q.shape[1])
        step = call.run.clock.step(call.sigma_value)
        capture = st.auto
        if capture is not None and capture.step == step and capture.grid == grid and capture.sum.shape == word_map.shape:
            capture.sum = capture.sum + word_map
            capture.count += 1
        else:
            capture = st.auto = _AutoCapture(step, grid, word_map)
        complete = capture.count >= len(st.auto_layers)
        if complete or st.auto_region is None or st.auto_region[0] != grid:
            region = mca.top_fraction_mask(capture.sum, auto.fraction)  # rank-based: no normalisation needed
            st.auto_region = (grid, region.cpu())
            st.auto_version += 1

    # ---------------------------------------------------------------- attention
    def attend(self, call, q, k, v, attend_next):
        subject_rows = call.rows(ROLE_SUBJECT, self.name)
        condition_rows = call.rows(ROLE_CONDITION, self.name)
        if not subject_rows or not condition_rows:
            return attend_next(q, k, v)
        st: _Scratch = call.run.scratch(self)
        if call.layer.kind == "attn2":
            if call.layer.key in st.auto_layers:
                self._capture_word_map(call, st, q, k, condition_rows)
            return attend_next(q, k, v)
        phase = self.phase(call.run, call.sigma_value)
        if phase == mca.PHASE_NONE or call.layer.key not in st.phase_layers[phase]:
            return attend_next(q, k, v)
        targets = target_rows(call.run, call.layout)
        if not targets:
            return attend_next(q, k, v)
        latent_hw = tuple(int(s) for s in call.extra_options["original_shape"][-2:])
        masks = self._layer_masks(st, latent_hw, q.shape[1])
        if masks is None:  # automatic mask not available yet (before the first capture)
            return attend_next(q, k, v)
        return self._mca_attention(call, phase, masks, targets, subject_rows, condition_rows, q, k, v, attend_next)

    def _mca_attention(self, call, phase, masks, targets, subject_rows, condition_rows, q, k, v, attend_next):
        layout = call.layout
        device = q.device
        target_set = set(targets)
        others = [i for i in range(q.shape[0]) if i not in target_set]
        others_index = torch.tensor(others, device=device)
        targets_index = torch.tensor(targets, device=device)
        plain = call.plain
        if call.exclusive:
            # Only the stream rows (and untouched sampler rows) need plain attention.
            out_others = plain(q.index_select(0, others_index), k.index_select(0, others_index),
                               v.index_select(0, others_index))
        else:
            # Other controls or another pack's patch follow: they expect the full rows.
            out_others = attend_next(q, k, v).index_select(0, others_index)
        position = {row: i for i, row in enumerate(others)}

        items = [layout.rows[i].item for i in targets]
        region = masks.region
        if region.shape[0] > 1:
            region = region[torch.tensor([min(item, region.shape[0] - 1) for item in items], device=region.device)]
        if len(condition_rows) == 1:
            condition_for_target = condition_rows[:1]
        else:
            by_item = {layout.rows[i].item: i for i in condition_rows}
            condition_for_target = [by_item[item] for item in items]
        region = region.to(device)
        subject = subject_rows[0]

        if phase == mca.PHASE_SALQ:
            cond_index = torch.tensor(condition_for_target, device=device)
            out_targets = mca.salq(
                q.index_select(0, targets_index),
                k[subject:subject + 1], v[subject:subject + 1],
                k.index_select(0, cond_index), v.index_select(0, cond_index),
                masks.subject_keys.to(device), region, plain,
            )
        else:
            out_subject = out_others[position[subject]:position[subject] + 1]
            out_condition = out_others[torch.tensor([position[i] for i in condition_for_target], device=device)]
            out_targets = mca.sagi(out_subject, out_condition, masks.subject_fg.to(device), region)
            if out_targets.shape[0] != len(targets):
                out_targets = out_targets.expand(len(targets), -1, -1)

        out = out_others.new_empty((q.shape[0],) + tuple(out_others.shape[1:]))
        out.index_copy_(0, others_index, out_others)
        out.index_copy_(0, targets_index, out_targets.to(out.dtype))
        return out
