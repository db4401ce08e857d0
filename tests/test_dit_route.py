"""The attention router on diffusion transformers (``patching.dit_route``), on the real
ModelPatcher and samplers with tiny Flux.1, SD3.5, Chroma and Flux 2 models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comfy.patcher_extension import WrappersMP

from qkv_control.attention.layers import select_layers
from qkv_control.attention.rows import ROLE_REFERENCE
from qkv_control.patching.control import AttentionControl, ExtraRow
from qkv_control.patching.patch import add_control
from qkv_control.patching.plain_attention import plain_attention
from dit_helpers import counting_override, dit_kit, dit_sample

FAMILIES = ("flux", "flux_schnell", "sd35", "chroma", "flux2")
OVERRIDE = "optimized_attention_override"


class PassThrough(AttentionControl):
    """On every layer of ``spec``: records the call and passes through."""

    dit_ready = True

    def __init__(self, spec="all"):
        super().__init__()
        self.spec = spec
        self.calls = []

    def select_layers(self, layers):
        return select_layers(self.spec, layers, "attn1")

    def attend(self, call, q, k, v, attend_next):
        self.calls.append((call.layer.key, call.tokens, tuple(q.shape)))
        return attend_next(q, k, v)


class ScaleImageTokens(PassThrough):
    """Scales the image-token outputs of its layers; text (and reference) tokens as computed."""

    def __init__(self, spec, factor=0.5):
        super().__init__(spec)
        self.factor = factor
        self.records = []

    def attend(self, call, q, k, v, attend_next):
        out = attend_next(q, k, v)
        self.records.append((call.tokens, call.heads, q.clone(), k.clone(), v.clone(), out.clone()))
        return call.tokens.with_image(out, call.tokens.image_tokens(out) * self.factor)


class PlainOnly(PassThrough):
    """Returns ``call.plain`` on every layer: the DiT's plain attention, outside the override; or
    the pack's ``plain_attention(call.extra_options)`` (ComfyUI's optimized attention)."""

    def __init__(self, via_extra_options=False):
        super().__init__()
        self.via_extra_options = via_extra_options

    def attend(self, call, q, k, v, attend_next):
        if self.via_extra_options:
            return plain_attention(call.extra_options)(q, k, v)
        return call.plain(q, k, v)


class UncoupledRow(AttentionControl):
    dit_ready = True

    def extra_rows(self, call):
        return [ExtraRow(ROLE_REFERENCE, x=torch.randn_like(call.x[:1]), context=call.context[:1])]


def sdpa_reference(q, k, v, heads):
    """Plain attention on [B, N, heads*dim] with torch's SDPA (independent of ComfyUI)."""
    b, n, inner = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, inner // heads).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, inner)


@pytest.mark.parametrize("family", FAMILIES)
def test_pass_through_on_every_block_is_bit_identical(family):
    model, positive, negative = dit_kit(family)
    plain = dit_sample(model, positive, negative, family)
    control = PassThrough()
    patched = dit_sample(add_control(model, control), positive, negative, family)
    assert torch.equal(plain, patched)
    layers = {key for key, _, _ in control.calls}
    assert len(layers) == {"sd35": 4}.get(family, 5)  # every layer was routed, each step
    assert len(control.calls) == 3 * len(layers)


@pytest.mark.parametrize("family,spec,text_tokens", [("flux", "double:1", 256), ("flux", "single:0", 256),
                                                     ("sd35", "joint:1", 77), ("sd35", "joint:0.1", 0)])
def test_image_token_edit_leaves_text_outputs_as_computed(family, spec, text_tokens):
    """q/k/v reach the control after norms and RoPE in [B, N, heads*dim]; the chain's output is
    plain attention of them (checked against torch's SDPA); the text part of the sequence is
    what the text encoder gave (its token count), and editing the image tokens leaves the text
    tokens' outputs of the call, and the text stream of the block, exactly as computed."""
    model, positive, negative = dit_kit(family)
    control = ScaleImageTokens(spec)
    patched = add_control(model, control)
    block_out = {}

    def hook(name):
        def record(module, args, kwargs, out):
            block_out.setdefault(name, [o.detach().clone() for o in out])
        return record

    dm = model.model.diffusion_model
    block = dm.double_blocks[1] if spec == "double:1" else dm.joint_blocks[1] if spec == "joint:1" else None
    for name, m in (("plain", model), ("patched", patched)):
        handle = block.register_forward_hook(hook(name), with_kwargs=True) if block is not None else None
        try:
            dit_sample(m, positive, negative, family, steps=1)
        finally:
            if handle is not None:
                handle.remove()
    tokens, heads, q, k, v, out = control.records[0]
    assert tokens.n_text == text_tokens and tokens.grid == (8, 8)
    assert torch.allclose(out, sdpa_reference(q, k, v, heads), atol=2e-5, rtol=1e-4)
    if block is not None:
        # Flux's double block returns (img, txt), SD3's joint block (context, x)
        text_index, image_index = (1, 0) if family == "flux" else (0, 1)
        assert torch.equal(block_out["plain"][text_index], block_out["patched"][text_index])
        assert not torch.allclose(block_out["plain"][image_index], block_out["patched"][image_index])


def test_image_edit_changes_the_image_and_only_through_image_tokens():
    """The edited output is what the model continues with (the sample changes), and the same
    edit with factor 1 is the unpatched model bit for bit."""
    model, positive, negative = dit_kit("flux")
    plain = dit_sample(model, positive, negative, "flux")
    assert not torch.allclose(plain, dit_sample(add_control(model, ScaleImageTokens("single:2")), positive, negative,
                                                "flux"), atol=1e-3)
    assert torch.equal(plain, dit_sample(add_control(model, ScaleImageTokens("all", 1.0)), positive, negative, "flux"))


