"""Content fingerprints for caches keyed by what a model computes: tensors, conditionings, and
the patches a ModelPatcher carries (the inversion cache, ``invert.cache_key``; the reference K/V
bank, ``kv_bank``).

Another node's patch is identified by the object's ``id``: clones share their patch objects, a
changed patch is a new object. An ``id`` is only unique while its object lives, so every object
whose ``id`` enters a fingerprint is also handed out as a *guard* (``Guards``): a cache entry
holding weak references to its guards is stale once one of them died, before the ``id`` can be
reused by another object.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any, Iterable

import torch

from ..patching import keys

# Entries of transformer_options that belong to this pack: its controls are accounted for
# separately (a control that changes stream rows says so), the rest is configuration that does
# not reach the model (guidance policy, bank settings, its wrappers' key).
_PACK_OPTIONS = (keys.CONTROLS, keys.IMAGE_PROMPT_POLICY, keys.WRAPPER, keys.KV_BANK, keys.RUN, keys.ROWS)


def hash_tensor(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().float().cpu().contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())


def hash_value(h, name: str, value: Any) -> None:
    """A named model input: tensors by content, lists of tensors element-wise, scalars by value,
    anything else by type."""
    h.update(name.encode())
    if torch.is_tensor(value):
        hash_tensor(h, value)
    elif isinstance(value, (list, tuple)) and all(torch.is_tensor(v) for v in value):
        for item in value:
            hash_tensor(h, item)
    elif isinstance(value, (int, float, str, bool, type(None))):
        h.update(repr(value).encode())
    else:
        h.update(type(value).__name__.encode())


def hash_conditioning(h, conditioning) -> None:
    for cond, extra in conditioning:
        hash_tensor(h, cond)
        for name in sorted(extra):
            hash_value(h, name, extra[name])


def text_fingerprint(context, conds: dict) -> str:
    """A stream row's text: its cross-attention context and other per-row inputs (SDXL's ``y``)."""
    h = hashlib.sha256()
    if context is not None:
        hash_tensor(h, context)
    for name in sorted(conds):
        hash_value(h, name, conds[name])
    return h.hexdigest()


class Guards:
    """Objects a fingerprint identified by ``id``, held weakly (strongly where an object takes no
    weak reference: such objects are small, e.g. some builtins). ``alive()`` is False once one
    of them was freed: its ``id`` may then name another object."""

    def __init__(self, objects: Iterable[Any] = ()):
        self._refs = []
        self._seen: set[int] = set()
        for obj in objects:
            self.add(obj)

    def add(self, obj: Any) -> None:
        if id(obj) in self._seen:
            return
        self._seen.add(id(obj))
        try:
            self._refs.append(weakref.ref(obj))
        except TypeError:
            self._refs.append(lambda obj=obj: obj)

    def alive(self) -> bool:
        return all(ref() is not None for ref in self._refs)


def options_fingerprint(options, guards: Guards | None = None) -> str:
    """Identity of the callables another node patched into model_options (attention patches,
    wrappers, cfg functions): clones share those objects, a different patch is another object.
    This pack's own entries are left out (``_PACK_OPTIONS``)."""
    parts = []

    def walk(value, path):
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                if key in _PACK_OPTIONS:
                    continue
                walk(value[key], f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")
        elif callable(value):
            parts.append(f"{path}={id(value)}")
            if guards is not None:
                guards.add(value)

    walk(options, "")
    return ";".join(parts)


def model_fingerprint(model, guards: Guards | None = None, model_options: dict | None = None) -> str:
    """What a ModelPatcher changes about its base model's output: weight patches (``patches_uuid``,
    the patched keys: a LoRA), object patches (names and objects: a ModelSamplingDiscrete node),
    and the callables of ``model_options`` (default: the patcher's own)."""
    parts = [str(model.patches_uuid), repr(sorted(model.patches.keys()))]
    objects = []
    for name in sorted(model.object_patches, key=str):
        value = model.object_patches[name]
        objects.append(f"{name}={id(value)}")
        if guards is not None:
            guards.add(value)
    parts.append(";".join(objects))
    parts.append(options_fingerprint(model.model_options if model_options is None else model_options, guards))
    return "|".join(parts)
