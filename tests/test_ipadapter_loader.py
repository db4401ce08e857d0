"""IP-Adapter files: every released key layout loads (tiny widths), malformed files are
rejected with clear errors, pickled code never runs, family mismatches name both sides."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch

from qkv_control.ipadapter.files import load_file, parse_state
from qkv_control.ipadapter.model import IPAdapterModel
from qkv_control.ipadapter.projection import build_projection
from qkv_control.patching.layers import discover_layers
from qkv_control.tiny.ipadapter_files import FILES, adapter_state, save, write_ipadapter_files
from qkv_control.tiny.models import TEXT_WIDTH, tiny_checkpoint, tiny_clip_vision

EXPECTED = {  # projection kind -> (tokens, CLIP output it reads)
    "linear": (4, "image_embeds"),
    "resampler": (16, "penultimate_hidden_states"),
}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_ipadapter_files(models)
    return models / "ipadapter"


@pytest.mark.parametrize("name", list(FILES))
def test_every_released_layout_loads(adapter_dir, name):
    family, kind = FILES[name]
    adapter = IPAdapterModel(load_file(str(adapter_dir / name)), name)
    tokens, source = EXPECTED[kind]
    assert adapter.info["kind"] == kind and adapter.info["tokens"] == tokens and adapter.info["input"] == source
    assert adapter.layer_count == (16 if family == "sd15" else 22)
    model = tiny_checkpoint(family)[0]
    mapping = adapter.layer_map(discover_layers(model), TEXT_WIDTH, "test")
    assert len(mapping) == adapter.layer_count


def test_file_formats_hold_the_real_key_names(adapter_dir):
    import safetensors.torch

    flat = safetensors.torch.load_file(str(adapter_dir / "ip-adapter-plus_sd15.safetensors"))
    assert "image_proj.latents" in flat and "image_proj.layers.3.1.3.weight" in flat
    assert "ip_adapter.1.to_k_ip.weight" in flat and "ip_adapter.31.to_v_ip.weight" in flat
    nested = torch.load(adapter_dir / "ip-adapter_sd15.bin", weights_only=True)
    assert set(nested) == {"image_proj", "ip_adapter"} and "proj.weight" in nested["image_proj"]


def test_bin_and_safetensors_of_one_state_give_the_same_tokens(tmp_path):
    state = adapter_state("sd15", "resampler", seed=3)
    save(state, tmp_path / "a.bin")
    save(state, tmp_path / "a.safetensors")
    features = torch.randn(1, 17, 64)
    a = IPAdapterModel(load_file(str(tmp_path / "a.bin"))).tokens_from_features(features)
    b = IPAdapterModel(load_file(str(tmp_path / "a.safetensors"))).tokens_from_features(features)
    assert torch.equal(a, b)


def reference_resampler(state, x, heads):
    """The Perceiver resampler written out from the released weights' structure."""

    def ln(t, p):
        return torch.nn.functional.layer_norm(t, t.shape[-1:], state[p + ".weight"], state[p + ".bias"])

    latents = state["latents"].expand(x.shape[0], -1, -1)
    x = x @ state["proj_in.weight"].t() + state["proj_in.bias"]
    depth = len([k for k in state if k.endswith(".0.to_q.weight")])
    for i in range(depth):
        p = f"layers.{i}."
        xn, ln_ = ln(x, p + "0.norm1"), ln(latents, p + "0.norm2")
        q = ln_ @ state[p + "0.to_q.weight"].t()
        kv = torch.cat([xn, ln_], 1) @ state[p + "0.to_kv.weight"].t()
        k, v = kv.chunk(2, -1)
        b, n, inner = q.shape
        d = inner // heads
        qh, kh, vh = (t.reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(d))  # the official code scales q and k by d^-1/4 each
        w = ((qh * scale) @ (kh * scale).transpose(-1, -2)).softmax(-1)
        out = (w @ vh).transpose(1, 2).reshape(b, n, inner) @ state[p + "0.to_out.weight"].t()
        latents = latents + out
        h = ln(latents, p + "1.0") @ state[p + "1.1.weight"].t()
        latents = latents + torch.nn.functional.gelu(h) @ state[p + "1.3.weight"].t()
    out = latents @ state["proj_out.weight"].t() + state["proj_out.bias"]
    return ln(out, "norm_out")


