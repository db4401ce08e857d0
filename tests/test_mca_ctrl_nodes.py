"""MCA-Ctrl nodes in-process: wiring, validation messages, what they say before sampling, tiny SD1.5."""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import encode, inverted_pair, sample
from qkv_control.nodes.mca_ctrl_nodes import QKVMCACtrlGenerate, QKVMCACtrlReplace
from qkv_control.patching.patch import registered_controls

SIZE = 16
STEPS = 3
PROMPT = "a photo of a dog on the beach"


@pytest.fixture(scope="module")
def kit():
    from qkv_control.tiny.models import tiny_checkpoint
    model, clip, _ = tiny_checkpoint("sd15")
    subject, scene = inverted_pair(model, SIZE, STEPS)
    mask = torch.zeros((1, SIZE * 8, SIZE * 8))
    mask[:, 32:96, 32:96] = 1
    return {"model": model, "clip": clip, "subject": subject, "scene": scene, "mask": mask,
            "positive": encode(clip, PROMPT), "negative": encode(clip, "")}


SCHEDULE = {"sagi_steps": 0.34, "salq_end": 1.0, "order": "sagi_first", "salq_layers": "all",
            "sagi_layers": "all", "subject_dilation": 1}


def _replace(kit, target_mask=None, **schedule):
    target = kit["mask"] if target_mask is None else target_mask
    return QKVMCACtrlReplace.execute(kit["model"], kit["subject"], kit["mask"], kit["scene"], target,
                                     target_dilation=1, **dict(SCHEDULE, **schedule)).args[0]


def test_replace_node_patches_a_clone(kit):
    """The node returns a patched clone: the model given keeps no control and samples exactly as
    before, and the clone's output differs from the plain model's by more than 5% of its scale."""
    before = sample(kit["model"], kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    model = _replace(kit)
    assert model is not kit["model"] and not registered_controls(kit["model"])
    assert len(registered_controls(model)) == 1
    after = sample(kit["model"], kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    out = sample(model, kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
    assert float((out - before).abs().max()) > 0.05 * float(before.abs().max())


def test_generate_node_automatic_mask(kit, caplog):
    """Without a target mask: the subject word's tokens of the node's prompt, the automatic mask,
    step 0 plain (no stream row, no layer changed), SAGI then SALQ; no warning when the
    positive prompt is the node's prompt, one when it is another."""
    (model,) = QKVMCACtrlGenerate.execute(kit["model"], kit["clip"], kit["subject"], kit["mask"], PROMPT, "dog",
                                          0.3, **SCHEDULE).args
    control = registered_controls(model)[0]
    assert control.automatic_mask and control.masks.auto.subject_tokens == (5,)
    steps = []
    original = control._mca_attention

    def spy(call, phase, *args):
        steps.append((call.run.clock.step(call.sigma_value), phase))
        return original(call, phase, *args)

    control._mca_attention = spy
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        sample(model, kit["positive"], kit["negative"], steps=STEPS, size=SIZE)
        assert "not the node's condition_prompt" not in caplog.text
        assert {s for s, _ in steps} == {1, 2} and {(1, "sagi"), (2, "salq")} == set(steps)
        sample(model, encode(kit["clip"], "a dog"), kit["negative"], steps=STEPS, size=SIZE)
    assert "not the node's condition_prompt" in caplog.text


def test_validation_messages(kit):
    bad = dict(SCHEDULE, sagi_steps=0.8, salq_end=0.5)
    assert "sagi_fraction <= salq_end" in QKVMCACtrlReplace.validate_inputs(**bad)
    with pytest.raises(ValueError, match="MCA-Ctrl Subject Replace / Add: salq_layers: block spec"):
        _replace(kit, salq_layers="output:99")
    with pytest.raises(ValueError, match="expected the word 'cat' in the prompt"):
        QKVMCACtrlGenerate.execute(kit["model"], kit["clip"], kit["subject"], kit["mask"], "a dog", "cat", 0.3,
                                   **SCHEDULE)
    with pytest.raises(ValueError, match="subject mask with the subject image's aspect ratio"):
        QKVMCACtrlReplace.execute(kit["model"], kit["subject"], torch.ones((1, 64, 128)), kit["scene"],
                                  kit["mask"], target_dilation=1, **SCHEDULE)
    with pytest.raises(ValueError, match=r"MCA-Ctrl Subject Replace / Add: expected a subject mask with a "
                                         r"foreground \(pixels >= 0.5\), got none \(largest value 0.400\)"):
        QKVMCACtrlReplace.execute(kit["model"], kit["subject"], torch.full((1, 128, 128), 0.4), kit["scene"],
                                  kit["mask"], target_dilation=1, **SCHEDULE)


@pytest.mark.parametrize("fill, said", [(0.0, "nothing is replaced"), (1.0, "covers the whole image")])
def test_replace_node_says_what_an_empty_or_full_target_mask_does(kit, caplog, fill, said):
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        _replace(kit, target_mask=torch.full((1, 128, 128), fill))
    assert said in caplog.text and "MCA-Ctrl Subject Replace / Add" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        _replace(kit)
    assert not caplog.text


@pytest.mark.parametrize("fill, said", [(0.0, "plain generation"), (1.0, "covers the whole image")])
def test_generate_node_says_what_an_empty_or_full_target_mask_does(kit, caplog, fill, said):
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        QKVMCACtrlGenerate.execute(kit["model"], kit["clip"], kit["subject"], kit["mask"], PROMPT, "dog", 0.3,
                                   target_mask=torch.full((1, 128, 128), fill), **SCHEDULE)
    assert said in caplog.text and "MCA-Ctrl Subject Generation" in caplog.text
