"""MCA-Ctrl on the real ComfyUI sampler with tiny models, against the official code's conventions
(yanghan-yh/MCA-Ctrl ``masactrl_p2p.py`` and its pipelines): which rows exist and with what
text, which keys each query sees, masks per layer, step windows, the automatic mask.

The per-layer references (tests/mca_reference.py) build full score matrices with additive
``finfo.min`` masks, as the official code does; the pack's output must match them at every
scheduled layer to 1e-4 (fp32, relative to the attention output's scale)."""

from __future__ import annotations

import logging

import pytest
import torch

import mca_reference as ref
from helpers import encode, sample
from qkv_control.attention import mca_ctrl as mca
from qkv_control.attention.layers import select_layers
from qkv_control.attention.rows import ROLE_COND, ROLE_CONDITION, ROLE_SUBJECT, ROLE_UNCOND
from qkv_control.attention.token_grid import token_grid
from qkv_control.inversion.invert import empty_conditioning, invert
from qkv_control.mca_ctrl.config import AutoMask, Masks, Schedule, Streams
from qkv_control.mca_ctrl.control import MCACtrl, new_scratch
from qkv_control.patching import keys
from qkv_control.patching.control import AttentionControl
from qkv_control.patching.image_prompt_policy import ImagePromptPolicy
from qkv_control.patching.layers import discover_layers
from qkv_control.patching.patch import add_control, set_transformer_option

STEPS = 4
SIZE = 16  # latent 16x16 (a 128 px image)
PROMPT = "a photo of a dog on the grass"
DOG = (5,)  # token position of "dog" in PROMPT


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request):
    return request.param


def _kit(family):
    from qkv_control.tiny.models import tiny_checkpoint
    model, clip, vae = tiny_checkpoint(family)
    g = torch.Generator().manual_seed(5)
    subject_latent = torch.randn((1, 4, SIZE, SIZE), generator=g) * 0.5
    scene_latent = torch.randn((1, 4, SIZE, SIZE), generator=g) * 0.5
    subject, _ = invert(model, subject_latent, STEPS, "normal")
    scene, _ = invert(model, scene_latent, STEPS, "normal")
    return {
        "model": model, "clip": clip, "subject": subject, "scene": scene,
        "positive": encode(clip, PROMPT), "negative": encode(clip, "blurry"),
    }


@pytest.fixture(scope="module")
def kit(family):
    return _kit(family)


def _box_mask(size, top, left, height, width):
    m = torch.zeros((1, size, size))
    m[:, top:top + height, left:left + width] = 1.0
    return m


SUBJECT_MASK = _box_mask(SIZE * 8, 32, 32, 64, 64)
REGION_MASK = _box_mask(SIZE * 8, 48, 16, 64, 80)


class Recorder:
    """Wraps an MCACtrl's extra_rows and _mca_attention to record what happened per call."""

    def __init__(self, control):
        self.control = control
        self.rows = []      # (step, call, extra rows)
        self.acted = []     # (step, layer key, phase, call, masks, targets, subject_for, condition_for, q, k, v, out)
        extra_rows, mca_attention = control.extra_rows, control._mca_attention

        def record_rows(call):
            rows = extra_rows(call)
            self.rows.append((call.run.clock.step(call.sigma_value), call, rows))
            return rows

        def record_attention(call, phase, masks, targets, subject_for, condition_for, q, k, v, attend_next):
            out = mca_attention(call, phase, masks, targets, subject_for, condition_for, q, k, v, attend_next)
            # The streams' inputs as the call's row indices they were taken from (the K/V bank is
            # off here: every stream runs as a row); in generation the condition is the target.
            subject_rows = [s.rows[0] for s in subject_for]
            condition_rows = [c.rows[0] if c is not None else t for c, t in zip(condition_for, targets)]
            self.acted.append((call.run.clock.step(call.sigma_value), call.layer.key, phase, call, masks, targets,
                               subject_rows, condition_rows, q, k, v, out))
            return out

        control.extra_rows = record_rows
        control._mca_attention = record_attention

    def extra_per_step(self):
        counts = {}
        for step, _, rows in self.rows:
            counts[step] = counts.get(step, 0) + len(rows)
        return counts

    def phases(self):
        return {(step, phase) for step, _, phase, *_ in self.acted}


