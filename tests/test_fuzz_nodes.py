"""Property-based fuzzing of every pack node's declared inputs (hypothesis), in-process on the real
ComfyUI with tiny SD1.5 and SDXL models.

For each node of ``nodes.registry.collect_nodes()`` the widget values are drawn from its V3 schema
(INT/FLOAT inside min/max, combo options, booleans, optional inputs present or absent, STRING inputs
from sensible and hostile values), the linked inputs from tiny models and files (batch 1-3, latent
sides 4-12, i.e. 32-96 px; inversions through the DDIM inversion node with few steps; masks of many
sizes and kinds; tiny IP-Adapter, CLIP vision, Grounding DINO and SAM files through the real loaders).
``validate_inputs`` runs first, as ComfyUI does; a node that returns a MODEL is sampled a few steps.

Property: every draw gives finite outputs, or is refused by ``validate_inputs`` / a ValueError whose
message names the node (its display name). Never another exception, never NaN/inf, never a silent
no-op (a patched model sampling exactly like the unpatched one where the draw says it should act).

Bounded and reproducible: ``derandomize=True`` (the draws are a function of the test alone, no
database), ``max_examples`` per node below (~1.5-2.5 minutes in all on 2 cores). Costly widgets are drawn
from a smaller part of their range (``COST_LIMITS``: step counts, detection resolution), said there.
Every failing draw found so far is a named test in tests/test_fuzz_regressions.py; the ones whose
fix belongs in the method packages are xfail there and listed in ``KNOWN_FAILURES`` so that this
fuzz keeps hunting for new ones instead of re-finding them.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import comfy.model_patcher
import folder_paths
from comfy_api.latest import io
from helpers import encode, sample
from qkv_control.attention import fusion_schedule as fs
from qkv_control.attention.layers import resolve_weight_spec, select_layers
from qkv_control.inversion.ddim import vp_scale
from qkv_control.inversion.result import InversionResult
from qkv_control.localization.managed import GROUNDING_DINO_FOLDER, SAM_FOLDER
from qkv_control.nodes import registry
from qkv_control.nodes.ddim_inversion import QKVDDIMInversion
from qkv_control.nodes.indetail_ip import QKVInDetailReferenceAttention
from qkv_control.patching.layers import discover_layers
from qkv_control.tiny.ipadapter_files import FILES as IPADAPTER_FILES
from qkv_control.tiny.ipadapter_files import write_ipadapter_files
from qkv_control.tiny.localization_files import write_tiny_localization_files
from qkv_control.tiny.models import cached_clip_vision, tiny_checkpoint
from test_fuzz_regressions import KNOWN_FAILURES

logger = logging.getLogger("qkv_control.tests.fuzz")

FAMILIES = ("sd15", "sdxl")
BROKEN_IPADAPTER = "broken.safetensors"

# Examples per node: what fits ~3 minutes for the whole file on 2 cores (sampling nodes cost most).
MAX_EXAMPLES = {
    "QKVDDIMInversion": 15, "QKVInDetailReferenceAttention": 14, "QKVImagePromptGuidance": 10,
    "QKVAdaINNoise": 12, "QKVMCACtrlReplace": 14, "QKVMCACtrlGenerate": 14, "QKVIPAdapterLoader": 12,
    "QKVIPAdapterApply": 14, "QKVIPAdapterStyleContent": 12, "QKVConditionGuidance": 12,
    "QKVMaskGuidance": 12, "QKVAttentionMap": 16, "QKVGroundingDinoLoader": 4, "QKVSamLoader": 4,
    "QKVTextSegment": 12, "QKVSamSegment": 12, "QKVReferenceKVBank": 6,
}

# No shrinking by default, so a failure costs no more time than a pass (its draws are printed).
# For a longer hunt by hand: QKV_FUZZ_SCALE=N (N times the examples), QKV_FUZZ_RANDOM=1 (fresh
# random draws instead of the fixed ones), QKV_FUZZ_SHRINK=1 (shrink a failure to a minimal draw).
PHASES = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if os.environ.get("QKV_FUZZ_SHRINK") else ())
SCALE = int(os.environ.get("QKV_FUZZ_SCALE", "1"))
DERANDOMIZE = not os.environ.get("QKV_FUZZ_RANDOM")

# Widgets whose full declared range is too costly per example: (low, high) actually drawn.
COST_LIMITS = {
    ("QKVDDIMInversion", "steps"): (1, 6),          # declared 1-1000 (each step is a UNet call)
    ("QKVAttentionMap", "steps"): (1, 3),           # declared 1-10000
    ("QKVTextSegment", "detection_resolution"): (64, 512),  # declared 64-2048 (tiny GDINO, O(pixels))
}

# Float widgets a node checks against an earlier one: mostly drawn at or above it (else most draws
# of MCA-Ctrl are refused by validate_inputs), sometimes anywhere in range.
AT_LEAST = {"salq_end": "sagi_steps"}

# -- STRING inputs: sensible and hostile values, by input id ------------------------------------
# Most draws are sensible (they reach the node's work), some hostile (they must be refused with a
# message naming the node, or work).

HOSTILE = ["", " ", ",", "-", "\x00", "∞", "🐕", "a" * 300, "null", "None", "\n\t", "'", "%s", "{}"]
BLOCK_SPECS = ["all", "output", "input", "middle", "up", "down", "mid", "input:4-8", "input:7.1", "#0-3",
               "#3", "level:0", "level:0-1", "-level:0", "output, -output:3", "ALL", " output , input "]
BAD_BLOCK_SPECS = ["all, -all", "output:99", "#999", "level:9", "input:", "input:x", "#-1", "level:-1",
                   "all,,output", "output:3-1", "#5-2", "output:3.9", "-all"] + HOSTILE
FUSION_SPECS = [fs.DEFAULT_SPEC, fs.CONTROLNET_SPEC, "concat:0-1", "replace:0-1", "stratified:0-1", "none:0-1",
                "concat:0.5-1", "stratified:0-0.2, concat:0.2-1, replace:0.9-1", "Concat:0-1", "concat:.5-1",
                "stratified:0-1, none:0-1"]
BAD_FUSION_SPECS = ["concat", "concat:1-0", "concat:0-2", "concat:-1-1", "concat:0-1,", "foo:0-1", "concat:0-1e3",
                    "concat:0.3-0.3"] + HOSTILE
WEIGHT_SPECS = ["all=1", "all=0", "all=1, input=0.5", "#4-8=0", "output=2, level:0=0", "all=-1", "all=1e-30",
                "all=1, -output=0", "all=1,"]
BAD_WEIGHT_SPECS = ["all=nan", "all=inf", "all=-inf", "all=1e309", "all", "=1", "all=", "all=x", "all==1",
                    "output:99=1", "-output=1", "auto"] + HOSTILE
PROMPTS = ["a photo of a dog on the beach", "a dog", "a photo of a product", "dog dog dog", "a " * 120,
           "ünïcødé dog", "(dog:1.5)", "embedding:missing", "a red sneaker, on a table"]
WORDS = ["dog", "product", "dog, beach", "photo of", "cat", "DOG", " dog ", "a", "dog,", ",dog"]
SEGMENT_PROMPTS = ["red square", "square . circle", "dog", "red car . person .", "a" * 500]
BAD_SEGMENT_PROMPTS = [".", " . ", "?"] + HOSTILE


def mostly(sensible, hostile) -> st.SearchStrategy:
    """Seven draws in eight from ``sensible``, one from ``hostile`` (lists or strategies)."""
    good = sensible if isinstance(sensible, st.SearchStrategy) else st.sampled_from(sensible)
    bad = hostile if isinstance(hostile, st.SearchStrategy) else st.sampled_from(hostile)
    return st.integers(0, 7).flatmap(lambda i: bad if i == 7 else good)


def _weight_specs():
    return mostly(st.one_of(st.sampled_from(WEIGHT_SPECS),
                            st.builds(lambda s, w: f"{s}={w}", st.sampled_from(BLOCK_SPECS),
                                      st.floats(-5, 5, allow_nan=False))), BAD_WEIGHT_SPECS)


def _auto_or_weight_specs():
    return st.one_of(st.sampled_from(["auto", " AUTO "]), _weight_specs())


def _words_of(prompt_input: str):
    """Words of the prompt drawn before (so most draws name a word that is there), or any words."""
    def strategy(drawn):
        words = [w for w in str(drawn.get(prompt_input, "")).replace(",", " ").split() if w.isalpha()]
        return mostly(st.sampled_from(words) if words else st.sampled_from(WORDS), WORDS + HOSTILE)
    return strategy


POINT_LISTS = ["[]", '[{"x": 10, "y": 12}]', '[{"x": 0, "y": 0}, {"x": 95.5, "y": 40}]', '[{"x": 500, "y": -3}]',
               '[[{"x": 4, "y": 4}], [{"x": 20, "y": 9}]]', '[[]]']
BAD_POINT_LISTS = ["{", '[{"x": 1}]', '[{"x": "a", "y": 2}]', '{"x": 1, "y": 2}', "[1, 2]", '[{"x": NaN, "y": 1}]',
                   '[{"x": 1e999, "y": 1}]'] + HOSTILE


def _point_lists():
    """JSON point lists as core's SAM3_Detect reads them (pixels; a list per image too)."""
    grid = st.lists(st.fixed_dictionaries({"x": st.integers(0, 120), "y": st.integers(0, 120)}), max_size=4)
    return mostly(st.one_of(st.sampled_from(POINT_LISTS), grid.map(json.dumps)), BAD_POINT_LISTS)


