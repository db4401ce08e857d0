"""Every failing draw tests/test_fuzz_nodes.py found, as a regular named test.

Fixed in the nodes (local validation): plain tests. Failures whose fix belongs in the method
packages (patching/, attention/, indetail_ip/, mca_ctrl/, ipadapter/, inversion/, localization/) are
``xfail(strict=True)`` with the bug as reason, and listed in ``KNOWN_FAILURES`` (node id,
exception type, message pattern) so the fuzz does not stop on them; when one is fixed its xfail
turns into a failure (strict): drop the mark and its ``KNOWN_FAILURES`` entry.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch

import folder_paths
from helpers import encode, sample
from qkv_control.localization.managed import GROUNDING_DINO_FOLDER, SAM_FOLDER
from qkv_control.nodes import ip_adapter_nodes as ipa
from qkv_control.nodes import text_guidance_nodes as tg
from qkv_control.nodes.ddim_inversion import QKVDDIMInversion
from qkv_control.nodes.localization_nodes import QKVGroundingDinoLoader, QKVSamLoader, QKVTextSegment
from qkv_control.nodes.mca_ctrl_nodes import REPLACE_NAME, QKVMCACtrlReplace
from qkv_control.tiny.ipadapter_files import write_ipadapter_files
from qkv_control.tiny.localization_files import GROUNDING_DINO_FILE, SAM_FILE, write_tiny_localization_files
from qkv_control.tiny.models import cached_clip_vision, tiny_checkpoint

class Known(NamedTuple):
    """A failure the fuzz tolerates until its xfail test below passes."""

    node: str                # node id
    error: type              # exception type (AssertionError: the fuzz's own NaN checks)
    pattern: str             # regex on the message
    when: Callable[[dict], bool] | None = None  # on the drawn widgets, where the message is not enough


KNOWN_FAILURES: dict[str, Known] = {}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression_models")
    write_ipadapter_files(root)
    (root / "ipadapter" / "broken.safetensors").write_bytes(b"\x00" * 64)
    write_tiny_localization_files(root)
    mp = pytest.MonkeyPatch()
    mp.setitem(folder_paths.folder_names_and_paths, "ipadapter", ([str(root / "ipadapter")], {".safetensors", ".bin"}))
    mp.setitem(folder_paths.folder_names_and_paths, GROUNDING_DINO_FOLDER, ([str(root / "grounding-dino")], {".pth"}))
    mp.setitem(folder_paths.folder_names_and_paths, SAM_FOLDER, ([str(root / "sams")], {".pth"}))
    folder_paths.filename_list_cache.clear()
    yield root
    mp.undo()
    folder_paths.filename_list_cache.clear()


def _inversion(h: int, w: int, steps: int, scheduler: str, seed: int):
    model, _, _ = tiny_checkpoint("sd15")
    g = torch.Generator().manual_seed(seed)
    latent = {"samples": torch.randn((1, 4, h, w), generator=g) * 0.5}
    return QKVDDIMInversion.execute(model, latent, steps, scheduler).args[0]


# -- fixed in the nodes ---------------------------------------------------------------------------

@pytest.mark.parametrize("node,args", [
    ("QKVIPAdapterStyleContent", dict(style_layers="output:99=1")),
    ("QKVConditionGuidance", dict(layers="input:7.1")),
    ("QKVMaskGuidance", dict(layers="#999")),
    ("QKVAttentionMap", dict(layers="input:7.1")),
    ("QKVIPAdapterApply", dict(layer_weights="output, -output:3=2.8")),
])
def test_bad_block_or_weight_spec_is_refused_with_the_display_name(model_files, node, args):
    """Found: the IP-Adapter family's errors used a shorter name than the display name, and a
    block spec selecting no layer (or a weight spec item without '=') reached the user as the spec
    parser's bare message (QKV IP-Adapter Apply: only inside the sampler)."""
    model, clip, _ = tiny_checkpoint("sd15")
    adapter = ipa.QKVIPAdapterLoader.execute("ip-adapter_sd15.safetensors").args[0]
    image = torch.rand((1, 56, 56, 3))
    calls = {
        "QKVIPAdapterStyleContent": lambda a: ipa.QKVIPAdapterStyleContent.execute(
            model, adapter, cached_clip_vision(0), image, 1.0, 0.5, "decoupled", 0.0, 1.0,
            a.get("style_layers", "auto"), "auto"),
        "QKVConditionGuidance": lambda a: tg.QKVConditionGuidance.execute(
            model, encode(clip, "a watercolor"), "concat", a["layers"], 0.0, 1.0),
        "QKVMaskGuidance": lambda a: tg.QKVMaskGuidance.execute(
            model, clip, "a photo of a product", "product", 0.5, 0.5, a["layers"], 0.0, 1.0),
        "QKVAttentionMap": lambda a: tg.QKVAttentionMap.execute(
            model, clip, "a photo of a dog", "dog", encode(clip, ""), {"samples": torch.zeros((1, 4, 4, 4))},
            0, 1, 5.0, "ddim", "normal", a["layers"], 1.0),
        "QKVIPAdapterApply": lambda a: ipa.QKVIPAdapterApply.execute(
            model, adapter, cached_clip_vision(0), image, 2.7, "decoupled", 0.0, 1.0, a["layer_weights"]),
    }
    display_name = getattr(ipa, node, None) or getattr(tg, node)
    display_name = display_name.define_schema().display_name
    with pytest.raises(ValueError) as caught:
        calls[node](args)
    assert str(caught.value).startswith(f"{display_name}: ") and "spec" in str(caught.value)