def make_mca(subject, subject_mask, region_mask, *, scene=None, schedule=mca.PhaseSchedule(), salq_layers="all",
             subject_dilation=1, subject_tokens=None, prompt_context=None):
    """An MCACtrl from the settings these tests vary (the rest at the nodes' defaults)."""
    auto = None if subject_tokens is None else AutoMask(tuple(subject_tokens), prompt_context=prompt_context)
    return MCACtrl(Streams(subject, scene=scene),
                   Masks(subject_mask, region_mask, subject_dilation=subject_dilation, auto=auto),
                   Schedule(schedule, salq_layers=salq_layers))


def _replacement(kit, **kwargs):
    return make_mca(kit["subject"], SUBJECT_MASK, REGION_MASK, scene=kit["scene"], **kwargs)


def _branch_row(layout, code):
    role = ROLE_COND if code == 0 else ROLE_UNCOND
    return next(i for i, row in enumerate(layout.rows) if row.is_sampler_row and row.role == role)


def _assert_rows_carry_their_branch_text(call, rows):
    """Each stream row serving a CFG branch runs with that branch's own prompt and per-row
    inputs (the official pipeline runs its streams inside CFG)."""
    for row in rows:
        i = _branch_row(call.layout, row.item)
        torch.testing.assert_close(row.context, call.context[i:i + 1], atol=0, rtol=0)
        for name, value in call.conds.items():
            if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == call.x.shape[0]:
                torch.testing.assert_close(row.conds[name], value[i:i + 1], atol=0, rtol=0)


def test_replacement_rows_text_and_schedule(kit):
    """Without a guidance node both CFG branches are controlled (official): per active step a
    subject and a scene row for each branch, each with that branch's text and the inverted latent
    at the call's sigma: 6 rows for one image against 2. SAGI steps [0, 0.5), SALQ to 0.75."""
    control = _replacement(kit, schedule=mca.PhaseSchedule(0.5, 0.75), salq_layers="output")
    rec = Recorder(control)
    sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, cfg=5.0, size=SIZE)
    assert rec.extra_per_step() == {0: 4, 1: 4, 2: 4, 3: 0}
    for step, call, rows in rec.rows:
        if not rows:
            continue
        assert [(r.role, r.item) for r in rows] == [(ROLE_SUBJECT, 0), (ROLE_SUBJECT, 1),
                                                     (ROLE_CONDITION, 0), (ROLE_CONDITION, 1)]
        _assert_rows_carry_their_branch_text(call, rows)
        for row, chain in zip(rows, [kit["subject"].chain] * 2 + [kit["scene"].chain] * 2):
            torch.testing.assert_close(row.x, chain.latent_at(call.sigma_value), atol=1e-6, rtol=1e-6)
    assert rec.phases() == {(0, "sagi"), (1, "sagi"), (2, "salq")}
    salq_layers = {key for _, key, phase, *_ in rec.acted if phase == "salq"}
    assert salq_layers and all(key[0] == "output" for key in salq_layers)
    # Every acted call controls both branches' target rows, each with its own branch's stream rows.
    for *_, call, masks, targets, subject_for, condition_for, q, k, v, out in rec.acted:
        assert {call.layout.rows[t].role for t in targets} == {ROLE_COND, ROLE_UNCOND}
        for t, s, c in zip(targets, subject_for, condition_for):
            code = 0 if call.layout.rows[t].role == ROLE_COND else 1
            assert (call.layout.rows[s].role, call.layout.rows[s].item) == (ROLE_SUBJECT, code)
            assert (call.layout.rows[c].role, call.layout.rows[c].item) == (ROLE_CONDITION, code)


