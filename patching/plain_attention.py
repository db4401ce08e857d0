"""Plain attention as ComfyUI computes it, the one function every control and the router use.

``plain_attention(extra_options)`` is ``attend(q, k, v, mask=None)`` with the layer's head
count bound: ComfyUI's ``optimized_attention`` (SDPA, xformers, sub-quadratic ... as chosen
by ComfyUI's startup flags, looked up at call time), with the layer's attention precision and
``transformer_options``. It is what a layer computes without any patch, so a control uses it
for rows or key subsets that bypass the rest of the chain.
"""

from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention

from ..attention.sdpa import AttendFn


def plain_attention(extra_options: dict) -> AttendFn:
    heads = extra_options["n_heads"]
    precision = extra_options.get("attn_precision")

    def attend(q, k, v, mask=None):
        return comfy_attention.optimized_attention(q, k, v, heads, mask=mask, attn_precision=precision,
                                                   transformer_options=extra_options)

    return attend
