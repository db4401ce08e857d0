"""IP-Adapter controls on the real ModelPatcher, router and samplers (tiny SD1.5 / SDXL):
per-layer results against the formulas, the guidance policy by row role, weight 0 and
identical presets reproducing unpatched output, layer routing, stacking with another
pack's attn2 replace patch, condition/mask guidance and attention maps."""

from __future__ import annotations

import functools

import pytest
import torch

import comfy.ldm.modules.attention as comfy_attention

from helpers import encode, sample
from qkv_control.attention.cross_attention import share_kv
from qkv_control.attention.layers import select_layers
from qkv_control.attention.rows import (PROMPT_NEGATIVE, PROMPT_POSITIVE, ROLE_COND, ROLE_CONDITION, ROLE_UNCOND,
                                        Row, RowLayout)
from qkv_control.attention.sdpa import bind_heads, plain_attention
from qkv_control.attention.step_window import ALWAYS, StepWindow
from qkv_control.ipadapter.control import IPAdapterControl, Reference
from qkv_control.text_guidance.condition import ConditionGuidanceControl
from qkv_control.ipadapter.files import load_file
from qkv_control.ipadapter.model import IPAdapterModel
from qkv_control.ipadapter.routing import deadiff_semantic_spec, routing_specs
from qkv_control.patching.prompt_tokens import word_token_positions
from qkv_control.nodes import ip_adapter_nodes as nodes
from qkv_control.nodes import text_guidance_nodes
from qkv_control.patching import keys
from qkv_control.patching.control import AttentionCall, AttentionControl, ExtraRow
from qkv_control.patching.image_prompt_policy import ImagePromptPolicy
from qkv_control.patching.layers import attention_module, discover_layers
from qkv_control.patching.patch import add_control, set_transformer_option
from qkv_control.patching.router import install_routes
from qkv_control.patching.run_context import RunContext
from qkv_control.tiny.ipadapter_files import write_ipadapter_files
from qkv_control.tiny.models import TEXT_WIDTH, tiny_checkpoint, tiny_clip_vision

ADAPTERS = {"sd15": "ip-adapter_sd15.safetensors", "sdxl": "ip-adapter-plus_sdxl_vit-h.safetensors"}
PROMPT = "a photo of a red sneaker on a table"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_ipadapter_files(models)
    return models / "ipadapter"


@pytest.fixture(scope="module")
def vision():
    return tiny_clip_vision(0)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand((1, 56, 56, 3), generator=g), torch.rand((1, 56, 56, 3), generator=g)


@functools.lru_cache(maxsize=4)
def _adapter(path):
    return IPAdapterModel(load_file(path))


def setup(family, adapter_dir):
    model, clip, _ = tiny_checkpoint(family)
    return model, clip, _adapter(str(adapter_dir / ADAPTERS[family]))


def apply(model, adapter, vision, image, weight=1.0, mode="decoupled", spec="all=1", start=0.0, end=1.0):
    (patched,) = nodes.QKVIPAdapterApply.execute(model, adapter, vision, image, weight, mode, start, end, spec).args
    return patched


# -- per-layer results, through the real control, router and run state -------------------


def _run(model, controls=None):
    from qkv_control.patching.patch import registered_controls

    run = RunContext(model, controls or registered_controls(model), sample_sigmas=torch.tensor([10.0, 5.0, 1.0, 0.0]))
    run.start()
    return run


def _layer_call(run, layer, layout):
    options = {"n_heads": layer.heads, "dim_head": layer.dim_head, "sigmas": torch.tensor([5.0]),
               "attn_precision": None, keys.ROWS: layout}
    return AttentionCall(layer, layout, run, options, plain=bind_heads(plain_attention, layer.heads)), options


def _qkv(layer, rows, seed=0, nq=16, nt=77):
    g = torch.Generator().manual_seed(seed)
    inner = layer.heads * layer.dim_head
    return (torch.randn(rows, nq, inner, generator=g), torch.randn(rows, nt, inner, generator=g),
            torch.randn(rows, nt, inner, generator=g))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("policy", [None, "both", "negative_image", "negative_image_given"])