@pytest.mark.parametrize("mode,both", [("positive_only", False), ("negative_image", False), ("both", True)])
def test_guidance_policy_decides_the_negative_branch(kit, mode, both):
    """With an Image Prompt Guidance node MCA-Ctrl follows it: conflict-free leaves the negative
    branch plain and each stream costs one row (4 rows for one image); ``both`` is the official."""
    control = _replacement(kit)
    rec = Recorder(control)
    model = set_transformer_option(add_control(kit["model"], control), keys.IMAGE_PROMPT_POLICY,
                                   ImagePromptPolicy(mode))
    sample(model, kit["positive"], kit["negative"], steps=2, cfg=5.0, size=SIZE)
    assert set(rec.extra_per_step().values()) == {4 if both else 2}
    for step, call, rows in rec.rows:
        _assert_rows_carry_their_branch_text(call, rows)
    roles = {call.layout.rows[t].role for *_, call, masks, targets, _s, _c, _q, _k, _v, _o in rec.acted
             for t in targets}
    assert roles == ({ROLE_COND, ROLE_UNCOND} if both else {ROLE_COND})


def test_generation_rows_and_schedule(kit):
    """Generation (official): no condition stream, one subject row per controlled branch (4 rows
    for one image at CFG); with the automatic mask step 0 is plain and SAGI runs from step 1;
    with a drawn target mask SAGI starts at step 0 as in replacement."""
    auto = make_mca(kit["subject"], SUBJECT_MASK, None, subject_tokens=DOG, schedule=mca.PhaseSchedule(0.5, 1.0))
    rec = Recorder(auto)
    sample(add_control(kit["model"], auto), kit["positive"], kit["negative"], steps=STEPS, cfg=5.0, size=SIZE)
    assert rec.extra_per_step() == {0: 0, 1: 2, 2: 2, 3: 2}
    assert rec.phases() == {(1, "sagi"), (2, "salq"), (3, "salq")}
    for step, call, rows in rec.rows:
        assert all(r.role == ROLE_SUBJECT for r in rows)
        _assert_rows_carry_their_branch_text(call, rows)
    drawn = make_mca(kit["subject"], SUBJECT_MASK, REGION_MASK, schedule=mca.PhaseSchedule(0.5, 1.0))
    rec = Recorder(drawn)
    sample(add_control(kit["model"], drawn), kit["positive"], kit["negative"], steps=STEPS, cfg=5.0, size=SIZE)
    assert rec.extra_per_step() == {0: 2, 1: 2, 2: 2, 3: 2}
    assert rec.phases() == {(0, "sagi"), (1, "sagi"), (2, "salq"), (3, "salq")}


def _assert_official_outputs(entry, region_of):
    """The pack's output of one acted layer call against the official formula, every row."""
    step, key, phase, call, masks, targets, subject_for, condition_for, q, k, v, out = entry
    latent_hw = tuple(int(s) for s in call.extra_options["original_shape"][-2:])
    grid = token_grid(latent_hw, q.shape[1])
    m_s = ref.nearest(SUBJECT_MASK, grid)
    for t, s, c in zip(targets, subject_for, condition_for):
        m_t = region_of(call.layout.rows[t].item, grid)
        expected = ref.official_target_output(phase, q, k, v, t, s, c, m_s, m_t, call.heads)
        scale = float(expected.abs().max())
        torch.testing.assert_close(out[t:t + 1].float(), expected, atol=1e-4 * scale, rtol=1e-4)
    others = [i for i in range(q.shape[0]) if i not in targets]
    torch.testing.assert_close(out[others], call.plain(q[others], k[others], v[others]), atol=1e-5, rtol=1e-4)


def test_replacement_layers_are_the_official_masked_key_attention(kit):
    """Every scheduled self-attention layer of both phases: SAGI is the subject's and the scene's
    own attention over their foreground / background keys, SALQ the target's queries over them,
    fused by the target mask sampled by nearest interpolation at that layer."""
    control = _replacement(kit, schedule=mca.PhaseSchedule(0.5, 1.0))
    rec = Recorder(control)
    sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, cfg=5.0, size=SIZE)
    for entry in rec.acted:
        _assert_official_outputs(entry, lambda item, grid: ref.nearest(REGION_MASK, grid))
    every_self_attention = {layer.key for layer in discover_layers(kit["model"]) if layer.kind == "attn1"}
    for phase in ("sagi", "salq"):
        assert {key for _, key, p, *_ in rec.acted if p == phase} == every_self_attention


