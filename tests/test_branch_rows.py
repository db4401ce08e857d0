"""Appending extra rows: every batched model input stays consistent."""

import torch

from qkv_control.attention.rows import ROLE_COND, ROLE_REFERENCE, ROLE_UNCOND, RowLayout
from qkv_control.patching.branch_rows import append_rows, cat_contexts
from qkv_control.patching.control import ExtraRow
from qkv_control.attention.sdpa import plain_attention


def test_contexts_of_other_lengths_are_repeated_without_changing_attention():
    a, b = torch.randn(2, 77, 8), torch.randn(1, 154, 8)
    cat = cat_contexts([a, b])
    assert cat.shape == (3, 154, 8)
    q = torch.randn(2, 5, 8)
    assert torch.allclose(plain_attention(q, a, a, 2), plain_attention(q, cat[:2], cat[:2], 2), atol=1e-6)


def test_append_rows_extends_every_batched_input():
    layout = RowLayout.from_cond_or_uncond([1, 0], 4)  # uncond x2 then cond x2
    x, sigma = torch.randn(4, 4, 8, 8), torch.full((4,), 3.0)
    context = torch.randn(4, 77, 8)
    y = torch.arange(4.0).reshape(4, 1).repeat(1, 6)
    control = {"input": [torch.ones(4, 2, 8, 8), None], "middle": [torch.ones(4, 3, 2, 2)], "output": []}
    row_x = torch.randn(1, 4, 8, 8)
    extras = [("ref#1", ExtraRow(ROLE_REFERENCE, x=row_x, context=torch.randn(1, 77, 8), sigma=torch.tensor([2.0]))),
              ("ref#1", ExtraRow(ROLE_REFERENCE, x=row_x, context=torch.randn(1, 77, 8), conds={"y": torch.full((1, 6), 9.0)}, item=1))]
    x2, s2, cc2, ctx2, ctrl2, conds2, layout2 = append_rows(x, sigma, None, context, control, {"y": y, "other": "kept"}, layout, extras)
    assert x2.shape[0] == ctx2.shape[0] == s2.shape[0] == 6 and torch.equal(x2[4], row_x[0])
    assert s2.tolist() == [3.0] * 4 + [2.0, 3.0]
    # a row without its own y copies a positive (cond) row's, not row 0 (uncond)
    assert conds2["y"][4].tolist() == [2.0] * 6 and conds2["y"][5].tolist() == [9.0] * 6
    assert conds2["other"] == "kept" and cc2 is None
    # ControlNet residuals: zeros for extra rows, the caller's lists untouched
    assert ctrl2["input"][0].shape[0] == 6 and ctrl2["input"][0][4:].abs().sum() == 0 and ctrl2["input"][1] is None
    assert control["input"][0].shape[0] == 4 and len(control["input"]) == 2
    assert [r.role for r in layout2.rows] == [ROLE_UNCOND] * 2 + [ROLE_COND] * 2 + [ROLE_REFERENCE] * 2
    assert layout2.indices(ROLE_REFERENCE, "ref#1") == [4, 5] and layout2.n_sampler_rows == 4
