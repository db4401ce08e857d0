"""InDetail-IP on diffusion transformers (tiny Flux.1 dev and SD3.5, real samplers): the modes on
the image tokens of the joint attention against their formulas, text tokens as the model
computes them, equivalences with unpatched sampling, conflict-free guidance on SD3.5, rows per
step, padded texts, another pack's override, AdaIN noise on a flow model, Kontext inputs.

Formulas (design note of docs/dit.md): for a target row t and the reference row r of a call,
with I the image tokens, T the rest (text, Kontext reference latents) and A plain attention,

    concat:     A(q_t[I], [K_r[I] ⊕ K_t],    [V_r[I] ⊕ V_t])
    replace:    A(q_t[I], [K_r[I] ⊕ K_t[T]], [V_r[I] ⊕ V_t[T]])
    stratified: λG·A(q_t[I], K_t, V_t) + λP·A(q_t[I], K_r[I], V_r[I])   (λG = λP = 0.5)

and every other output (t's text tokens, the negative rows, the reference row) A(q, K_own, V_own)
over the row's own keys without its zero padding. Checked against torch's SDPA on the q/k/v the
call received: 2e-5 absolute + 1e-4 relative (float32, other batch and key order)."""

from __future__ import annotations

import pytest
import torch

import comfy.model_patcher
import comfy.sample
import comfy.samplers
import nodes as comfy_nodes

from qkv_control.attention.rows import ROLE_COND, ROLE_REFERENCE
from qkv_control.indetail_ip.blocks import default_blocks
from qkv_control.indetail_ip.control import ReferenceAttentionControl
from qkv_control.families.registry import family_of
from qkv_control.nodes.adain_noise import QKVAdaINNoise
from qkv_control.nodes.ddim_inversion import QKVDDIMInversion
from qkv_control.nodes.image_prompt_guidance import QKVImagePromptGuidance
from qkv_control.nodes.indetail_ip import QKVInDetailReferenceAttention
from qkv_control.patching.control import ExtraRow
from qkv_control.patching.layers import discover_layers
from qkv_control.patching.patch import add_control
from qkv_control.tiny.dit import cached_dit_checkpoint
from dit_helpers import ModelRows, counting_override, dit_kit, dit_sample, sdpa_reference
from helpers import encode, uncond_recorder

STEPS = 3
ATOL, RTOL = 2e-5, 1e-4
# A row's prediction in another batch differs by float rounding only (tests/test_dit_rows.py).
SAMPLE_RTOL = 1e-4
OVERRIDE = "optimized_attention_override"
CFG = {"flux": 1.0, "sd35": 3.0}  # Flux.1 dev: guidance-distilled, cfg 1; SD3.5: CFG


def invert(model, positive, seed=2, size=16):
    latent = torch.randn(1, 16, size, size, generator=torch.Generator().manual_seed(seed))
    return QKVDDIMInversion.execute(model, {"samples": latent}, STEPS, "simple", positive).args[0]


@pytest.fixture(scope="module", params=["flux", "sd35"])
def kit(request):
    family = request.param
    model, positive, negative = dit_kit(family)
    return family, model, positive, negative, invert(model, positive)


def indetail(model, inversion, schedule, blocks="auto", lam_ref=0.5, lam_self=0.5):
    return QKVInDetailReferenceAttention.execute(model, inversion, blocks, schedule, lam_ref, lam_self).args[0]