class WordMapRecorder(AttentionControl):
    """Records, at the cross-attention layers of one level, the positive rows' head-mean
    attention probabilities of the subject tokens, per batch item, in call order."""

    def __init__(self, level, tokens):
        super().__init__()
        self.level, self.tokens, self.maps, self.grid = level, list(tokens), {}, None

    def select_layers(self, layers):
        return tuple(layer for layer in layers if layer.kind == "attn2" and layer.level == self.level)

    def attend(self, call, q, k, v, attend_next):
        d = q.shape[-1] // call.heads
        latent_hw = tuple(int(s) for s in call.extra_options["original_shape"][-2:])
        self.grid = token_grid(latent_hw, q.shape[1])
        for i, row in enumerate(call.layout.rows):
            if row.is_sampler_row and row.role == ROLE_COND:
                qh = q[i].float().view(-1, call.heads, d).transpose(0, 1)
                kh = k[i].float().view(-1, call.heads, d).transpose(0, 1)
                probs = (qh @ kh.transpose(-1, -2) * d ** -0.5).softmax(-1).mean(0)   # [N, 77]
                self.maps.setdefault(row.item, []).append(probs[:, self.tokens].sum(-1))
        return attend_next(q, k, v)


def test_generation_layers_and_automatic_mask_are_the_official(kit):
    """Generation with the automatic mask, batch 2 at CFG: at every scheduled layer the mask of
    each item is the official soft mask (the positive row's word map averaged over every level-2
    cross-attention call so far, min-max normalised, nearest to the layer, top 30% set to 1), shared
    by that item's two CFG rows, and the output is the official formula with the target's own
    keys/values as the background."""
    control = make_mca(kit["subject"], SUBJECT_MASK, None, subject_tokens=DOG, schedule=mca.PhaseSchedule(0.5, 1.0))
    words = WordMapRecorder(2, DOG)  # level 2: the 16x16 layers at 512 px (official)
    rec = Recorder(control)
    seen = []
    original = control._mca_attention

    def check(call, phase, masks, targets, *rest):
        out = original(call, phase, masks, targets, *rest)
        snapshot = {item: list(maps) for item, maps in words.maps.items()}
        seen.append(snapshot)
        grid = token_grid(tuple(int(s) for s in call.extra_options["original_shape"][-2:]), rest[2].shape[1])
        for item in (0, 1):
            expected = ref.automatic_mask(snapshot[item], words.grid, grid)
            torch.testing.assert_close(masks.region[item].float(), expected, atol=1e-6, rtol=1e-5)
        _assert_official_outputs(rec.acted[-1], lambda item, g: ref.automatic_mask(snapshot[item], words.grid, g))
        return out

    control._mca_attention = check
    model = add_control(add_control(kit["model"], words), control)
    sample(model, kit["positive"], kit["negative"], steps=STEPS, cfg=5.0, batch=2, size=SIZE)
    assert seen and not torch.equal(torch.stack(words.maps[0]), torch.stack(words.maps[1]))
    every_self_attention = {layer.key for layer in discover_layers(kit["model"]) if layer.kind == "attn1"}
    assert {key for _, key, *_ in rec.acted} == every_self_attention
    for entry in rec.acted:
        step, _, _, call, masks, targets, subject_for, condition_for, *_ = entry
        assert condition_for == targets  # the target's own keys/values are the background
        assert len(targets) == 4


