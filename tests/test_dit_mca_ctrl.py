"""MCA-Ctrl on diffusion transformers (tiny Flux.1 dev and SD3.5, real samplers): SALQ and SAGI on
the image tokens of the joint attention with the masks at the patch grid, text tokens as the
model computes them, rows per step, the automatic mask from the joint attention's image -> text
part, word positions per text encoder, another pack's override.

The DiT form (docs/mca_ctrl.md): with I a row's image tokens, T its text tokens and the
official additive masks (``mca_reference``: subject keys where M_S > 0, background keys where
the target mask m < 1, raised by m; text keys at 0),

    SALQ: m · A(q_t[I], [K_t[T] ⊕ K_s[I]], M_S) + (1 - m) · A(q_t[I], [K_t[T] ⊕ K_c[I]], M_C)
    SAGI: m · A(q_s[I], [K_s[T] ⊕ K_s[I]], M_S) + (1 - m) · A(q_c[I], [K_c[T] ⊕ K_c[I]], M_C)

each branch keeping the querying row's own text keys (what a UNet keeps in its
cross-attention). Full score matrices in the reference; 1e-4 relative to the output's scale."""

from __future__ import annotations

import pytest
import torch

import mca_reference as ref
from qkv_control.attention import mca_ctrl as mca
from qkv_control.attention.rows import ROLE_COND, ROLE_UNCOND
from qkv_control.mca_ctrl.config import Masks, Schedule, Streams
from qkv_control.mca_ctrl.control import MCACtrl
from qkv_control.nodes.ddim_inversion import QKVDDIMInversion
from qkv_control.nodes.mca_ctrl_nodes import QKVMCACtrlGenerate
from qkv_control.patching import keys
from qkv_control.patching.image_prompt_policy import ImagePromptPolicy
from qkv_control.patching.layers import discover_layers
from qkv_control.patching.patch import add_control, set_transformer_option
from qkv_control.patching.prompt_tokens import word_token_positions
from qkv_control.tiny.dit import cached_dit_checkpoint
from dit_helpers import ModelRows, counting_override, dit_kit, dit_sample, sdpa_reference

STEPS = 4
SIZE = 16  # latent 16 x 16: a 128 px image, an 8 x 8 patch grid
PROMPT = "a red fox in the snow"
CFG = {"flux": 1.0, "sd35": 3.0}


def _box(height, width, top, left, h, w):
    m = torch.zeros((1, height, width))
    m[:, top:top + h, left:left + w] = 1.0
    return m


SUBJECT_MASK = _box(128, 128, 32, 32, 64, 64)
REGION_MASK = _box(128, 128, 48, 16, 64, 80)


def invert(model, positive, seed, hw=(SIZE, SIZE)):
    latent = torch.randn((1, 16) + tuple(hw), generator=torch.Generator().manual_seed(seed)) * 0.5
    return QKVDDIMInversion.execute(model, {"samples": latent}, STEPS, "simple", positive).args[0]


@pytest.fixture(scope="module", params=["flux", "sd35"])
def kit(request):
    family = request.param
    model, positive, negative = dit_kit(family)
    return {"family": family, "model": model, "positive": positive, "negative": negative,
            "subject": invert(model, positive, 5), "scene": invert(model, positive, 6)}


def replacement(kit, schedule=mca.PhaseSchedule(0.5, 1.0), subject_mask=SUBJECT_MASK, region=REGION_MASK,
                scene=None):
    return MCACtrl(Streams(kit["subject"], scene=scene or kit["scene"]), Masks(subject_mask, region),
                   Schedule(schedule))


class Recorder:
    """Records every SALQ / SAGI call of an MCACtrl: (step, call, phase, masks, rows, q, k, v, out)."""

    def __init__(self, control):
        self.acted, self.rows = [], []
        attention, extra_rows = control._mca_attention, control.extra_rows

        def record(call, phase, masks, targets, subject_for, condition_for, q, k, v, attend_next):
            out = attention(call, phase, masks, targets, subject_for, condition_for, q, k, v, attend_next)
            # The streams' inputs as the call's row indices they were taken from (on a DiT every
            # stream runs as a row); in generation the condition is the target.
            subject_rows = [s.rows[0] for s in subject_for]
            condition_rows = [c.rows[0] if c is not None else t for c, t in zip(condition_for, targets)]
            self.acted.append((call.run.clock.step(call.sigma_value), call, phase, masks,
                               (targets, subject_rows, condition_rows), q, k, v, out))
            return out

        def rows(call):
            out = extra_rows(call)
            self.rows.append((call.run.clock.step(call.sigma_value), out))
            return out

        control._mca_attention, control.extra_rows = record, rows


