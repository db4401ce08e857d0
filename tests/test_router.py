"""The attention router and branch rows, on the real ModelPatcher and samplers."""

import copy

import pytest
import torch

import comfy.ldm.modules.attention as comfy_attention
from comfy.ldm.modules.attention import CrossAttention

from qkv_control.attention.rows import ROLE_COND, ROLE_REFERENCE, ROLE_UNCOND
from qkv_control.attention.layers import select_layers
from qkv_control.patching import keys
from qkv_control.patching.control import AttentionControl, ExtraRow
from qkv_control.patching.patch import add_control, registered_controls
from helpers import encode, sample


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family):
    from qkv_control.tiny.models import tiny_checkpoint
    model, clip, vae = tiny_checkpoint(family)
    return model, encode(clip, "a red fox in the snow"), encode(clip, "")


class NoOpControl(AttentionControl):
    """Touches every layer of both kinds and passes through."""

    def __init__(self, spec="all"):
        super().__init__()
        self.spec = spec

    def select_layers(self, layers):
        return select_layers(self.spec, layers, "attn1") + select_layers(self.spec, layers, "attn2")


class ScaleControl(AttentionControl):
    """Scales one layer's attention output: a visible, local change."""

    def __init__(self, kind, spec, factor=0.5):
        super().__init__()
        self.kind, self.spec, self.factor = kind, spec, factor

    def select_layers(self, layers):
        return select_layers(self.spec, layers, self.kind)

    def attend(self, call, q, k, v, attend_next):
        return attend_next(q, k, v) * self.factor


class UncoupledRowControl(AttentionControl):
    """Appends a row nobody attends to; records its prediction."""

    def start_run(self, run):
        return []  # the predictions of the appended rows

    def extra_rows(self, call):
        outputs = call.run.scratch(self)
        return [ExtraRow(ROLE_REFERENCE, x=torch.randn_like(call.x[:1]), context=call.context[:1],
                         on_output=outputs.append)]


def test_noop_control_is_bit_identical(checkpoint):
    model, pos, neg = checkpoint
    plain = sample(model, pos, neg)
    patched = sample(add_control(model, NoOpControl()), pos, neg)
    assert torch.equal(plain, patched)


def test_uncoupled_extra_rows_are_bit_identical(checkpoint):
    model, pos, neg = checkpoint
    plain = sample(model, pos, neg)
    control = UncoupledRowControl()
    assert torch.equal(plain, sample(add_control(model, control), pos, neg))


def test_input_model_is_not_mutated(checkpoint):
    model, pos, neg = checkpoint
    before = copy.copy(model.model_options["transformer_options"])
    wrappers_before = {k: dict(v) for k, v in model.wrappers.items()}
    patched = add_control(add_control(model, NoOpControl()), NoOpControl())
    assert model.model_options["transformer_options"] == before
    assert {k: dict(v) for k, v in model.wrappers.items()} == wrappers_before
    assert len(registered_controls(patched)) == 2 and registered_controls(model) == ()
    sample(patched, pos, neg, steps=1)
    assert keys.RUN not in patched.model_options["transformer_options"]  # run state gone after the run


def _capture_attention_io(model):
    """Forward hooks recording every CrossAttention's input and output for one UNet call."""
    records = {}
    handles = []
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, CrossAttention):
            def hook(mod, args, kwargs, out, name=name):
                records.setdefault(name, (args[0].detach().clone(), kwargs.get("context"), out.detach().clone()))
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return records, handles


def test_control_on_one_layer_changes_only_that_layer(checkpoint, family):
    """Every other attention layer computes exactly its plain attention on the input it gets;
    only the chosen layer differs. Checked by replaying each layer on its captured input."""
    model, pos, neg = checkpoint
    layer_spec = "output:4.0" if family == "sd15" else "output:3.1"
    patched = add_control(model, ScaleControl("attn1", layer_spec))
    seen = {}

    def record(name):
        def hook(mod, args, out):
            seen.setdefault(name, (args[0].detach().clone(), out.detach().clone()))
        return hook

    unet = model.model.diffusion_model
    handles = []
    targets = {}
    for name, module in unet.named_modules():
        if name.endswith(".attn1"):
            handles.append(module.register_forward_hook(record(name)))
            targets[name] = module
    # With a replace patch the block calls to_q/to_k/to_v/to_out itself, so hook the
    # block's norm input instead: record the block input and output of attn1 via to_out.
    for handle in handles:
        handle.remove()
    handles = []
    for name, module in unet.named_modules():
        if name.endswith(".attn1"):
            def pre(mod, args, name=name):
                seen.setdefault(name + ":q_in", args[0].detach().clone())
            def post(mod, args, out, name=name):
                seen.setdefault(name + ":out", out.detach().clone())
            handles.append(module.to_q.register_forward_pre_hook(pre))
            handles.append(module.to_out.register_forward_hook(post))
    try:
        sample(patched, pos, neg, steps=1)
    finally:
        for handle in handles:
            handle.remove()
    changed = []
    for name, module in targets.items():
        x = seen[name + ":q_in"]
        with torch.no_grad():
            plain = module(x)
        if not torch.allclose(plain, seen[name + ":out"], atol=1e-5, rtol=1e-5):
            changed.append(name)
    block, index = layer_spec.split(":")[1].split(".")
    assert changed == [f"output_blocks.{block}.1.transformer_blocks.{index}.attn1"]