def test_attention_map_without_steps_names_the_node():
    """Found: denoise 0 (no step runs) was refused as 'QKV Word Attention Map', not its display name."""
    model, clip, _ = tiny_checkpoint("sd15")
    with pytest.raises(ValueError, match=r"^QKV Word Attention Map \(sampler\): expected the sampler to run"):
        tg.QKVAttentionMap.execute(model, clip, "a photo of a dog", "dog", encode(clip, ""),
                                    {"samples": torch.zeros((1, 4, 4, 4))}, 0, 1, 0.0, "euler", "simple", "all", 0.0)


def test_broken_ipadapter_file_names_the_loader(model_files):
    """Found: a file that is not a safetensors file was refused without the loader's name."""
    with pytest.raises(ValueError, match=r"^QKV IP-Adapter Loader: IP-Adapter file broken.safetensors: expected a "
                                         r"valid safetensors file"):
        ipa.QKVIPAdapterLoader.execute("broken.safetensors")


@pytest.mark.parametrize("layer_weights", ["input:4-8=-0.67", "all=1, output=-0.5"])
def test_negative_layer_weight_in_joint_mode_is_refused_at_the_node(model_files, layer_weights):
    """Found: weight 5 with a negative layer weight in joint mode passed the node and failed inside
    the sampler with the attention math's message ('joint attention: expected a weight >= 0')."""
    model, _, _ = tiny_checkpoint("sd15")
    adapter = ipa.QKVIPAdapterLoader.execute("ip-adapter-plus_sd15.safetensors").args[0]
    with pytest.raises(ValueError, match=r"^QKV IP-Adapter Apply: expected weight x layer weight >= 0 in every "
                                         r"layer in joint mode"):
        ipa.QKVIPAdapterApply.execute(model, adapter, cached_clip_vision(0), torch.rand((1, 76, 38, 3)), 5.0,
                                      "joint", 0.0, 0.67, layer_weights)
    # The same weights in decoupled mode (a subtraction there is allowed) sample finite latents.
    (patched,) = ipa.QKVIPAdapterApply.execute(model, adapter, cached_clip_vision(0), torch.rand((1, 76, 38, 3)),
                                               5.0, "decoupled", 0.0, 0.67, layer_weights).args
    _, clip, _ = tiny_checkpoint("sd15")
    assert torch.isfinite(sample(patched, encode(clip, "a dog"), encode(clip, ""), steps=2, size=5)).all()


# -- method code -----------------------------------------------------------------------------------

def test_mca_replace_with_a_region_covering_a_coarse_layer():
    steps, scheduler = 3, "karras"
    subject = _inversion(11, 10, steps, scheduler, seed=0)
    scene = _inversion(8, 8, steps, scheduler, seed=1)
    model, clip, _ = tiny_checkpoint("sd15")
    subject_mask = torch.ones((1, 88, 80))
    target = torch.zeros((2, 64, 64))
    target[:, 10:31, 20:41] = 1.0
    try:
        (patched,) = QKVMCACtrlReplace.execute(
            model, subject, subject_mask, scene, target, sagi_steps=1e-38, salq_end=1.0, order="sagi_first",
            salq_layers="up", sagi_layers="all", subject_dilation=9, target_dilation=5).args
    except ValueError as error:  # refused at the node, before sampling: fine if it names the node
        assert str(error).startswith(REPLACE_NAME)
        return
    out = sample(patched, encode(clip, "a dog"), encode(clip, ""), steps=steps, scheduler=scheduler, cfg=1.0,
                 latent=torch.zeros((1, 4, 8, 8)))
    assert torch.isfinite(out).all()


def test_text_segment_at_the_smallest_detection_resolution(model_files):
    gdino = QKVGroundingDinoLoader.execute(GROUNDING_DINO_FILE).args[0]
    sam = QKVSamLoader.execute(SAM_FILE).args[0]
    image = torch.rand((1, 32, 32, 1), generator=torch.Generator().manual_seed(0))
    try:
        masks = QKVTextSegment.execute(gdino, sam, image, "red square", 0.0, 0.0, "union", 0, 64, False).args[0]
    except ValueError as error:
        assert str(error).startswith(QKVTextSegment.DISPLAY_NAME) and "detection" in str(error)
        return
    assert masks.shape == (1, 32, 32) and torch.isfinite(masks).all()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ddim_inversion_kl_optimal_single_step(family):
    model, _, _ = tiny_checkpoint(family)
    latent = {"samples": torch.randn((1, 4, 12, 6), generator=torch.Generator().manual_seed(0)) * 0.5}
    try:
        inversion, z_t = QKVDDIMInversion.execute(model, latent, 1, "kl_optimal").args
    except ValueError as error:
        assert str(error).startswith("QKV DDIM Inversion: ")
        return
    assert torch.isfinite(inversion.chain.latents).all() and torch.isfinite(z_t["samples"]).all()