def dit_expected(phase, call, q, k, v, t, s, c, m_s, m_t):
    """The DiT form of the module docstring for target row ``t`` (full score matrices)."""
    tokens, heads = call.tokens, call.heads
    image = slice(tokens.image.start, tokens.image.stop)
    text = [i for i in range(tokens.length) if not tokens.image.start <= i < tokens.image.stop]
    fg_row, bg_row = (t, t) if phase == "salq" else (s, c)  # whose queries (and text keys)

    def branch(query_row, key_row, bias):
        keys_ = torch.cat([k[query_row:query_row + 1, text], k[key_row:key_row + 1, image]], 1)
        values = torch.cat([v[query_row:query_row + 1, text], v[key_row:key_row + 1, image]], 1)
        full_bias = torch.cat([torch.zeros(len(text)), bias])
        return ref.masked_attention(q[query_row:query_row + 1, image], keys_, values, full_bias, heads)

    # The official subject bias adds M_S (= 1) to every kept subject key: a uniform shift, a no-op
    # over image keys alone, so the DiT form keeps them at 0 like the text keys beside them.
    fg = branch(fg_row, s, ref.subject_bias(m_s) - (m_s > 0).float())
    bg = branch(bg_row, c, ref.background_bias(m_t))
    m = m_t.view(1, -1, 1)
    return m * fg + (1 - m) * bg


def assert_dit_outputs(entry, region_of=lambda item, grid: ref.nearest(REGION_MASK, grid)):
    step, call, phase, masks, (targets, subject_for, condition_for), q, k, v, out = entry
    tokens = call.tokens
    grid = tokens.grid
    assert tuple(masks.region.shape[-1:]) == (grid[0] * grid[1],)  # masks at the patch grid
    m_s = ref.nearest(SUBJECT_MASK, grid)
    image = slice(tokens.image.start, tokens.image.stop)
    for t, s, c in zip(targets, subject_for, condition_for):
        m_t = region_of(call.layout.rows[t].item, grid)
        expected = dit_expected(phase, call, q, k, v, t, s, c, m_s, m_t)
        scale = float(expected.abs().max())
        torch.testing.assert_close(out[t:t + 1, image].float(), expected, atol=1e-4 * scale, rtol=1e-4)
        if tokens.n_text:  # the target's text tokens: its own joint attention
            plain = sdpa_reference(q[t:t + 1], k[t:t + 1], v[t:t + 1], call.heads)
            torch.testing.assert_close(out[t:t + 1, :tokens.text.stop], plain[:, :tokens.text.stop],
                                       atol=2e-5, rtol=1e-4)
    others = [i for i in range(q.shape[0]) if i not in targets]
    torch.testing.assert_close(out[others], sdpa_reference(q[others], k[others], v[others], call.heads),
                               atol=2e-5, rtol=1e-4)


def test_replacement_salq_and_sagi_follow_the_dit_form(kit):
    """Every joint attention of both phases (Flux: double and single blocks; SD3.5: joint blocks
    and MMDiT-X's image-only attention, which has no text keys), both CFG branches on SD3.5."""
    control = replacement(kit)
    rec = Recorder(control)
    dit_sample(add_control(kit["model"], control), kit["positive"], kit["negative"], kit["family"], steps=STEPS,
               cfg=CFG[kit["family"]])
    assert {phase for _, _, phase, *_ in rec.acted} == {"sagi", "salq"}
    for entry in rec.acted:
        assert_dit_outputs(entry)
    every = {layer.key for layer in discover_layers(kit["model"])}
    assert {entry[1].layer.key for entry in rec.acted} == every
    if kit["family"] == "sd35":
        roles = {entry[1].layout.rows[t].role for entry in rec.acted for t in entry[4][0]}
        assert roles == {ROLE_COND, ROLE_UNCOND}  # the official default: both branches controlled