def test_decoupled_layer_matches_formula_by_row_role(family, policy, adapter_dir, vision, images):
    model, _, adapter = setup(family, adapter_dir)
    if policy == "negative_image_given":
        model = set_transformer_option(model, keys.IMAGE_PROMPT_POLICY,
                                       ImagePromptPolicy("negative_image", negative_image=images[1]))
    elif policy is not None:
        model = set_transformer_option(model, keys.IMAGE_PROMPT_POLICY, ImagePromptPolicy(policy))
    weight = 0.7
    patched = apply(model, adapter, vision, images[0], weight)
    run = _run(patched)
    control = run.controls[0]
    layer = [layer for layer in run.layers if layer.kind == "attn2"][3]
    layout = RowLayout((Row(ROLE_UNCOND, 0, image_prompt=PROMPT_NEGATIVE), Row(ROLE_COND, 0, image_prompt=PROMPT_POSITIVE)))
    call, _ = _layer_call(run, layer, layout)
    q, k, v = _qkv(layer, 2)
    plain = bind_heads(plain_attention, layer.heads)
    out = control.attend(call, q, k, v, plain)

    w_k, w_v = control.layer_kv[layer.key]
    tokens = control.references[0].tokens

    def image_term(t, rows):
        return weight * plain(q[rows], (t @ w_k.t()).expand(len(rows), -1, -1), (t @ w_v.t()).expand(len(rows), -1, -1))

    text = plain(q, k, v)
    torch.testing.assert_close(out[1:], text[1:] + image_term(tokens.cond, [1]), atol=1e-5, rtol=1e-4)
    if policy is None:  # the pack's default: positive only (conflict-free) -> no image tokens at all
        torch.testing.assert_close(out[:1], text[:1])
    elif policy == "both":
        torch.testing.assert_close(out[:1], text[:1] + image_term(tokens.cond, [0]), atol=1e-5, rtol=1e-4)
    elif policy == "negative_image":  # without an image: IP-Adapter's own negative (empty-image tokens)
        torch.testing.assert_close(out[:1], text[:1] + image_term(tokens.uncond, [0]), atol=1e-5, rtol=1e-4)
    else:  # the policy's negative image, encoded at the start of the run
        negative = adapter.encode(vision, images[1]).cond
        torch.testing.assert_close(out[:1], text[:1] + image_term(negative, [0]), atol=1e-5, rtol=1e-4)
    run.close()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("exclusive", [False, True])
def test_joint_layer_is_one_attention_over_text_and_image(family, exclusive, adapter_dir, vision, images):
    model, _, adapter = setup(family, adapter_dir)
    patched = apply(model, adapter, vision, images[0], 1.0, mode="joint")
    run = _run(patched)
    control = run.controls[0]
    layer = [layer for layer in run.layers if layer.kind == "attn2"][-1]
    layout = RowLayout((Row(ROLE_COND, 0, image_prompt=PROMPT_POSITIVE), Row(ROLE_UNCOND, 0, image_prompt=PROMPT_NEGATIVE)))
    call, _ = _layer_call(run, layer, layout)
    plain = bind_heads(plain_attention, layer.heads)
    call.plain, call.exclusive = plain, exclusive
    q, k, v = _qkv(layer, 2, seed=1)
    out = control.attend(call, q, k, v, plain)
    w_k, w_v = control.layer_kv[layer.key]
    t = control.references[0].tokens.cond
    expected = plain(q[:1], torch.cat([k[:1], t @ w_k.t()], 1), torch.cat([v[:1], t @ w_v.t()], 1))
    torch.testing.assert_close(out[:1], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1:], plain(q[1:], k[1:], v[1:]))  # positive-only: uncond untouched
    run.close()


def test_stacking_with_another_packs_attn2_replace_keeps_both(adapter_dir, vision, images):
    model, clip, adapter = setup("sd15", adapter_dir)
    calls = []

    def foreign(q, k, v, extra_options):  # another pack's replace: visibly changes the output
        calls.append(extra_options["block"])
        return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    other = model.clone()
    other.set_model_attn2_replace(foreign, "input", 1)
    both = apply(other, adapter, vision, images[0], 0.8)
    run = _run(both)
    layout = RowLayout((Row(ROLE_COND, 0, image_prompt=PROMPT_POSITIVE),))
    routes = install_routes(both.model_options["transformer_options"].get("patches_replace", {}), run, layout)
    layer = next(layer for layer in run.layers if layer.kind == "attn2" and layer.key == ("input", 1, 0))
    routed = routes["attn2"][layer.key]
    _, options = _layer_call(run, layer, layout)
    options.update({"block": ("input", 1), "block_index": 0})
    q, k, v = _qkv(layer, 1, seed=2)
    out = routed(q, k, v, options)
    control = run.controls[0]
    w_k, w_v = control.layer_kv[layer.key]
    t = control.references[0].tokens.cond
    plain = bind_heads(plain_attention, layer.heads)
    expected = 0.5 * plain(q, k, v) + 0.8 * plain(q, t @ w_k.t(), t @ w_v.t())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    run.close()
    # and in a whole sampling run: the foreign patch still runs, the image prompt still acts
    pos, neg = encode(clip, PROMPT), encode(clip, "")
    calls.clear()
    with_both = sample(both, pos, neg, steps=2)
    assert calls, "the other pack's attn2 replace was dropped"
    assert not torch.allclose(with_both, sample(other, pos, neg, steps=2), atol=1e-4)
    assert not torch.allclose(with_both, sample(apply(model, adapter, vision, images[0], 0.8), pos, neg, steps=2),
                              atol=1e-4)


