"""MCA-Ctrl math (attention/mca_ctrl.py) against plain SDPA references and the paper's formulas."""

from __future__ import annotations

import pytest
import torch

from qkv_control.attention import mca_ctrl as mca
from qkv_control.attention.token_grid import token_grid
from qkv_control.attention.sdpa import bind_heads, plain_attention

HEADS = 2
ATOL = 1e-5


def _qkv(rows, n, c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, n, c, generator=g) for _ in range(3)]


def _reference_salq(q, k_s, v_s, k_c, v_c, subject_keys, region):
    """The paper's SALQ with full key sets and 0/-inf masks on plain SDPA."""
    rows = q.shape[0]
    neg = float("-inf")
    m_s = torch.zeros(subject_keys.shape).masked_fill(~subject_keys, neg).expand(rows, -1).unsqueeze(1)
    background = region < mca.KEY_THRESHOLD
    m_c = torch.zeros(background.shape).masked_fill(~background, neg).expand(rows, -1).unsqueeze(1)
    f_s = plain_attention(q, k_s.expand(rows, -1, -1), v_s.expand(rows, -1, -1), HEADS, mask=m_s)
    f_c = plain_attention(q, k_c.expand(rows, -1, -1), v_c.expand(rows, -1, -1), HEADS, mask=m_c)
    r = region.unsqueeze(-1)
    return (1 - r) * f_c + r * f_s


@pytest.fixture
def attend():
    return bind_heads(plain_attention, HEADS)


def test_salq_matches_masked_reference_shared_masks(attend):
    n = 16
    q, _, _ = _qkv(3, n, seed=1)
    k_s, v_s, _ = _qkv(1, n, seed=2)
    k_c, v_c, _ = _qkv(1, n, seed=3)
    subject_keys = torch.zeros(1, n, dtype=torch.bool)
    subject_keys[0, 3:9] = True
    region = torch.zeros(1, n)
    region[0, 5:12] = 1.0
    region[0, 12] = 0.3  # soft border: fused, and counted as background key
    out = mca.salq(q, k_s, v_s, k_c, v_c, subject_keys, region, attend)
    ref = _reference_salq(q, k_s, v_s, k_c, v_c, subject_keys, region)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


def test_salq_per_row_region_uses_float_masks(attend):
    n = 16
    q, _, _ = _qkv(2, n, seed=4)
    k_s, v_s, _ = _qkv(1, n, seed=5)
    k_c, v_c, _ = _qkv(2, n, seed=6)  # one condition row per target row
    subject_keys = torch.ones(1, n, dtype=torch.bool)
    region = torch.zeros(2, n)
    region[0, :4] = 1
    region[1, 8:] = 1
    calls = []

    def spy(q_, k_, v_, mask=None):
        calls.append(mask)
        return attend(q_, k_, v_, mask=mask)

    out = mca.salq(q, k_s, v_s, k_c, v_c, subject_keys, region, spy)
    for row in range(2):
        ref = _reference_salq(q[row:row + 1], k_s, v_s, k_c[row:row + 1], v_c[row:row + 1],
                              subject_keys, region[row:row + 1])
        torch.testing.assert_close(out[row:row + 1], ref, atol=ATOL, rtol=1e-5)
    masks = [m for m in calls if m is not None]
    assert masks and all(m.dtype == q.dtype and set(m.unique().tolist()) <= {0.0, float("-inf")} for m in masks)


def test_salq_row_with_region_everywhere_stays_finite(attend):
    """Per-row regions where one row is all region: its background branch has no key and a
    zero weight, and must not turn the row into NaN."""
    n = 8
    q, _, _ = _qkv(2, n, seed=13)
    k_s, v_s, _ = _qkv(1, n, seed=14)
    k_c, v_c, _ = _qkv(2, n, seed=15)
    region = torch.zeros(2, n)
    region[0] = 1.0
    region[1, :3] = 1.0
    out = mca.salq(q, k_s, v_s, k_c, v_c, torch.ones(1, n, dtype=torch.bool), region, attend)
    assert torch.isfinite(out).all()
    ref0 = plain_attention(q[:1], k_s, v_s, HEADS)
    torch.testing.assert_close(out[:1], ref0, atol=ATOL, rtol=1e-5)


