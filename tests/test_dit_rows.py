"""Extra branch rows on diffusion transformers: every per-row input the DiT takes is extended
(Flux.1: guidance, pooled ``y``, attention mask, Kontext reference latents; SD3: ``y``), an
uncoupled row leaves the sampler rows as they were and predicts what it predicts alone, and
rows with other text lengths are zero-padded and masked instead of repeated."""

from __future__ import annotations

import pytest
import torch

from qkv_control.attention.layers import select_layers
from qkv_control.attention.rows import ROLE_REFERENCE, RowLayout
from qkv_control.patching.branch_rows import append_rows, pad_contexts, text_lengths
from qkv_control.patching.control import AttentionControl, ExtraRow
from qkv_control.patching.patch import add_control
from dit_helpers import dit_kit, dit_sample

# Batch composition changes float rounding (matmul blocking), not the maths: a row's
# prediction in a bigger batch equals its prediction alone to within this (measured ~1e-6).
ALONE_ATOL = 1e-4


class RecordedRow(AttentionControl):
    """Appends one row with its own latent, sigma, text and per-row conds, and records what it
    was given and what it predicted; ``tokens`` sets the row's text length."""

    dit_ready = True

    def __init__(self, tokens=None, seed=0):
        super().__init__()
        self.tokens, self.seed = tokens, seed
        self.rows = []

    def extra_rows(self, call):
        generator = torch.Generator().manual_seed(self.seed + len(self.rows))
        width = call.context.shape[-1]
        n = call.context.shape[1] if self.tokens is None else self.tokens
        conds = {}
        if "y" in call.conds:
            conds["y"] = torch.randn(1, call.conds["y"].shape[-1], generator=generator)
        if "guidance" in call.conds:
            conds["guidance"] = torch.tensor([2.0])
        row = ExtraRow(ROLE_REFERENCE, x=torch.randn(call.x[:1].shape, generator=generator),
                       context=torch.randn(1, n, width, generator=generator), sigma=call.sigma[:1] * 0.5, conds=conds)
        record = {"row": row}
        row.on_output = lambda out: record.__setitem__("out", out.detach().clone())
        self.rows.append(record)
        return [row]


def predict_alone(model, row: ExtraRow):
    """The row's prediction from the model run on that row only (no wrappers, no other rows)."""
    with torch.no_grad():
        return model.model.apply_model(row.x, row.sigma, c_crossattn=row.context, transformer_options={}, **row.conds)


@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_uncoupled_row_leaves_sampler_rows_and_predicts_as_alone(family):
    model, positive, negative = dit_kit(family)
    plain = dit_sample(model, positive, negative, family)
    control = RecordedRow()
    assert torch.equal(plain, dit_sample(add_control(model, control), positive, negative, family))
    assert len(control.rows) == 3
    for record in control.rows:
        alone = predict_alone(model, record["row"])
        assert torch.allclose(record["out"], alone, atol=ALONE_ATOL, rtol=0), (record["out"] - alone).abs().max()


@pytest.mark.parametrize("family,tokens", [("flux", 40), ("flux", 300), ("sd35", 154), ("sd35", 20)])
def test_rows_with_other_text_lengths_are_padded_and_masked(family, tokens):
    """Zero padding with masked padding keys: the sampler rows give what they gave unpadded and the
    padded row what it gives alone at its own length (repeating the text instead, as for UNet
    cross-attention, would change every row of a joint attention)."""
    model, positive, negative = dit_kit(family)
    plain = dit_sample(model, positive, negative, family)
    control = RecordedRow(tokens=tokens)
    out = dit_sample(add_control(model, control), positive, negative, family)
    assert torch.allclose(plain, out, atol=1e-4, rtol=1e-5), (plain - out).abs().max()
    for record in control.rows:
        alone = predict_alone(model, record["row"])
        assert torch.allclose(record["out"], alone, atol=ALONE_ATOL, rtol=0), (record["out"] - alone).abs().max()


