"""InDetail-IP math without a model: attention modes against their formulas, the fusion
schedule, the inverted chain lookup, AdaIN (eq. 2) and the guidance policy values."""

import math

import pytest
import torch

from qkv_control.attention.fusion_schedule import DEFAULT_SPEC, parse_fusion_schedule
from qkv_control.attention.kv_modes import kv_concat, kv_replace, reference_tokens, stratified_attention
from qkv_control.attention.sdpa import bind_heads, plain_attention
from qkv_control.inversion.chain import InvertedChain
from qkv_control.inversion.ddim import adain, ddim_step, inversion_input_scale
from qkv_control.patching.image_prompt_policy import ImagePromptPolicy, get_policy
from qkv_control.patching import keys

HEADS, DIM = 2, 8
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 SDPA against an explicit float64 softmax


def softmax_attention(q, k, v, heads=HEADS):
    """softmax(Q·Kᵀ/√d)·V per head with explicit scores, float64: the formula itself."""
    b, n, inner = q.shape
    d = inner // heads
    split = lambda x: x.double().view(x.shape[0], x.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
    out = scores.softmax(-1) @ split(v)
    return out.transpose(1, 2).reshape(b, n, inner).float()


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (rand(3, 10, HEADS * DIM), rand(3, 10, HEADS * DIM), rand(3, 10, HEADS * DIM),
            rand(1, 7, HEADS * DIM), rand(1, 7, HEADS * DIM))


attend = bind_heads(plain_attention, HEADS)


def test_kv_replace_is_attention_to_reference_only(qkv):
    q, _, _, k_ref, v_ref = qkv
    kp, vp = reference_tokens(k_ref, 3), reference_tokens(v_ref, 3)
    torch.testing.assert_close(kv_replace(q, kp, vp, attend), softmax_attention(q, kp, vp), **TOL)


def test_kv_concat_is_one_softmax_over_both(qkv):
    q, k, v, k_ref, v_ref = qkv
    kp, vp = reference_tokens(k_ref, 3), reference_tokens(v_ref, 3)
    expected = softmax_attention(q, torch.cat([kp, k], 1), torch.cat([vp, v], 1))
    torch.testing.assert_close(kv_concat(q, k, v, kp, vp, attend), expected, **TOL)


@pytest.mark.parametrize("weight_self,weight_ref", [(0.5, 0.5), (0.33, 0.67), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_stratified_attention_is_equation_3(qkv, weight_self, weight_ref):
    """eq. 3: λG·M_G·V_G + λP·M_P·V_P, normalised by λG + λP (the official code; = eq. 3 when they sum to 1)."""
    q, k, v, k_ref, v_ref = qkv
    kp, vp = reference_tokens(k_ref, 3), reference_tokens(v_ref, 3)
    total = weight_self + weight_ref
    expected = (weight_self * softmax_attention(q, k, v) + weight_ref * softmax_attention(q, kp, vp)) / total
    got = stratified_attention(q, k, v, kp, vp, weight_self, weight_ref, attend)
    torch.testing.assert_close(got, expected, **TOL)


def test_lambda_reference_zero_is_unpatched_exactly(qkv):
    q, k, v, k_ref, v_ref = qkv
    got = stratified_attention(q, k, v, reference_tokens(k_ref, 3), reference_tokens(v_ref, 3), 0.5, 0.0, attend)
    assert torch.equal(got, attend(q, k, v))


def test_modes_with_own_keys_values_are_unpatched(qkv):
    """Replacement by the row's own K/V is plain self-attention (the formula, float64);
    concatenating the own K/V with themselves (the official negative branch under ``sain:
    cond``) and stratifying with them change nothing either."""
    q, k, v, _, _ = qkv
    own = softmax_attention(q, k, v)
    torch.testing.assert_close(kv_replace(q, k, v, attend), own, **TOL)
    torch.testing.assert_close(kv_concat(q, k, v, k, v, attend), own, **TOL)
    torch.testing.assert_close(stratified_attention(q, k, v, k, v, 0.5, 0.5, attend), own, **TOL)


def test_reference_tokens_concatenate_several_references():
    k_ref = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    tokens = reference_tokens(k_ref, 5)
    assert tokens.shape == (5, 6, 4)
    assert torch.equal(tokens[4], torch.cat([k_ref[0], k_ref[1]]))


def test_stratified_rejects_zero_weights(qkv):
    q, k, v, k_ref, v_ref = qkv
    with pytest.raises(ValueError, match="λG \\+ λP > 0"):
        stratified_attention(q, k, v, k_ref.expand(3, -1, -1), v_ref.expand(3, -1, -1), 0.0, 0.0, attend)


# ------------------------------------------------------------------ schedule

def test_default_schedule_is_first_10_of_50_steps():
    schedule = parse_fusion_schedule(DEFAULT_SPEC)
    modes = [schedule.mode_at(i, 50) for i in range(50)]
    assert modes == ["stratified"] * 10 + ["concat"] * 40


@pytest.mark.parametrize("steps,stratified", [(20, 4), (10, 2), (30, 6), (4, 1), (100, 20)])
def test_schedule_survives_other_step_counts(steps, stratified):
    schedule = parse_fusion_schedule(DEFAULT_SPEC)
    modes = [schedule.mode_at(i, steps) for i in range(steps)]
    assert modes.count("stratified") == stratified and modes.count("concat") == steps - stratified


def test_schedule_later_items_win_and_gaps_are_unpatched():
    schedule = parse_fusion_schedule("concat:0-1, replace:0.5-0.75")
    assert [schedule.mode_at(i, 8) for i in range(8)] == ["concat"] * 4 + ["replace"] * 2 + ["concat"] * 2
    assert parse_fusion_schedule("stratified:0.5-1").mode_at(0, 10) == "none"


@pytest.mark.parametrize("spec,message", [
    ("", "got an empty schedule"),
    ("stratified", "expected 'mode:start-end'"),
    ("blend:0-1", "expected a mode in stratified, concat, replace, none, got 'blend'"),
    ("concat:0.5-0.2", "expected 0 <= start < end <= 1"),
])
def test_schedule_errors_name_expected_and_got(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_fusion_schedule(spec)


# --------------------------------------------------------------------- chain

def make_chain():
    sigmas = torch.tensor([0.0, 0.5, 1.5, 3.0])
    latents = torch.randn(4, 2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    return InvertedChain(sigmas, latents), sigmas, latents


def test_chain_is_exact_on_its_schedule():
    chain, sigmas, latents = make_chain()
    for i, s in enumerate(sigmas.tolist()):
        assert torch.equal(chain.latent_at(s), latents[i])
        assert torch.equal(chain.latent_at(s * (1 + 1e-6)), latents[i])


def test_chain_between_sigmas_is_the_ddim_step_of_the_segment():
    chain, sigmas, latents = make_chain()
    eps = (latents[2] - latents[1]) / (1.5 - 0.5)
    torch.testing.assert_close(chain.latent_at(1.1), ddim_step(latents[1], eps, 0.5, 1.1), atol=1e-6, rtol=0)
    eps_top = (latents[3] - latents[2]) / 1.5
    torch.testing.assert_close(chain.latent_at(4.0), ddim_step(latents[3], eps_top, 3.0, 4.0), atol=1e-6, rtol=0)


def test_chain_below_its_clean_level_is_the_ddim_step_towards_zero():
    """A chain from the clean level sigma_min (the official convention): a sigma between 0 and
    it gets the first segment's epsilon extrapolated downwards, DDIM towards sigma 0."""
    sigmas = torch.tensor([0.0292, 0.5, 1.5])
    latents = torch.randn(3, 1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    chain = InvertedChain(sigmas, latents)
    eps = (latents[1] - latents[0]) / (0.5 - 0.0292)
    for sigma in (0.01, 0.0):
        torch.testing.assert_close(chain.latent_at(sigma), ddim_step(latents[0], eps, 0.0292, sigma),
                                   atol=1e-6, rtol=0)
    assert torch.equal(chain.latent_at(0.0292), latents[0])


def test_chain_resize_policy_keeps_values_and_covers_the_target():
    chain, _, latents = make_chain()
    small = chain.resized(3, 3)
    assert small.latent_shape == (4, 3, 3)
    wide = chain.resized(6, 12)
    assert wide.latent_shape == (4, 6, 12)
    values = set(latents[1, 0, 0].flatten().tolist())
    assert set(wide.latents[1, 0, 0].flatten().tolist()) <= values


def test_chain_validation():
    with pytest.raises(ValueError, match="strictly ascending"):
        InvertedChain(torch.tensor([0.0, 2.0, 1.0]), torch.zeros(3, 1, 4, 2, 2))
    with pytest.raises(ValueError, match="one latent per sigma"):
        InvertedChain(torch.tensor([0.0, 1.0]), torch.zeros(3, 1, 4, 2, 2))
    with pytest.raises(ValueError, match="sigmas >= 0"):
        InvertedChain(torch.tensor([-0.1, 1.0]), torch.zeros(2, 1, 4, 2, 2))


# ------------------------------------------------------------- end of a run

@pytest.mark.parametrize("sigmas,expected", [
    ([8.39, 3.35, 0.0413, 0.0], [8.39, 3.35, 0.0413, 0.0292]),  # ddim_uniform: the last step goes to ᾱ₀
    ([14.6, 1.2, 0.0292, 0.0], [14.6, 1.2, 0.0292, 0.0]),       # 'normal' / 'karras': already leaves from it
    ([14.6, 0.01, 0.0], [14.6, 0.01, 0.0]),                      # below the level: ComfyUI's own end
])
def test_schedule_ending_at_the_clean_level(sigmas, expected):
    from qkv_control.patching.sampler_start import schedule_ending_at
    got = schedule_ending_at(torch.tensor(sigmas), 0.0292)
    torch.testing.assert_close(got, torch.tensor(expected))


def test_inversion_input_scale_gives_the_lower_vp_latent():
    x_lo, s_lo, s_hi = torch.randn(4), 0.7, 2.3
    model_input = x_lo * inversion_input_scale(s_lo, s_hi) / math.sqrt(s_hi ** 2 + 1)
    torch.testing.assert_close(model_input, x_lo / math.sqrt(s_lo ** 2 + 1))


# --------------------------------------------------------------------- AdaIN

def test_adain_is_equation_2():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 4, 8, 8, generator=g), torch.randn(1, 4, 5, 5, generator=g) * 3 + 1
    eps = 1e-5
    mu = lambda t: t.mean((2, 3), keepdim=True)  # noqa: E731
    sd = lambda t: (t.var((2, 3), keepdim=True, unbiased=True) + eps).sqrt()  # noqa: E731
    expected = sd(y) * (x - mu(x)) / sd(x) + mu(y)
    got = adain(x, y)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(mu(got), mu(y).expand(3, -1, -1, -1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected 1 or 3 reference samples, got 2"):
        adain(x, torch.randn(2, 4, 5, 5))


# -------------------------------------------------------------------- policy

def test_policy_values():
    assert get_policy({}).positive_only
    assert get_policy({keys.IMAGE_PROMPT_POLICY: "both"}).include_negative
    assert ImagePromptPolicy("conflicting").mode == "both" and ImagePromptPolicy("cond").mode == "positive_only"
    assert ImagePromptPolicy("Negative image").mode == "negative_image"
    with pytest.raises(ValueError, match="expected one of positive_only, both, negative_image, got 'sometimes'"):
        ImagePromptPolicy("sometimes")