class Recording(ReferenceAttentionControl):
    """The control as the node builds it, recording each patched call's q/k/v and output."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def attend(self, call, q, k, v, attend_next):
        out = super().attend(call, q, k, v, attend_next)
        self.records.append((call, self.mode_at(call.run, call.sigma_value), q.clone(), k.clone(), v.clone(),
                             out.clone()))
        return out


def own_keys(tokens, text_tokens, row_text):
    """Indices of a row's own keys: its text without zero padding, then the image and extra tokens."""
    keep = list(range(tokens.text.start, tokens.text.start + row_text))
    return keep + list(range(tokens.text.stop, tokens.length))


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def check_call(call, mode, q, k, v, out, text_lengths):
    """One recorded call against the formulas of the module docstring."""
    tokens, heads, layout = call.tokens, call.heads, call.layout
    reference = layout.indices(ROLE_REFERENCE)
    targets = layout.indices(ROLE_COND) if reference else []  # a call without the row: all plain
    image = list(range(tokens.image.start, tokens.image.stop))
    rest = [i for i in range(tokens.length) if i not in set(image)]
    if reference:
        k_ref, v_ref = k[reference[0]:reference[0] + 1, image], v[reference[0]:reference[0] + 1, image]
    for row in range(q.shape[0]):
        keys_own = own_keys(tokens, tokens.n_text, text_lengths[row]) if tokens.n_text else list(range(tokens.length))
        kk, vv = k[row:row + 1, keys_own], v[row:row + 1, keys_own]
        plain = sdpa_reference(q[row:row + 1], kk, vv, heads)
        if row not in targets:
            close(out[row:row + 1], plain, f"{call.layer.describe()} row {row} ({layout.rows[row].role})")
            continue
        q_img = q[row:row + 1, image]
        if mode == "concat":
            expected = sdpa_reference(q_img, torch.cat([k_ref, kk], 1), torch.cat([v_ref, vv], 1), heads)
        elif mode == "replace":
            kept = [i for i in keys_own if i not in set(image)]
            expected = sdpa_reference(q_img, torch.cat([k_ref, k[row:row + 1, kept]], 1),
                                      torch.cat([v_ref, v[row:row + 1, kept]], 1), heads)
        else:
            expected = 0.5 * plain[:, image] + 0.5 * sdpa_reference(q_img, k_ref, v_ref, heads)
        close(out[row:row + 1, image], expected, f"{call.layer.describe()} {mode}, target image tokens")
        if rest:
            close(out[row:row + 1, rest], plain[:, rest], f"{call.layer.describe()} target text tokens")


SPECS = {"flux": "double:1, single:0, single:2", "sd35": "joint"}


@pytest.mark.parametrize("mode", ["concat", "replace", "stratified"])
def test_modes_on_image_tokens_follow_their_formulas(kit, mode):
    """Every patched layer (Flux: a double and two single blocks; SD3.5: every joint block and
    MMDiT-X's image self-attention), at every step of a CFG run (SD3.5) or a cfg 1 run (Flux)."""
    family, model, positive, negative, inversion = kit
    control = Recording(inversion, SPECS[family], f"{mode}:0-1")
    dit_sample(add_control(model, control), positive, negative, family, steps=2, cfg=CFG[family])
    assert control.records
    for call, used, q, k, v, out in control.records:
        assert used == mode
        check_call(call, mode, q, k, v, out, [call.tokens.n_text] * q.shape[0])
    layers = {call.layer.key for call, *_ in control.records}
    if family == "sd35":
        assert ("joint", 0, 1) in layers  # the image-only MMDiT-X attention is patched too
        assert {call.tokens.n_text for call, *_ in control.records} == {0, 77}


def test_reference_rows_carry_the_inversions_text_and_image_tokens_only(kit):
    """The reference row runs with the inversion's captured context and per-row conds (Flux: its
    pooled text and guidance); the modes read its image tokens at the target's positions only."""
    family, model, positive, negative, inversion = kit
    assert set(inversion.conds) == ({"y", "guidance"} if family == "flux" else {"y"})
    control = Recording(inversion, SPECS[family], "concat:0-1")
    rows = []
    base = control.extra_rows
    control.extra_rows = lambda call: rows.append(base(call)) or rows[-1]
    dit_sample(add_control(model, control), positive, negative, family, steps=2, cfg=CFG[family])
    (row,) = rows[0]
    assert torch.equal(row.context, inversion.context) and torch.equal(row.conds["y"], inversion.conds["y"])
    if family == "flux":
        assert torch.equal(row.conds["guidance"], inversion.conds["guidance"])
    # (that the modes read the reference's image tokens only: the formulas of the test above)


def test_lambda_reference_zero_equals_unpatched_sampling(kit):
    family, model, positive, negative, inversion = kit
    patched = indetail(model, inversion, "stratified:0-1", blocks="all", lam_ref=0.0, lam_self=1.0)
    got = dit_sample(patched, positive, negative, family, steps=STEPS, cfg=CFG[family])
    expected = dit_sample(model, positive, negative, family, steps=STEPS, cfg=CFG[family])
    torch.testing.assert_close(got, expected, atol=SAMPLE_RTOL * float(expected.abs().max()), rtol=0)