def _block_specs(drawn):
    return mostly(BLOCK_SPECS, BAD_BLOCK_SPECS)


# Each takes the widgets drawn so far (a node's schema lists a prompt before its words).
STRING_STRATEGIES: dict[str, Callable[[dict], st.SearchStrategy]] = {
    "blocks": _block_specs,
    "layers": _block_specs,
    "salq_layers": _block_specs,
    "sagi_layers": _block_specs,
    "schedule": lambda drawn: mostly(st.one_of(
        st.sampled_from(FUSION_SPECS),
        st.builds(lambda m, a, b: f"{m}:{min(a, b):.3f}-{max(a, b):.3f}", st.sampled_from(fs.MODES),
                  st.floats(0, 1), st.floats(0, 1))), BAD_FUSION_SPECS),
    "layer_weights": lambda drawn: _weight_specs(),
    "style_layers": lambda drawn: _auto_or_weight_specs(),
    "content_layers": lambda drawn: _auto_or_weight_specs(),
    "text": lambda drawn: mostly(PROMPTS, HOSTILE),
    "condition_prompt": lambda drawn: mostly(PROMPTS, HOSTILE),
    "words": _words_of("text"),
    "subject_word": _words_of("condition_prompt"),
    "prompt": lambda drawn: mostly(SEGMENT_PROMPTS, BAD_SEGMENT_PROMPTS),
    "positive_coords": lambda drawn: _point_lists(),
    "negative_coords": lambda drawn: _point_lists(),
}