def test_rows_per_step(kit):
    """Replacement: Flux.1 dev at cfg 1 runs target + subject + scene (3 rows against 1);
    SD3.5 at CFG the official 6 (each stream per branch), conflict-free 4."""
    family = kit["family"]
    control = replacement(kit, schedule=mca.PhaseSchedule(0.25, 0.75))
    with ModelRows(kit["model"]) as calls:
        dit_sample(add_control(kit["model"], control), kit["positive"], kit["negative"], family, steps=STEPS,
                   cfg=CFG[family])
    plain = 1 if family == "flux" else 2
    assert calls.rows == [plain + 2 * plain] * 3 + [plain], calls.rows
    if family == "sd35":
        free = set_transformer_option(add_control(kit["model"], replacement(kit)), keys.IMAGE_PROMPT_POLICY,
                                      ImagePromptPolicy("positive_only"))
        with ModelRows(kit["model"]) as calls:
            dit_sample(free, kit["positive"], kit["negative"], family, steps=2, cfg=3.0)
        assert calls.rows == [4, 4]


def test_masks_follow_the_patch_grid_of_an_odd_latent():
    """A 18 x 14 latent: Flux's patch grid is 9 x 7 ((h + 1) // 2), and the masks are the drawn
    masks sampled to it (nearest); the outputs follow the DiT form there."""
    model, positive, negative = dit_kit("flux")
    kit = {"subject": invert(model, positive, 5, (18, 14)), "scene": invert(model, positive, 6, (18, 14))}
    subject, region = _box(144, 112, 40, 30, 60, 50), _box(144, 112, 20, 10, 90, 70)
    control = MCACtrl(Streams(kit["subject"], scene=kit["scene"]), Masks(subject, region), Schedule())
    rec = Recorder(control)
    latent = torch.zeros(1, 16, 18, 14)
    import nodes as comfy_nodes
    comfy_nodes.common_ksampler(add_control(model, control), 0, 2, 1.0, "euler", "simple", positive, negative,
                                {"samples": latent})
    for entry in rec.acted:
        call, masks = entry[1], entry[3]
        assert call.tokens.grid == (9, 7)
        torch.testing.assert_close(masks.region[0], ref.nearest(region, (9, 7)), atol=0, rtol=0)
        torch.testing.assert_close(masks.subject_keys[0].float(), (ref.nearest(subject, (9, 7)) > 0).float())


def test_generation_with_the_automatic_mask_from_the_joint_attention():
    """Flux generation without a target mask: the word map is the target's image queries'
    attention to its own text keys (softmax over the text keys), head mean, summed over the
    subject word's T5 tokens, accumulated over the double blocks of every step so far; the soft
    mask is the official one from it, and SALQ / SAGI follow the DiT form with the target's own
    keys as the background."""
    model, clip, _ = cached_dit_checkpoint("flux")
    _, positive, negative = dit_kit("flux")
    subject = invert(model, positive, 5)
    tokens = word_token_positions(clip, PROMPT, "fox")
    control = QKVMCACtrlGenerate.execute(model, clip, subject, SUBJECT_MASK, PROMPT, "fox", 0.3, 0.5, 1.0,
                                         "sagi_first", "all", "all", 1).args[0]
    (mca_control,) = [c for c in control.model_options["transformer_options"][keys.CONTROLS]
                      if isinstance(c, MCACtrl)]
    assert mca_control.masks.auto.subject_tokens == tuple(tokens) == (3, 4)  # "▁", "fox" of the T5 tokens
    maps = {}
    capture = mca_control._capture_word_map

    def record_map(call, st, q, k):
        assert call.layer.section == "double"
        rows = [i for i, row in enumerate(call.layout.rows) if row.is_sampler_row and row.role == ROLE_COND]
        t = call.tokens
        for i in rows:
            d = q.shape[-1] // call.heads
            qh = q[i, t.image].float().view(-1, call.heads, d).transpose(0, 1)
            kh = k[i, t.text].float().view(-1, call.heads, d).transpose(0, 1)
            probs = (qh @ kh.transpose(-1, -2) * d ** -0.5).softmax(-1).mean(0)
            maps.setdefault(call.layout.rows[i].item, []).append(probs[:, list(tokens)].sum(-1))
        capture(call, st, q, k)

    mca_control._capture_word_map = record_map
    rec = Recorder(mca_control)
    checked = []
    attention = mca_control._mca_attention

    def check(call, phase, masks, targets, *rest):
        out = attention(call, phase, masks, targets, *rest)
        expected = ref.automatic_mask(list(maps[0]), call.tokens.grid, call.tokens.grid)
        torch.testing.assert_close(masks.region[0].float(), expected, atol=1e-6, rtol=1e-5)
        assert_dit_outputs(rec.acted[-1], lambda item, grid: expected)
        checked.append(phase)
        return out

    mca_control._mca_attention = check
    dit_sample(control, positive, negative, "flux", steps=STEPS, cfg=1.0)
    assert set(checked) == {"sagi", "salq"} and len(maps[0]) == 2 * STEPS  # 2 double blocks per step
    for entry in rec.acted:
        targets, _, condition_for = entry[4]
        assert condition_for == targets


