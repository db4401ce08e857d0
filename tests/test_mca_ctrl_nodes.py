"""MCA-Ctrl nodes in-process: wiring, validation messages, guidance policy, tiny SD1.5."""

from __future__ import annotations

import pytest
import torch

from helpers import encode, sample
from qkv_control.attention.rows import ROLE_UNCOND
from qkv_control.inversion.invert import invert
from qkv_control.nodes.mca_ctrl_nodes import QKVMCACtrlGenerate, QKVMCACtrlReplace
from qkv_control.patching import keys
from qkv_control.patching.image_prompt_policy import ImagePromptPolicy
from qkv_control.patching.patch import registered_controls, set_transformer_option

SIZE = 16
STEPS = 3


@pytest.fixture(scope="module")
def kit():
    from qkv_control.tiny.models import tiny_checkpoint
    model, clip, _ = tiny_checkpoint("sd15")
    g = torch.Generator().manual_seed(1)
    subject, _ = invert(model, torch.randn((1, 4, SIZE, SIZE), generator=g) * 0.5, STEPS, "normal")
    scene, _ = invert(model, torch.randn((1, 4, SIZE, SIZE), generator=g) * 0.5, STEPS, "normal")
    mask = torch.zeros((1, SIZE * 8, SIZE * 8))
    mask[:, 32:96, 32:96] = 1
    return {"model": model, "clip": clip, "subject": subject, "scene": scene, "mask": mask,
            "positive": encode(clip, "a dog"), "negative": encode(clip, "")}


SCHEDULE = {"sagi_steps": 0.34, "salq_end": 1.0, "order": "sagi_first", "salq_layers": "all",
            "sagi_layers": "all", "subject_dilation": 3}


def test_replace_node_patches_a_clone(kit):
    (model,) = QKVMCACtrlReplace.execute(kit["model"], kit["subject"], kit["mask"], kit["scene"], kit["mask"],
                                         target_dilation=1, **SCHEDULE).args
    assert model is not kit["model"] and not registered_controls(kit["model"])
    assert len(registered_controls(model)) == 1
    out = sample(model, kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    assert torch.isfinite(out).all()


def test_generate_node_automatic_mask(kit):
    (model,) = QKVMCACtrlGenerate.execute(kit["model"], kit["clip"], kit["subject"], kit["mask"],
                                          "a photo of a dog on the beach", "dog", 0.3, 1.0, **SCHEDULE).args
    control = registered_controls(model)[0]
    assert control.automatic_mask and control.masks.auto.subject_tokens == (5,)
    acted = []
    original = control._mca_attention
    control._mca_attention = lambda call, phase, *a: acted.append(phase) or original(call, phase, *a)
    out = sample(model, kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    assert torch.isfinite(out).all() and {"sagi", "salq"} <= set(acted)


def test_validation_messages(kit):
    bad = dict(SCHEDULE, sagi_steps=0.8, salq_end=0.5)
    assert "sagi_fraction <= salq_end" in QKVMCACtrlReplace.validate_inputs(**bad)
    with pytest.raises(ValueError, match="MCA-Ctrl Subject Replace / Add: salq_layers: block spec"):
        QKVMCACtrlReplace.execute(kit["model"], kit["subject"], kit["mask"], kit["scene"], kit["mask"],
                                  target_dilation=1, **dict(SCHEDULE, salq_layers="output:99"))
    with pytest.raises(ValueError, match="expected the word 'cat' in the prompt"):
        QKVMCACtrlGenerate.execute(kit["model"], kit["clip"], kit["subject"], kit["mask"], "a dog", "cat", 0.3, 1.0,
                                   **SCHEDULE)
    with pytest.raises(ValueError, match="subject mask with the subject image's aspect ratio"):
        QKVMCACtrlReplace.execute(kit["model"], kit["subject"], torch.ones((1, 64, 128)), kit["scene"],
                                  kit["mask"], target_dilation=1, **SCHEDULE)
    with pytest.raises(ValueError, match="subject mask with a foreground"):
        QKVMCACtrlReplace.execute(kit["model"], kit["subject"], torch.zeros((1, 128, 128)), kit["scene"],
                                  kit["mask"], target_dilation=1, **SCHEDULE)


@pytest.mark.parametrize("mode,negative_controlled", [("positive_only", False), ("both", True)])
def test_guidance_policy_decides_the_negative_branch(kit, mode, negative_controlled):
    (model,) = QKVMCACtrlReplace.execute(kit["model"], kit["subject"], kit["mask"], kit["scene"], kit["mask"],
                                         target_dilation=1, **SCHEDULE).args
    model = set_transformer_option(model, keys.IMAGE_PROMPT_POLICY, ImagePromptPolicy(mode))
    control = registered_controls(model)[0]
    roles = set()
    original = control._mca_attention

    def spy(call, phase, masks, targets, *a):
        roles.update(call.layout.rows[i].role for i in targets)
        return original(call, phase, masks, targets, *a)

    control._mca_attention = spy
    sample(model, kit["positive"], kit["negative"], steps=2, size=SIZE)
    assert (ROLE_UNCOND in roles) == negative_controlled and "cond" in roles