def test_nothing_happens_outside_the_schedule(kit):
    """An empty schedule equals the unpatched model exactly (no rows, no attention change)."""
    control = _replacement(kit, schedule=mca.PhaseSchedule(0.0, 0.0))
    plain = sample(kit["model"], kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    # the initial latent differs (the target starts from the scene): compare on the same start
    out = sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    reference = make_mca(kit["subject"], SUBJECT_MASK, REGION_MASK, scene=kit["scene"],
                         schedule=mca.PhaseSchedule(0.0, 0.0))
    reference.attend = lambda call, q, k, v, attend_next: attend_next(q, k, v)
    same_start = sample(add_control(kit["model"], reference), kit["positive"], kit["negative"], steps=STEPS,
                        size=SIZE)
    torch.testing.assert_close(out, same_start, atol=0, rtol=0)
    assert not torch.allclose(out, plain)  # it did start from the scene's inverted latent


def test_target_starts_from_scene_inversion(kit):
    """The target's first model input is the scene's inverted latent at the first sigma
    (the paper's shared initial features), for a full and a partial (denoise < 1) run."""
    for denoise in (1.0, 0.75):
        control = _replacement(kit)
        first = {}
        extra_rows = control.extra_rows

        def spy(call):
            first.setdefault("x", call.x[0:1].clone())
            first.setdefault("sigma", call.sigma_value)
            return extra_rows(call)

        control.extra_rows = spy
        sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, size=SIZE,
               denoise=denoise)
        expected = kit["scene"].chain.latent_at(first["sigma"])
        torch.testing.assert_close(first["x"], expected, atol=1e-4, rtol=1e-4)


def test_subject_of_another_size(kit):
    """A subject inverted at 24x16 latents is fitted (cover + centre crop) to the 16x16 target,
    and its binarised mask with it, so the subject rows and the keys they offer stay aligned."""
    from qkv_control.attention.cover_crop import cover_crop

    g = torch.Generator().manual_seed(9)
    subject, _ = invert(kit["model"], torch.randn((1, 4, 24, 16), generator=g) * 0.5, STEPS, "normal")
    mask = torch.zeros((1, 192, 128))
    mask[:, 80:112, 48:80] = 1  # centre of the tall image: survives the centre crop
    control = make_mca(subject, mask, REGION_MASK, scene=kit["scene"])
    rec = Recorder(control)
    sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    fitted = cover_crop(torch.nn.functional.interpolate(mask[None], size=(24, 16)), (SIZE, SIZE))
    for step, call, rows in rec.rows:
        for row in (r for r in rows if r.role == ROLE_SUBJECT):
            expected = cover_crop(subject.chain.latent_at(call.sigma_value), (SIZE, SIZE))
            torch.testing.assert_close(row.x, expected, atol=1e-6, rtol=1e-6)
    assert rec.acted
    for entry in rec.acted:
        subject_keys = entry[4].subject_keys
        grid = token_grid((SIZE, SIZE), subject_keys.shape[-1])
        assert torch.equal(subject_keys.flatten(), ref.nearest(fitted[0], grid) > 0)
    # A subject at the very top of the tall image is cropped away: a clear error, not a silent no-op.
    top = mask.new_zeros(mask.shape)
    top[:, :24, 48:80] = 1
    with pytest.raises(ValueError, match="subject to stay in view"):
        make_mca(subject, top, REGION_MASK, scene=kit["scene"])._latent_masks(new_scratch(), (SIZE, SIZE))


def test_empty_subject_mask_is_an_error(kit):
    with pytest.raises(ValueError, match="subject mask with a foreground"):
        make_mca(kit["subject"], torch.zeros((1, 64, 64)), REGION_MASK, scene=kit["scene"])
    with pytest.raises(ValueError, match="subject mask with a foreground"):
        make_mca(kit["subject"], torch.full((1, 64, 64), 0.45), REGION_MASK, scene=kit["scene"])


def test_empty_target_mask_reconstructs_the_scene(kit, caplog):
    """An empty target mask replaces nothing: the target queries only the scene stream, so the
    result is the scene's DDIM reconstruction (plain sampling from the scene's inverted noise with
    the inversion's text): within 5% of its largest value on the tiny model (the target's own
    trajectory drifts from the inverted one it reads the keys of), and at least 10x closer to it
    than a full target mask. The node says so before sampling."""

    class StartAtScene(AttentionControl):
        def start_latent(self, run, noise):
            return kit["scene"].chain.latent_at(run.clock.first_sigma)

    text = empty_conditioning(kit["model"])
    reconstruction = sample(add_control(kit["model"], StartAtScene()), text, text, steps=STEPS, cfg=1.0, size=SIZE)
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        empty = make_mca(kit["subject"], SUBJECT_MASK, torch.zeros((1, 64, 64)), scene=kit["scene"])
    assert "nothing is replaced" in caplog.text
    out = sample(add_control(kit["model"], empty), text, text, steps=STEPS, cfg=1.0, size=SIZE)
    full = make_mca(kit["subject"], SUBJECT_MASK, torch.ones((1, 64, 64)), scene=kit["scene"])
    out_full = sample(add_control(kit["model"], full), text, text, steps=STEPS, cfg=1.0, size=SIZE)
    scale = float(reconstruction.abs().max())
    error = float((out - reconstruction).abs().max())
    assert error < 0.05 * scale
    assert error * 10 < float((out_full - reconstruction).abs().max())