def test_salq_all_ones_is_subject_kv_replacement(attend):
    n = 12
    q, _, _ = _qkv(2, n, seed=7)
    k_s, v_s, _ = _qkv(1, n, seed=8)
    k_c, v_c, _ = _qkv(1, n, seed=9)
    out = mca.salq(q, k_s, v_s, k_c, v_c, torch.ones(1, n, dtype=torch.bool), torch.ones(1, n), attend)
    ref = plain_attention(q, k_s.expand(2, -1, -1), v_s.expand(2, -1, -1), HEADS)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


def test_salq_all_zeros_region_is_condition_kv_replacement(attend):
    n = 12
    q, _, _ = _qkv(2, n, seed=10)
    k_s, v_s, _ = _qkv(1, n, seed=11)
    k_c, v_c, _ = _qkv(1, n, seed=12)
    # An empty subject mask is fine where nothing queries the subject.
    out = mca.salq(q, k_s, v_s, k_c, v_c, torch.zeros(1, n, dtype=torch.bool), torch.zeros(1, n), attend)
    ref = plain_attention(q, k_c.expand(2, -1, -1), v_c.expand(2, -1, -1), HEADS)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


def test_salq_empty_subject_mask_in_region_is_a_clear_error(attend):
    n = 12
    q, k, v = _qkv(1, n)
    with pytest.raises(ValueError, match="non-empty subject mask"):
        mca.salq(q, k, v, k, v, torch.zeros(1, n, dtype=torch.bool), torch.full((1, n), 0.5), attend)
    with pytest.raises(ValueError, match="scene background"):
        # region 0.9 everywhere: everything is region, no background key, yet 10% weight on it
        mca.salq(q, k, v, k, v, torch.ones(1, n, dtype=torch.bool), torch.full((1, n), 0.9), attend)


def test_sagi_formula():
    n, c = 10, 8
    g = torch.Generator().manual_seed(3)
    f_s, f_c = torch.randn(1, n, c, generator=g), torch.randn(1, n, c, generator=g)
    m_s = (torch.rand(1, n, generator=g) > 0.4).float()
    region = (torch.rand(2, n, generator=g) > 0.5).float()
    out = mca.sagi(f_s, f_c, m_s, region)
    m_c = 1 - region
    expected = m_c[..., None] * (m_c[..., None] * f_c) + (1 - m_c[..., None]) * (m_s[..., None] * f_s)
    torch.testing.assert_close(out, expected)
    assert out.shape == (2, n, c)


def test_token_grid_and_masks():
    assert token_grid((8, 8), 64) == (8, 8)
    assert token_grid((8, 8), 16) == (4, 4)
    assert token_grid((9, 7), 20) == (5, 4)
    assert token_grid((8, 12), 6) == (2, 3)
    with pytest.raises(ValueError, match="token count"):
        token_grid((8, 8), 15)
    mask = torch.zeros(64, 64)
    mask[16:32, 16:32] = 1  # latent 8x8 -> tokens (2..3, 2..3)
    masks = mca.layer_masks(mask, torch.zeros(1, 64, 64), (8, 8), 64, dilation=3)
    grid = masks.subject_fg.view(8, 8)
    assert grid[1:5, 1:5].eq(1).all() and grid.sum() == 16  # 2x2 dilated by 3x3 -> 4x4
    assert masks.background_keys.all()
    no_dilation = mca.layer_masks(mask, mask, (8, 8), 16, dilation=1)
    assert no_dilation.subject_keys.view(4, 4)[1, 1] and no_dilation.subject_keys.sum() == 1
    assert no_dilation.region.view(4, 4)[1, 1] == 1


def test_schedule_windows_do_not_overlap_and_reverse():
    s = mca.PhaseSchedule(0.1, 1.0)
    phases = [s.phase(i, 50) for i in range(50)]
    assert phases[:5] == ["sagi"] * 5 and phases[5:] == ["salq"] * 45
    # Step i of N is in a-b when a <= i/N < b: at 25 steps, 10% is steps 0-2 (0.08 < 0.1).
    assert [s.phase(i, 25) for i in range(4)] == ["sagi"] * 3 + ["salq"]
    r = mca.PhaseSchedule(0.1, 0.8, order="salq_first")
    assert [r.phase(i, 10) for i in range(10)] == ["salq"] * 7 + ["sagi"] + ["none"] * 2
    with pytest.raises(ValueError, match="sagi_fraction <= salq_end"):
        mca.PhaseSchedule(0.5, 0.2)


def test_top_fraction_mask():
    m = torch.arange(10.0).unsqueeze(0)
    top = mca.top_fraction_mask(m, 0.3)
    assert top.tolist() == [[0] * 7 + [1] * 3]

