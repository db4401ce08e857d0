"""MCA-Ctrl math (attention/mca_ctrl.py) against references written from the official code's
conventions: full score matrices with additive ``finfo.min`` masks (the official form), masks
resized by nearest sampling, the soft automatic mask. fp32 throughout; tolerance 1e-5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qkv_control.attention import mca_ctrl as mca
from qkv_control.attention.sdpa import bind_heads, plain_attention
from qkv_control.attention.token_grid import token_grid

HEADS = 2
ATOL = 1e-5


def _qkv(rows, n, c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, n, c, generator=g) for _ in range(3)]


def official_masked_attention(q, k, v, bias):
    """The official ``attn_batch`` branch: ``softmax(q k^T * scale + bias) v`` per head, with
    ``bias`` [Nk] the official additive mask (the mask value on kept keys, finfo.min on the
    others). A full [Nq, Nk] score matrix: a reference, never what the pack runs."""
    b, n, c = q.shape
    d = c // HEADS
    qh, kh, vh = (t.view(t.shape[0], -1, HEADS, d).transpose(1, 2) for t in (q, k, v))
    sim = qh @ kh.transpose(-1, -2) * d ** -0.5 + bias.view(1, 1, 1, -1)
    return (sim.softmax(-1) @ vh).transpose(1, 2).reshape(b, n, c)


def subject_bias(m_s):
    return m_s.masked_fill(m_s == 0, torch.finfo(torch.float32).min)


def background_bias(m_t):
    return m_t.masked_fill(m_t == 1, torch.finfo(torch.float32).min)


@pytest.fixture
def attend():
    return bind_heads(plain_attention, HEADS)


@pytest.mark.parametrize("soft", [False, True], ids=["binary region", "soft region"])
def test_salq_is_the_official_masked_key_fusion(attend, soft):
    """SALQ: target queries over the subject's foreground keys and the condition's background
    keys (region < 1, logits raised by the region value), fused by the region."""
    n = 16
    q, _, _ = _qkv(1, n, seed=1)
    k_s, v_s, _ = _qkv(1, n, seed=2)
    k_c, v_c, _ = _qkv(1, n, seed=3)
    m_s = torch.zeros(n)
    m_s[3:9] = 1
    m_t = torch.zeros(n)
    m_t[5:12] = 1
    if soft:
        m_t[12:] = torch.tensor([0.2, 0.5, 0.7, 0.9])
    calls = []

    def spy(q_, k_, v_, mask=None):
        calls.append((q_.shape[1], k_.shape[1], mask))
        return attend(q_, k_, v_, mask=mask)

    out = mca.salq(q, k_s, v_s, k_c, v_c, (m_s > 0).unsqueeze(0), m_t.unsqueeze(0), spy)
    fg = official_masked_attention(q, k_s, v_s, subject_bias(m_s))
    bg = official_masked_attention(q, k_c, v_c, background_bias(m_t))
    r = m_t.view(1, n, 1)
    torch.testing.assert_close(out, r * fg + (1 - r) * bg, atol=ATOL, rtol=1e-5)
    # Shared key sets are gathered: 6 subject keys, 9 background keys; a mask only for the soft bias.
    assert [c[1] for c in calls] == [6, 9]
    assert calls[0][2] is None and (calls[1][2] is not None) == soft
    # Each query computes only the branches it has weight in: the region's 7 tokens (+ the 4 soft
    # ones) the subject branch, the 9 tokens outside it (the soft ones included) the background.
    assert [c[0] for c in calls] == ([11, 9] if soft else [7, 9])


def test_salq_per_row_regions_use_float_masks(attend):
    n = 16
    q, _, _ = _qkv(2, n, seed=4)
    k_s, v_s, _ = _qkv(2, n, seed=5)
    k_c, v_c, _ = _qkv(2, n, seed=6)
    m_s = torch.ones(n)
    region = torch.zeros(2, n)
    region[0, :4] = 1
    region[1, 8:] = 1
    masks = []

    def spy(q_, k_, v_, mask=None):
        masks.append(mask)
        return attend(q_, k_, v_, mask=mask)

    out = mca.salq(q, k_s, v_s, k_c, v_c, (m_s > 0).unsqueeze(0), region, spy)
    for row in range(2):
        fg = official_masked_attention(q[row:row + 1], k_s[row:row + 1], v_s[row:row + 1], subject_bias(m_s))
        bg = official_masked_attention(q[row:row + 1], k_c[row:row + 1], v_c[row:row + 1],
                                       background_bias(region[row]))
        r = region[row].view(1, n, 1)
        torch.testing.assert_close(out[row:row + 1], r * fg + (1 - r) * bg, atol=ATOL, rtol=1e-5)
    float_masks = [m for m in masks if m is not None]
    assert float_masks and all(m.shape == (2, 1, n) and set(m.unique().tolist()) <= {0.0, float("-inf")}
                               for m in float_masks)


def test_full_and_empty_regions_need_one_branch_only(attend):
    """A full region is pure subject attention (no background key, none needed), an empty one pure
    background attention; a row with a full region among others stays finite (its background
    branch has no key and weight 0)."""
    n = 12
    q, _, _ = _qkv(2, n, seed=7)
    k_s, v_s, _ = _qkv(1, n, seed=8)
    k_c, v_c, _ = _qkv(1, n, seed=9)
    keys = torch.ones(1, n, dtype=torch.bool)
    full = mca.salq(q, k_s, v_s, k_c, v_c, keys, torch.ones(1, n), attend)
    torch.testing.assert_close(full, plain_attention(q, k_s.expand(2, -1, -1), v_s.expand(2, -1, -1), HEADS),
                               atol=ATOL, rtol=1e-5)
    empty = mca.salq(q, k_s, v_s, k_c, v_c, torch.zeros(1, n, dtype=torch.bool), torch.zeros(1, n), attend)
    torch.testing.assert_close(empty, plain_attention(q, k_c.expand(2, -1, -1), v_c.expand(2, -1, -1), HEADS),
                               atol=ATOL, rtol=1e-5)
    mixed = torch.zeros(2, n)
    mixed[0] = 1
    mixed[1, :3] = 1
    out = mca.salq(q, k_s, v_s, k_c, v_c, keys, mixed, attend)
    torch.testing.assert_close(out[:1], full[:1], atol=ATOL, rtol=1e-5)


def test_empty_subject_keys_where_the_subject_is_needed_is_a_clear_error(attend):
    n = 12
    q, k, v = _qkv(1, n)
    with pytest.raises(ValueError, match="non-empty subject mask"):
        mca.salq(q, k, v, k, v, torch.zeros(1, n, dtype=torch.bool), torch.full((1, n), 0.5), attend)


def test_sagi_is_the_streams_own_masked_attention(attend):
    """Official SAGI (``attn_batch2``): inside the region the subject's own queries over its
    foreground keys, outside the condition's own queries over its background keys; the target's
    q/k/v are not inputs at all."""
    n = 16
    q_s, k_s, v_s = _qkv(1, n, seed=10)
    q_c, k_c, v_c = _qkv(1, n, seed=11)
    m_s = (torch.arange(n) % 3 == 0).float()
    m_t = torch.zeros(n)
    m_t[2:9] = 1
    out = mca.sagi(q_s, k_s, v_s, q_c, k_c, v_c, (m_s > 0).unsqueeze(0), m_t.unsqueeze(0), attend)
    fg = official_masked_attention(q_s, k_s, v_s, subject_bias(m_s))
    bg = official_masked_attention(q_c, k_c, v_c, background_bias(m_t))
    r = m_t.view(1, n, 1)
    torch.testing.assert_close(out, r * fg + (1 - r) * bg, atol=ATOL, rtol=1e-5)
    # Not the paper's literal reading (all-key outputs multiplied by the masks).
    literal = (1 - r) * plain_attention(q_c, k_c, v_c, HEADS) + r * m_s.view(1, n, 1) * plain_attention(
        q_s, k_s, v_s, HEADS)
    assert (out - literal).abs().max() > 1e-2


def test_one_threshold_binarises_drawn_masks():
    """0.5 and above is in, below is out: a white PNG at 0.99611 is full, 127/255 is out, 128/255 in."""
    mask = torch.tensor([[[0.99611, 0.5000076, 0.4961, 0.0]]])
    assert mca.binarize(mask).flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    assert mca.coverage(torch.full((1, 8, 8), 0.99611)) == "full"
    assert mca.coverage(torch.full((1, 8, 8), 0.49)) == "empty"
    assert mca.coverage(mask) == "partial"


def test_layer_masks_are_nearest_samples_of_the_drawn_mask():
    """Per layer, the masks are the drawn pixels sampled by nearest interpolation (official
    ``F.interpolate(mask, (H, W))``), through the latent: the same pixels either way."""
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(1, 128, 128, generator=g) > 0.6).float()
    latent = mca.fit_mask(pixels, (16, 16), (16, 16))
    for n_tokens in (256, 64, 16, 4):
        grid = token_grid((16, 16), n_tokens)
        masks = mca.layer_masks(latent, latent, (16, 16), n_tokens)
        direct = F.interpolate(pixels[None], size=grid).flatten()
        assert masks.subject_keys.flatten().tolist() == (direct > 0).tolist()
        assert masks.region.flatten().tolist() == direct.tolist()
        assert masks.background_keys.flatten().tolist() == (direct < 1).tolist()


def test_a_subject_missed_by_nearest_sampling_keeps_the_tokens_it_touches():
    latent = torch.zeros(1, 1, 16, 16)
    latent[..., 5, 5] = 1  # nearest to 4x4 samples rows/cols 0, 4, 8, 12: misses (5, 5)
    masks = mca.layer_masks(latent, torch.zeros_like(latent), (16, 16), 16)
    assert masks.subject_keys.view(4, 4).nonzero().tolist() == [[1, 1]]


def test_dilation_is_a_max_filter_on_the_token_grid():
    latent = torch.zeros(1, 1, 8, 8)
    latent[..., 2:4, 2:4] = 1
    masks = mca.layer_masks(latent, torch.zeros_like(latent), (8, 8), 64, dilation=3)
    grid = masks.subject_keys.view(8, 8)
    assert grid[1:5, 1:5].all() and grid.sum() == 16  # 2x2 dilated by 3x3 -> 4x4


def test_fit_mask_crops_like_the_stream():
    """A mask on a 24x16 latent image fitted to 16x16: binarised, then the centre crop the
    stream's latents get (cover_crop), so mask and latent stay aligned."""
    from qkv_control.attention.cover_crop import cover_crop

    pixels = torch.zeros(1, 192, 128)
    pixels[:, 80:112, 48:80] = 0.7
    fitted = mca.fit_mask(pixels, (24, 16), (16, 16))
    expected = cover_crop((F.interpolate(pixels[None], size=(24, 16)) >= 0.5).float(), (16, 16))
    assert fitted.shape == (1, 1, 16, 16) and torch.equal(fitted, expected)


