"""Attention layers of a model as plain descriptors, and block specs resolved against them.

A *block spec* is how users pick layers without knowing a model's block list.
Items are separated by commas; the selection is the union of the plain items
minus the items prefixed with ``-``:

    all | input | middle | output     (aliases: down, mid, up) UNet blocks
    double | single | joint           diffusion-transformer blocks (Flux: double/single, SD3: joint)
    input:4        one block (ComfyUI's block numbers; double:0, single:10-37, joint:3 ...)
    output:3-5     a range of blocks
    input:4.1      one transformer of a block (joint:N.1: SD3.5's MMDiT-X image self-attention)
    #4-8  or #3    layers by ordinal among layers of that kind, in forward order
    level:0-1      layers by resolution level (0 = the latent's own resolution)

A *weight spec* is ``selector=weight`` items, e.g. ``#0-3=1.0, #4-8=0.5``; later
items win where selectors overlap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SECTION_ALIASES = {"input": "input", "down": "input", "middle": "middle", "mid": "middle",
                   "output": "output", "up": "output", "double": "double", "single": "single", "joint": "joint"}


@dataclass(frozen=True)
class AttentionLayer:
    kind: str                 # "attn1" (self- or joint attention) or "attn2" (cross-attention)
    block: tuple[str, int]    # ComfyUI block, e.g. ("input", 1), ("double", 3), ("joint", 0)
    transformer_index: int    # index in the block's transformer stack
    ordinal: int              # position among layers of this kind, forward order
    level: int                # resolution level: 0 = full latent resolution, 1 = /2, ...
    heads: int
    dim_head: int

    @property
    def key(self) -> tuple[str, int, int]:
        """The replace-patch key ComfyUI looks up first."""
        return (self.block[0], self.block[1], self.transformer_index)

    @property
    def section(self) -> str:
        return self.block[0]

    def describe(self) -> str:
        return f"{self.kind} {self.block[0]}:{self.block[1]}.{self.transformer_index} (#{self.ordinal}, level {self.level})"


_RANGE = r"(\d+)(?:-(\d+))?"


def _in_range(value: int, low: str, high: str | None) -> bool:
    lo = int(low)
    hi = int(high) if high is not None else lo
    return lo <= value <= hi


def _matches(item: str, layer: AttentionLayer) -> bool:
    if item == "all":
        return True
    if item in SECTION_ALIASES:
        return layer.section == SECTION_ALIASES[item]
    m = re.fullmatch(r"#" + _RANGE, item)
    if m:
        return _in_range(layer.ordinal, m.group(1), m.group(2))
    m = re.fullmatch(r"level:" + _RANGE, item)
    if m:
        return _in_range(layer.level, m.group(1), m.group(2))
    m = re.fullmatch(r"([a-z]+):" + _RANGE + r"(?:\.(\d+))?", item)
    if m and m.group(1) in SECTION_ALIASES:
        if layer.section != SECTION_ALIASES[m.group(1)]:
            return False
        if not _in_range(layer.block[1], m.group(2), m.group(3)):
            return False
        return m.group(4) is None or layer.transformer_index == int(m.group(4))
    raise ValueError(
        f"block spec: expected all, input, middle, output, input:N, input:N-M, input:N.T, #N-M or level:N-M "
        f"(diffusion transformers: double, single, joint, double:N-M ...), got '{item}'"
    )


def _items(spec: str) -> list[str]:
    return [part.strip().lower() for part in spec.split(",") if part.strip()]


def select_layers(spec: str, layers: tuple[AttentionLayer, ...] | list[AttentionLayer], kind: str) -> tuple[AttentionLayer, ...]:
    """Layers of ``kind`` chosen by ``spec``. An empty selection is an error naming what exists."""
    candidates = [layer for layer in layers if layer.kind == kind]
    items = _items(spec) or ["all"]
    include = [i for i in items if not i.startswith("-")] or ["all"]
    exclude = [i[1:].strip() for i in items if i.startswith("-")]
    chosen = tuple(
        layer
        for layer in candidates
        if any(_matches(i, layer) for i in include) and not any(_matches(i, layer) for i in exclude)
    )
    if not chosen:
        if not candidates:
            raise ValueError(f"block spec '{spec}' selects no {kind} layer; this model has no {kind} layers "
                             "(a diffusion transformer's attention is joint self-attention: attn1)")
        available = ", ".join(f"{layer.block[0]}:{layer.block[1]}.{layer.transformer_index}" for layer in candidates)
        raise ValueError(f"block spec '{spec}' selects no {kind} layer; this model has: {available}")
    return chosen


def resolve_weight_spec(spec: str, layers, kind: str, default: float = 0.0) -> dict[tuple[str, int, int], float]:
    """Per-layer weights from ``selector=weight`` items; unlisted layers get ``default``."""
    candidates = [layer for layer in layers if layer.kind == kind]
    weights = {layer.key: default for layer in candidates}
    for item in _items(spec):
        if "=" not in item:
            raise ValueError(f"weight spec: expected 'selector=weight' items, got '{item}'")
        selector, value = (s.strip() for s in item.rsplit("=", 1))
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"weight spec: expected a number after '=', got '{value}' in '{item}'") from None
        for layer in select_layers(selector, candidates, kind):
            weights[layer.key] = weight
    return weights