def test_resampler_and_linear_match_reference_formulas():
    state = adapter_state("sd15", "resampler", seed=5)["image_proj"]
    module, info = build_projection(state)
    x = torch.randn(2, 17, 64)
    torch.testing.assert_close(module(x), reference_resampler(state, x, heads=1), atol=1e-5, rtol=1e-4)
    state = adapter_state("sd15", "linear", seed=6)["image_proj"]
    module, info = build_projection(state)
    e = torch.randn(2, 64)
    y = (e @ state["proj.weight"].t() + state["proj.bias"]).reshape(2, 4, 64)
    expected = torch.nn.functional.layer_norm(y, (64,), state["norm.weight"], state["norm.bias"])
    torch.testing.assert_close(module(e), expected, atol=1e-5, rtol=1e-4)


def test_real_sizes_are_recognised_from_shapes():
    """Layout detection on the released shapes (image_proj only; ip-adapter_sd15 and plus_sdxl_vit-h)."""
    linear = {"proj.weight": torch.zeros(4 * 768, 1024), "proj.bias": torch.zeros(4 * 768),
              "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)}
    _, info = build_projection(linear)
    assert (info["tokens"], info["cross_dim"], info["embed_dim"]) == (4, 768, 1024)
    dim, inner = 1280, 1280
    resampler = {"latents": torch.zeros(1, 16, dim), "proj_in.weight": torch.zeros(dim, 1280),
                 "proj_in.bias": torch.zeros(dim), "proj_out.weight": torch.zeros(2048, dim),
                 "proj_out.bias": torch.zeros(2048), "norm_out.weight": torch.ones(2048),
                 "norm_out.bias": torch.zeros(2048)}
    for i in range(4):
        p = f"layers.{i}."
        resampler.update({p + "0.norm1.weight": torch.ones(dim), p + "0.norm1.bias": torch.zeros(dim),
                          p + "0.norm2.weight": torch.ones(dim), p + "0.norm2.bias": torch.zeros(dim),
                          p + "0.to_q.weight": torch.zeros(inner, dim), p + "0.to_kv.weight": torch.zeros(2 * inner, dim),
                          p + "0.to_out.weight": torch.zeros(dim, inner), p + "1.0.weight": torch.ones(dim),
                          p + "1.0.bias": torch.zeros(dim), p + "1.1.weight": torch.zeros(4 * dim, dim),
                          p + "1.3.weight": torch.zeros(dim, 4 * dim)})
    module, info = build_projection(resampler)
    assert (info["tokens"], info["cross_dim"], info["embed_dim"]) == (16, 2048, 1280)
    assert module.layers[0][0].heads == 20  # plus_sdxl_vit-h: 20 heads of 64


def _renumber(ip_adapter, old, new):
    for kind in ("k", "v"):
        ip_adapter[f"{new}.to_{kind}_ip.weight"] = ip_adapter.pop(f"{old}.to_{kind}_ip.weight")


def _state():
    return adapter_state("sd15", "linear", seed=1)


@pytest.mark.parametrize("break_it, message", [
    (lambda s: s.pop("image_proj"), "expected 'image_proj"),
    (lambda s: s.pop("ip_adapter"), "expected 'ip_adapter.N.to_k_ip.weight' weights"),
    (lambda s: s["ip_adapter"].pop("3.to_v_ip.weight"), "expected to_k_ip and to_v_ip for ip_adapter.3"),
    (lambda s: _renumber(s["ip_adapter"], 31, 33), "numbered 1, 3, 5"),
    (lambda s: s["ip_adapter"].update({"1.to_k_lora.down.weight": torch.zeros(4, 64)}), "FaceID"),
    (lambda s: s["ip_adapter"].update({"1.to_v_ip.weight": torch.zeros(32, 48)}), "of one shape"),
    (lambda s: s["image_proj"].pop("norm.weight"), "known IP-Adapter layout"),
    (lambda s: s["image_proj"].pop("proj.bias"), "image_proj keys"),
])
def test_malformed_files_are_rejected(tmp_path, break_it, message):
    state = _state()
    break_it(state)
    path = tmp_path / "broken.safetensors"
    save(state, path)
    with pytest.raises(ValueError, match=message):
        IPAdapterModel(load_file(str(path)), "broken")


def test_truncated_safetensors_and_garbage_are_rejected(tmp_path):
    path = tmp_path / "cut.safetensors"
    save(_state(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="expected a valid safetensors file"):
        load_file(str(path))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="IP-Adapter file garbage.bin"):
        load_file(str(garbage))


class _Payload:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# torch warns that the hostile file uses pickle protocol 4: expected, the file is refused anyway.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_code_never_runs(tmp_path):
    marker = tmp_path / "the_code_ran"
    path = tmp_path / "evil.bin"
    state = _state()
    state["extra"] = _Payload(marker)
    with open(path, "wb") as fh:
        pickle.dump(state, fh)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_file(str(path))
    assert not marker.exists()


def test_family_mismatch_names_both(adapter_dir):
    adapter = IPAdapterModel(load_file(str(adapter_dir / "ip-adapter_sd15.safetensors")))
    sdxl = tiny_checkpoint("sdxl")[0]
    with pytest.raises(ValueError, match=r"weights are for a model with 16 cross-attention layers.*; the model is "
                                         r"a model with 22 cross-attention layers"):
        adapter.layer_map(discover_layers(sdxl), TEXT_WIDTH, "QKV IP-Adapter Apply")
    with pytest.raises(ValueError, match=r"are for a model with 16 .*width 64; the model is SD1.5 \(16 .*width 768\)"):
        adapter.layer_map(discover_layers(tiny_checkpoint("sd15")[0]), 768, "QKV IP-Adapter Apply")


def test_real_family_names_in_errors():
    state = parse_state(adapter_state("sd15", "linear", widths=(320,) * 16, cross_dim=768))
    adapter = IPAdapterModel(state)
    with pytest.raises(ValueError, match=r"weights are for SD1.5 \(16 cross-attention layers, context width 768\); "
                                         r"the model is a model with 22"):
        adapter.layer_map(discover_layers(tiny_checkpoint("sdxl")[0]), 2048, "QKV IP-Adapter Apply")


def test_attention_width_mismatch_names_both_shapes():
    """Layer count and context width match, the attention widths do not: the error names the model's
    family and both widths."""
    state = parse_state(adapter_state("sd15", "linear", widths=(96,) * 16, cross_dim=TEXT_WIDTH))
    model = tiny_checkpoint("sd15")[0]
    with pytest.raises(ValueError, match=r"for another model than a model with 16 cross-attention layers, context "
                                         r"width 64: ip_adapter.1 projects to width 96, the model.s layer .* has "
                                         r"width 32"):
        IPAdapterModel(state).layer_map(discover_layers(model), TEXT_WIDTH, "QKV IP-Adapter Apply")


def test_clip_vision_width_mismatch_names_both(adapter_dir):
    adapter = IPAdapterModel(load_file(str(adapter_dir / "ip-adapter_sd15.safetensors")))
    with pytest.raises(ValueError, match=r"image_embeds of width 64 .*gives 1024 \(ViT-H\)"):
        adapter.tokens_from_features(torch.zeros(1, 1024))
    tokens = adapter.encode(tiny_clip_vision(0), torch.rand(2, 56, 56, 3))
    assert tokens.cond.shape == (1, 8, 64)  # two images -> one 8-token prompt
    assert tokens.uncond.shape == (1, 8, 64)


def test_ipadapter_folder_keeps_paths_from_extra_model_paths(monkeypatch, tmp_path):
    import folder_paths

    from qkv_control.nodes import ip_adapter_nodes

    # extra_model_paths.yaml creates the entry with no extensions before custom nodes load
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ipadapter", ([str(tmp_path)], set()))
    ip_adapter_nodes.register_folder()
    paths, extensions = folder_paths.folder_names_and_paths["ipadapter"]
    assert paths[0] == str(tmp_path) and os.path.join(folder_paths.models_dir, "ipadapter") in paths
    assert {".bin", ".safetensors"} <= extensions


def test_nodes_have_help_pages_and_tooltips():
    from pathlib import Path

    from qkv_control.nodes.ip_adapter_nodes import NODES

    docs = Path(__file__).resolve().parents[1] / "web" / "docs"
    for node in NODES:
        schema = node.define_schema()
        assert schema.node_id.startswith("QKV") and schema.description
        assert (docs / f"{schema.node_id}.md").is_file(), schema.node_id
        for item in list(schema.inputs) + list(schema.outputs):
            assert item.tooltip, f"{schema.node_id}.{getattr(item, 'id', '?')} has no tooltip"


def test_fp16_files_load_as_released(tmp_path):
    """The released files are fp16: K/V weights stay fp16 (cast per layer when used), the
    projection runs in float32."""
    state = adapter_state("sd15", "resampler", seed=2)
    half = {group: {k: v.half() for k, v in values.items()} for group, values in state.items()}
    save(half, tmp_path / "half.safetensors")
    adapter = IPAdapterModel(load_file(str(tmp_path / "half.safetensors")))
    assert adapter.kv[1][0].dtype == torch.float16
    tokens = adapter.tokens_from_features(torch.randn(1, 17, 64))
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