class OwnStreamControl(ReferenceAttentionControl):
    """The 'reference' row is the generated row itself (same latent, text, per-row conds, sigma)."""

    def extra_rows(self, call):
        row = call.layout.indices(ROLE_COND)[0]
        conds = {k: v[row:row + 1] for k, v in call.conds.items() if torch.is_tensor(v) and v.ndim}
        return [ExtraRow(ROLE_REFERENCE, call.x[row:row + 1], call.context[row:row + 1], conds=conds)]


def test_replacement_with_the_streams_own_kv_equals_unpatched_sampling(kit):
    """KV replacement keeps the row's own text keys: with the row's own image keys in place of the
    reference's it is the row's own joint attention (its keys reordered), on every block."""
    family, model, positive, negative, inversion = kit
    patched = add_control(model, OwnStreamControl(inversion, "all", "replace:0-1"))
    got = dit_sample(patched, positive, negative, family, steps=STEPS, cfg=1.0)
    expected = dit_sample(model, positive, negative, family, steps=STEPS, cfg=1.0)
    torch.testing.assert_close(got, expected, atol=SAMPLE_RTOL * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("policy", [None, "positive_only"])
def test_conflict_free_negative_prediction_is_unpatched_on_sd35(policy):
    """SD3.5 with CFG: at every step the negative prediction equals the unpatched model's at the
    same x and sigma (the negative rows attend their own keys only), up to batch-size rounding
    (1e-5 relative); and it is patched under ``both`` (the conflicting baseline)."""
    model, positive, negative = dit_kit("sd35")
    inversion = invert(model, positive)
    for schedule in ("stratified:0-0.5, concat:0.5-1", "replace:0-1"):
        patched = indetail(model, inversion, schedule, blocks="all")
        if policy is not None:
            patched = QKVImagePromptGuidance.execute(patched, policy).args[0]
        recorder, diffs = uncond_recorder(patched)
        dit_sample(recorder, positive, negative, "sd35", steps=4, cfg=3.0)
        assert len(diffs) == 4 and max(diffs) < 1e-5, (schedule, diffs)
    recorder, diffs = uncond_recorder(QKVImagePromptGuidance.execute(indetail(model, inversion, "concat:0-1"),
                                                                     "both").args[0])
    dit_sample(recorder, positive, negative, "sd35", steps=2, cfg=3.0)
    assert min(diffs) > 1e-3, diffs


def test_rows_per_step():
    """One extra row per stream: Flux.1 dev at cfg 1 runs 2 rows against plain's 1; SD3.5 with
    conflict-free CFG 3 against 2 (the official InDetail-IP code: 4)."""
    for family, cfg, plain_rows, rows in (("flux", 1.0, 1, 2), ("sd35", 3.0, 2, 3)):
        model, positive, negative = dit_kit(family)
        patched = indetail(model, invert(model, positive), "stratified:0-0.5, concat:0.5-1")
        with ModelRows(model) as calls:
            dit_sample(model, positive, negative, family, steps=STEPS, cfg=cfg)
        assert calls.rows == [plain_rows] * STEPS
        with ModelRows(model) as calls:
            dit_sample(patched, positive, negative, family, steps=STEPS, cfg=cfg)
        assert calls.rows == [rows] * STEPS, (family, calls.rows)


LONG = ("a red fox in the snow, " * 12).strip(", ")  # over 75 CLIP tokens: SD3's context is 2 x 77


@pytest.mark.parametrize("longer", ["sampler", "reference"])
def test_padded_texts_are_masked_in_every_mode(longer):
    """SD3: the sampler's prompt and the inversion's text of other lengths (154 / 77 tokens): the
    shorter rows are zero-padded and every mode leaves their padding keys out (the formulas over
    each row's own keys); conflict-free, the negative prediction is still the unpatched one."""
    model, clip, _ = cached_dit_checkpoint("sd35")
    short, long = encode(clip, "a red fox"), encode(clip, LONG)
    assert long[0][0].shape[1] == 154 and short[0][0].shape[1] == 77
    positive, reference_text = (long, short) if longer == "sampler" else (short, long)
    negative = encode(clip, "")
    inversion = invert(model, reference_text)
    for mode in ("concat", "replace", "stratified"):
        control = Recording(inversion, "joint:1", f"{mode}:0-1")
        recorder, diffs = uncond_recorder(add_control(model, control))
        dit_sample(recorder, positive, negative, "sd35", steps=2, cfg=3.0)
        assert max(diffs) < 1e-5, diffs
        padded = [record for record in control.records if record[0].layout.has(ROLE_REFERENCE)]
        assert len(padded) == 2  # one call with the reference row per step (the positive one)
        for call, used, q, k, v, out in padded:
            assert call.tokens.n_text == 154
            lengths = [positive[0][0].shape[1]] * (q.shape[0] - 1) + [inversion.context.shape[1]]
            check_call(call, mode, q, k, v, out, lengths)


@pytest.mark.parametrize("order", ["before", "after"])
def test_another_packs_override_and_indetail_both_run(kit, order):
    """Another pack's attention override installed before or after the InDetail-IP node: it runs
    on every attention call (the sampler rows), ours on the patched layers, and the result is the
    one without it (a pass-through override), to float rounding."""
    family, model, positive, negative, inversion = kit
    patched = indetail(model, inversion, "stratified:0-0.5, concat:0.5-1")
    expected = dit_sample(patched, positive, negative, family, steps=STEPS, cfg=CFG[family])
    calls = []
    if order == "before":
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})[OVERRIDE] = counting_override(calls)
        m = indetail(m, inversion, "stratified:0-0.5, concat:0.5-1")
    else:
        m = patched.clone()
        m.model_options["transformer_options"][OVERRIDE] = counting_override(calls)
    got = dit_sample(m, positive, negative, family, steps=STEPS, cfg=CFG[family])
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    layers = len(discover_layers(model))
    assert len(calls) == layers * STEPS and set(calls) == {1 if family == "flux" else 2}


