"""Which self-attention blocks InDetail-IP patches by default, per model family (``auto``).

UNets (SD1.5 / SD2.x / SDXL): the decoder (``output``), the official code's choice (its ``up``
blocks' ``attn1``).

Diffusion transformers have no decoder. The published work on attention injection in Flux
puts appearance in the later single-stream blocks: RF-Solver-Edit (Wang et al. 2024, the
official ``FLUX_Image_Edit``: value features shared in single blocks ``id > 19``, i.e. 20-37 of
38, for the first steps) and FireFlow (Deng et al. 2024, the same blocks), whose defaults
ComfyUI-Fluxtapoz's RF-Edit nodes also use. So Flux.1 (and Chroma and Flux 2, the same
double/single design) default to the same share of their single blocks: ``single:20-37`` on a
38-single-block model. Stable Flow's "vital layers" (Avrahami et al., CVPR 2025: double 0, 1,
17, 18 and single 6, 9, 34, 35, 37 of FLUX.1-dev, found by bypassing each layer) are the
alternative for edits that keep the layout: ``double:0-1, double:17-18, single:6, single:9,
single:34-35, single:37``. SD3 / SD3.5: no published injection study was found; by analogy
with the UNet decoder and Flux's later blocks, the later half of the joint blocks.
"""

from __future__ import annotations

from ..attention.layers import AttentionLayer
from ..families.base import ModelFamily
from ..families.mmdit import SECTION as JOINT

AUTO = "auto"
UNET_BLOCKS = "output"
# RF-Solver-Edit / FireFlow: single blocks 20-37 of FLUX.1's 38
FLUX_SINGLE_FIRST, FLUX_SINGLE_COUNT = 20, 38
STABLE_FLOW_VITAL_LAYERS = "double:0-1, double:17-18, single:6, single:9, single:34-35, single:37"


def _blocks(layers: tuple[AttentionLayer, ...], section: str) -> list[int]:
    return sorted({layer.block[1] for layer in layers if layer.kind == "attn1" and layer.section == section})


def default_blocks(family: ModelFamily, layers: tuple[AttentionLayer, ...]) -> str:
    """The block spec ``auto`` stands for on a model of ``family`` with ``layers`` (module docstring)."""
    if not family.uses_override:
        return UNET_BLOCKS
    single = _blocks(layers, "single")
    if single:
        first = min(round(len(single) * FLUX_SINGLE_FIRST / FLUX_SINGLE_COUNT), len(single) - 1)
        return f"single:{single[first]}-{single[-1]}"
    joint = _blocks(layers, JOINT)
    if joint:
        return f"{JOINT}:{joint[len(joint) // 2]}-{joint[-1]}"
    return "all"


def resolve_blocks(spec: str, family: ModelFamily, layers: tuple[AttentionLayer, ...]) -> str:
    """``spec`` with ``auto`` replaced by the family's default (any other spec as it is)."""
    return default_blocks(family, layers) if spec.strip().lower() == AUTO else spec
