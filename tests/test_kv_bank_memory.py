"""The reference K/V bank's memory: where its budget comes from (the node, ComfyUI's settings file,
``$QKV_KV_BANK_MB``, automatic) and what a bad setting does; ComfyUI's free-memory requests
(``comfy.model_management.free_memory``, ``unload_all_models`` and ComfyUI's own ``LoadedModel``
partial unload) giving the bank's compute-device entries back, still served afterwards.

Memory manager tests on CPU: the machine has one device, so the run is told the CPU has a separate
offload device (``reference_kv.separate_offload_device``: the one thing patched, and in one test
ComfyUI's ``get_free_memory``, given a simulated device); everything else is the real path: the room estimate from ComfyUI's functions (RAM standing in for device memory), the
residency registered with ComfyUI's ``load_models_gpu``, and ComfyUI's own free-memory functions.
Entries then count as on the compute device and moving them is the bookkeeping that is tested (both
"devices" are the CPU: no bytes move between memories here).

The settings file is ComfyUI's own (``comfy.settings.json`` in the ``default`` user's folder, as
``app/app_settings.py`` writes it), in a temporary user directory set with ``folder_paths``' own
function; the server-side path (``POST /settings/<id>`` then a queued prompt) is
``tests/test_kv_bank_server.py``.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

import comfy.model_management as mm
import folder_paths
from test_kv_bank import STEPS, assert_warm_equals, indetail, make_kit, run

from qkv_control.inversion import bank_residency, kv_bank, reference_kv
from qkv_control.inversion.kv_bank import BANK, BankSettings
from qkv_control.nodes.kv_bank import QKVReferenceKVBank

SETTING_SOURCE = f"ComfyUI setting {kv_bank.SETTING_BUDGET_NAME}"


@pytest.fixture(scope="module")
def kit():
    return make_kit()


@pytest.fixture
def user_settings(tmp_path, monkeypatch):
    """Writes ComfyUI's settings file of the default user in an empty user directory; the bank on
    (``$QKV_KV_BANK_MB`` 256) and empty."""
    previous = folder_paths.get_user_directory()
    folder_paths.set_user_directory(str(tmp_path))
    monkeypatch.setenv(kv_bank.ENV_BUDGET, "256")
    monkeypatch.setattr(kv_bank, "_warned_setting", None)
    path = os.path.join(folder_paths.get_public_user_directory("default"), "comfy.settings.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(value=None, raw=None):
        with open(path, "w") as f:
            f.write(raw if raw is not None else json.dumps({"Comfy.Other": 1, kv_bank.SETTING_BUDGET: value}))

    BANK.clear()
    yield write
    BANK.clear()
    folder_paths.set_user_directory(previous)


def test_budget_precedence_node_then_setting_then_environment_then_automatic(user_settings, monkeypatch):
    MB = kv_bank.MB
    assert kv_bank.budget_in_force(BankSettings()) == (256 * MB, "$QKV_KV_BANK_MB")  # no settings file
    user_settings(300)
    assert kv_bank.budget_in_force(BankSettings()) == (300 * MB, SETTING_SOURCE)
    assert kv_bank.budget_in_force(BankSettings(budget_mb=64)) == (64 * MB, "the Reference K/V Bank node")
    user_settings(0.5)
    assert kv_bank.budget_in_force(BankSettings()) == (MB // 2, SETTING_SOURCE)
    for unset in (None, 0, "auto", ""):
        user_settings(unset)
        assert kv_bank.budget_in_force(BankSettings()) == (256 * MB, "$QKV_KV_BANK_MB"), unset
    monkeypatch.delenv(kv_bank.ENV_BUDGET)
    budget, source = kv_bank.budget_in_force(BankSettings())
    assert source.startswith("automatic") and budget == kv_bank.automatic_budget_bytes() > 0


@pytest.mark.parametrize("value", ["lots", -3, True, [512], {"mb": 1}, "nan", "inf"])
def test_a_bad_setting_warns_once_naming_it_and_falls_through(user_settings, caplog, value):
    user_settings(value)
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        for _ in range(2):
            assert kv_bank.budget_in_force(BankSettings()) == (256 * kv_bank.MB, "$QKV_KV_BANK_MB")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"expected the ComfyUI setting '{kv_bank.SETTING_BUDGET}'" in warnings[0]
    assert f"got {value!r}" in warnings[0] or f"got '{value}'" in warnings[0], warnings[0]


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]"])
def test_an_unreadable_settings_file_warns_and_falls_through(user_settings, caplog, raw):
    user_settings(raw=raw)
    with caplog.at_level(logging.WARNING, logger="qkv_control"):
        assert kv_bank.budget_in_force(BankSettings()) == (256 * kv_bank.MB, "$QKV_KV_BANK_MB")
    assert any("comfy.settings.json" in r.getMessage() and kv_bank.SETTING_BUDGET in r.getMessage()
               for r in caplog.records)


def test_a_run_reads_the_setting_when_it_starts_and_the_node_says_so(kit, user_settings):
    """The setting changed between two queued runs is the budget of the second: read at the run's
    start, not cached; the node's text names the source in force."""
    model = indetail(kit["model"], kit["reference"])
    user_settings(2)  # 2 MiB: room for the tiny model's 5 steps (0.33 MiB each)
    run(kit, model)
    assert BANK.budget == 2 * kv_bank.MB and BANK.stats().steps == STEPS
    user_settings(0.001)  # below one step: the next run's start evicts down to it
    run(kit, model)
    assert BANK.budget == int(0.001 * kv_bank.MB) and BANK.stats().steps == 0
    status = QKVReferenceKVBank.execute(kit["model"], True, 0).ui["text"][0]
    assert status.startswith(f"on: budget 0 MiB ({SETTING_SOURCE})"), status
    status = QKVReferenceKVBank.execute(kit["model"], True, 128).ui["text"][0]
    assert status.startswith("on: budget 128 MiB (the Reference K/V Bank node)"), status


