"""MCA-Ctrl on the real ComfyUI sampler with tiny models: streams, schedules, edge cases."""

from __future__ import annotations

import pytest
import torch

from helpers import encode, sample
from qkv_control.attention import mca_ctrl as mca
from qkv_control.attention.rows import ROLE_CONDITION, ROLE_SUBJECT
from qkv_control.inversion.invert import invert
from qkv_control.mca_ctrl.config import AutoMask, ConditionPrompt, Masks, Schedule, Streams
from qkv_control.mca_ctrl.control import MCACtrl, new_scratch
from qkv_control.patching.layers import discover_layers
from qkv_control.patching.patch import add_control

STEPS = 4
SIZE = 16  # latent 16x16 (a 128 px image)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def kit(family):
    from qkv_control.tiny.models import tiny_checkpoint
    model, clip, vae = tiny_checkpoint(family)
    g = torch.Generator().manual_seed(5)
    subject_latent = torch.randn((1, 4, SIZE, SIZE), generator=g) * 0.5
    scene_latent = torch.randn((1, 4, SIZE, SIZE), generator=g) * 0.5
    subject, _ = invert(model, subject_latent, STEPS, "normal")
    scene, _ = invert(model, scene_latent, STEPS, "normal")
    return {
        "model": model, "clip": clip, "subject": subject, "scene": scene,
        "positive": encode(clip, "a photo of a dog on the grass"), "negative": encode(clip, ""),
    }


def _box_mask(size, top, left, height, width):
    m = torch.zeros((1, size, size))
    m[:, top:top + height, left:left + width] = 1.0
    return m


SUBJECT_MASK = _box_mask(SIZE * 8, 32, 32, 64, 64)
REGION_MASK = _box_mask(SIZE * 8, 48, 16, 64, 80)


class Recorder:
    """Wraps an MCACtrl's attend/extra_rows to record what happened per call."""

    def __init__(self, control):
        self.control = control
        self.calls = []     # (sigma, number of extra rows)
        self.acted = []     # (sigma, layer key, phase) where target rows were changed
        extra_rows, mca_attention = control.extra_rows, control._mca_attention

        def record_rows(call):
            rows = extra_rows(call)
            self.calls.append((call.sigma_value, len(rows), len(call.layout)))
            return rows

        def record_attention(call, phase, *args, **kwargs):
            self.acted.append((call.sigma_value, call.layer.key, phase))
            return mca_attention(call, phase, *args, **kwargs)

        control.extra_rows = record_rows
        control._mca_attention = record_attention


def make_mca(subject, subject_mask, region_mask, *, condition=None, condition_context=None, condition_cfg=1.0,
             schedule=mca.PhaseSchedule(), salq_layers="all", subject_dilation=3, subject_tokens=None):
    """An MCACtrl from the settings these tests vary (the rest at the nodes' defaults)."""
    prompt = None if condition_context is None else ConditionPrompt(condition_context, cfg=condition_cfg)
    auto = None if subject_tokens is None else AutoMask(tuple(subject_tokens))
    return MCACtrl(Streams(subject, scene=condition, prompt=prompt),
                   Masks(subject_mask, region_mask, subject_dilation=subject_dilation, auto=auto),
                   Schedule(schedule, salq_layers=salq_layers))


def _replacement(kit, **kwargs):
    return make_mca(kit["subject"], SUBJECT_MASK, REGION_MASK, condition=kit["scene"], **kwargs)