# -- widget strategies from the V3 schema --------------------------------------------------------

def _int_strategy(inp, low, high):
    step = int(inp.step or 1)
    base = int(inp.min if inp.min is not None else low)
    count = (high - base) // step
    return st.integers(0, count).map(lambda k: base + k * step)


def widget_strategy(node_id: str, inp, drawn: dict | None = None) -> st.SearchStrategy | None:
    """The strategy for a widget input, or None for a linked (socket) input."""
    if isinstance(inp, io.Boolean.Input):
        return st.booleans()
    if isinstance(inp, io.Combo.Input):
        return st.sampled_from(list(inp.options))
    if isinstance(inp, io.Int.Input):
        low, high = COST_LIMITS.get((node_id, inp.id), (inp.min, inp.max))
        return _int_strategy(inp, low, high)
    if isinstance(inp, io.Float.Input):
        # The boundaries and default, the widget's step grid (what the UI sends), any float in range (the API).
        low, high, step = inp.min, inp.max, inp.step or 0.01
        grid = st.integers(0, int(round((high - low) / step))).map(lambda k: min(high, round(low + k * step, 10)))
        anywhere = st.one_of(st.sampled_from([low, high, inp.default]), grid,
                             st.floats(low, high, allow_nan=False, allow_infinity=False))
        floor = (drawn or {}).get(AT_LEAST.get(inp.id))
        if floor is None:
            return anywhere
        return mostly(st.one_of(st.just(high), st.floats(floor, high, allow_nan=False)), anywhere)
    if isinstance(inp, io.String.Input):
        return STRING_STRATEGIES[inp.id](drawn or {})
    return None


# -- what the draws are made of ----------------------------------------------------------------

@dataclass
class Kit:
    models_dir: Any


@functools.lru_cache(maxsize=64)
def inversion(family: str, batch: int, h: int, w: int, steps: int, scheduler: str, seed: int = 0) -> InversionResult:
    """A reference inverted through the DDIM inversion node (random latent, empty prompt)."""
    model, _, _ = tiny_checkpoint(family)
    g = torch.Generator().manual_seed(seed)
    latent = {"samples": torch.randn((batch, 4, h, w), generator=g) * 0.5}
    result, _ = QKVDDIMInversion.execute(model, latent, steps, scheduler).args
    return result


@functools.lru_cache(maxsize=16)
def conditioning(family: str, text: str):
    _, clip, _ = tiny_checkpoint(family)
    return encode(clip, text)


@dataclass
class Sampling:
    """How a MODEL output is sampled, and against what it is compared."""

    family: str
    batch: int
    h: int
    w: int
    steps: int = 3
    scheduler: str = "normal"
    cfg: float = 5.0
    seed: int = 0
    positive: str = "a photo of a dog"
    negative: str = ""
    positive_cond: Any = None      # a CONDITIONING the node produced (mask guidance)
    baseline_model: Any = None     # compared against (default: the unpatched tiny model)
    acts: Callable[[dict], bool] | None = None  # from the drawn widgets: must the output differ?


@dataclass
class Case:
    links: dict
    sampling: Sampling | None = None
    checks: list = field(default_factory=list)  # callables(outputs, widgets) for extra properties


def draw_geometry(data):
    family = data.draw(st.sampled_from(FAMILIES), label="family")
    batch = data.draw(st.integers(1, 3), label="batch")
    h = data.draw(st.integers(4, 12), label="latent_h")
    w = data.draw(st.integers(4, 12), label="latent_w")
    return family, batch, h, w


def draw_schedule(data):
    steps = data.draw(st.integers(2, 4), label="steps")
    scheduler = data.draw(st.sampled_from(["normal", "ddim_uniform", "karras", "simple"]), label="scheduler")
    cfg = data.draw(st.sampled_from([1.0, 4.0, 7.5]), label="cfg")
    return steps, scheduler, cfg