def test_automatic_region_is_the_official_soft_top_share():
    """Official ``McaControlGeneration``: min-max normalised map, nearest-resized to the layer,
    its int(N * 0.3) highest tokens set to 1, the rest keeping their normalised value."""
    g = torch.Generator().manual_seed(1)
    word_map = torch.rand(2, 16, generator=g) * 5 + 1   # [items, 4x4]
    for grid in ((4, 4), (8, 8), (2, 2)):
        out = mca.automatic_region(word_map, (4, 4), grid, 0.3)
        n = grid[0] * grid[1]
        for item in range(2):
            m = word_map[item]
            norm = (m - m.min()) / (m.max() - m.min())
            resized = F.interpolate(norm.view(1, 1, 4, 4), size=grid).flatten()
            expected = resized.clone()
            expected[torch.topk(resized, int(n * 0.3), sorted=False).indices] = 1
            torch.testing.assert_close(out[item], expected)
            assert int((out[item] == 1).sum()) >= int(n * 0.3)
            assert ((out[item] > 0) & (out[item] < 1)).any()  # soft, not binary


def test_schedule_windows_do_not_overlap_and_reverse():
    s = mca.PhaseSchedule(0.1, 1.0)
    phases = [s.phase(i, 50) for i in range(50)]
    assert phases[:5] == ["sagi"] * 5 and phases[5:] == ["salq"] * 45  # official: steps 0-4 of 50
    assert [s.phase(i, 10) for i in range(2)] == ["sagi", "salq"]
    r = mca.PhaseSchedule(0.1, 0.8, order="salq_first")
    assert [r.phase(i, 10) for i in range(10)] == ["salq"] * 7 + ["sagi"] + ["none"] * 2
    with pytest.raises(ValueError, match="sagi_fraction <= salq_end"):
        mca.PhaseSchedule(0.5, 0.2)