class ForeignReplace:
    """Another pack's attn replace patch: plain attention, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, extra_options):
        self.calls += 1
        return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5


@pytest.mark.parametrize("order", ["foreign_first", "ours_first"])
@pytest.mark.parametrize("key_len", [2, 3])
def test_foreign_replace_patch_still_runs(checkpoint, order, key_len):
    """Ours (a pass-through on every layer) composed with a foreign patch gives exactly the
    foreign patch's result, whichever was installed first and whatever key it used."""
    model, pos, neg = checkpoint
    from qkv_control.patching.layers import discover_layers
    layer = next(item for item in discover_layers(model) if item.kind == "attn2")
    args = (layer.block[0], layer.block[1]) + ((layer.transformer_index,) if key_len == 3 else ())

    def with_foreign(m, foreign):
        m = m.clone()
        m.set_model_attn2_replace(foreign, *args)
        return m

    reference_foreign = ForeignReplace()
    expected = sample(with_foreign(model, reference_foreign), pos, neg, steps=2)
    foreign = ForeignReplace()
    if order == "foreign_first":
        patched = add_control(with_foreign(model, foreign), NoOpControl())
    else:
        patched = with_foreign(add_control(model, NoOpControl()), foreign)
    got = sample(patched, pos, neg, steps=2)
    assert foreign.calls == reference_foreign.calls > 0
    assert torch.equal(expected, got)


class RoleRecorder(AttentionControl):
    """Records, for every UNet call, each row's role with the context it actually got."""

    def __init__(self, pos_context, neg_context, log):
        super().__init__()
        self.pos, self.neg, self.log = pos_context, neg_context, log

    def extra_rows(self, call):
        for i, row in enumerate(call.layout.rows):
            ctx = call.context[i, : self.pos.shape[1]]
            matches = "cond" if torch.equal(ctx, self.pos[0]) else "uncond" if torch.equal(ctx, self.neg[0]) else "?"
            self.log.append((row.role, row.item, matches))
        return []


@pytest.mark.parametrize("cfg,batch,separate", [(5.0, 1, False), (5.0, 3, False), (5.0, 2, True), (1.0, 1, False), (1.0, 3, False)])
def test_roles_follow_the_data(checkpoint, monkeypatch, cfg, batch, separate):
    model, pos, neg = checkpoint
    log = []
    patched = add_control(model, RoleRecorder(pos[0][0], neg[0][0], log))
    if separate:  # memory pressure: ComfyUI then sends cond and uncond in separate calls
        monkeypatch.setattr(type(patched.model), "memory_required", lambda self, *a, **k: float("inf"))
    sample(patched, pos, neg, steps=1, cfg=cfg, batch=batch)
    assert log, "no UNet call seen"
    assert all(role == matches for role, _, matches in log), log
    roles = [role for role, _, _ in log]
    assert roles.count(ROLE_COND) == batch
    assert roles.count(ROLE_UNCOND) == (0 if cfg == 1.0 else batch)
    assert sorted(item for role, item, _ in log if role == ROLE_COND) == list(range(batch))


def test_a_b_a_gives_identical_a(checkpoint):
    model, pos, neg = checkpoint
    a = add_control(model, ScaleControl("attn1", "output", 0.7))
    b = add_control(model, ScaleControl("attn2", "input", 1.8))
    first = sample(a, pos, neg)
    other = sample(b, pos, neg)
    again = sample(a, pos, neg)
    assert torch.equal(first, again) and not torch.equal(first, other)


class FailingCleanup(AttentionControl):
    def end_run(self, run):
        raise RuntimeError("cleanup failed")

    def extra_rows(self, call):
        raise KeyError("the sampling error")


def test_cleanup_never_hides_the_sampling_error(checkpoint):
    model, pos, neg = checkpoint
    with pytest.raises(KeyError, match="the sampling error"):
        sample(add_control(model, FailingCleanup()), pos, neg, steps=1)


class ChunkingForeignReplace:
    """Another pack's replace patch that, like IPAdapter_plus, slices the batch into
    ``len(cond_or_uncond)`` equal chunks: it must only ever see the sampler's rows."""

    def __init__(self):
        self.batches = []

    def __call__(self, q, k, v, extra_options):
        chunks = len(extra_options["cond_or_uncond"])
        assert q.shape[0] % chunks == 0, f"{q.shape[0]} rows for {chunks} CFG chunks"
        self.batches.append(q.shape[0])
        per_chunk = q.shape[0] // chunks
        parts = [comfy_attention.optimized_attention(q[i * per_chunk:(i + 1) * per_chunk], k[i * per_chunk:(i + 1) * per_chunk],
                                                     v[i * per_chunk:(i + 1) * per_chunk], extra_options["n_heads"]) * (0.5 + i)
                 for i in range(chunks)]
        return torch.cat(parts)


@pytest.mark.parametrize("kind", ["attn1", "attn2"])
def test_other_packs_patches_see_only_sampler_rows(checkpoint, kind):
    """Extra branch rows never reach another pack's replace patch on any layer, routed by us
    or not; the sampler rows' result is exactly what that patch gives without extra rows."""
    model, pos, neg = checkpoint
    from qkv_control.patching.layers import discover_layers
    layer = next(item for item in discover_layers(model) if item.kind == kind)

    def with_foreign(m, foreign):
        m = m.clone()
        m.set_model_patch_replace(foreign, kind, layer.block[0], layer.block[1], layer.transformer_index)
        return m

    alone = ChunkingForeignReplace()
    expected = sample(with_foreign(model, alone), pos, neg, steps=2, batch=2)
    for ours in (UncoupledRowControl(), NoOpControl()):
        foreign = ChunkingForeignReplace()
        patched = with_foreign(add_control(add_control(model, UncoupledRowControl()), ours), foreign)
        assert torch.equal(expected, sample(patched, pos, neg, steps=2, batch=2))
        assert foreign.batches == alone.batches and set(foreign.batches) == {4}
