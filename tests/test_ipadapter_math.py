"""The IP-Adapter family's attention modes against explicit reference formulas
(softmax written out per head), on SD1.5- and SDXL-shaped layers."""

from __future__ import annotations

import math

import pytest
import torch

from qkv_control.attention.cross_attention import (
    decoupled_attention,
    joint_attention,
    mask_guidance,
    share_kv,
    word_attention_map,
)
from qkv_control.attention.sdpa import bind_heads, plain_attention

# (heads, dim_head) of real layers: SD1.5 input 1 (8 x 40) and SDXL input 7 (20 x 64).
SHAPES = {"sd15": (8, 40), "sdxl": (20, 64)}
ATOL = 1e-5


def reference_attention(q, k, v, heads, bias=None):
    """softmax(q k^T / sqrt(d) + bias) v, written out per head."""
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.view(b, nq, heads, d).transpose(1, 2).double()
    kh = k.view(b, k.shape[1], heads, d).transpose(1, 2).double()
    vh = v.view(b, v.shape[1], heads, d).transpose(1, 2).double()
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias.double()
    out = scores.softmax(-1) @ vh
    return out.transpose(1, 2).reshape(b, nq, inner).float()


def tensors(family, batch=2, nq=64, nt=77, ni=4, seed=0):
    heads, d = SHAPES[family]
    g = torch.Generator().manual_seed(seed)
    inner = heads * d

    def r(*shape):
        return torch.randn(shape, generator=g)

    return heads, r(batch, nq, inner), r(batch, nt, inner), r(batch, nt, inner), r(batch, ni, inner), r(batch, ni, inner)


@pytest.mark.parametrize("family", SHAPES)
@pytest.mark.parametrize("weight", [0.0, 0.6, 1.0])
def test_decoupled_is_text_plus_weighted_image_attention(family, weight):
    heads, q, kt, vt, ki, vi = tensors(family)
    attend = bind_heads(plain_attention, heads)
    out = decoupled_attention(q, kt, vt, [(ki, vi, weight)], attend)
    expected = reference_attention(q, kt, vt, heads) + weight * reference_attention(q, ki, vi, heads)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", SHAPES)
def test_decoupled_weight_zero_is_unpatched(family):
    heads, q, kt, vt, ki, vi = tensors(family)
    attend = bind_heads(plain_attention, heads)
    assert torch.equal(decoupled_attention(q, kt, vt, [(ki, vi, 0.0)], attend), attend(q, kt, vt))


@pytest.mark.parametrize("family", SHAPES)
def test_joint_is_one_attention_over_the_concatenation(family):
    heads, q, kt, vt, ki, vi = tensors(family)
    attend = bind_heads(plain_attention, heads)
    out = joint_attention(q, kt, vt, [(ki, vi, 1.0)], attend)
    expected = reference_attention(q, torch.cat([kt, ki], 1), torch.cat([vt, vi], 1), heads)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", SHAPES)
def test_joint_weight_is_a_log_bias_and_zero_is_text_only(family):
    heads, q, kt, vt, ki, vi = tensors(family)
    attend = bind_heads(plain_attention, heads)
    w = 0.3
    out = joint_attention(q, kt, vt, [(ki, vi, w)], attend)
    bias = torch.cat([torch.zeros(kt.shape[1]), torch.full((ki.shape[1],), math.log(w))])
    expected = reference_attention(q, torch.cat([kt, ki], 1), torch.cat([vt, vi], 1), heads, bias)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    assert torch.equal(joint_attention(q, kt, vt, [(ki, vi, 0.0)], attend), attend(q, kt, vt))