def draw_mask(data, h_px: int, w_px: int, label: str) -> torch.Tensor:
    """Masks as users make them: boxes, full, empty, near-white (0.99611 from a PNG), soft, any size."""
    kind = data.draw(mostly(["box"], ["full", "empty", "near_white", "soft"]), label=f"{label}_kind")
    same_size = data.draw(mostly([True], [False]), label=f"{label}_same_size")
    mh, mw = (h_px, w_px) if same_size else (data.draw(st.integers(8, 96), label=f"{label}_h"),
                                             data.draw(st.integers(8, 96), label=f"{label}_w"))
    batch = data.draw(st.integers(1, 3), label=f"{label}_batch")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 3), label=f"{label}_seed"))
    if kind == "full":
        mask = torch.ones((batch, mh, mw))
    elif kind == "empty":
        mask = torch.zeros((batch, mh, mw))
    elif kind == "near_white":
        mask = torch.full((batch, mh, mw), 254 / 255)
    elif kind == "soft":
        mask = torch.rand((batch, mh, mw), generator=g)
    else:
        mask = torch.zeros((batch, mh, mw))
        top, left = int(torch.randint(0, max(mh // 2, 1), (1,), generator=g)), int(
            torch.randint(0, max(mw // 2, 1), (1,), generator=g))
        mask[:, top:top + max(mh // 3, 1), left:left + max(mw // 3, 1)] = 1.0
    if batch == 1 and data.draw(st.booleans(), label=f"{label}_2d"):
        mask = mask[0]
    return mask


def draw_image(data, label: str, channels=(3,)) -> torch.Tensor:
    batch = data.draw(st.integers(1, 3), label=f"{label}_batch")
    h = data.draw(st.integers(32, 96), label=f"{label}_h")
    w = data.draw(st.integers(32, 96), label=f"{label}_w")
    c = data.draw(st.sampled_from(channels), label=f"{label}_channels")
    g = torch.Generator().manual_seed(h * 97 + w)
    return torch.rand((batch, h, w, c), generator=g)


def _model(family):
    return tiny_checkpoint(family)[0]


def _other(family):
    return "sdxl" if family == "sd15" else "sd15"


def _acts_at(value: float) -> bool:
    """A weight or strength that visibly changes a tiny model's output (2e-16 does not)."""
    return abs(value) >= 1e-3


def _window_covers_first_step(widgets) -> bool:
    # percent 0 is the first step's sigma; an end at or past half the run lies below it.
    return widgets.get("start_at", 0.0) == 0.0 and widgets.get("end_at", 1.0) >= 0.5


def _any_layer(model, spec: str, kind: str) -> bool:
    try:
        return bool(select_layers(spec, discover_layers(model), kind))
    except ValueError:
        return False


def _nonzero_weights(model, spec: str) -> bool:
    try:
        return any(_acts_at(w) for w in resolve_weight_spec(spec, discover_layers(model), "attn2").values())
    except ValueError:
        return False


# -- per-node recipes: the linked inputs and how the result is checked --------------------------

def case_ddim_inversion(data, kit):
    family, batch, h, w = draw_geometry(data)
    g = torch.Generator().manual_seed(batch * 13 + h)
    latent = {"samples": torch.randn((batch, 4, h, w), generator=g) * 0.5}
    links = {"model": _model(family), "latent": latent}
    if data.draw(st.booleans(), label="positive_connected"):
        links["positive"] = conditioning(data.draw(st.sampled_from([family, family, _other(family)]),
                                                   label="positive_family"), "a photo")

    def z_t_moves(outputs, widgets):
        # The inverted top latent is not the reference itself (the inversion did something).
        assert not torch.allclose(outputs[1]["samples"], latent["samples"], atol=1e-6)
    return Case(links, checks=[z_t_moves])


def _inversion_links(data, family, h, w, steps, scheduler, label):
    inv_family = data.draw(mostly([family], [_other(family)]), label=f"{label}_family")
    same = data.draw(mostly([True], [False]), label=f"{label}_same_size")
    ih, iw = (h, w) if same else (data.draw(st.integers(4, 12), label=f"{label}_h"),
                                  data.draw(st.integers(4, 12), label=f"{label}_w"))
    batch = data.draw(mostly([1], [2]), label=f"{label}_batch")
    return inversion(inv_family, batch, ih, iw, steps, scheduler, seed=1 if label == "scene" else 0)


def case_indetail(data, kit):
    family, batch, h, w = draw_geometry(data)
    steps, scheduler, cfg = draw_schedule(data)
    model = _model(family)
    links = {"model": model, "inversion": _inversion_links(data, family, h, w, steps, scheduler, "reference")}

    def acts(widgets):
        spec = fs.parse_fusion_schedule(widgets["schedule"])
        modes = {spec.mode_at(i, steps) for i in range(steps)}
        return (_any_layer(model, widgets["blocks"], "attn1")
                and bool(modes & {fs.CONCAT, fs.REPLACE} or (fs.STRATIFIED in modes and _acts_at(widgets["lambda_reference"]))))
    return Case(links, Sampling(family, batch, h, w, steps, scheduler, cfg, acts=acts))


def case_image_prompt_guidance(data, kit):
    family, batch, h, w = draw_geometry(data)
    steps, scheduler, cfg = draw_schedule(data)
    model = _model(family)
    ref = inversion(family, 1, h, w, steps, scheduler)
    base_kind = data.draw(st.sampled_from(["indetail", "plain"]), label="base_model")
    base = (QKVInDetailReferenceAttention.execute(model, ref, "output", "concat:0-1", 0.5, 0.5).args[0]
            if base_kind == "indetail" else model)
    links = {"model": base}
    if data.draw(st.booleans(), label="negative_inversion_connected"):
        links["negative_inversion"] = _inversion_links(data, family, h, w, steps, scheduler, "negative")
    if data.draw(st.booleans(), label="negative_image_connected"):
        links["negative_image"] = draw_image(data, "negative_image")

    def acts(widgets):
        # 'both' puts the reference into the negative branch too: different from conflict-free.
        return base_kind == "indetail" and widgets["policy"] == "both" and cfg > 1
    return Case(links, Sampling(family, batch, h, w, steps, scheduler, cfg, baseline_model=base, acts=acts))


def case_kv_bank(data, kit):
    """The bank changes time, never results: the node's model samples like its input, cold and then
    warm (where the drawn settings turn the bank on), within the bank's tolerance (tests/test_kv_bank.py)."""
    from qkv_control.inversion.kv_bank import BANK

    family, batch, h, w = draw_geometry(data)
    steps, scheduler, cfg = draw_schedule(data)
    model = _model(family)
    base = model
    if data.draw(st.booleans(), label="indetail_on_the_model"):
        ref = inversion(family, 1, h, w, steps, scheduler)
        base = QKVInDetailReferenceAttention.execute(model, ref, "output", "concat:0-1", 0.5, 0.5).args[0]

    def samples_like_its_input(outputs, widgets):
        run = functools.partial(sample, positive=conditioning(family, "a photo of a dog"), negative=conditioning(family, ""),
                                steps=steps, cfg=cfg, scheduler=scheduler, latent=torch.zeros((batch, 4, h, w)))
        BANK.clear()
        try:
            expected = run(base)
            for _ in range(2):
                got = run(outputs[0])
                assert float((got - expected).abs().max()) <= 2e-5 * float(expected.abs().max()) + 1e-6
        finally:
            BANK.clear()
    return Case({"model": base}, checks=[samples_like_its_input])


def case_adain(data, kit):
    family, batch, h, w = draw_geometry(data)
    steps, scheduler, _ = draw_schedule(data)
    ref = _inversion_links(data, family, h, w, steps, scheduler, "reference")
    latent = {"samples": torch.zeros((batch, data.draw(mostly([4], [16]), label="channels"), h, w))}
    links = {"inversion": ref, "latent": latent}
    if data.draw(st.booleans(), label="model_connected"):  # optional: graphs made before it had one
        links["model"] = _model(family)

    def statistics_follow_the_reference(outputs, widgets):
        start = outputs[1].start_latent(latent)
        assert torch.isfinite(start).all()
        sigma = ref.chain.sigma_max
        reference = ref.chain.latent_at(sigma) * vp_scale(sigma)
        if reference.shape[0] == 1 and h * w > 1:
            # AdaIN (eq. 2): per sample and channel the VP start takes the reference's mean.
            torch.testing.assert_close((start * vp_scale(sigma)).mean(dim=(2, 3)),
                                       reference.mean(dim=(2, 3)).expand(batch, -1), atol=1e-4, rtol=1e-4)
        assert (outputs[2] is None) == ("model" not in links)
    return Case(links, checks=[statistics_follow_the_reference])


def _mca_acts(widgets, mask):
    return float(mask.max()) >= 0.5 and float(mask.min()) < 0.5 and widgets["salq_end"] > widgets["sagi_steps"]


def case_mca_replace(data, kit):
    family, batch, h, w = draw_geometry(data)
    steps, scheduler, cfg = draw_schedule(data)
    subject = _inversion_links(data, family, h, w, steps, scheduler, "subject")
    scene = _inversion_links(data, family, h, w, steps, scheduler, "scene")
    sh, sw = subject.chain.latent_shape[1:]
    target = draw_mask(data, scene.chain.latent_shape[1] * 8, scene.chain.latent_shape[2] * 8, "target_mask")
    links = {"model": _model(family), "subject": subject, "scene": scene,
             "subject_mask": draw_mask(data, sh * 8, sw * 8, "subject_mask"), "target_mask": target}
    scene_h, scene_w = scene.chain.latent_shape[1:]
    return Case(links, Sampling(family, batch, scene_h, scene_w, steps, scheduler, cfg,
                                acts=lambda widgets: _mca_acts(widgets, target)))


def case_mca_generate(data, kit):
    family, batch, h, w = draw_geometry(data)
    steps, scheduler, cfg = draw_schedule(data)
    subject = _inversion_links(data, family, h, w, steps, scheduler, "subject")
    sh, sw = subject.chain.latent_shape[1:]
    clip_family = data.draw(st.sampled_from([family, family, _other(family)]), label="clip_family")
    links = {"model": _model(family), "clip": tiny_checkpoint(clip_family)[1], "subject": subject,
             "subject_mask": draw_mask(data, sh * 8, sw * 8, "subject_mask")}
    if data.draw(st.booleans(), label="target_mask_connected"):
        links["target_mask"] = draw_mask(data, h * 8, w * 8, "target_mask")

    def acts(widgets):
        # Generation runs step 0 plain (the official code); from step 1, wherever SAGI or SALQ runs,
        # the target's queries inside a non-empty target mask read the subject. The automatic mask
        # may be empty on a tiny latent (its 16x16 level is then one token), so only a drawn one counts.
        mask = links.get("target_mask")
        return (mask is not None and float(mask.max()) >= 0.5 and steps > 1
                and widgets["salq_end"] > 1.0 / steps + 1e-9)
    return Case(links, Sampling(family, batch, h, w, steps, scheduler, cfg, acts=acts))


def case_ipadapter_loader(data, kit):
    return Case({})


@functools.lru_cache(maxsize=16)
def _adapter(name: str):
    from qkv_control.nodes.ip_adapter_nodes import QKVIPAdapterLoader

    return QKVIPAdapterLoader.execute(name).args[0]


def _adapter_links(data, family):
    same = [n for n, (f, _) in IPADAPTER_FILES.items() if f == family]
    name = data.draw(st.sampled_from(same + same + list(IPADAPTER_FILES)), label="ipadapter_file")
    return {"model": _model(family), "ipadapter": _adapter(name), "clip_vision": cached_clip_vision(0)}


def case_ipadapter_apply(data, kit):
    family, batch, h, w = draw_geometry(data)
    steps, scheduler, cfg = draw_schedule(data)
    links = dict(_adapter_links(data, family), image=draw_image(data, "image"))
    model = links["model"]
    return Case(links, Sampling(family, batch, h, w, steps, scheduler, cfg, acts=lambda widgets: (
        _acts_at(widgets["weight"]) and _window_covers_first_step(widgets)
        and _nonzero_weights(model, widgets["layer_weights"]))))


def case_ipadapter_style_content(data, kit):
    family, batch, h, w = draw_geometry(data)
    steps, scheduler, cfg = draw_schedule(data)
    links = dict(_adapter_links(data, family), style_image=draw_image(data, "style_image"))
    if data.draw(st.booleans(), label="content_image_connected"):
        links["content_image"] = draw_image(data, "content_image")
    model = links["model"]

    def acts(widgets):
        style = widgets["style_layers"]
        style_spec = "all=1" if style.strip().lower() == "auto" else style
        return _acts_at(widgets["style_weight"]) and _window_covers_first_step(widgets) and _nonzero_weights(model, style_spec)
    return Case(links, Sampling(family, batch, h, w, steps, scheduler, cfg, acts=acts))


def case_condition_guidance(data, kit):
    family, batch, h, w = draw_geometry(data)
    steps, scheduler, cfg = draw_schedule(data)
    preset_family = data.draw(st.sampled_from([family, family, _other(family)]), label="preset_family")
    preset = data.draw(st.sampled_from(["a watercolor painting", "", "a photo of a dog"]), label="preset_text")
    links = {"model": _model(family), "preset": conditioning(preset_family, preset)}
    model = links["model"]
    return Case(links, Sampling(family, batch, h, w, steps, scheduler, cfg, acts=lambda widgets: (
        _window_covers_first_step(widgets) and _any_layer(model, widgets["layers"], "attn2")
        and preset != "a photo of a dog")))


def case_mask_guidance(data, kit):
    family, batch, h, w = draw_geometry(data)
    steps, scheduler, cfg = draw_schedule(data)
    clip_family = data.draw(st.sampled_from([family, family, _other(family)]), label="clip_family")
    links = {"model": _model(family), "clip": tiny_checkpoint(clip_family)[1]}
    model = links["model"]
    return Case(links, Sampling(family, batch, h, w, steps, scheduler, cfg, acts=lambda widgets: (
        _acts_at(widgets["strength"]) and widgets["threshold"] < 0.9 and _window_covers_first_step(widgets)
        and _any_layer(model, widgets["layers"], "attn2"))))


def case_attention_map(data, kit):
    family, batch, h, w = draw_geometry(data)
    links = {"model": _model(family), "clip": tiny_checkpoint(family)[1],
             "negative": conditioning(family, ""), "latent_image": {"samples": torch.zeros((batch, 4, h, w))}}

    def mask_in_unit_range(outputs, widgets):
        mask = outputs[1]
        assert mask.shape == (batch, h * 8, w * 8) and float(mask.min()) >= 0 and float(mask.max()) <= 1
    return Case(links, checks=[mask_in_unit_range])


def case_localization_loader(data, kit):
    return Case({})


@functools.lru_cache(maxsize=1)
def _localization_models():
    from qkv_control.nodes.localization_nodes import QKVGroundingDinoLoader, QKVSamLoader

    names = [n for n in folder_paths.get_filename_list(GROUNDING_DINO_FOLDER) if n.endswith(".pth")]
    return QKVGroundingDinoLoader.execute(names[0]).args[0], QKVSamLoader.execute(
        folder_paths.get_filename_list(SAM_FOLDER)[0]).args[0]


def _boxes(data, batch: int):
    """Core BOUNDING_BOX values: one box, a list for every image, a list per image (pixels)."""
    box = st.fixed_dictionaries({"x": st.integers(-10, 90), "y": st.integers(-10, 90),
                                 "width": st.integers(0, 80), "height": st.integers(0, 80)})
    kind = data.draw(st.sampled_from(["one", "list", "per image", "empty"]), label="bboxes_kind")
    if kind == "one":
        return data.draw(box, label="bbox")
    if kind == "list":
        return data.draw(st.lists(box, max_size=3), label="bboxes")
    if kind == "per image":
        return data.draw(st.lists(st.lists(box, max_size=2), min_size=batch, max_size=batch), label="bboxes")
    return []


def case_sam_segment(data, kit):
    _, sam = _localization_models()
    image = draw_image(data, "image", channels=(1, 3, 4))
    links = {"sam": sam, "image": image}
    if data.draw(st.booleans(), label="bboxes_connected"):
        links["bboxes"] = _boxes(data, image.shape[0])

    def masks_in_unit_range(outputs, widgets):
        masks = outputs[0]
        assert masks.shape[1:] == image.shape[1:3] and float(masks.min()) >= 0 and float(masks.max()) <= 1
    return Case(links, checks=[masks_in_unit_range])


def case_text_segment(data, kit):
    gdino, sam = _localization_models()
    image = draw_image(data, "image", channels=(1, 3, 4))

    def masks_in_unit_range(outputs, widgets):
        masks = outputs[0]
        assert masks.shape[1:] == image.shape[1:3] and float(masks.min()) >= 0 and float(masks.max()) <= 1
    return Case({"grounding_dino": gdino, "sam": sam, "image": image}, checks=[masks_in_unit_range])


RECIPES = {
    "QKVDDIMInversion": case_ddim_inversion,
    "QKVInDetailReferenceAttention": case_indetail,
    "QKVImagePromptGuidance": case_image_prompt_guidance,
    "QKVAdaINNoise": case_adain,
    "QKVReferenceKVBank": case_kv_bank,
    "QKVMCACtrlReplace": case_mca_replace,
    "QKVMCACtrlGenerate": case_mca_generate,
    "QKVIPAdapterLoader": case_ipadapter_loader,
    "QKVIPAdapterApply": case_ipadapter_apply,
    "QKVIPAdapterStyleContent": case_ipadapter_style_content,
    "QKVConditionGuidance": case_condition_guidance,
    "QKVMaskGuidance": case_mask_guidance,
    "QKVAttentionMap": case_attention_map,
    "QKVGroundingDinoLoader": case_localization_loader,
    "QKVSamLoader": case_localization_loader,
    "QKVTextSegment": case_text_segment,
    "QKVSamSegment": case_sam_segment,
}


# -- running one draw ---------------------------------------------------------------------------

class Refused(Exception):
    """The node refused the draw the way it should: a message naming it."""


def _known(node_id: str, error: BaseException, widgets: dict) -> str | None:
    for name, known in KNOWN_FAILURES.items():
        if (known.node == node_id and isinstance(error, known.error) and re.search(known.pattern, str(error))
                and (known.when is None or known.when(widgets))):
            return name
    return None


def _assert_names_node(display_name: str, message: str) -> None:
    assert display_name in message, f"refusal does not name the node {display_name!r}: {message!r}"


def _finite(value, path="output"):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"{path}: non-finite values"
    elif isinstance(value, dict):
        for key, item in value.items():
            _finite(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _finite(item, f"{path}[{i}]")
    elif isinstance(value, InversionResult):
        _finite(value.chain.latents, f"{path}.chain.latents")
        _finite(value.context, f"{path}.context")


def run_draw(node, data, kit, outcomes: collections.Counter) -> None:
    schema = node.define_schema()
    node_id, name = schema.node_id, schema.display_name
    case = RECIPES[node_id](data, kit)
    widgets = {}
    for inp in schema.inputs:
        strategy = widget_strategy(node_id, inp, widgets)
        if strategy is None:
            continue
        if inp.optional and not data.draw(st.booleans(), label=f"{inp.id}_present"):
            continue
        widgets[inp.id] = data.draw(strategy, label=inp.id)
    links = dict(case.links)
    try:
        try:
            verdict = node.validate_inputs(**widgets)
        except NotImplementedError:  # no validate_inputs of its own
            verdict = True
        if verdict is not True:
            assert isinstance(verdict, str), f"validate_inputs returned {verdict!r}"
            _assert_names_node(name, verdict)
            logger.debug("refused by validate_inputs: %s", verdict)
            raise Refused(verdict)
        outputs = node.execute(**links, **widgets).args
        _finite(outputs)
        for check in case.checks:
            check(outputs, widgets)
        outcomes["ran"] += 1
        patched = [o for o in outputs if isinstance(o, comfy.model_patcher.ModelPatcher)]
        if patched and case.sampling is not None:
            outcomes["acted" if _sample_and_compare(patched[0], outputs, case.sampling, widgets) else "sampled"] += 1
    except Refused:
        outcomes["refused"] += 1
    except Exception as error:
        known = _known(node_id, error, widgets)
        if known:
            outcomes[f"known: {known}"] += 1
            return
        if not isinstance(error, ValueError):
            raise
        _assert_names_node(name, str(error))
        logger.debug("refused: %s", error)
        outcomes["refused"] += 1


_UNPATCHED: dict = {}


def _unpatched(s: Sampling, positive, latent):
    """The same sampling on the model before the node (cached for the unpatched tiny model)."""
    run = functools.partial(sample, positive=positive, negative=conditioning(s.family, s.negative), seed=s.seed,
                            steps=s.steps, cfg=s.cfg, scheduler=s.scheduler, latent=latent)
    if s.baseline_model is not None or s.positive_cond is not None:
        return run(s.baseline_model if s.baseline_model is not None else _model(s.family))
    key = (s.family, s.positive, s.negative, s.seed, s.steps, s.cfg, s.scheduler, tuple(latent.shape))
    if key not in _UNPATCHED:
        _UNPATCHED[key] = run(_model(s.family))
    return _UNPATCHED[key]


def _sample_and_compare(model, outputs, s: Sampling, widgets) -> bool:
    """Sample the patched model; where the draw says the node acts, the result must differ from
    the unpatched one. Returns whether that comparison was made."""
    positive = s.positive_cond
    if positive is None:
        conds = [o for o in outputs if isinstance(o, list) and o and isinstance(o[0], list)]
        positive = conds[0] if conds else conditioning(s.family, s.positive)
    latent = torch.zeros((s.batch, 4, s.h, s.w))
    out = sample(model, positive, conditioning(s.family, s.negative), seed=s.seed, steps=s.steps, cfg=s.cfg,
                 scheduler=s.scheduler, latent=latent)
    assert torch.isfinite(out).all(), "sampled latent has non-finite values"
    if s.acts is not None and s.acts(widgets):
        reference = _unpatched(s, positive, latent)
        assert not torch.allclose(out, reference, rtol=0, atol=1e-6), (
            f"silent no-op: the patched model samples like the unpatched one (max diff "
            f"{float((out - reference).abs().max()):.2e})")
        return True
    return False


# -- the tests ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Tiny model files in the real formats, registered with folder_paths for the loaders."""
    root = tmp_path_factory.mktemp("fuzz_models")
    write_ipadapter_files(root)
    (root / "ipadapter" / BROKEN_IPADAPTER).write_bytes(b"\x00" * 64)
    write_tiny_localization_files(root)
    mp = pytest.MonkeyPatch()
    mp.setitem(folder_paths.folder_names_and_paths, "ipadapter", ([str(root / "ipadapter")], {".safetensors", ".bin"}))
    mp.setitem(folder_paths.folder_names_and_paths, GROUNDING_DINO_FOLDER,
               ([str(root / "grounding-dino")], {".pth", ".safetensors"}))
    mp.setitem(folder_paths.folder_names_and_paths, SAM_FOLDER, ([str(root / "sams")], {".pth", ".safetensors"}))
    folder_paths.filename_list_cache.clear()
    _adapter.cache_clear()
    _localization_models.cache_clear()
    yield Kit(root)
    mp.undo()
    folder_paths.filename_list_cache.clear()


NODES = {n.define_schema().node_id: n for n in registry.collect_nodes()}


def test_every_node_has_a_recipe_and_every_string_input_a_strategy():
    assert set(RECIPES) == set(NODES) == set(MAX_EXAMPLES)
    for node_id, node in NODES.items():
        for inp in node.define_schema().inputs:
            if isinstance(inp, io.String.Input):
                assert inp.id in STRING_STRATEGIES, f"{node_id}.{inp.id}: no STRING strategy"
    for (node_id, input_id), (low, high) in COST_LIMITS.items():
        inp = next(i for i in NODES[node_id].define_schema().inputs if i.id == input_id)
        assert inp.min <= low < high <= inp.max


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_fuzz_node_inputs(node_id, kit):
    node = NODES[node_id]

    @settings(max_examples=MAX_EXAMPLES[node_id] * SCALE, derandomize=DERANDOMIZE, database=None, deadline=None, phases=PHASES,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(data=st.data())
    def draws(data):
        with torch.no_grad():
            run_draw(node, data, kit, outcomes)

    outcomes: collections.Counter = collections.Counter()
    draws()
    logger.info("fuzz %s: %s", node_id, dict(outcomes))
    # A fuzz whose draws are all refused tests nothing: at least a quarter must reach the node's work.
    assert outcomes["ran"] >= MAX_EXAMPLES[node_id] // 4, dict(outcomes)