def test_repeating_a_dit_context_would_change_the_result():
    """Why DiT contexts are padded, not repeated: the same text twice is another joint attention."""
    model, positive, _ = dit_kit("flux")
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    context, pooled = positive[0][0], positive[0][1]["pooled_output"]
    with torch.no_grad():
        once = model.model.apply_model(x, sigma, c_crossattn=context, y=pooled, guidance=torch.tensor([3.5]))
        twice = model.model.apply_model(x, sigma, c_crossattn=context.repeat(1, 2, 1), y=pooled,
                                        guidance=torch.tensor([3.5]))
    assert (once - twice).abs().max() > 1e-3


class KontextRecorder(AttentionControl):
    dit_ready = True

    def __init__(self):
        super().__init__()
        self.layouts = []

    def select_layers(self, layers):
        return select_layers("single:0", layers, "attn1")

    def attend(self, call, q, k, v, attend_next):
        self.layouts.append(call.tokens)
        return attend_next(q, k, v)

    def extra_rows(self, call):
        return [ExtraRow(ROLE_REFERENCE, x=torch.randn_like(call.x[:1]), context=call.context[:1])]


def test_kontext_reference_latents_are_extended_and_laid_out():
    """Flux Kontext's reference latents (a list-valued per-row input) get the extra row's copy,
    and the reference tokens appear after the image's in the token layout."""
    model, positive, negative = dit_kit("flux")
    reference = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    positive = [[positive[0][0], {**positive[0][1], "reference_latents": [reference]}]]
    negative = [[negative[0][0], {**negative[0][1], "reference_latents": [reference]}]]
    plain = dit_sample(model, positive, negative, "flux")
    control = KontextRecorder()
    assert torch.equal(plain, dit_sample(add_control(model, control), positive, negative, "flux"))
    layout = control.layouts[0]
    assert (layout.n_text, layout.image, layout.extra) == (256, slice(256, 320), (slice(320, 336),))


def test_append_rows_extends_dit_inputs():
    layout = RowLayout.from_cond_or_uncond([1, 0], 2)
    x, sigma = torch.randn(2, 16, 4, 4), torch.full((2,), 0.7)
    context = torch.randn(2, 10, 8)
    conds = {"y": torch.arange(2.0).reshape(2, 1).repeat(1, 3), "guidance": torch.tensor([3.5, 4.5]),
             "ref_latents": [torch.randn(2, 16, 2, 2), torch.randn(2, 16, 4, 4)], "ref_latents_method": "index"}
    own_ref = [torch.full((1, 16, 2, 2), 7.0), torch.full((1, 16, 4, 4), 8.0)]
    extras = [("a", ExtraRow(ROLE_REFERENCE, x=torch.randn(1, 16, 4, 4), context=torch.randn(1, 6, 8))),
              ("a", ExtraRow(ROLE_REFERENCE, x=torch.randn(1, 16, 4, 4), context=torch.randn(1, 10, 8),
                             conds={"guidance": torch.tensor([1.0]), "ref_latents": own_ref}))]
    x2, s2, _, ctx2, _, conds2, layout2 = append_rows(x, sigma, None, context, None, conds, layout, extras,
                                                      pad_text=True)
    assert x2.shape[0] == s2.shape[0] == ctx2.shape[0] == 4 and len(layout2) == 4
    assert torch.equal(ctx2[2, :6], extras[0][1].context[0]) and ctx2[2, 6:].abs().sum() == 0  # padded, not repeated
    assert conds2["guidance"].tolist() == [3.5, 4.5, 4.5, 1.0]  # a copy of the positive row (row 1), or its own
    assert torch.equal(conds2["y"][2], conds["y"][1]) and conds2["ref_latents_method"] == "index"
    assert [t.shape[0] for t in conds2["ref_latents"]] == [4, 4]
    assert torch.equal(conds2["ref_latents"][0][2], conds["ref_latents"][0][1]) and conds2["ref_latents"][1][3].eq(8).all()
    assert text_lengths(context, extras) == (10, 10, 6, 10)
    assert text_lengths(context, extras[1:]) is None
    assert pad_contexts([context, torch.randn(1, 12, 8)]).shape == (3, 12, 8)
    masked = {**conds, "attention_mask": torch.zeros(2, 74, 74)}
    with pytest.raises(ValueError, match="expected extra rows with the sampler rows' 10 text tokens when the model "
                                         r"takes an attention mask, got \[6, 10\]"):
        append_rows(x, sigma, None, context, None, masked, layout, extras, pad_text=True)
