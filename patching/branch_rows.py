"""Appending extra branch rows (reference, subject, condition streams) to a model call.

Everything batched to the model input is extended consistently: latent, sigma,
text context, concat conditioning, other per-row conditionings (SDXL's ``y``; a DiT's
``y``/pooled text, Flux's ``guidance``, ``attention_mask``, the tensors of a list such as
Kontext's ``ref_latents``) and ControlNet residuals (zeros for extra rows, so control
never leaks into a reference stream; ComfyUI would otherwise skip a residual whose batch
does not match, with only a warning). ``zero_control_rows`` also zeroes the residuals of
sampler rows a control asks to leave uncontrolled.

Text contexts of different lengths: a UNet's cross-attention is unchanged by repeating its
keys, so they are repeated to a common length as ComfyUI's ``cond_cat`` does. In a DiT's
joint attention text tokens are queries and keys next to the image's, so repeating them
would change every row; they are zero-padded at the end instead (``pad_contexts``) and the
DiT route masks the padding keys of the padded rows.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..attention.rows import ROLE_COND, Row, RowLayout
from ..attention.sdpa import repeat_tokens
from .control import ExtraRow


def cat_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    _check_widths(contexts)
    # Contexts repeated to a common length, as ComfyUI's ``cond_cat`` batches them.
    tokens = math.lcm(*(c.shape[1] for c in contexts))
    return torch.cat([repeat_tokens(c, tokens) for c in contexts])


def _check_widths(contexts: list[torch.Tensor]) -> None:
    widths = {c.shape[-1] for c in contexts}
    if len(widths) != 1:
        raise ValueError(f"branch rows: expected one context width, got {sorted(widths)} (model family mismatch?)")


def pad_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Contexts zero-padded at the end to the longest (``text_lengths`` gives each row's own)."""
    _check_widths(contexts)
    tokens = max(c.shape[1] for c in contexts)
    return torch.cat([torch.nn.functional.pad(c, (0, 0, 0, tokens - c.shape[1])) for c in contexts])


def _template_row(layout: RowLayout) -> int:
    """A positive sampler row to copy per-row inputs from (row 0 if there is none)."""
    cond_rows = layout.indices(ROLE_COND)
    return cond_rows[0] if cond_rows else 0


def _per_row(value, batch: int) -> bool:
    return torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch


def _cat_rows(value: torch.Tensor, owns: list, template: int) -> torch.Tensor:
    """``value`` with one row per entry of ``owns`` appended: the row's own, else the template row's."""
    return torch.cat([value] + [own.to(value) if own is not None else value[template:template + 1] for own in owns])


def _extend(value, batch: int, extras: list[ExtraRow], name: str, template: int):
    owns = [row.conds.get(name) for row in extras]
    if isinstance(value, list) and value and all(_per_row(v, batch) for v in value):
        # a list of per-row tensors (Kontext's ref_latents): each one extended; a row's own is a list too
        return [_cat_rows(v, [own[i] if own is not None else None for own in owns], template)
                for i, v in enumerate(value)]
    if not _per_row(value, batch):
        return value
    return _cat_rows(value, owns, template)


# What an extra row gets from a ControlNet (``_pad_control``): part of the reference K/V bank's
# key, so a change of this policy never reuses streams computed under the old one.
EXTRA_ROW_CONTROLNET = "zero residuals"


def borrowed_inputs(c_concat, conds: dict, layout: RowLayout, batch: int, row_conds: dict) -> dict:
    """The per-row model inputs ``append_rows`` copies from the template sampler row into an extra
    row that carries ``row_conds`` (an inpainting model's ``c_concat``, any per-row input the row
    does not bring), by name: the row's output depends on them as on its own inputs."""
    template = _template_row(layout)
    borrowed = {}
    for name, value in (("c_concat", c_concat), *conds.items()):
        if name in row_conds:
            continue
        if isinstance(value, list) and value and all(_per_row(v, batch) for v in value):
            borrowed[name] = [v[template:template + 1] for v in value]
        elif _per_row(value, batch):
            borrowed[name] = value[template:template + 1]
    return borrowed


def shared_inputs(conds: dict, batch: int, row_conds: dict) -> dict:
    """The model inputs ``append_rows`` passes unchanged to every row, by name: those not per row
    (ComfyUI's ``CONDConstant``s, such as Kontext's ``ref_latents_method``) that the extra row does
    not bring itself. The row computes with them as with its own inputs."""
    return {name: value for name, value in conds.items()
            if name not in row_conds and value is not None and not _per_row(value, batch)
            and not (isinstance(value, list) and value and all(_per_row(v, batch) for v in value))}


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
                extras: list[tuple[str, ExtraRow]], pad_text: bool = False):
    """Return the inputs with ``extras`` ((source, row) pairs) appended, and the new layout.
    ``pad_text`` (diffusion transformers): contexts are zero-padded (``pad_contexts``; the
    rows' own lengths are ``text_lengths(...)``), not repeated."""
    batch = x.shape[0]
    rows = [row for _, row in extras]
    if pad_text and conds.get("attention_mask") is not None and c_crossattn is not None \
            and any(r.context.shape[1] != c_crossattn.shape[1] for r in rows):
        raise ValueError(f"branch rows: expected extra rows with the sampler rows' {c_crossattn.shape[1]} text tokens "
                         f"when the model takes an attention mask, got {[r.context.shape[1] for r in rows]}")
    template = _template_row(layout)
    x_ext = torch.cat([x] + [r.x.to(x) for r in rows])
    sigma_ext = torch.cat([sigma] + [
        (r.sigma if r.sigma is not None else sigma[:1]).reshape(-1).to(sigma) for r in rows
    ])
    context_ext = c_crossattn
    if c_crossattn is not None:
        contexts = [c_crossattn] + [r.context.to(c_crossattn) for r in rows]
        context_ext = pad_contexts(contexts) if pad_text else cat_contexts(contexts)
    concat_ext = _extend(c_concat, batch, rows, "c_concat", template)
    conds_ext = {name: _extend(value, batch, rows, name, template) for name, value in conds.items()}
    new_layout = layout.with_extra([Row(r.role, r.item, source, r.image_prompt) for source, r in extras])
    return x_ext, sigma_ext, concat_ext, context_ext, _pad_control(control, len(rows)), conds_ext, new_layout


def text_lengths(c_crossattn, extras: list[tuple[str, ExtraRow]]) -> Optional[tuple[int, ...]]:
    """Each row's own text token count after ``append_rows(..., pad_text=True)``: sampler rows
    first, then the extras (None when no row was padded)."""
    if c_crossattn is None or not extras:
        return None
    lengths = [c_crossattn.shape[1]] * c_crossattn.shape[0] + [row.context.shape[1] for _, row in extras]
    return tuple(lengths) if len(set(lengths)) > 1 else None