def test_rows_per_step_and_schedule(kit):
    control = _replacement(kit, schedule=mca.PhaseSchedule(0.25, 0.75), salq_layers="output")
    rec = Recorder(control)
    out = sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, cfg=5.0,
                 size=SIZE)
    assert torch.isfinite(out).all()
    sigmas = sorted({c[0] for c in rec.calls}, reverse=True)
    assert len(sigmas) == STEPS
    # Steps 0..2 active (SAGI step 0, SALQ steps 1-2), step 3 none: 2 sampler + 2 stream rows per step.
    per_sigma = {s: [c for c in rec.calls if c[0] == s] for s in sigmas}
    for step, s in enumerate(sigmas):
        extra = sum(c[1] for c in per_sigma[s])
        assert extra == (2 if step < 3 else 0), (step, per_sigma[s])
    phases = {(sigmas.index(s), p) for s, _, p in rec.acted}
    assert phases == {(0, "sagi"), (1, "salq"), (2, "salq")}
    salq_layers = {key for s, key, p in rec.acted if p == "salq"}
    assert salq_layers and all(key[0] == "output" for key in salq_layers)


def test_nothing_happens_outside_the_schedule(kit):
    """An empty schedule equals the unpatched model exactly (no rows, no attention change)."""
    control = _replacement(kit, schedule=mca.PhaseSchedule(0.0, 0.0))
    plain = sample(kit["model"], kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    # the initial latent differs (the target starts from the scene): compare on the same start
    out = sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    reference = make_mca(kit["subject"], SUBJECT_MASK, REGION_MASK, condition=kit["scene"],
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


def test_salq_with_all_ones_masks_is_subject_kv_replacement(kit):
    """Full subject mask and full target mask: SALQ is the target attending the subject's K/V."""
    ones = torch.ones((1, SIZE * 8, SIZE * 8))
    control = make_mca(kit["subject"], ones, ones, condition=kit["scene"], subject_dilation=1,
                      schedule=mca.PhaseSchedule(0.0, 1.0))
    seen = []
    original = control._mca_attention

    def check(call, phase, masks, targets, subject_rows, condition_rows, q, k, v, attend_next):
        out = original(call, phase, masks, targets, subject_rows, condition_rows, q, k, v, attend_next)
        s = subject_rows[0]
        idx = torch.tensor(targets)
        ref = call.plain(q[idx], k[s:s + 1].expand(len(targets), -1, -1), v[s:s + 1].expand(len(targets), -1, -1))
        torch.testing.assert_close(out[idx], ref, atol=1e-5, rtol=1e-4)
        others = [i for i in range(q.shape[0]) if i not in targets]
        torch.testing.assert_close(out[others], call.plain(q[others], k[others], v[others]), atol=1e-5, rtol=1e-4)
        seen.append(call.layer.key)
        return out

    control._mca_attention = check
    sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=2, size=SIZE)
    assert seen


def test_sagi_injects_the_formula(kit):
    control = _replacement(kit, schedule=mca.PhaseSchedule(1.0, 1.0))
    seen = []
    original = control._mca_attention

    def check(call, phase, masks, targets, subject_rows, condition_rows, q, k, v, attend_next):
        assert phase == "sagi"
        out = original(call, phase, masks, targets, subject_rows, condition_rows, q, k, v, attend_next)
        s, c = subject_rows[0], condition_rows[0]
        f_s = call.plain(q[s:s + 1], k[s:s + 1], v[s:s + 1])
        f_c = call.plain(q[c:c + 1], k[c:c + 1], v[c:c + 1])
        r = masks.region[..., None]
        expected = (1 - r) * f_c + r * masks.subject_fg[..., None] * f_s
        for t in targets:
            torch.testing.assert_close(out[t:t + 1], expected, atol=1e-5, rtol=1e-4)
        seen.append(phase)
        return out

    control._mca_attention = check
    sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=2, size=SIZE)
    assert seen


def test_batch_cfg1_and_generation(kit):
    """Generation: a condition stream per batch item from the target's own noise; batch 2, cfg 1."""
    clip = kit["clip"]
    condition = encode(clip, "a dog on the beach")
    control = make_mca(kit["subject"], SUBJECT_MASK, REGION_MASK, condition_context=condition[0][0],
                      schedule=mca.PhaseSchedule(0.25, 1.0))
    rec = Recorder(control)
    out = sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, cfg=1.0,
                 batch=2, size=SIZE)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    # cfg 1: 2 target rows (cond only) + 1 subject + 2 condition rows
    assert all(c[1] == 3 and c[2] == 2 for c in rec.calls)
    assert {p for _, _, p in rec.acted} == {"sagi", "salq"}
    assert not torch.allclose(out[0], out[1])  # each item keeps its own noise


