"""The MCA-Ctrl attention control: three streams in one batch, SALQ and SAGI in the
target's self-attention.

Rows of a UNet call while MCA-Ctrl is active (paper, "Overall Architecture"):

- target: the sampler's own rows (cond / uncond, any batch size); starts from the
  condition stream's initial latent (``initial_noise``);
- subject: one row, the inverted subject image at the call's sigma (no CFG);
- condition: one row, the inverted scene (replacement / addition), or one row per
  batch item generated from the target's noise with its own prompt (generation).

So a CFG step costs 4 rows for one image (the official code runs 6). Outside the
scheduled steps no row is appended and every layer runs plain attention.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from ..attention import mca_ctrl as mca
from ..attention.cross_attention import word_attention_map
from ..attention.layers import select_layers
from ..attention.rows import ROLE_COND, ROLE_CONDITION, ROLE_SUBJECT, ROLE_UNCOND
from ..inversion.result import InversionResult
from ..inversion.stream import InvertedStream
from ..patching.control import AttentionControl
from ..patching.image_prompt_policy import BOTH, get_policy
from ..patching.prompt_tokens import expand_positions
from .streams import GeneratedStream

logger = logging.getLogger("qkv_control")

NAME = "MCA-Ctrl"


def target_roles(transformer_options) -> tuple[str, ...]:
    """Sampler rows MCA-Ctrl controls, by the image-prompt guidance policy: the positive
    branch always; the negative branch too under ``both`` (the official code's setting).
    Under ``positive_only`` (the default, conflict-free) and ``negative_image`` (MCA-Ctrl
    has no negative subject) the negative rows run plain attention."""
    if get_policy(transformer_options).mode == BOTH:
        return (ROLE_COND, ROLE_UNCOND)
    return (ROLE_COND,)


def _check_aspect(label, mask, latent_hw, what, image) -> None:
    """A mask must be drawn on its image: same aspect ratio as the image's latent (10% slack
    for the latent's rounding to multiples of 8 pixels)."""
    mh, mw = mask.shape[-2:]
    lh, lw = int(latent_hw[0]), int(latent_hw[1])
    if abs((mh / mw) / (lh / lw) - 1.0) > 0.1:
        raise ValueError(f"{label}: expected a {what} with the {image}'s aspect ratio (about {lh * 8}x{lw * 8} "
                         f"pixels, H x W), got a {mh}x{mw} mask")


class MCACtrl(AttentionControl):
    """Configuration of one MCA-Ctrl application (immutable); run state in ``run.state(self)``.

    subject:          InversionResult of the subject image (one image)
    subject_mask:     MASK [1, H, W] of the subject's foreground on the subject image (M_S)
    region_mask:      MASK [1 or B, H, W] of where the subject goes in the target / scene
                      (1 - M_C); None = automatic (generation only)
    condition:        InversionResult of the scene (replacement / addition), or None
    condition_context: [1, T, D] text context of the generated condition stream (generation)
    condition_cfg:    CFG of the generated condition stream (1 = one row per image and step;
                      above 1 a second row runs the target's negative prompt)
    subject_tokens:   token indices of the subject word in the condition prompt (automatic mask)
    """

    kind = "attn1"

    def __init__(self, subject: InversionResult, subject_mask: torch.Tensor,
                 region_mask: Optional[torch.Tensor] = None,
                 condition: Optional[InversionResult] = None,
                 condition_context: Optional[torch.Tensor] = None,
                 condition_conds: Optional[dict] = None,
                 schedule: mca.PhaseSchedule = mca.PhaseSchedule(),
                 salq_layers: str = "all", sagi_layers: str = "all",
                 subject_dilation: int = 3, region_dilation: int = 0,
                 subject_tokens: Optional[list[int]] = None,
                 auto_mask_layers: str = "level:2", auto_mask_fraction: float = 0.3,
                 condition_cfg: float = 1.0, label: str = NAME):
        super().__init__()
        if subject.batch != 1:
            raise ValueError(f"{label}: expected one subject image, got a batch of {subject.batch}")
        if (condition is None) == (condition_context is None):
            raise ValueError(f"{label}: expected either a scene inversion or a condition prompt, got "
                             f"{'both' if condition is not None else 'neither'}")
        if condition is not None and condition.batch != 1:
            raise ValueError(f"{label}: expected one scene image, got a batch of {condition.batch}")
        if region_mask is None and (condition is not None or not subject_tokens):
            raise ValueError(f"{label}: expected a target mask (or, for generation, a subject word found in "
                             f"the condition prompt for the automatic mask), got neither")
        mask = mca.as_mask_batch(subject_mask)
        if mask.shape[0] != 1:
            raise ValueError(f"{label}: expected one subject mask, got a batch of {mask.shape[0]}")
        if float(mask.max()) <= 0:
            raise ValueError(f"{label}: expected a subject mask with a foreground, got an empty mask")
        _check_aspect(label, mask, subject.chain.latent_shape[1:], "subject mask", "subject image")
        if region_mask is not None and condition is not None:
            _check_aspect(label, mca.as_mask_batch(region_mask), condition.chain.latent_shape[1:],
                          "target mask", "scene image")
        self.subject = subject
        self.subject_mask = mask
        self.region_mask = None if region_mask is None else mca.as_mask_batch(region_mask)
        self.condition = condition
        self.generated = None
        if condition_context is not None:
            self.generated = GeneratedStream(condition_context, condition_conds, cfg=condition_cfg)
        self.schedule = schedule
        self.salq_layers = salq_layers
        self.sagi_layers = sagi_layers
        self.subject_dilation = int(subject_dilation)
        self.region_dilation = int(region_dilation)
        self.subject_tokens = list(subject_tokens or [])
        self.auto_mask_layers = auto_mask_layers
        self.auto_mask_fraction = float(auto_mask_fraction)
        self.label = label
        self.subject_stream = InvertedStream(subject, ROLE_SUBJECT, f"{label} subject")
        self.condition_stream = None if condition is None else InvertedStream(condition, ROLE_CONDITION,
                                                                               f"{label} scene")

    # ------------------------------------------------------------------ layers
    @property
    def automatic_mask(self) -> bool:
        return self.region_mask is None

    def _auto_layers(self, layers):
        try:
            return select_layers(self.auto_mask_layers, layers, "attn2")
        except ValueError:
            # The model has no cross-attention at that level: take its coarsest one.
            attn2 = [layer for layer in layers if layer.kind == "attn2"]
            coarsest = max(layer.level for layer in attn2)
            return tuple(layer for layer in attn2 if layer.level == coarsest)

    def _phase_layers(self, layers) -> dict[str, frozenset]:
        return {
            mca.PHASE_SALQ: frozenset(layer.key for layer in select_layers(self.salq_layers, layers, "attn1")),
            mca.PHASE_SAGI: frozenset(layer.key for layer in select_layers(self.sagi_layers, layers, "attn1")),
        }

    def select_layers(self, layers):
        by_phase = self._phase_layers(layers)
        wanted = by_phase[mca.PHASE_SALQ] | by_phase[mca.PHASE_SAGI]
        chosen = tuple(layer for layer in layers if layer.kind == "attn1" and layer.key in wanted)
        if self.automatic_mask:
            chosen += self._auto_layers(layers)
        return chosen

    # --------------------------------------------------------------------- run
    def start_run(self, run) -> None:
        st = run.state(self)
        st["phase_layers"] = self._phase_layers(run.layers)
        st["auto_layers"] = frozenset(layer.key for layer in self._auto_layers(run.layers)) if self.automatic_mask else frozenset()
        st["steps"] = max(int(run.sample_sigmas.shape[-1]) - 1, 1)
        st["anchors"] = {}       # generated condition stream, per item
        st["masks"] = {}         # (latent hw, tokens, region version) -> LayerMasks
        st["latent_masks"] = {}  # latent hw -> (subject [1,1,H,W], region [B,1,H,W] or None)
        st["auto"] = None        # automatic mask of the current step: step, grid, summed map [items, N], count
        st["auto_region"] = None  # (grid, region [items, N]) in use
        st["auto_version"] = 0
        st["warned"] = set()

    def end_run(self, run) -> None:
        run.state(self).clear()

    def phase(self, run, sigma: float) -> str:
        st = run.state(self)
        return self.schedule.phase(run.step_index(sigma), st["steps"])

    def initial_noise(self, run, noise: torch.Tensor) -> torch.Tensor:
        """Replacement / addition: the target starts from the scene's inverted latent at the
        run's first sigma (paper: the target shares the condition's initial features).
        ComfyUI starts from ``latent + noise * scale(sigma_0)``; solve for the noise."""
        if self.condition is None or run.sample_sigmas is None or noise is None:
            return noise
        sigma0 = float(run.sample_sigmas[0])
        if sigma0 <= 0:
            return noise
        height, width = noise.shape[-2:]
        if noise.shape[1] != self.condition.latent_channels:
            raise ValueError(f"{self.label}: expected {self.condition.latent_channels}-channel latents "
                             f"(the scene inversion's), got {noise.shape[1]}")
        start = self.condition.chain.resized(height, width).latent_at(sigma0).to(noise)
        latent = run.latent_image
        if latent is not None and torch.count_nonzero(latent) > 0:
            latent_in = run.model_patcher.model.process_latent_in(latent.to(noise))
        else:
            latent_in = torch.zeros_like(noise)
        ms = run.model_patcher.get_model_object("model_sampling")
        sigma_max = float(ms.sigma_max)
        max_denoise = math.isclose(sigma_max, sigma0, rel_tol=1e-05) or sigma0 > sigma_max
        scale = math.sqrt(1.0 + sigma0 ** 2) if max_denoise else sigma0
        return (start.expand_as(noise) - latent_in) / scale

    # -------------------------------------------------------------------- rows
    def extra_rows(self, call):
        run = call.run
        if self.phase(run, call.sigma_value) == mca.PHASE_NONE:
            return []
        roles = target_roles(call.transformer_options)
        if not any(call.layout.has(role) for role in roles):
            return []
        rows = self.subject_stream.rows_for(call)
        if self.condition_stream is not None:
            rows += self.condition_stream.rows_for(call)
        else:
            items = sorted({row.item for row in call.layout.rows if row.is_sampler_row})
            rows += self.generated.rows_for(call, run.state(self)["anchors"], items)
        return rows

    # -------------------------------------------------------------------- masks
    def _latent_masks(self, st, latent_hw):
        cached = st["latent_masks"].get(latent_hw)
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
                if float(region.max()) <= 0 and "empty" not in st["warned"]:
                    st["warned"].add("empty")
                    logger.warning("%s: the target mask is empty; the scene is reconstructed unchanged", self.label)
            cached = (subject, region)
            st["latent_masks"][latent_hw] = cached
        return cached

    def _layer_masks(self, st, latent_hw, n_tokens) -> Optional[mca.LayerMasks]:
        version = st["auto_version"] if self.automatic_mask else 0
        key = (latent_hw, n_tokens, version)
        masks = st["masks"].get(key)
        if masks is not None:
            return masks
        subject, region = self._latent_masks(st, latent_hw)
        if region is None:
            if st["auto_region"] is None:
                return None
            grid, region_tokens = st["auto_region"]
            layer_grid = mca.token_grid(latent_hw, n_tokens)
            region_tokens = mca.resize_tokens(region_tokens, grid, layer_grid)
            region = region_tokens.view(-1, 1, *layer_grid)
        masks = mca.layer_masks(subject, region, latent_hw, n_tokens, self.subject_dilation, self.region_dilation)
        st["masks"] = {k: v for k, v in st["masks"].items() if k[2] == version}
        st["masks"][key] = masks
        return masks

    def _capture_word_map(self, call, st, q, k, condition_rows) -> None:
        """Automatic target mask (official code): top 30% of the subject word's cross-attention
        of the condition stream at 16x16, summed over that level's layers of a step. Until a
        step has seen all of them, the previous step's complete mask stays in use."""
        heads = call.heads
        tokens = expand_positions(self.subject_tokens, self.generated.context.shape[1], k.shape[1])
        if not tokens:
            return
        rows = torch.tensor(condition_rows, device=q.device)
        word_map = word_attention_map(q.index_select(0, rows), k.index_select(0, rows), heads, tokens)
        latent_hw = tuple(int(s) for s in call.extra_options["original_shape"][-2:])
        grid = mca.token_grid(latent_hw, q.shape[1])
        step = call.run.step_index(call.sigma_value)
        auto = st["auto"]
        if auto is not None and auto["step"] == step and auto["grid"] == grid and auto["sum"].shape == word_map.shape:
            auto["sum"] = auto["sum"] + word_map
            auto["count"] += 1
        else:
            auto = {"step": step, "grid": grid, "sum": word_map, "count": 1}
            st["auto"] = auto
        complete = auto["count"] >= len(st["auto_layers"])
        if complete or st["auto_region"] is None or st["auto_region"][0] != grid:
            region = mca.top_fraction_mask(auto["sum"], self.auto_mask_fraction)  # rank-based: no normalisation needed
            st["auto_region"] = (grid, region.cpu())
            st["auto_version"] += 1

    # ---------------------------------------------------------------- attention
    def attend(self, call, q, k, v, attend_next):
        subject_rows = call.rows(ROLE_SUBJECT, self.name)
        condition_rows = call.rows(ROLE_CONDITION, self.name)
        if not subject_rows or not condition_rows:
            return attend_next(q, k, v)
        st = call.run.state(self)
        if call.layer.kind == "attn2":
            if call.layer.key in st["auto_layers"]:
                self._capture_word_map(call, st, q, k, condition_rows)
            return attend_next(q, k, v)
        phase = self.phase(call.run, call.sigma_value)
        if phase == mca.PHASE_NONE or call.layer.key not in st["phase_layers"][phase]:
            return attend_next(q, k, v)
        layout = call.layout
        roles = target_roles(call.extra_options)
        targets = [i for i, row in enumerate(layout.rows) if row.is_sampler_row and row.role in roles]
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
        plain = call.plain if call.plain is not None else attend_next
        if call.exclusive and call.plain is not None:
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
