"""DEADiff's disentangled conditioning (Qi et al. 2024, §3.2): semantic features into the
coarse, low-resolution cross-attention layers, style features into the fine ones.

The split is read from the model's own layers, not a block list:
semantic = the cross-attention layers of the input blocks at the coarsest level that has
cross-attention, the middle block, and the first two output blocks at that level.
On SD1.5 this is exactly the official split (layers 4-8 of 16: input 7 and 8 at 16x16,
the middle, output 3 and 4); on SDXL the same rule gives input 7-8, the middle and
output 0-1 (the 32x32 level at 1024 px: 50 of 70 layers, because SDXL puts 10
transformers per block there). Style = every other cross-attention layer.
"""

from __future__ import annotations

from ..attention.layers import AttentionLayer, resolve_weight_spec

AUTO = "auto"


def _blocks(layers, section: str, level: int) -> list[int]:
    return sorted({layer.block[1] for layer in layers if layer.section == section and layer.level == level})


def deadiff_semantic_spec(layers) -> str:
    """The block spec of DEADiff's semantic layers for this model."""
    attn2 = [layer for layer in layers if layer.kind == "attn2"]
    if not attn2:
        raise ValueError("DEADiff routing: expected a model with cross-attention layers, got none")
    coarsest = max(layer.level for layer in attn2 if layer.section != "middle")
    inputs = _blocks(attn2, "input", coarsest)
    outputs = _blocks(attn2, "output", coarsest)[:2]
    parts = [f"input:{b}" for b in inputs]
    if any(layer.section == "middle" for layer in attn2):
        parts.append("middle")
    parts += [f"output:{b}" for b in outputs]
    return ", ".join(parts)


def deadiff_weight_specs(layers) -> tuple[str, str]:
    """(style, semantic) weight specs of DEADiff's split: each reference on its own layers."""
    parts = [p.strip() for p in deadiff_semantic_spec(layers).split(",")]
    style = "all=1, " + ", ".join(f"{p}=0" for p in parts)
    semantic = ", ".join(f"{p}=1" for p in parts)
    return style, semantic


def routing_specs(layers, style_spec: str, semantic_spec: str) -> tuple[str, str]:
    """Concrete weight specs for the two references; ``auto`` is DEADiff's split.
    Custom specs are validated against the model here (an unknown selector is an error)."""
    auto_style, auto_semantic = deadiff_weight_specs(layers)
    style = auto_style if style_spec.strip().lower() == AUTO else style_spec
    semantic = auto_semantic if semantic_spec.strip().lower() == AUTO else semantic_spec
    resolve_weight_spec(style, layers, "attn2")
    resolve_weight_spec(semantic, layers, "attn2")
    return style, semantic


def layer_names(layers: tuple[AttentionLayer, ...] | list[AttentionLayer], weights: dict) -> list[str]:
    """Readable names of the layers with a non-zero weight."""
    return [layer.describe() for layer in layers if weights.get(layer.key, 0) != 0]
