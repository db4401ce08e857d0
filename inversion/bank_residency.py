"""The reference K/V bank's compute-device memory as a model ComfyUI's memory manager manages.

ComfyUI frees device memory (``comfy.model_management.free_memory``: before loading a model, on
``unload_all_models`` and the server's *Free model and node cache*) by walking its list of loaded
models only. ``BankResidency`` is a ``ModelPatcher`` whose size is the bank's bytes on the compute
device, put in that list with ComfyUI's own ``load_models_gpu``; what ComfyUI asks of a loaded
model to free memory, it does with the bank's entries:

- ``partially_unload(offload, n)``: moves the least recently used device entries to the offload
  device until ``n`` bytes are freed (``KVBank.give_back``), and caps the bank's device room there
  for the rest of the run;
- ``detach``: moves them all (ComfyUI then drops the residency from its list); a detach without
  unpatching is ComfyUI re-loading a loaded model, no request for memory, and keeps them.

Nothing is dropped: a moved entry is read from the offload device, layer by layer (time, never
correctness). ComfyUI orders what it frees by its own rule (``free_memory``: partially loaded models
first, then the least referenced): the residency has no offloaded part and one reference, so it
typically comes before fully loaded models, after partially loaded ones.

Registered at a run's start (``track``), only while the bank may hold device memory: then the
bank has none there yet (a residency is dropped from the list only by ``detach``, which moves it
all), so ``load_models_gpu`` asks no memory for it, and the room the run starts with leaves more
than ComfyUI's minimum inference memory free, so its ``free_memory`` call unloads nothing.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher

from .kv_bank import BANK, KVBank

logger = logging.getLogger("qkv_control")


class KVBankDeviceMemory(torch.nn.Module):
    """The residency's ``model`` (holds no weights): what ComfyUI's logs name ("Requested to load
    KVBankDeviceMemory")."""


class BankResidency(comfy.model_patcher.ModelPatcher):
    """The bank's compute-device bytes as one of ComfyUI's loaded models (module docstring)."""

    def __init__(self, bank: KVBank, load_device, offload_device):
        super().__init__(KVBankDeviceMemory(), load_device, offload_device)
        self.bank = bank

    def model_size(self):
        return self.bank.compute_bytes

    def loaded_size(self):
        return self.bank.compute_bytes

    def current_loaded_device(self):
        # Everything it counts is on the load device: ComfyUI never needs memory to "load" it.
        return self.load_device

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        return 0  # entries reach the device when a run stores them, within the room at its start

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        return self.bank.give_back(memory_to_free)

    def detach(self, unpatch_all=True):
        # unpatch_all=False is no request for memory: load_models_gpu re-loading a loaded model
        # (what ControlNet does around its VAE encode) detaches it so, then loads it again.
        if unpatch_all:
            self.bank.give_back(None)
        return self.model


_residency: Optional[BankResidency] = None


def tracked(device) -> bool:
    """Whether ComfyUI's list of loaded models holds the bank's residency for ``device``."""
    return _residency is not None and _residency.load_device == device and any(
        model is _residency for model in mm.loaded_models())


def track(device, offload_device) -> bool:
    """Put the bank's residency for ``device`` in ComfyUI's loaded models (``load_models_gpu``)
    unless it is there. False where ComfyUI would not keep it: ``--disable-smart-memory`` (every
    ``free_memory`` there unloads every model, so the bank keeps nothing on the device)."""
    global _residency
    if mm.DISABLE_SMART_MEMORY:
        return False
    if tracked(device):
        return True
    if _residency is not None and _residency.load_device != device:
        _residency.detach()  # one compute device at a time: the old one's entries go to RAM
    if BANK.compute_bytes:  # held on the device while ComfyUI did not know (never left so): give back
        BANK.give_back(None)
    _residency = BankResidency(BANK, device, offload_device)
    try:
        mm.load_models_gpu([_residency])
    except Exception:  # noqa: BLE001 - not tracked: the bank keeps nothing on the device
        logger.warning("QKV Control: the K/V bank could not register its device memory with ComfyUI; "
                       "it keeps its entries on the offload device", exc_info=True)
        return False
    return tracked(device)