def test_auto_blocks_per_family():
    """``auto``: the decoder on UNets; the later single blocks on Flux (RF-Solver-Edit's 20-37 of
    38, the same share of the tiny model's 3); the later half of SD3's joint blocks."""
    from qkv_control.tiny.models import tiny_checkpoint
    unet = tiny_checkpoint("sd15")[0]
    assert default_blocks(family_of(unet), discover_layers(unet)) == "output"
    flux, sd35 = dit_kit("flux")[0], dit_kit("sd35")[0]
    assert default_blocks(family_of(flux), discover_layers(flux)) == "single:2-2"
    assert default_blocks(family_of(sd35), discover_layers(sd35)) == "joint:1-2"  # 3 joint blocks

    from qkv_control.attention.layers import AttentionLayer
    # the block lists of FLUX.1 (19 double, 38 single) and SD3.5 Large (38 joint blocks)
    full = tuple(AttentionLayer("attn1", (s, i), 0, 0, 0, 24, 128) for s, n in (("double", 19), ("single", 38))
                 for i in range(n))
    assert default_blocks(family_of(flux), full) == "single:20-37"
    joint = tuple(AttentionLayer("attn1", ("joint", i), 0, i, 0, 38, 64) for i in range(38))
    assert default_blocks(family_of(sd35), joint) == "joint:19-37"


def test_stream_rows_follow_other_samplers_and_denoise(kit):
    """Another sampler (dpmpp_2m, evaluating between the inversion's sigmas) and denoise < 1: the
    reference row gets the chain's latent at each call's sigma (an Euler sub-step between stored
    sigmas); the modes still follow their formulas."""
    family, model, positive, negative, inversion = kit
    control = Recording(inversion, SPECS[family], "concat:0-1")
    seen = []
    base = control.extra_rows

    def rows(call):
        out = base(call)
        seen.append((call.sigma_value, [r.x for r in out]))
        return out

    control.extra_rows = rows
    latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(9))
    comfy_nodes.common_ksampler(add_control(model, control), 0, 4, CFG[family], "dpmpp_2m", "beta", positive,
                                negative, {"samples": latent}, denoise=0.6)
    assert seen and all(len(x) == 1 for _, x in seen)
    for sigma, (x,) in seen:
        torch.testing.assert_close(x, inversion.chain.latent_at(sigma).to(x), atol=1e-6, rtol=0)
    call, mode, q, k, v, out = control.records[-1]
    check_call(call, mode, q, k, v, out, [call.tokens.n_text] * q.shape[0])


# --------------------------------------------------------------------- AdaIN

def adain_flow(inversion, sigma, seed, batch):
    """Eq. 2 on a flow model: the seed's noise with the per-channel statistics of the inverted
    latent at sigma as the model sees it (x itself: no VP scale; at sigma 1 unit noise)."""
    noise = comfy.sample.prepare_noise(torch.zeros(batch, 16, 16, 16), seed)
    reference = inversion.chain.latent_at(sigma)
    mu = lambda t: t.mean((2, 3), keepdim=True)  # noqa: E731
    sd = lambda t: (t.var((2, 3), keepdim=True) + 1e-5).sqrt()  # noqa: E731
    return sd(reference) * (noise - mu(noise)) / sd(noise) + mu(reference)


