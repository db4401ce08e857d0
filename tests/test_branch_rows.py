"""Appending extra rows: every batched model input stays consistent."""

import pytest
import torch

from qkv_control.attention.rows import ROLE_COND, ROLE_REFERENCE, ROLE_UNCOND, RowLayout, put_rows, row_runs, take_rows
from qkv_control.patching.branch_rows import append_rows, cat_contexts, zero_control_rows
from qkv_control.patching.control import AttentionControl, ExtraRow
from qkv_control.patching.patch import _without_control
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


def test_zero_control_rows_makes_new_residuals_and_keeps_the_callers():
    shared = torch.randn(4, 2, 8, 8)
    other_batch = torch.randn(1, 3, 2, 2)  # not the call's batch: left as it is
    control = {"input": [shared, None, shared], "middle": [other_batch], "output": [], "other": "kept"}
    before = shared.clone()
    zeroed = zero_control_rows(control, [1, 3], 4)
    assert zero_control_rows(control, [], 4) is control and zero_control_rows(None, [1], 4) is None
    new = zeroed["input"][0]
    assert new is not shared and zeroed["input"][2] is new and zeroed["input"][1] is None  # still shared once
    assert new[[1, 3]].abs().sum() == 0 and torch.equal(new[[0, 2]], shared[[0, 2]])
    assert zeroed["middle"][0] is other_batch and zeroed["other"] == "kept"
    assert torch.equal(shared, before) and control["input"] == [shared, None, shared] and zeroed["input"] is not control["input"]


def test_rows_without_control_outside_the_sampler_rows_is_an_error():
    class Asks(AttentionControl):
        def rows_without_control(self, call):
            return [5]

    control = Asks()
    with pytest.raises(ValueError, match=rf"{control.name} expected sampler rows 0-3 without ControlNet, got \[5\]"):
        _without_control((control,), None, {"input": []}, 4)


def test_rows_are_taken_as_views_when_consecutive_and_written_in_place():
    x = torch.arange(5 * 3 * 2, dtype=torch.float32).view(5, 3, 2)
    assert row_runs([0, 1, 3, 4, 2]) == [(0, 0, 2), (2, 3, 2), (4, 2, 1)]
    view = take_rows(x, [2, 3])
    assert view.data_ptr() == x[2].data_ptr() and torch.equal(view, x[2:4])
    gathered = take_rows(x, [3, 1])
    assert gathered.data_ptr() not in (x[3].data_ptr(), x[1].data_ptr())
    assert torch.equal(gathered, torch.stack([x[3], x[1]]))

    out = torch.zeros(5, 3, 2)
    values = torch.randn(3, 3, 2)
    put_rows(out, [4, 0, 1], values)
    assert torch.equal(out[4], values[0]) and torch.equal(out[:2], values[1:])
    assert torch.equal(out[2:4], torch.zeros(2, 3, 2))
    # a part of each row (a DiT's image tokens): tokens 1-2 of rows 1 and 3, the rest untouched
    out = torch.zeros(5, 3, 2, dtype=torch.float64)
    put_rows(out, [1, 3], values[:2, 1:], part=lambda block: block.narrow(1, 1, 2))
    assert torch.equal(out[1, 1:], values[0, 1:].double()) and torch.equal(out[3, 1:], values[1, 1:].double())
    assert not out[:, 0].any() and not out[[0, 2, 4]].any()