@pytest.mark.parametrize("family", ["flux", "sd35"])
@pytest.mark.parametrize("via_extra_options", [False, True])
def test_plain_attention_of_a_call_does_not_reenter_the_route(family, via_extra_options):
    """``call.plain`` is the DiT's attention function itself, and ``call.extra_options`` hold no
    override (calling ``optimized_attention`` with the model's transformer_options would re-enter
    it); on every layer either gives the unpatched result."""
    model, positive, negative = dit_kit(family)
    plain = dit_sample(model, positive, negative, family)
    out = dit_sample(add_control(model, PlainOnly(via_extra_options)), positive, negative, family)
    assert torch.allclose(plain, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd35"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_another_packs_override_and_ours_both_run(family, order):
    """An override another node installed, before or after this pack's node: both run on every
    call (ours on the layers a control touches, theirs on every attention call)."""
    model, positive, negative = dit_kit(family)
    plain = dit_sample(model, positive, negative, family)
    foreign_calls = []
    control = PassThrough()
    if order == "before":
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})[OVERRIDE] = counting_override(foreign_calls)
        m = add_control(m, control)
    else:
        m = add_control(model, control)
        m.model_options["transformer_options"][OVERRIDE] = counting_override(foreign_calls)
    assert torch.equal(plain, dit_sample(m, positive, negative, family))
    assert len(control.calls) == len(foreign_calls) > 0


def test_an_override_installed_per_call_inside_our_wrapper_runs_with_ours():
    """A pack that installs its override in a DIFFUSION_MODEL wrapper (inside the APPLY_MODEL
    one), chaining what it finds there: both run."""
    model, positive, negative = dit_kit("flux")
    foreign_calls = []

    def diffusion_model_wrapper(executor, *args, **kwargs):
        options = args[-1] if isinstance(args[-1], dict) and "sigmas" in args[-1] else kwargs["transformer_options"]
        options = dict(options)
        options[OVERRIDE] = counting_override(foreign_calls, options.get(OVERRIDE))
        if "transformer_options" in kwargs:
            kwargs = {**kwargs, "transformer_options": options}
        else:
            args = args[:-1] + (options,)
        return executor(*args, **kwargs)

    control = PassThrough()
    m = add_control(model, control)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "other_pack", diffusion_model_wrapper)
    plain = dit_sample(model, positive, negative, "flux")
    assert torch.equal(plain, dit_sample(m, positive, negative, "flux"))
    assert len(control.calls) == len(foreign_calls) == 15


def test_another_packs_override_sees_only_the_sampler_rows():
    model, positive, negative = dit_kit("flux")
    foreign_calls = []
    m = add_control(model, UncoupledRow())
    m.model_options["transformer_options"][OVERRIDE] = counting_override(foreign_calls)
    plain = dit_sample(model, positive, negative, "flux")
    assert torch.equal(plain, dit_sample(m, positive, negative, "flux"))
    assert foreign_calls and set(foreign_calls) == {2}  # cond + uncond; the extra row gets plain attention


def test_sd3_block_patch_of_another_pack_still_runs():
    """SD3 names its blocks through ``patches_replace["dit"]``: another pack's block patch on a
    touched block is called inside ours, with the original block."""
    model, positive, negative = dit_kit("sd35")
    seen = []

    def block_patch(args, extra):
        seen.append(args["img"].shape[0])
        return extra["original_block"](args)

    m = model.clone()
    m.set_model_patch_replace(block_patch, "dit", "double_block", 1)
    control = PassThrough("joint:1")
    plain = dit_sample(model, positive, negative, "sd35")
    assert torch.equal(plain, dit_sample(add_control(m, control), positive, negative, "sd35"))
    assert len(seen) == 3 and [key for key, _, _ in control.calls] == [("joint", 1, 0)] * 3


def test_model_options_are_not_mutated_and_no_route_outlives_the_run():
    model, positive, negative = dit_kit("flux")
    m = add_control(model, PassThrough())
    before = dict(m.model_options["transformer_options"])
    dit_sample(m, positive, negative, "flux", steps=1)
    assert m.model_options["transformer_options"] == before and OVERRIDE not in before
    assert OVERRIDE not in model.model_options.get("transformer_options", {})


def test_methods_not_ready_for_dits_are_refused_not_run():
    """A control that does not read the token layout (the cross-attention methods: IP-Adapter /
    DEADiff, text guidance) is an error on a DiT when sampling starts, never run there on joint
    sequences; a UNet block spec names no DiT block."""
    from qkv_control.nodes.ddim_inversion import QKVDDIMInversion
    from qkv_control.nodes.indetail_ip import QKVInDetailReferenceAttention
    from qkv_control.text_guidance.mask import MaskGuidanceControl

    model, positive, negative = dit_kit("flux")
    latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    inversion, _ = QKVDDIMInversion.execute(model, {"samples": latent}, 3, "simple", positive).args
    with pytest.raises(ValueError, match="InDetail-IP Reference Attention: .*selects no attn1 layer; this model has: "
                                         "double:0.0"):
        QKVInDetailReferenceAttention.execute(model, inversion, "output", "concat:0-1", 0.5, 0.5)
    control = MaskGuidanceControl([1], 256, 0.5, 1.0, "all")
    assert not control.dit_ready
    with pytest.raises(ValueError, match=r"expected an SD1.5 / SD2.x / SDXL \(UNet\) model for "
                                         r"MaskGuidanceControl#\d+, got a Flux.1 model"):
        dit_sample(add_control(model, control), positive, negative, "flux")