def test_automatic_mask_from_subject_word(kit):
    clip = kit["clip"]
    condition = encode(clip, "a dog on the beach")
    control = make_mca(kit["subject"], SUBJECT_MASK, None, condition_context=condition[0][0],
                      subject_tokens=[2], schedule=mca.PhaseSchedule(0.25, 1.0))
    regions = []
    original = control._mca_attention

    def spy(call, phase, masks, *args):
        if masks.region.shape[-1] == (SIZE // 4) ** 2:  # the 16x16-equivalent level (latent / 4)
            regions.append(masks.region)
        return original(call, phase, masks, *args)

    control._mca_attention = spy
    sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    assert regions
    tokens = (SIZE // 4) ** 2
    for region in regions:  # binary, the top 30% of the tokens
        assert set(region.unique().tolist()) <= {0.0, 1.0}
        assert (region.sum(-1) == round(0.3 * tokens)).all()


def test_subject_of_another_size(kit):
    """A subject inverted at 24x16 latents is fitted (cover + centre crop) to the 16x16 target,
    and its mask with it."""
    g = torch.Generator().manual_seed(9)
    subject, _ = invert(kit["model"], torch.randn((1, 4, 24, 16), generator=g) * 0.5, STEPS, "normal")
    mask = _box_mask(1, 0, 0, 1, 1).new_zeros((1, 192, 128))
    mask[:, 80:112, 48:80] = 1  # centre of the tall image: survives the centre crop
    control = make_mca(subject, mask, REGION_MASK, condition=kit["scene"])
    out = sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    assert torch.isfinite(out).all()
    fitted, _ = control._latent_masks(new_scratch(), (SIZE, SIZE))
    assert fitted.shape[-2:] == (SIZE, SIZE) and float(fitted.sum()) > 0
    # A subject at the very top of the tall image is cropped away: a clear error, not a silent no-op.
    top = mask.new_zeros(mask.shape)
    top[:, :24, 48:80] = 1
    with pytest.raises(ValueError, match="subject to stay in view"):
        make_mca(subject, top, REGION_MASK, condition=kit["scene"])._latent_masks(new_scratch(), (SIZE, SIZE))


def test_empty_masks(kit):
    with pytest.raises(ValueError, match="subject mask with a foreground"):
        make_mca(kit["subject"], torch.zeros((1, 64, 64)), REGION_MASK, condition=kit["scene"])
    # An empty target mask is valid: nothing to replace, the scene is reconstructed.
    control = make_mca(kit["subject"], SUBJECT_MASK, torch.zeros((1, 64, 64)), condition=kit["scene"])
    out = sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=2, size=SIZE)
    assert torch.isfinite(out).all()


def test_stream_rows_keep_their_roles(kit):
    control = _replacement(kit)
    roles = []
    original = control._mca_attention

    def spy(call, *args, **kwargs):
        roles.append(tuple(row.role for row in call.layout.rows))
        return original(call, *args, **kwargs)

    control._mca_attention = spy
    sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=2, size=SIZE)
    assert roles and all(r.count(ROLE_SUBJECT) == 1 and r.count(ROLE_CONDITION) == 1 for r in roles)


def test_composes_with_another_control_on_the_same_layers(kit):
    """A second control on every self-attention layer (the chain is no longer exclusive, so
    the stream rows go through ``attend_next``) leaves the result unchanged, in either order."""
    from qkv_control.attention.layers import select_layers
    from qkv_control.patching.control import AttentionControl

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
    """Batch 2 at cfg 1: both items start from the one scene, share the stream rows (2 + 2 rows
    per call) and, the sampler being deterministic, come out the same."""
    control = _replacement(kit)
    rec = Recorder(control)
    out = sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, cfg=1.0,
                 batch=2, size=SIZE)
    assert torch.isfinite(out).all()
    assert all(c[1] == 2 and c[2] == 2 for c in rec.calls)
    torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("scheduler, denoise", [("normal", 1.0), ("ddim_uniform", 1.0), ("karras", 0.6)])
