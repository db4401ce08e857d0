"""The reference K/V bank through the real ComfyUI server (its default: on, automatic budget): a
re-queued InDetail-IP workflow with a new seed and a new prompt and the same reference is warm
(the run's log line says so), the Reference K/V Bank node reports the bank, and A-B-A holds; the
budget set in ComfyUI's settings (through ComfyUI's own ``POST /settings/<id>``) is the one in force
for a prompt queued through the HTTP API, below the node's own budget, and a bad value falls through
with a warning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from qkv_control.inversion import kv_bank

pytestmark = pytest.mark.server

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "indetail_ip_cross_prompt.json"
# Steps no other workflow of the suite uses, so this test's reference stream is its own.
STEPS = 10
BANK_NODE = "90"


def _prompt(server, seed: int, text: str, budget_mb: int = 512) -> dict:
    prompt = server.api_prompt(WORKFLOW)
    by_type = {node["class_type"]: node_id for node_id, node in prompt.items()}
    inversion, sampler, adain = by_type["QKVDDIMInversion"], by_type["KSamplerAdvanced"], by_type["QKVAdaINNoise"]
    prompt[inversion]["inputs"]["steps"] = STEPS
    prompt[sampler]["inputs"]["steps"] = STEPS
    prompt[sampler]["inputs"]["noise_seed"] = seed
    prompt[adain]["inputs"]["seed"] = seed
    positive = prompt[sampler]["inputs"]["positive"][0]
    prompt[positive]["inputs"]["text"] = text
    # The bank node between the model chain and AdaIN Noise (which hands the model to the sampler).
    prompt[BANK_NODE] = {"class_type": "QKVReferenceKVBank",
                         "inputs": {"model": prompt[adain]["inputs"]["model"], "enabled": True, "budget_mb": budget_mb}}
    prompt[adain]["inputs"]["model"] = [BANK_NODE, 0]
    return prompt


def _run(server, prompt) -> tuple[dict, str, np.ndarray]:
    """(history entry, the server log written during the run, the saved image's pixels)."""
    start = len(server.log_text())
    entry = server.run(prompt, tiny=False)
    log = server.log_text()[start:]
    (path,) = [p for p in server.output_paths(entry) if p.suffix == ".png"]
    return entry, log, np.asarray(Image.open(path).convert("RGB"))


def _bank_line(log: str) -> str:
    lines = [line for line in log.splitlines() if "reference K/V bank" in line]
    assert len(lines) == 1, f"expected one bank line per run, got {lines}"
    return lines[0]


def test_requeued_workflow_is_warm_and_a_b_a_holds(comfy_server):
    first, log, _ = _run(comfy_server, _prompt(comfy_server, 1, "a cat sitting on a sofa"))
    assert re.search(rf"InDetail-IP reference: \d+ of {STEPS} step\(s\) from the bank", _bank_line(log))
    status = first["outputs"][BANK_NODE]["text"][0]
    assert status.startswith("on: budget 512 MiB (the Reference K/V Bank node)"), status

    # Same reference, new seed and new prompt: no reference row at any step.
    _, log, a_warm = _run(comfy_server, _prompt(comfy_server, 2, "a dog on a beach"))
    line = _bank_line(log)
    assert f"InDetail-IP reference: {STEPS} of {STEPS} step(s) from the bank, 0 computed" in line, line

    # A-B-A: A, then B (another prompt), then A again: identical images.
    _, _, a = _run(comfy_server, _prompt(comfy_server, 3, "a red fox"))
    _run(comfy_server, _prompt(comfy_server, 4, "a lighthouse at night"))
    _, log, a_again = _run(comfy_server, _prompt(comfy_server, 3, "a red fox"))
    assert np.array_equal(a, a_again)
    assert a.std() > 1.0 and not np.array_equal(a, a_warm)


def _set_setting(server, value) -> None:
    """Through ComfyUI's own settings route, as the frontend stores it (None: unset)."""
    # The body as JSON text: requests sends no body for json=None.
    response = requests.post(f"{server.url}/settings/{kv_bank.SETTING_BUDGET}", data=json.dumps(value),
                             headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 200, response.text
    assert requests.get(f"{server.url}/settings/{kv_bank.SETTING_BUDGET}", timeout=10).json() == value


def test_the_settings_budget_is_in_force_below_the_nodes(comfy_server):
    """No browser: the setting stored through ``POST /settings/<id>`` is read when the queued run
    starts (the node's text and the run's line say 384 MiB and where it comes from); the node's own
    non-zero budget wins over it; a bad value logs a warning naming the setting and falls through to
    the server's ``$QKV_KV_BANK_MB=auto`` (the automatic budget)."""
    source = f"ComfyUI setting {kv_bank.SETTING_BUDGET_NAME}"
    try:
        _set_setting(comfy_server, 384)
        entry, log, _ = _run(comfy_server, _prompt(comfy_server, 5, "a boat", budget_mb=0))
        assert entry["outputs"][BANK_NODE]["text"][0].startswith(f"on: budget 384 MiB ({source})")
        assert _bank_line(log).endswith("budget 384 MiB")

        entry, log, _ = _run(comfy_server, _prompt(comfy_server, 5, "a boat", budget_mb=448))
        assert entry["outputs"][BANK_NODE]["text"][0].startswith("on: budget 448 MiB (the Reference K/V Bank node)")
        assert _bank_line(log).endswith("budget 448 MiB")

        _set_setting(comfy_server, "lots")
        entry, log, _ = _run(comfy_server, _prompt(comfy_server, 5, "a boat", budget_mb=0))
        status = entry["outputs"][BANK_NODE]["text"][0]
        assert "(automatic: a quarter of the RAM available)" in status, status
        warnings = [line for line in log.splitlines() if kv_bank.SETTING_BUDGET in line]
        assert warnings and "expected the ComfyUI setting" in warnings[0] and "got 'lots'" in warnings[0], warnings
        assert "budget 384 MiB" not in _bank_line(log)
    finally:
        _set_setting(comfy_server, None)