@pytest.mark.parametrize("route,denoise", [("ksampler", 1.0), ("ksampler", 0.6), ("noise", 1.0)])
def test_adain_noise_on_a_flow_model_starts_at_eq2(route, denoise):
    """Flux: sampled with the AdaIN node's model (KSampler, any denoise) or its NOISE
    (SamplerCustomAdvanced), the first model input is eq. 2's AdaIN z_T at the run's first sigma
    with the flow's scale 1 (1e-5 relative)."""
    from comfy_extras.nodes_custom_sampler import BasicScheduler, SamplerCustomAdvanced
    model, positive, negative = dit_kit("flux")
    inversion = invert(model, positive)
    latent = {"samples": torch.zeros(2, 16, 16, 16)}
    _, noise, started = QKVAdaINNoise.execute(model=indetail(model, inversion, "concat:0-1"), inversion=inversion,
                                              latent=latent, seed=7).args
    inputs = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    try:
        if route == "ksampler":
            comfy_nodes.common_ksampler(started, 0, 3, 1.0, "euler", "simple", positive, negative, latent,
                                        denoise=denoise)
            sigma = float(BasicScheduler.execute(model, "simple", 3, denoise)[0][0])
        else:
            guider = comfy.samplers.CFGGuider(model)
            guider.set_conds(positive, negative)
            guider.set_cfg(1.0)
            sigmas = BasicScheduler.execute(model, "simple", 3, 1.0)[0]
            SamplerCustomAdvanced.execute(noise, guider, comfy.samplers.sampler_object("euler"), sigmas, latent)
            sigma = float(sigmas[0])
    finally:
        handle.remove()
    expected = adain_flow(inversion, sigma, 7, 2)
    torch.testing.assert_close(inputs[0][:2], expected, atol=1e-5 * float(expected.abs().max()), rtol=0)
    assert abs(float(inputs[0][:2].std()) - float(inversion.chain.latent_at(sigma).std())) < 0.2


def test_kontext_reference_latents_reach_the_reference_row():
    """Flux Kontext: the inversion records the list-valued ``ref_latents`` of its conditioning,
    the reference row carries them, and the modes read the reference's generated-image tokens
    only (not its Kontext tokens), its text and Kontext tokens as the model computes them."""
    model, positive, negative = dit_kit("flux")
    kontext = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    positive = [[positive[0][0], {**positive[0][1], "reference_latents": [kontext]}]]
    negative = [[negative[0][0], {**negative[0][1], "reference_latents": [kontext]}]]
    inversion = invert(model, positive)
    assert isinstance(inversion.conds["ref_latents"], list)
    control = Recording(inversion, "single:0, double:0", "replace:0-1")
    dit_sample(add_control(model, control), positive, negative, "flux", steps=2, cfg=1.0)
    for call, mode, q, k, v, out in control.records:
        assert call.tokens.extra and call.tokens.n_image == 64
        check_call(call, mode, q, k, v, out, [call.tokens.n_text] * q.shape[0])


@pytest.mark.parametrize("family", ["flux_schnell", "chroma", "flux2"])
def test_modes_on_schnell_chroma_and_flux2(family):
    """The same adapter (double/single blocks) on Flux.1 schnell (no guidance embedding), Chroma
    (unpadded text, no pooled vector) and Flux 2 (patch 1, 128-channel latents): every mode follows
    its formulas at CFG."""
    from dit_helpers import LATENT_CHANNELS
    model, positive, negative = dit_kit(family)
    latent = torch.randn(1, LATENT_CHANNELS[family], 16, 16, generator=torch.Generator().manual_seed(2))
    inversion = QKVDDIMInversion.execute(model, {"samples": latent}, 2, "simple", positive).args[0]
    for mode in ("concat", "replace", "stratified"):
        control = Recording(inversion, "double:1, single:1", f"{mode}:0-1")
        dit_sample(add_control(model, control), positive, negative, family, steps=2, cfg=3.0)
        assert control.records
        for call, used, q, k, v, out in control.records:
            check_call(call, used, q, k, v, out, [call.tokens.n_text] * q.shape[0])