# -- whole sampling runs --------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_weight_zero_reproduces_unpatched_and_weight_changes(family, adapter_dir, vision, images):
    model, clip, adapter = setup(family, adapter_dir)
    pos, neg = encode(clip, PROMPT), encode(clip, "")
    base = sample(model, pos, neg, steps=2)
    layer_kv = adapter.layer_map(discover_layers(model), TEXT_WIDTH, "test")
    tokens = adapter.encode(vision, images[0])
    zero = add_control(model, IPAdapterControl(layer_kv, (Reference("image", tokens, 0.0),)))
    assert torch.equal(sample(zero, pos, neg, steps=2), base)
    zero_layers = add_control(model, IPAdapterControl(layer_kv, (Reference("image", tokens, 1.0, "all=0"),)))
    assert torch.equal(sample(zero_layers, pos, neg, steps=2), base)
    # a window holding no step of a 2-step run (step fractions 0 and 0.5)
    outside = apply(model, adapter, vision, images[0], 1.0, start=0.6, end=0.9)
    torch.testing.assert_close(sample(outside, pos, neg, steps=2), base)
    for mode in ("decoupled", "joint"):
        out = sample(apply(model, adapter, vision, images[0], 1.0, mode=mode), pos, neg, steps=2)
        assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-3)


def test_routing_touches_only_the_listed_layers(adapter_dir, vision, images):
    model, clip, adapter = setup("sd15", adapter_dir)
    touched = []

    class Spy(IPAdapterControl):
        def _decoupled(self, call, *args):
            touched.append(call.layer.ordinal)
            return super()._decoupled(call, *args)

    layer_kv = adapter.layer_map(discover_layers(model), TEXT_WIDTH, "test")
    spy = Spy(layer_kv, (Reference("image", adapter.encode(vision, images[0]), 1.0, "#4-8=1"),))
    sample(add_control(model, spy), encode(clip, PROMPT), encode(clip, ""), steps=1)
    assert set(touched) == {4, 5, 6, 7, 8}


def test_deadiff_split_sd15_and_sdxl():
    sd15 = discover_layers(tiny_checkpoint("sd15")[0])
    assert deadiff_semantic_spec(sd15) == "input:7, input:8, middle, output:3, output:4"
    style, semantic = routing_specs(sd15, "auto", "auto")
    from qkv_control.attention.layers import resolve_weight_spec

    sem = resolve_weight_spec(semantic, sd15, "attn2")
    sty = resolve_weight_spec(style, sd15, "attn2")
    attn2 = [layer for layer in sd15 if layer.kind == "attn2"]
    assert [layer.ordinal for layer in attn2 if sem[layer.key]] == [4, 5, 6, 7, 8]  # DEADiff: layers 4-8 of 16
    assert [layer.ordinal for layer in attn2 if sty[layer.key]] == [0, 1, 2, 3] + list(range(9, 16))
    sdxl = discover_layers(tiny_checkpoint("sdxl")[0])
    assert deadiff_semantic_spec(sdxl) == "input:7, input:8, middle, output:0, output:1"
    style, semantic = routing_specs(sdxl, "#0=0.5, output=1", "middle=2")
    assert resolve_weight_spec(semantic, sdxl, "attn2")[("middle", 0, 1)] == 2.0
    with pytest.raises(ValueError, match="block spec"):
        routing_specs(sd15, "nowhere=1", "auto")


