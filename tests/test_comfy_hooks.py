"""The ComfyUI hooks the pack relies on (patching/comfy_hooks.py): all found on the ComfyUI under
test, what the probes claim matches what a real sampling run delivers, and a missing hook (simulated
on the real ComfyUI, in this test only) turns every node into one that registers and fails at
execute with one message naming the hook and the supported range."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import comfy.ldm.modules.attention
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
from comfy.patcher_extension import WrappersMP
from helpers import encode, sample
from qkv_control.nodes import registry
from qkv_control.patching import comfy_hooks
from qkv_control.patching.comfy_hooks import HOOKS, SUPPORTED_COMFYUI, TESTED_COMFYUI, MissingComfyUIHook
from qkv_control.tiny.models import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def probe_again():
    """Probe afresh before and after the test (the result is cached for the process)."""
    comfy_hooks.missing_hooks.cache_clear()
    yield
    comfy_hooks.missing_hooks.cache_clear()


def _module_nodes() -> list[type]:
    return [n for m in registry.NODE_MODULES for n in importlib.import_module(f"qkv_control.nodes.{m}").NODES]


def test_every_hook_is_found_on_this_comfyui(probe_again, comfyui_path):
    assert comfy_hooks.missing_hooks() == (), f"ComfyUI at {comfyui_path}"
    # Nothing missing: the very node classes, no wrapper.
    assert registry.collect_nodes() == _module_nodes()


def test_probed_keys_and_hooks_are_what_a_sampling_run_delivers():
    """The probes read ComfyUI's source; this runs the real sampler and records what reaches the
    pack's kind of patches, so a probe that claims a key ComfyUI does not deliver fails here."""
    model, clip, _ = tiny_checkpoint("sd15")
    m = model.clone()
    seen = {"keys": set(), "wrappers": set(), "override": 0}

    def attn1_replace(q, k, v, extra_options):
        seen["keys"] |= set(extra_options)
        return comfy.ldm.modules.attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                               transformer_options=extra_options)

    def override(func, *args, **kwargs):
        seen["override"] += 1
        return func(*args, **kwargs)

    def wrapper(kind):
        def wrap(executor, *args, **kwargs):
            seen["wrappers"].add(kind)
            return executor(*args, **kwargs)
        return wrap

    m.set_model_attn1_replace(attn1_replace, "output", 3)
    m.model_options["transformer_options"]["optimized_attention_override"] = override
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "probe", wrapper("outer_sample"))
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "probe", wrapper("apply_model"))
    sample(m, encode(clip, "a"), encode(clip, ""), steps=2, size=8)
    assert {"cond_or_uncond", "sigmas", "sample_sigmas", "original_shape", "activations_shape",
            "n_heads"} <= seen["keys"]
    assert seen["wrappers"] == {"outer_sample", "apply_model"}
    assert seen["override"] > 0


def _one_node_message(nodes, hook_name: str):
    """Every node registers with its own schema and fails at execute with one message."""
    originals = {n.define_schema().node_id: n for n in _module_nodes()}
    assert sorted(n.define_schema().node_id for n in nodes) == sorted(originals)
    for node in nodes:
        schema = node.define_schema()
        assert issubclass(node, originals[schema.node_id]) and node.__name__ == originals[schema.node_id].__name__
        with pytest.raises(MissingComfyUIHook) as caught:
            node.EXECUTE_NORMALIZED()  # what ComfyUI's executor calls
        message = str(caught.value)
        assert message.startswith(f"{schema.display_name}: this ComfyUI lacks what QKV Control relies on: ")
        assert hook_name in message and f"supports ComfyUI {SUPPORTED_COMFYUI}" in message
        assert message.count("supports ComfyUI") == 1


def test_missing_patcher_wrapper_fails_every_node_by_name(probe_again, monkeypatch, caplog):
    monkeypatch.delattr(WrappersMP, "OUTER_SAMPLE")
    with caplog.at_level("ERROR", logger="qkv_control"):
        nodes = asyncio.run(registry.QKVControlExtension().get_node_list())
    assert [h.name for h in comfy_hooks.missing_hooks()] == ["patcher wrappers (OUTER_SAMPLE, APPLY_MODEL)"]
    _one_node_message(nodes, "patcher wrappers (OUTER_SAMPLE, APPLY_MODEL)")
    # One log line at load, no traceback.
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and "will not run" in errors[0].getMessage()


def test_missing_attention_override_fails_every_node_by_name(probe_again, monkeypatch):
    monkeypatch.delattr(comfy.ldm.modules.attention, "wrap_attn")
    _one_node_message(registry.collect_nodes(), "attention override (optimized_attention_override)")


def test_unet_that_does_not_set_original_shape_is_found_missing(probe_again, monkeypatch, tmp_path):
    """The real UNet module, its source without the lines that set ``original_shape``."""
    source = inspect.getsource(openaimodel)
    lines = [line for line in source.splitlines() if '"original_shape"' not in line]
    assert len(lines) < len(source.splitlines())
    patched = tmp_path / "openaimodel.py"
    patched.write_text("\n".join(lines))
    monkeypatch.setattr(openaimodel, "__file__", str(patched))
    assert [h.name for h in comfy_hooks.missing_hooks()] == ["transformer_options original_shape"]
    _one_node_message(registry.collect_nodes(), "transformer_options original_shape")


def test_a_probe_that_raises_counts_as_missing_and_never_breaks_loading(probe_again, monkeypatch):
    def broken():
        raise AttributeError("changed API")

    monkeypatch.setattr(comfy_hooks, "HOOKS", (comfy_hooks.Hook("x", "y", broken),) + HOOKS)
    assert [h.name for h in comfy_hooks.missing_hooks()] == ["x"]


def test_supported_range_is_stated_once_and_tested_at_its_minimum(comfyui_path):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["comfy"]["requires-comfyui"] == SUPPORTED_COMFYUI
    minimum = re.fullmatch(r">=\s*([\d.]+)", SUPPORTED_COMFYUI).group(1)
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    oldest = re.search(r'^OLDEST_COMFYUI_VERSION="([\d.]+)"', setup, re.M).group(1)
    assert Version(oldest) == Version(minimum) == Version(TESTED_COMFYUI[0])
    assert all(Version(v) in SpecifierSet(SUPPORTED_COMFYUI) for v in TESTED_COMFYUI)
    readme = (ROOT / "README.md").read_text()
    assert f"ComfyUI {SUPPORTED_COMFYUI}" in readme and all(v in readme for v in TESTED_COMFYUI)
    assert f"ComfyUI {SUPPORTED_COMFYUI}" in (ROOT / "docs" / "install.md").read_text()
