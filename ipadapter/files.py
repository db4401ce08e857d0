"""Reading IP-Adapter weight files (the released ``ip-adapter_*.bin`` / ``.safetensors``).

Two key layouts exist in the wild:
- ``.bin`` (torch pickle): ``{"image_proj": {...}, "ip_adapter": {...}}``, loaded with
  ``torch.load(weights_only=True)`` so no pickled code ever runs;
- ``.safetensors``: flat keys ``image_proj.<name>`` and ``ip_adapter.<N>.to_k_ip.weight``.

``ip_adapter.<N>`` numbers the decoupled projections of the UNet's cross-attention
layers in diffusers' processor order (N = 2*i + 1 for the i-th cross-attention layer:
even numbers are the self-attention processors, which have no weights).
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass

import torch

KV_KEY = re.compile(r"(\d+)\.to_([kv])_ip\.weight$")


@dataclass
class IPAdapterWeights:
    image_proj: dict[str, torch.Tensor]
    # module number N -> (to_k_ip weight, to_v_ip weight), each [inner_dim, cross_dim]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @property
    def cross_dim(self) -> int:
        return next(iter(self.kv.values()))[0].shape[1]

    @property
    def layer_count(self) -> int:
        return len(self.kv)


def _nest(flat: dict[str, torch.Tensor], name: str) -> dict:
    if not isinstance(flat, dict):
        raise ValueError(f"IP-Adapter file {name}: expected a dict of tensors, got {type(flat).__name__}")
    if "image_proj" in flat or "ip_adapter" in flat:
        return flat
    nested: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head in nested and rest:
            nested[head][rest] = value
    return nested


def read_state(path: str) -> dict:
    """The raw nested state ``{"image_proj": ..., "ip_adapter": ...}`` of a file."""
    name = os.path.basename(path)
    if path.lower().endswith((".safetensors", ".sft")):
        import safetensors.torch

        try:
            flat = safetensors.torch.load_file(path, device="cpu")
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"IP-Adapter file {name}: expected a valid safetensors file, got: {error}") from error
        return _nest(flat, name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"IP-Adapter file {name}: expected plain tensors (loaded with weights_only=True, no pickled code "
            f"runs), got a pickle that needs more: {str(error).splitlines()[0]}"
        ) from error
    except Exception as error:
        raise ValueError(f"IP-Adapter file {name}: expected a torch or safetensors file, got: {error}") from error
    return _nest(state, name)


def parse_state(state: dict, name: str = "IP-Adapter file") -> IPAdapterWeights:
    """Validate the nested state and collect the per-layer K/V projections."""
    image_proj, ip_adapter = state.get("image_proj"), state.get("ip_adapter")
    if not isinstance(image_proj, dict) or not image_proj:
        raise ValueError(f"{name}: expected 'image_proj.*' weights, got keys {sorted(state)[:6]}")
    if not isinstance(ip_adapter, dict) or not ip_adapter:
        raise ValueError(f"{name}: expected 'ip_adapter.N.to_k_ip.weight' weights, got none")
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ip_adapter.items():
        m = KV_KEY.fullmatch(key)
        if m is None:
            # FaceID files carry LoRA weights; those variants are not supported.
            raise ValueError(f"{name}: expected only 'ip_adapter.N.to_k_ip.weight' / 'to_v_ip.weight' keys, "
                             f"got 'ip_adapter.{key}' (FaceID and other variants are not supported)")
        if not torch.is_tensor(value) or value.ndim != 2:
            raise ValueError(f"{name}: expected 'ip_adapter.{key}' to be a 2-D weight, got "
                             f"{tuple(value.shape) if torch.is_tensor(value) else type(value).__name__}")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    numbers = sorted(found)
    expected = [2 * i + 1 for i in range(len(numbers))]
    if numbers != expected:
        raise ValueError(f"{name}: expected ip_adapter modules numbered 1, 3, 5, ... {expected[-1]}, got {numbers}")
    kv = {}
    for number in numbers:
        pair = found[number]
        if set(pair) != {"k", "v"}:
            raise ValueError(f"{name}: expected to_k_ip and to_v_ip for ip_adapter.{number}, got only to_{''.join(pair)}_ip")
        if pair["k"].shape != pair["v"].shape:
            raise ValueError(f"{name}: expected ip_adapter.{number} to_k_ip and to_v_ip of one shape, got "
                             f"{tuple(pair['k'].shape)} and {tuple(pair['v'].shape)}")
        # Kept in the file's dtype (fp16 for the released files); cast per layer when used.
        kv[number] = (pair["k"], pair["v"])
    widths = {w.shape[1] for w, _ in kv.values()}
    if len(widths) != 1:
        raise ValueError(f"{name}: expected one cross-attention width in ip_adapter weights, got {sorted(widths)}")
    return IPAdapterWeights(dict(image_proj), kv)


def load_file(path: str) -> IPAdapterWeights:
    return parse_state(read_state(path), f"IP-Adapter file {os.path.basename(path)}")