@pytest.mark.parametrize("family", SHAPES)
def test_kv_share_replace_and_concat(family):
    heads, q, kt, vt, _, _ = tensors(family, batch=3)
    attend = bind_heads(plain_attention, heads)
    # rows: 0 = uncond, 1 = cond (user prompt), 2 = preset condition row
    k, v = share_kv(kt, vt, [1], 2, "replace")
    out = attend(q, k, v)
    torch.testing.assert_close(out[1], reference_attention(q[1:2], kt[2:3], vt[2:3], heads)[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(out[[0, 2]], reference_attention(q[[0, 2]], kt[[0, 2]], vt[[0, 2]], heads),
                               atol=ATOL, rtol=1e-4)
    k, v = share_kv(kt, vt, [1], 2, "concat")
    out = attend(q, k, v)
    expected = reference_attention(q[1:2], torch.cat([kt[2:3], kt[1:2]], 1), torch.cat([vt[2:3], vt[1:2]], 1), heads)
    torch.testing.assert_close(out[1:2], expected, atol=ATOL, rtol=1e-4)
    # the other rows see their own keys twice: unchanged attention
    torch.testing.assert_close(out[[0, 2]], reference_attention(q[[0, 2]], kt[[0, 2]], vt[[0, 2]], heads),
                               atol=ATOL, rtol=1e-4)
    with pytest.raises(ValueError, match="expected mode"):
        share_kv(kt, vt, [1], 2, "swap")


@pytest.mark.parametrize("family", SHAPES)
@pytest.mark.parametrize("mode", ["replace", "concat"])
@pytest.mark.parametrize("preset_tokens", [77, 154])
def test_kv_share_from_projected_preset_equals_preset_row(family, mode, preset_tokens):
    """The preset's K/V given directly equal a preset row batched with the others, its
    context and theirs repeated to a common token count as ComfyUI's cond_cat does."""
    heads, q, kt, vt, _, _ = tensors(family, batch=3)
    g = torch.Generator().manual_seed(3)
    k_pre = torch.randn(1, preset_tokens, kt.shape[-1], generator=g)
    v_pre = torch.randn(1, preset_tokens, kt.shape[-1], generator=g)
    attend = bind_heads(plain_attention, heads)
    # rows: 0 = uncond, 1 = cond (user prompt), 2 = the preset row of the row-based form
    tokens = math.lcm(kt.shape[1], preset_tokens)
    k_rows = torch.cat([kt[:2].repeat(1, tokens // kt.shape[1], 1), k_pre.repeat(1, tokens // preset_tokens, 1)])
    v_rows = torch.cat([vt[:2].repeat(1, tokens // vt.shape[1], 1), v_pre.repeat(1, tokens // preset_tokens, 1)])
    expected = attend(q, *share_kv(k_rows, v_rows, [1], 2, mode))[:2]
    out = attend(q[:2], *share_kv(kt[:2], vt[:2], [1], (k_pre, v_pre), mode))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)


def reference_mask_guidance(q, k, v, heads, tokens, threshold, strength):
    """Z_q = sum_k A_qk v_k (1 + strength * M_q [k in S]) with M the thresholded,
    max-normalised, head- and word-averaged map, written out explicitly."""
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.view(b, nq, heads, d).transpose(1, 2).double()
    kh = k.view(b, -1, heads, d).transpose(1, 2).double()
    vh = v.view(b, -1, heads, d).transpose(1, 2).double()
    a = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(-1)             # [B, H, Nq, Nk]
    m = a[..., tokens].mean(dim=(1, 3))                                     # [B, Nq]
    m = m / m.max(dim=1, keepdim=True).values
    gate = (m >= threshold).double()
    in_s = torch.zeros(k.shape[1], dtype=torch.float64)
    in_s[tokens] = 1
    scale = 1 + strength * gate[:, None, :, None] * in_s[None, None, None, :]   # [B, 1, Nq, Nk]
    out = torch.einsum("bhqk,bhqk,bhkd->bhqd", a, scale.expand_as(a), vh)
    return out.transpose(1, 2).reshape(b, nq, inner).float()


@pytest.mark.parametrize("family", SHAPES)
def test_mask_guidance_matches_its_formula(family):
    heads, q, kt, vt, _, _ = tensors(family)
    attend = bind_heads(plain_attention, heads)
    tokens = [5, 6, 9]
    out = mask_guidance(q, kt, vt, heads, tokens, 0.4, 0.7, attend)
    torch.testing.assert_close(out, reference_mask_guidance(q, kt, vt, heads, tokens, 0.4, 0.7), atol=1e-4, rtol=1e-4)
    # only the guided rows change
    out_row = mask_guidance(q, kt, vt, heads, tokens, 0.4, 0.7, attend, guide_rows=[1])
    torch.testing.assert_close(out_row[0], attend(q, kt, vt)[0])
    torch.testing.assert_close(out_row[1], out[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(mask_guidance(q, kt, vt, heads, tokens, 0.4, 0.0, attend), attend(q, kt, vt))


def test_word_attention_map_is_the_mean_of_the_chosen_columns():
    heads, q, kt, _, _, _ = tensors("sd15")
    tokens = [3, 4]
    d = q.shape[-1] // heads
    qh = q.view(2, -1, heads, d).transpose(1, 2)
    kh = kt.view(2, -1, heads, d).transpose(1, 2)
    a = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    torch.testing.assert_close(word_attention_map(q, kt, heads, tokens), a[..., tokens].mean(dim=(1, 3)),
                               atol=1e-6, rtol=1e-5)
