"""A full-size random SD1.5 checkpoint through the real CheckpointLoaderSimple (slow)."""

import pytest
import torch

import folder_paths
import nodes as comfy_nodes

from qkv_control.attention.layers import select_layers
from qkv_control.patching.control import AttentionControl
from qkv_control.patching.layers import discover_layers
from qkv_control.patching.patch import add_control
from qkv_control.tiny.full_size import write_random_sd15_checkpoint
from helpers import sample

pytestmark = pytest.mark.slow


class HalveDecoderSelfAttention(AttentionControl):
    def select_layers(self, layers):
        return select_layers("output", layers, "attn1")

    def attend(self, call, q, k, v, attend_next):
        return attend_next(q, k, v) * 0.5


class PassThrough(AttentionControl):
    def select_layers(self, layers):
        return select_layers("all", layers, "attn1") + select_layers("all", layers, "attn2")


@pytest.fixture(scope="module")
def full_sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    write_random_sd15_checkpoint(folder / "random-sd15.safetensors")
    folder_paths.add_model_folder_path("checkpoints", str(folder), is_default=True)
    model, _, _ = comfy_nodes.CheckpointLoaderSimple().load_checkpoint("random-sd15.safetensors")[:3]
    return model


def test_real_loader_gives_the_sd15_block_structure_and_controls_work(full_sd15):
    layers = discover_layers(full_sd15)
    attn1 = [layer for layer in layers if layer.kind == "attn1"]
    assert [layer.block for layer in attn1] == [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", i) for i in range(3, 12)]
    assert all(layer.heads == 8 and layer.dim_head in (40, 80, 160) for layer in attn1)
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    pos, neg = [[context, {}]], [[torch.zeros_like(context), {}]]
    plain = sample(full_sd15, pos, neg, steps=1, size=8)
    assert torch.equal(plain, sample(add_control(full_sd15, PassThrough()), pos, neg, steps=1, size=8))
    changed = sample(add_control(full_sd15, HalveDecoderSelfAttention()), pos, neg, steps=1, size=8)
    assert not torch.allclose(plain, changed)