def test_empty_target_mask_in_generation_is_plain_sampling(kit):
    """Generation with an empty drawn target mask: the target's queries see only its own keys, as
    without MCA-Ctrl: the plain sampler's result to 1e-4 of its scale."""
    plain = sample(kit["model"], kit["positive"], kit["negative"], steps=STEPS, cfg=5.0, size=SIZE)
    control = make_mca(kit["subject"], SUBJECT_MASK, torch.zeros((1, 64, 64)))
    out = sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, cfg=5.0,
                 size=SIZE)
    torch.testing.assert_close(out, plain, atol=1e-4 * float(plain.abs().max()), rtol=0)


def test_composes_with_another_control_on_the_same_layers(kit):
    """A second control on every self-attention layer (the chain is no longer exclusive, so
    the stream rows go through ``attend_next``) leaves the result unchanged, in either order."""
    class PassThrough(AttentionControl):
        def select_layers(self, layers):
            return select_layers("all", layers, "attn1")

    args = (kit["positive"], kit["negative"])
    alone = sample(add_control(kit["model"], _replacement(kit)), *args, steps=STEPS, size=SIZE)
    after = sample(add_control(add_control(kit["model"], _replacement(kit)), PassThrough()), *args,
                   steps=STEPS, size=SIZE)
    before = sample(add_control(add_control(kit["model"], PassThrough()), _replacement(kit)), *args,
                    steps=STEPS, size=SIZE)
    torch.testing.assert_close(after, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(before, alone, atol=1e-4, rtol=1e-4)


def test_replacement_batch_and_cfg1(kit):
    """Batch 2 at cfg 1 (positive rows only): both items start from the one scene, share one
    subject and one scene row per call and, the sampler being deterministic, come out the same."""
    control = _replacement(kit)
    rec = Recorder(control)
    out = sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, cfg=1.0,
                 batch=2, size=SIZE)
    assert all(len(rows) == 2 and len(call.layout) == 2 for _, call, rows in rec.rows)
    torch.testing.assert_close(out[0], out[1], atol=0, rtol=0)


@pytest.mark.parametrize("scheduler, denoise", [("normal", 1.0), ("ddim_uniform", 1.0), ("karras", 0.6)])
def test_start_latent_hook_sets_the_start(kit, scheduler, denoise):
    """patching: the sampler's first model input is exactly the latent a control's
    ``start_latent`` asks for, whatever ComfyUI's noise scaling does at that sigma (max_denoise
    or not, a latent to denoise from); returning None changes nothing."""
    import comfy.sample

    target = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 3.0

    class StartAt(AttentionControl):
        def start_latent(self, run, noise):
            return target

    first = []

    class Spy(AttentionControl):
        def extra_rows(self, call):
            first.append(call.x[:1].clone())
            return []

    latent = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) if denoise < 1 else \
        torch.zeros(1, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, 0)
    args = (STEPS, 5.0, "ddim", scheduler, kit["positive"], kit["negative"], latent)
    comfy.sample.sample(add_control(add_control(kit["model"], StartAt()), Spy()), noise, *args, seed=0,
                        denoise=denoise)
    # ComfyUI passes the model calculate_input(sigma, x); the wrapper sees x itself.
    torch.testing.assert_close(first[0], target, atol=1e-5, rtol=1e-5)
    unchanged = comfy.sample.sample(add_control(kit["model"], AttentionControl()), noise, *args, seed=0,
                                    denoise=denoise)
    torch.testing.assert_close(unchanged, comfy.sample.sample(kit["model"], noise, *args, seed=0, denoise=denoise),
                               atol=0, rtol=0)