# ------------------------------------------------------------------ ComfyUI's memory manager

@pytest.fixture
def device_bank(monkeypatch):
    """The bank on (256 MiB) with a separate offload device (see the module docstring) and
    ComfyUI's smart memory on (its default; the suite's conftest turns it off); ComfyUI's list of
    loaded models emptied afterwards with its own ``unload_all_models``."""
    monkeypatch.setenv(kv_bank.ENV_BUDGET, "256")
    monkeypatch.setattr(reference_kv, "separate_offload_device", lambda device, offload: True)
    monkeypatch.setattr(reference_kv, "DEVICE_RESERVE_SHARE", 0.0)  # RAM stands in: no VAE decode to leave room for
    monkeypatch.setattr(mm, "DISABLE_SMART_MEMORY", False)
    BANK.clear()
    yield BANK
    mm.unload_all_models()
    BANK.clear()


def _residency_loaded() -> bool:
    return any(isinstance(model, bank_residency.BankResidency) for model in mm.loaded_models())


def _on_compute() -> list[bool]:
    return [entry.on_compute for entry in BANK._steps.values()]  # least recently used first


@pytest.mark.parametrize("request_kind", ["unload_all_models", "free_memory"])
def test_comfyui_free_memory_requests_take_the_banks_device_entries(kit, device_bank, request_kind):
    """A cold run keeps its steps on the compute device and registers the residency in ComfyUI's
    loaded models; ComfyUI's ``unload_all_models`` (what *Free model and node cache* runs) or a
    ``free_memory`` request for more than there is moves every entry to the offload device and
    drops the residency; nothing is lost: the next run reads every step from the bank (plain
    rows) and equals the cold run."""
    model = indetail(kit["model"], kit["reference"])
    cold, rows = run(kit, model)
    assert rows == [3] * STEPS and _residency_loaded()
    held = BANK.stats()
    assert held.steps == STEPS and BANK.compute_bytes == held.nbytes > 0 and all(_on_compute())
    if request_kind == "unload_all_models":
        mm.unload_all_models()
    else:
        mm.free_memory(1e30, torch.device("cpu"))
    assert not _residency_loaded() and BANK.compute_bytes == 0 and not any(_on_compute())
    assert BANK.stats().steps == STEPS and BANK.nbytes == held.nbytes
    warm, rows = run(kit, model)
    assert rows == [2] * STEPS
    assert_warm_equals(warm, cold)
    assert _residency_loaded()  # registered again at the warm run's start (nothing to give back yet)


def test_a_partial_request_moves_the_least_recently_used_entries_only(kit, device_bank):
    """ComfyUI's own ``LoadedModel.model_unload(memory_to_free)`` (what ``free_memory`` calls with
    the bytes it still needs) on the residency: the oldest steps move, just enough of them, the
    residency stays loaded, and later runs are still served, equal to the cold run."""
    model = indetail(kit["model"], kit["reference"])
    cold, _ = run(kit, model)
    (loaded,) = [m for m in mm.current_loaded_models if isinstance(m.model, bank_residency.BankResidency)]
    per_step = BANK.nbytes // STEPS
    before = BANK.compute_bytes
    assert loaded.model_memory() == loaded.model_loaded_memory() == before and loaded.model_offloaded_memory() == 0
    assert loaded.model_unload(memory_to_free=int(2.5 * per_step)) is False  # freed enough: stays loaded
    assert _on_compute() == [False, False, False, True, True]
    assert BANK.compute_bytes == before - 3 * per_step and _residency_loaded()
    warm, rows = run(kit, model)
    assert rows == [2] * STEPS
    assert_warm_equals(warm, cold)


def test_a_request_that_needs_no_memory_takes_none(kit, device_bank):
    """``free_memory`` for less than is free unloads nothing: not the bank's entries, not the
    tiny model ComfyUI loaded for the run."""
    model = indetail(kit["model"], kit["reference"])
    run(kit, model)
    before = (BANK.compute_bytes, list(mm.loaded_models()))
    assert mm.free_memory(1024, torch.device("cpu")) == []
    assert (BANK.compute_bytes, list(mm.loaded_models())) == before and before[0] == BANK.nbytes > 0