def test_start_latent_hook_sets_the_start(kit, scheduler, denoise):
    """patching: the sampler's first model input is exactly the latent a control's
    ``start_latent`` asks for, whatever ComfyUI's noise scaling does at that sigma (max_denoise
    or not, a latent to denoise from); returning None changes nothing."""
    import comfy.sample

    from qkv_control.patching.control import AttentionControl

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


def test_salq_in_the_model_matches_masked_reference(kit):
    """In the running model, the target rows' SALQ output equals the paper's formula computed
    with full key sets, 0/-inf masks and plain SDPA, at every scheduled layer."""
    control = _replacement(kit, schedule=mca.PhaseSchedule(0.0, 1.0))
    checked = []
    original = control._mca_attention

    def check(call, phase, masks, targets, subject_rows, condition_rows, q, k, v, attend_next):
        out = original(call, phase, masks, targets, subject_rows, condition_rows, q, k, v, attend_next)
        s, c = subject_rows[0], condition_rows[0]
        rows = len(targets)
        neg = float("-inf")
        m_s = torch.zeros(masks.subject_keys.shape).masked_fill(~masks.subject_keys, neg)
        m_c = torch.zeros(masks.region.shape).masked_fill(~masks.background_keys, neg)
        qt = q[torch.tensor(targets)]
        f_s = call.plain(qt, k[s:s + 1].expand(rows, -1, -1), v[s:s + 1].expand(rows, -1, -1),
                         mask=m_s.expand(rows, -1).unsqueeze(1))
        f_c = call.plain(qt, k[c:c + 1].expand(rows, -1, -1), v[c:c + 1].expand(rows, -1, -1),
                         mask=m_c.expand(rows, -1).unsqueeze(1))
        r = masks.region[..., None]
        torch.testing.assert_close(out[torch.tensor(targets)], (1 - r) * f_c + r * f_s, atol=1e-5, rtol=1e-4)
        checked.append(call.layer.key)
        return out

    control._mca_attention = check
    sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=2, size=SIZE)
    every_self_attention = {layer.key for layer in discover_layers(kit["model"]) if layer.kind == "attn1"}
    assert set(checked) == every_self_attention


def test_generated_condition_stream_with_cfg(kit):
    """condition_cfg > 1: one negative row per item (the target's negative prompt) and the
    stream steps with the guided prediction D_neg + cfg (D_pos - D_neg)."""
    from qkv_control.mca_ctrl.streams import ROLE_CONDITION_NEGATIVE

    condition = encode(kit["clip"], "a dog on the beach")
    control = make_mca(kit["subject"], SUBJECT_MASK, REGION_MASK, condition_context=condition[0][0],
                      condition_cfg=3.0, schedule=mca.PhaseSchedule(0.25, 1.0))
    stream = control.generated
    rows_for = stream.rows_for
    checked = []

    def spy(call, anchors, items, **kwargs):
        rows = rows_for(call, anchors, items, **kwargs)
        outputs = {}
        for row in rows:
            def wrapped(denoised, callback=row.on_output, role=row.role):
                outputs[role] = denoised.clone()
                callback(denoised)
                if role == ROLE_CONDITION_NEGATIVE:
                    guided = outputs[role] + 3.0 * (outputs[ROLE_CONDITION] - outputs[role])
                    torch.testing.assert_close(anchors[0][2], guided)
                    checked.append(call.sigma_value)
            row.on_output = wrapped
        assert [r.role for r in rows] == [ROLE_CONDITION, ROLE_CONDITION_NEGATIVE]
        return rows

    stream.rows_for = spy
    rec = Recorder(control)
    sample(add_control(kit["model"], control), kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    assert len(checked) == STEPS and all(c[1] == 3 for c in rec.calls)  # 2 target + subject + 2 condition rows