def test_word_positions_per_text_encoder():
    """Positions index the context the encoder gives the model: Flux.1's T5 tokens (its context
    is T5 only, padded to 256); SD3's CLIP tokens (77 per chunk), then its T5 tokens when it has a
    T5 (a tiny T5: tokenizing only)."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip
    from qkv_control.patching.prompt_tokens import prompt_token_count
    from qkv_control.tiny.dit import _CLIP_CONFIG, _T5_CONFIG

    flux_clip = cached_dit_checkpoint("flux")[1]
    t5 = [e[0] for e in flux_clip.tokenize(PROMPT)["t5xxl"][0]]
    assert word_token_positions(flux_clip, PROMPT, "snow") == [t5.index(2983)]  # "snow" in T5's vocabulary
    assert prompt_token_count(flux_clip, PROMPT) == 256
    sd3_clip = cached_dit_checkpoint("sd35")[1]
    assert word_token_positions(sd3_clip, PROMPT, "fox, snow") == [3, 6]  # CLIP BPE, after the start token
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                                                    comfy.text_encoders.sd3_clip.sd3_clip(True, True, True))
    with_t5 = comfy.sd.CLIP(target=target, model_options={
        "dtype": torch.float32, "clip_l_model_config": dict(_CLIP_CONFIG), "clip_g_model_config": dict(_CLIP_CONFIG),
        "t5xxl_model_config": dict(_T5_CONFIG)})
    assert word_token_positions(with_t5, PROMPT, "snow") == [6, 77 + t5.index(2983)]
    with pytest.raises(ValueError, match="expected the word 'wolf' in the prompt"):
        word_token_positions(flux_clip, PROMPT, "wolf")


@pytest.mark.parametrize("order", ["before", "after"])
def test_another_packs_override_and_mca_ctrl_both_run(order):
    model, positive, negative = dit_kit("flux")
    subject, scene = invert(model, positive, 5), invert(model, positive, 6)

    def control():
        return MCACtrl(Streams(subject, scene=scene), Masks(SUBJECT_MASK, REGION_MASK), Schedule())

    expected = dit_sample(add_control(model, control()), positive, negative, "flux", steps=2, cfg=1.0)
    calls = []
    if order == "before":
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
            counting_override(calls)
        m = add_control(m, control())
    else:
        m = add_control(model, control())
        m.model_options["transformer_options"]["optimized_attention_override"] = counting_override(calls)
    got = dit_sample(m, positive, negative, "flux", steps=2, cfg=1.0)
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    assert len(calls) == 5 * 2 and set(calls) == {1}  # every attention call, the sampler row only


@pytest.mark.parametrize("family", ["flux_schnell", "chroma", "flux2"])
def test_replacement_on_schnell_chroma_and_flux2(family):
    """Flux.1 schnell, Chroma and Flux 2 (patch 1: the 16 x 16 latent is the grid) through the same
    adapter, at CFG (both branches controlled)."""
    from dit_helpers import LATENT_CHANNELS
    model, positive, negative = dit_kit(family)

    def inverted(seed):
        latent = torch.randn(1, LATENT_CHANNELS[family], SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
        return QKVDDIMInversion.execute(model, {"samples": latent * 0.5}, 2, "simple", positive).args[0]

    control = MCACtrl(Streams(inverted(5), scene=inverted(6)), Masks(SUBJECT_MASK, REGION_MASK),
                      Schedule(mca.PhaseSchedule(0.5, 1.0)))
    rec = Recorder(control)
    dit_sample(add_control(model, control), positive, negative, family, steps=2, cfg=3.0)
    assert {phase for _, _, phase, *_ in rec.acted} == {"sagi", "salq"}
    for entry in rec.acted:
        assert entry[1].tokens.grid == ((16, 16) if family == "flux2" else (8, 8))
        assert_dit_outputs(entry)