@pytest.mark.parametrize("listed", [True, False])
def test_comfyui_takes_the_banks_memory_before_a_models(kit, device_bank, monkeypatch, listed):
    """``free_memory`` for half of what the bank holds on the device, with the tiny model loaded:
    ComfyUI's own order takes it from the bank (the oldest steps, at least that much, not all) and
    leaves the model loaded in full. Without the residency in ComfyUI's list (``listed=False``, the
    bank before this change) the same request partially unloads the model instead.

    The CPU has no device memory to measure, so ComfyUI's ``get_free_memory`` is given a device of
    ``DEVICE_BYTES`` that the listed models' loaded bytes and the bank's device bytes use (only that
    function is replaced; ``free_memory``'s order and amounts are ComfyUI's)."""
    DEVICE_BYTES = 8 << 30
    model = indetail(kit["model"], kit["reference"])
    cold, _ = run(kit, model)
    (loaded_model,) = [m for m in mm.current_loaded_models if m.model is not None and m.model.model is kit["model"].model]
    weights = loaded_model.model_loaded_memory()
    if not listed:
        mm.current_loaded_models[:] = [m for m in mm.current_loaded_models
                                       if not isinstance(m.model, bank_residency.BankResidency)]

    def device_free(dev=None, torch_free_too=False):
        used = BANK.compute_bytes + sum(m.model.loaded_size() for m in mm.current_loaded_models
                                        if m.model is not None and not isinstance(m.model, bank_residency.BankResidency))
        return (DEVICE_BYTES - used,) * 2 if torch_free_too else DEVICE_BYTES - used

    monkeypatch.setattr(mm, "get_free_memory", device_free)
    held = BANK.compute_bytes
    assert weights > held > 0
    unloaded = mm.free_memory(device_free() + held // 2, torch.device("cpu"))
    if listed:
        assert unloaded == [] and loaded_model.model_loaded_memory() == weights
        assert held // 2 <= held - BANK.compute_bytes < held and _on_compute()[-1] and not _on_compute()[0]
        warm, rows = run(kit, model)
        assert rows == [2] * STEPS
        assert_warm_equals(warm, cold)
    else:
        assert BANK.compute_bytes == held and loaded_model.model_loaded_memory() < weights


def test_reloading_the_loaded_models_keeps_the_entries(kit, device_bank):
    """``load_models_gpu(loaded_models(only_currently_used=True))``, what ComfyUI's ControlNet and
    model-patch nodes do around a VAE encode, detaches every loaded model without unpatching and
    loads it again: no request for memory, so the bank keeps its device entries and stays listed."""
    run(kit, indetail(kit["model"], kit["reference"]))
    before = BANK.compute_bytes
    # ComfyUI's list may still hold dead entries (models earlier tests let go): the live ones.
    loaded = [m for m in mm.loaded_models(only_currently_used=True) or mm.loaded_models() if m is not None]
    mm.load_models_gpu(loaded)
    assert BANK.compute_bytes == before == BANK.nbytes > 0 and _residency_loaded()


def test_store_after_a_give_back_keeps_new_steps_off_the_device():
    """After ComfyUI took device memory back mid-run, the rest of the run stores its steps on the
    offload device (the room is capped where the request left it) until the next run's start."""
    store = kv_bank.KVBank()
    cpu = torch.device("cpu")
    step = {("output", 9, 0): {"k": torch.randn(1, 4, 8), "v": torch.randn(1, 4, 8)}}
    token = store.begin_run(1 << 20, room=1 << 20, offload_device=cpu)
    guards = kv_bank.Guards()
    for sigma in (1.0, 2.0):
        assert store.commit("s", guards, sigma, dict(step))
    assert store.give_back(1) == store._steps[("s", 1.0)].nbytes  # the oldest step only
    assert store.commit("s", guards, 3.0, dict(step))
    assert [e.on_compute for e in store._steps.values()] == [False, True, False]
    store.end_run(token)
    assert store.give_back(None) == store._steps[("s", 2.0)].nbytes and store.compute_bytes == 0
    store.begin_run(1 << 20, room=1 << 20, offload_device=cpu)
    assert store.commit("s", guards, 4.0, dict(step)) and store._steps[("s", 4.0)].on_compute


def test_with_smart_memory_off_the_bank_keeps_nothing_on_the_device(kit, device_bank, monkeypatch):
    """``--disable-smart-memory``: ComfyUI unloads every model at every load, so the bank does not
    register and keeps its entries on the offload device (still warm)."""
    monkeypatch.setattr(mm, "DISABLE_SMART_MEMORY", True)
    model = indetail(kit["model"], kit["reference"])
    cold, _ = run(kit, model)
    assert not _residency_loaded() and BANK.compute_bytes == 0 and BANK.stats().steps == STEPS
    assert not any(_on_compute())
    warm, rows = run(kit, model)
    assert rows == [2] * STEPS
    assert_warm_equals(warm, cold)
