"""Appending extra branch rows (reference, subject, condition streams) to a UNet call.

Everything batched to the model input is extended consistently: latent, sigma,
cross-attention context, concat conditioning, other per-row conditionings and
ControlNet residuals (zeros for extra rows, so control never leaks into a
reference stream; ComfyUI would otherwise skip a residual whose batch does not
match, with only a warning). ``zero_control_rows`` also zeroes the residuals of
sampler rows a control asks to leave uncontrolled.
"""

from __future__ import annotations

import math

import torch

from ..attention.rows import ROLE_COND, Row, RowLayout
from ..attention.sdpa import repeat_tokens
from .control import ExtraRow


def cat_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    widths = {c.shape[-1] for c in contexts}
    if len(widths) != 1:
        raise ValueError(f"branch rows: expected one context width, got {sorted(widths)} (model family mismatch?)")
    # Contexts repeated to a common length, as ComfyUI's ``cond_cat`` batches them.
    tokens = math.lcm(*(c.shape[1] for c in contexts))
    return torch.cat([repeat_tokens(c, tokens) for c in contexts])


def _template_row(layout: RowLayout) -> int:
    """A positive sampler row to copy per-row inputs from (row 0 if there is none)."""
    cond_rows = layout.indices(ROLE_COND)
    return cond_rows[0] if cond_rows else 0


def _extend(value, batch: int, extras: list[ExtraRow], name: str, template: int):
    if not torch.is_tensor(value) or value.ndim == 0 or value.shape[0] != batch:
        return value
    parts = [value]
    for row in extras:
        own = row.conds.get(name)
        parts.append(own.to(value) if own is not None else value[template:template + 1])
    return torch.cat(parts)


def _pad_control(control, extra_count: int):
    if control is None:
        return None
    padded = {}
    for name, residuals in control.items():
        if isinstance(residuals, list):
            padded[name] = [
                torch.cat([r, r.new_zeros((extra_count,) + tuple(r.shape[1:]))]) if torch.is_tensor(r) else r
                for r in residuals
            ]
        else:
            padded[name] = residuals
    return padded


def zero_control_rows(control, rows: list[int], batch: int):
    """``control`` (ComfyUI's residual dict) with the residuals of batch ``rows`` set to zero,
    as new tensors and new lists: the caller's dict, lists and tensors are not touched (the
    UNet pops from the lists, and the caller may use the residuals again). A tensor shared by
    several entries (ComfyUI's ControlNet merge allows that) stays shared. Residuals whose
    batch is not ``batch`` are left as they are."""
    if control is None or not rows:
        return control
    done: dict[int, torch.Tensor] = {}

    def zeroed(r):
        if not torch.is_tensor(r) or r.ndim == 0 or r.shape[0] != batch:
            return r
        if id(r) not in done:
            done[id(r)] = r.index_fill(0, torch.tensor(rows, dtype=torch.long, device=r.device), 0)
        return done[id(r)]

    return {name: [zeroed(r) for r in residuals] if isinstance(residuals, list) else residuals
            for name, residuals in control.items()}


def append_rows(x, sigma, c_concat, c_crossattn, control, conds: dict, layout: RowLayout,
                extras: list[tuple[str, ExtraRow]]):
    """Return the inputs with ``extras`` ((source, row) pairs) appended, and the new layout."""
    batch = x.shape[0]
    rows = [row for _, row in extras]
    template = _template_row(layout)
    x_ext = torch.cat([x] + [r.x.to(x) for r in rows])
    sigma_ext = torch.cat([sigma] + [
        (r.sigma if r.sigma is not None else sigma[:1]).reshape(-1).to(sigma) for r in rows
    ])
    context_ext = c_crossattn
    if c_crossattn is not None:
        context_ext = cat_contexts([c_crossattn] + [r.context.to(c_crossattn) for r in rows])
    concat_ext = _extend(c_concat, batch, rows, "c_concat", template)
    conds_ext = {name: _extend(value, batch, rows, name, template) for name, value in conds.items()}
    new_layout = layout.with_extra([Row(r.role, r.item, source, r.image_prompt) for source, r in extras])
    return x_ext, sigma_ext, concat_ext, context_ext, _pad_control(control, len(rows)), conds_ext, new_layout