def test_style_content_node_routes_each_image_to_its_layers(adapter_dir, vision, images):
    model, clip, adapter = setup("sdxl", adapter_dir)
    (patched,) = nodes.QKVIPAdapterStyleContent.execute(model, adapter, vision, images[0], 1.0, 0.7, "decoupled",
                                                        0.0, 1.0, "auto", "auto", content_image=images[1]).args
    run = _run(patched)
    style, content = run.scratch(run.controls[0]).weights
    attn2 = [layer for layer in run.layers if layer.kind == "attn2"]
    assert all((style[layer.key] == 0) != (content[layer.key] == 0) for layer in attn2)  # every layer: exactly one image
    assert {layer.block for layer in attn2 if content[layer.key]} == {("input", 7), ("input", 8), ("middle", 0), ("output", 0),
                                                          ("output", 1)}
    run.close()
    out = sample(patched, encode(clip, PROMPT), encode(clip, ""), steps=2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("mode", ["replace", "concat"])
def test_condition_guidance_with_the_prompt_as_preset_is_unpatched(family, mode):
    """Sharing the K/V of a preset equal to the prompt changes nothing: the projected
    preset K/V are the prompt's own (replace: same K/V; concat: K/V twice)."""
    model, clip, _ = tiny_checkpoint(family)
    pos, neg = encode(clip, PROMPT), encode(clip, "")
    base = sample(model, pos, neg, steps=2)
    (same,) = text_guidance_nodes.QKVConditionGuidance.execute(model, pos, mode, "all", 0.0, 1.0).args
    # float32 rounding only (K/V projected outside the batch, attention over 154 instead
    # of 77 keys), relative to the latents' scale (~500 for the tiny random UNet after 2 steps)
    torch.testing.assert_close(sample(same, pos, neg, steps=2), base, atol=1e-5 * float(base.abs().max()), rtol=0)
    preset = encode(clip, "studio product photo, soft light, pastel background, minimal")
    (other,) = text_guidance_nodes.QKVConditionGuidance.execute(model, preset, mode, "all", 0.0, 1.0).args
    assert not torch.allclose(sample(other, pos, neg, steps=2), base, atol=1e-3)


class RowBasedConditionGuidance(AttentionControl):
    """Reference: condition guidance as it was, with the preset condition as an extra batch
    row whose K/V the prompt rows share (the paper's batch of two texts, §3.2.1)."""

    kind = "attn2"

    def __init__(self, context, mode, layers="all", window=ALWAYS):
        super().__init__()
        self.context, self.mode, self.layers, self.window = context, mode, layers, window

    def select_layers(self, layers):
        return select_layers(self.layers, layers, "attn2")

    def extra_rows(self, call):
        cond_rows = call.layout.indices(ROLE_COND)
        if not cond_rows or not call.active(self.window):
            return []
        r = cond_rows[0]
        # The preset row is a prompt row: it sees the positive image prompt (an IP-Adapter's tokens).
        return [ExtraRow(ROLE_CONDITION, x=call.x[r:r + 1], context=self.context, image_prompt=PROMPT_POSITIVE)]

    def attend(self, call, q, k, v, attend_next):
        sources, targets = call.rows(ROLE_CONDITION, self.name), call.rows(ROLE_COND)
        if not sources or not targets:
            return attend_next(q, k, v)
        k, v = share_kv(k, v, targets, sources[0], self.mode)
        return attend_next(q, k, v)


class RowCounter(AttentionControl):
    """Records the batch rows of every UNet call (seen in its first cross-attention layer)."""

    kind = "attn2"

    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def select_layers(self, layers):
        return tuple(layer for layer in layers if layer.kind == "attn2")[:1]

    def attend(self, call, q, k, v, attend_next):
        self.sink.append(q.shape[0])
        return attend_next(q, k, v)


PRESET = "studio product photo, soft light, pastel background, minimal"


@pytest.mark.parametrize("mode", ["replace", "concat"])
@pytest.mark.parametrize("family, variant", [("sd15", "plain"), ("sdxl", "plain"), ("sd15", "long_preset"),
                                             ("sdxl", "window_layers"), ("sd15", "lora"), ("sdxl", "ipadapter")])
def test_condition_guidance_equals_the_preset_row(family, variant, mode, adapter_dir, vision, images):
    """The preset K/V projected in each layer give the sampled latent of the former
    row-based form. Variants: a 154-token preset against a 77-token prompt (token counts
    repeated to a common length), a sigma window and a layer subset, a weight patch
    (LoRA-style) on the cross-attention projections, an IP-Adapter on the model."""
    model, clip, adapter = setup(family, adapter_dir)
    pos, neg = encode(clip, PROMPT), encode(clip, "")
    text = ", ".join([PRESET] * 8) if variant == "long_preset" else PRESET
    context = encode(clip, text)[0][0]
    assert context.shape[1] == (154 if variant == "long_preset" else 77)
    layers, window = "all", ALWAYS
    if variant == "window_layers":  # the first of the 2 steps only (step fractions 0 and 0.5), output blocks
        layers, window = "output", StepWindow(0.0, 0.5)
    if variant == "lora":
        g = torch.Generator().manual_seed(5)
        sd = model.model.state_dict()
        patches = {key: ("diff", (0.5 * torch.randn(sd[key].shape, generator=g),)) for key in sd
                   if ".attn2.to_k." in key or ".attn2.to_v." in key}
        assert patches
        model = model.clone()
        model.add_patches(patches, 1.0)
    if variant == "ipadapter":
        model = apply(model, adapter, vision, images[0], 0.8)
    new = sample(add_control(model, ConditionGuidanceControl(context, mode, layers, window)), pos, neg, steps=2)
    ref = sample(add_control(model, RowBasedConditionGuidance(context, mode, layers, window)), pos, neg, steps=2)
    # float32 rounding only, relative to the latents' scale
    torch.testing.assert_close(new, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    if variant == "lora":  # the patch matters: the projections use the patched weights
        unpatched = tiny_checkpoint(family)[0]
        other = sample(add_control(unpatched, ConditionGuidanceControl(context, mode, layers, window)), pos, neg,
                       steps=2)
        assert not torch.allclose(new, other, atol=1e-3)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_condition_guidance_adds_no_row(family):
    """cfg > 1: 2 rows per UNet call (prompt and negative), as plain sampling; the
    row-based form took 3."""
    model, clip, _ = tiny_checkpoint(family)
    pos, neg = encode(clip, PROMPT), encode(clip, "")
    context = encode(clip, PRESET)[0][0]
    counts = {}
    for name, control in (("plain", None), ("guided", ConditionGuidanceControl(context, "concat")),
                          ("row-based", RowBasedConditionGuidance(context, "concat"))):
        sink = []
        patched = model if control is None else add_control(model, control)
        sample(add_control(patched, RowCounter(sink)), pos, neg, steps=2, cfg=5.0)
        counts[name] = sink
    assert counts["plain"] and set(counts["plain"]) == {2}
    assert counts["guided"] == counts["plain"]
    assert set(counts["row-based"]) == {3}


def test_attention_module_is_the_layer_of_the_model():
    model = tiny_checkpoint("sdxl")[0]
    unet = model.model.diffusion_model
    layers = discover_layers(model)
    layer = next(layer for layer in layers if layer.kind == "attn2" and layer.block == ("output", 1))
    module = attention_module(model, layer)
    blocks = unet.output_blocks[1]
    transformer = next(m for m in blocks if hasattr(m, "transformer_blocks"))
    assert module is transformer.transformer_blocks[layer.transformer_index].attn2
    assert attention_module(model.model, layers[0]) is attention_module(unet, layers[0])
    assert all(attention_module(model, layer).heads == layer.heads for layer in layers)


def test_word_positions_come_from_the_tokenizer():
    _, clip, _ = tiny_checkpoint("sd15")
    positions = word_token_positions(clip, PROMPT, "sneaker, red", "test")
    ids = [t[0] for t in clip.tokenize(PROMPT)["l"][0]]
    for word in ("sneaker", "red"):
        word_ids = [t[0] for t in clip.tokenize(word, return_word_ids=True)["l"][0] if t[2] != 0]
        start = next(i for i in range(77) if ids[i:i + len(word_ids)] == word_ids)
        assert set(range(start, start + len(word_ids))) <= set(positions)
    assert positions[0] >= 1  # position 0 is the start token
    with pytest.raises(ValueError, match="expected the word 'giraffe' in the prompt"):
        word_token_positions(clip, PROMPT, "giraffe", "test")


def test_mask_guidance_node_changes_only_with_strength():
    model, clip, _ = tiny_checkpoint("sd15")
    neg = encode(clip, "")
    (same, positive) = text_guidance_nodes.QKVMaskGuidance.execute(model, clip, PROMPT, "sneaker", 0.5, 0.0, "-level:0",
                                                     0.0, 1.0).args
    assert same is model
    base = sample(model, positive, neg, steps=2)
    (guided, positive) = text_guidance_nodes.QKVMaskGuidance.execute(model, clip, PROMPT, "sneaker", 0.5, 1.0, "-level:0",
                                                       0.0, 1.0).args
    out = sample(guided, positive, neg, steps=2)
    assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-4)


def test_attention_map_node_outputs_mask_and_preview():
    model, clip, _ = tiny_checkpoint("sd15")
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    out, mask, preview = text_guidance_nodes.QKVAttentionMap.execute(model, clip, PROMPT, "sneaker", encode(clip, ""), latent, 0, 2,
                                                       5.0, "ddim", "normal", "level:2", 1.0).args
    assert out["samples"].shape == (1, 4, 16, 16)
    assert mask.shape == (1, 128, 128) and preview.shape == (1, 128, 128, 3)
    assert float(mask.min()) >= 0 and abs(float(mask.max()) - 1) < 0.05 and float(mask.std()) > 0
