"""Other patches that reshape what reaches a layer (core HyperTile: image tiles folded into the
batch; core ToMe: merged self-attention queries; core Deep Shrink, PatchModelAddDownscale: a
downscaled feature map, so fewer tokens at every later level), with InDetail-IP and MCA-Ctrl, in both node
orders, on tiny SD1.5 and SDXL (patching.router: rows that cannot be told apart are passed
through; merged tokens are handled by the controls whose math holds for any token count)."""

from __future__ import annotations

import logging

import pytest
import torch

from comfy_extras.nodes_hypertile import HyperTile
from comfy_extras.nodes_model_downscale import PatchModelAddDownscale
from comfy_extras.nodes_tomesd import TomePatchModel

from helpers import encode, sample
from qkv_control.attention import mca_ctrl as mca
from qkv_control.attention.rows import ROLE_COND, ROLE_REFERENCE
from qkv_control.attention.sdpa import bind_heads, plain_attention
from qkv_control.indetail_ip.control import ReferenceAttentionControl
from qkv_control.inversion.invert import invert
from qkv_control.mca_ctrl.config import Masks, Schedule, Streams
from qkv_control.mca_ctrl.control import MCACtrl
from qkv_control.patching.patch import add_control

STEPS = 3
SIZE = 16


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def kit(request):
    from qkv_control.tiny.models import tiny_checkpoint

    model, clip, _ = tiny_checkpoint(request.param)
    g = torch.Generator().manual_seed(3)
    reference, _ = invert(model, torch.randn((1, 4, SIZE, SIZE), generator=g) * 0.5, STEPS, "normal")
    scene, _ = invert(model, torch.randn((1, 4, SIZE, SIZE), generator=g) * 0.5, STEPS, "normal")
    return {"model": model, "reference": reference, "scene": scene, "family": request.param,
            "positive": encode(clip, "a photo of a fox"), "negative": encode(clip, "")}


def hypertile(model):
    # 32 px tiles: the tiny 16x16 latent splits into 4x4 tiles of 4x4 tokens at level 0 and 1;
    # swap_size 1 makes HyperTile's tile choice deterministic.
    return HyperTile.execute(model, 32, 1, 1, False)[0]


def tome(model):
    torch.manual_seed(0)  # ToMe picks its destination tokens at random
    return TomePatchModel.execute(model, 0.5)[0]


def _mask(top, left, size):
    m = torch.zeros((1, SIZE * 8, SIZE * 8))
    m[:, top:top + size, left:left + size] = 1.0
    return m


def _mca(kit):
    return MCACtrl(Streams(kit["reference"], scene=kit["scene"]), Masks(_mask(32, 32, 64), _mask(40, 16, 64)),
                   Schedule(mca.PhaseSchedule(0.34, 1.0)))


class Spy:
    """Records the batch and token counts every ``attend`` of a control receives."""

    def __init__(self, control, method="attend"):
        self.shapes = []
        original = getattr(control, method)

        def spy(call, *args, **kwargs):
            q = args[0] if method == "attend" else args[5]
            self.shapes.append((call.layer.level, q.shape[0], q.shape[1], len(call.layout)))
            return original(call, *args, **kwargs)

        setattr(control, method, spy)


def _both_orders(kit, patch, control):
    base = kit["model"]
    return {"patch first": add_control(patch(base), control), "control first": patch(add_control(base, control))}


@pytest.mark.parametrize("order", ["patch first", "control first"])
def test_hypertile_with_indetail_passes_tiled_layers_through(kit, order, caplog):
    """InDetail-IP on the layers HyperTile tiles (level 0 and 1 of the decoder) is passed through
    there: the result is HyperTile's alone, exactly (the reference rows it still appends are
    uncoupled), with one warning per run."""
    control = ReferenceAttentionControl(kit["reference"], blocks="output, -level:2-9")
    spy = Spy(control)
    args = (kit["positive"], kit["negative"])
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        out = sample(_both_orders(kit, hypertile, control)[order], *args, steps=STEPS, size=SIZE)
    alone = sample(hypertile(kit["model"]), *args, steps=STEPS, size=SIZE)
    assert torch.equal(out, alone)
    assert spy.shapes == []  # never handed a tiled batch
    warnings = [r for r in caplog.records if "changed the batch" in r.getMessage()]
    assert len(warnings) == 1 and control.name in warnings[0].getMessage()


@pytest.mark.parametrize("order", ["patch first", "control first"])
def test_hypertile_with_indetail_still_acts_on_other_layers(kit, order):
    """On the decoder layers HyperTile leaves alone, InDetail-IP acts as without HyperTile."""
    control = ReferenceAttentionControl(kit["reference"], blocks="output", schedule="concat:0-1")
    spy = Spy(control)
    args = (kit["positive"], kit["negative"])
    out = sample(_both_orders(kit, hypertile, control)[order], *args, steps=STEPS, size=SIZE)
    assert spy.shapes and all(rows == layout for _, rows, _, layout in spy.shapes)
    assert not torch.allclose(out, sample(hypertile(kit["model"]), *args, steps=STEPS, size=SIZE), atol=1e-4)


def _level_tokens(kit, levels):
    """Token counts of the self-attention layers at these resolution levels of the tiny model."""
    from qkv_control.patching.layers import discover_layers

    return {(SIZE // 2 ** layer.level) ** 2 for layer in discover_layers(kit["model"])
            if layer.kind == "attn1" and layer.level in levels}


@pytest.mark.parametrize("order", ["patch first", "control first"])
def test_hypertile_with_mca_ctrl(kit, order):
    """MCA-Ctrl passes the tiled levels (0 and 1) through and runs SALQ/SAGI on the others."""
    control = _mca(kit)
    spy = Spy(control, "_mca_attention")
    out = sample(_both_orders(kit, hypertile, control)[order], kit["positive"], kit["negative"], steps=STEPS,
                 size=SIZE)
    assert torch.isfinite(out).all()
    assert spy.shapes and all(rows == layout for _, rows, _, layout in spy.shapes)
    assert {tokens for _, _, tokens, _ in spy.shapes} == _level_tokens(kit, range(2, 9))


@pytest.mark.parametrize("order", ["patch first", "control first"])
def test_tome_with_indetail_acts_on_merged_queries(kit, order):
    """ToMe merges self-attention queries at the full-resolution layers: InDetail-IP's KV
    concatenation still holds there, on the queries it gets (checked against plain SDPA)."""
    control = ReferenceAttentionControl(kit["reference"], blocks="output", schedule="concat:0-1")
    checked = _check_concat(control, lambda q, k: q.shape[1] < k.shape[1])  # merged by ToMe
    out = sample(_both_orders(kit, tome, control)[order], kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    assert torch.isfinite(out).all()
    assert bool(checked) == bool(_level_tokens(kit, [0]))  # ToMe merges level 0 only (none on SDXL)


def _check_concat(control, applies):
    """Wraps the control's attend: where ``applies(q, k)``, its output for every cond row must be
    KV concatenation (plain SDPA over the reference's keys then the row's own); returns the layers
    checked."""
    checked = []
    original = control.attend

    def check(call, q, k, v, attend_next):
        out = original(call, q, k, v, attend_next)
        if applies(q, k):
            plain = bind_heads(plain_attention, call.heads)
            cond = call.rows(ROLE_COND)
            ref = call.rows(ROLE_REFERENCE, control.name)
            for row in cond:
                keys = torch.cat([k[ref].reshape(1, -1, k.shape[-1]), k[row:row + 1]], dim=1)
                values = torch.cat([v[ref].reshape(1, -1, v.shape[-1]), v[row:row + 1]], dim=1)
                torch.testing.assert_close(out[row:row + 1], plain(q[row:row + 1], keys, values), atol=1e-5, rtol=1e-4)
            checked.append((call.layer.level, q.shape[1]))
        return out

    control.attend = check
    return checked


def deep_shrink(model):
    # Kohya Deep Shrink on the first input block, for the whole run: every later level sees a
    # feature map downscaled by 2 (a quarter of the tokens), the decoder until the skip joins.
    return PatchModelAddDownscale.execute(model, 1, 2.0, 0.0, 1.0, True, "bicubic", "bicubic")[0]


@pytest.mark.parametrize("order", ["patch first", "control first"])
def test_deep_shrink_with_indetail_acts_on_the_downscaled_tokens(kit, order):
    """Under Deep Shrink every row (the reference too) is downscaled alike, so KV concatenation
    holds on the tokens each layer gets, fewer than the layer's nominal grid at the shrunk
    levels; the result differs from Deep Shrink alone."""
    control = ReferenceAttentionControl(kit["reference"], blocks="output", schedule="concat:0-1")
    checked = _check_concat(control, lambda q, k: True)
    args = (kit["positive"], kit["negative"])
    out = sample(_both_orders(kit, deep_shrink, control)[order], *args, steps=STEPS, size=SIZE)
    assert checked and any(tokens < (SIZE // 2 ** level) ** 2 for level, tokens in checked)  # shrunk layers acted on
    assert not torch.allclose(out, sample(deep_shrink(kit["model"]), *args, steps=STEPS, size=SIZE), atol=1e-4)


@pytest.mark.parametrize("order", ["patch first", "control first"])
def test_deep_shrink_with_mca_ctrl_masks_at_the_downscaled_grid(kit, order):
    """MCA-Ctrl under Deep Shrink: SALQ/SAGI run on every layer, at the shrunk layers on the
    downscaled grid (its masks resampled to the tokens the layer gets), never passed through."""
    control = _mca(kit)
    spy = Spy(control, "_mca_attention")
    args = (kit["positive"], kit["negative"])
    out = sample(_both_orders(kit, deep_shrink, control)[order], *args, steps=STEPS, size=SIZE)
    assert spy.shapes and all(rows == layout for _, rows, _, layout in spy.shapes)
    assert any(tokens < (SIZE // 2 ** level) ** 2 for level, _, tokens, _ in spy.shapes)  # the shrunk grid
    assert not torch.allclose(out, sample(deep_shrink(kit["model"]), *args, steps=STEPS, size=SIZE), atol=1e-4)


@pytest.mark.parametrize("order", ["patch first", "control first"])
def test_tome_with_mca_ctrl_passes_merged_layers_through(kit, order, caplog):
    """MCA-Ctrl's masks are per token of the layer grid: at the layers ToMe merges (level 0; SDXL
    has no self-attention there, so ToMe changes nothing on it) it passes through, with one
    warning per run, and acts everywhere else, instead of refusing the run."""
    control = _mca(kit)
    spy = Spy(control, "_mca_attention")
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        out = sample(_both_orders(kit, tome, control)[order], kit["positive"], kit["negative"], steps=STEPS,
                     size=SIZE)
    merges = bool(_level_tokens(kit, [0]))
    assert {tokens for _, _, tokens, _ in spy.shapes} == _level_tokens(kit, range(1, 9))
    warnings = [r for r in caplog.records if "changed the token count" in r.getMessage()]
    assert len(warnings) == (1 if merges else 0)
    if merges:
        assert control.name in warnings[0].getMessage()
    else:  # ToMe is a no-op here: exactly MCA-Ctrl alone
        assert torch.equal(out, sample(add_control(kit["model"], _mca(kit)), kit["positive"], kit["negative"],
                                       steps=STEPS, size=SIZE))


def test_hypertile_tiles_reach_another_packs_patch_without_the_extra_rows(kit):
    """Another pack's replace patch on a tiled layer gets the sampler rows' tiles only (it chunks the
    batch by cond_or_uncond), also when InDetail-IP appends its reference row: the result is that
    of HyperTile and the other patch alone, exactly."""
    from qkv_control.patching.layers import discover_layers
    from test_router import ChunkingForeignReplace

    layer = next(item for item in discover_layers(kit["model"]) if item.kind == "attn1" and item.level <= 1
                 and item.section == "output")

    def with_foreign(model, foreign):
        model = model.clone()
        model.set_model_patch_replace(foreign, "attn1", layer.block[0], layer.block[1], layer.transformer_index)
        return model

    args = (kit["positive"], kit["negative"])
    alone = ChunkingForeignReplace()
    expected = sample(hypertile(with_foreign(kit["model"], alone)), *args, steps=STEPS, size=SIZE)
    foreign = ChunkingForeignReplace()
    control = ReferenceAttentionControl(kit["reference"], blocks="output, -level:2-9")
    out = sample(add_control(hypertile(with_foreign(kit["model"], foreign)), control), *args, steps=STEPS, size=SIZE)
    assert foreign.batches == alone.batches and foreign.batches
    assert torch.equal(out, expected)
