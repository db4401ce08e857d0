"""Registering controls on a model, and the keyed wrappers that run them.

- OUTER_SAMPLE:   builds the run's RunContext, frees it in ``finally``.
- SAMPLER_SAMPLE: lets controls choose where the run starts (``patching.sampler_start``).
- APPLY_MODEL:    computes the row layout, zeroes the ControlNet residuals of rows
                  the controls leave uncontrolled, appends the controls' extra rows,
                  installs the routed attention (UNet: replace patches,
                  ``patching.router``; DiT: the attention override,
                  ``patching.dit_route``), removes the extra rows from the output.
The model given to a node is never mutated: ``add_control`` works on a clone.
"""

from __future__ import annotations

import logging

import comfy.model_patcher
from comfy.patcher_extension import WrappersMP

from ..attention.rows import RowLayout
from ..families.base import CallGeometry, diffusion_model_of
from . import keys
from .branch_rows import append_rows, text_lengths, zero_control_rows
from .control import AttentionControl, ModelCall
from .dit_route import install_dit_route
from .router import install_routes
from .run_context import RunContext
from .sampler_start import sampler_sample_wrapper

logger = logging.getLogger("qkv_control")


def _wrappers():
    return ((WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
            (WrappersMP.SAMPLER_SAMPLE, sampler_sample_wrapper),
            (WrappersMP.APPLY_MODEL, apply_model_wrapper))


def add_control(model, control: AttentionControl):
    """A clone of ``model`` (a ModelPatcher) with ``control`` registered on its router."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    to[keys.CONTROLS] = tuple(to.get(keys.CONTROLS, ())) + (control,)
    for wrapper_type, wrapper in _wrappers():
        m.remove_wrappers_with_key(wrapper_type, keys.WRAPPER)
        m.add_wrapper_with_key(wrapper_type, keys.WRAPPER, wrapper)
    return m


def without_controls(model):
    """A clone of ``model`` without this pack's controls, guidance policy and wrappers: a plain
    pass of the model with every other node's patches (LoRA, other packs' wrappers) kept."""
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    to.pop(keys.CONTROLS, None)
    to.pop(keys.IMAGE_PROMPT_POLICY, None)
    for wrapper_type, _ in _wrappers():
        m.remove_wrappers_with_key(wrapper_type, keys.WRAPPER)
    return m


def add_outermost_wrapper(model, wrapper_type: str, key: str, wrapper) -> None:
    """Register ``wrapper`` on ``model`` (a ModelPatcher, changed in place: call it on a clone)
    so that it runs outside every other wrapper of ``wrapper_type``.

    ComfyUI runs the wrappers of a type in the order of the ``wrappers[type]`` dict (first key
    outermost, see ``comfy.patcher_extension.get_all_wrappers``); the key is put first."""
    wrappers = model.model_options.setdefault("transformer_options", {}).setdefault("wrappers", {})
    by_key = wrappers.get(wrapper_type, {})
    wrappers[wrapper_type] = {key: [wrapper], **{k: list(v) for k, v in by_key.items() if k != key}}


def registered_controls(model) -> tuple[AttentionControl, ...]:
    return tuple(model.model_options.get("transformer_options", {}).get(keys.CONTROLS, ()))


def set_transformer_option(model, key: str, value):
    """A clone of ``model`` with one configuration entry in ``transformer_options``."""
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})[key] = value
    return m


_OUTER_SAMPLE_ARGS = ("noise", "latent_image", "sampler", "sigmas", "denoise_mask")


def _sample_arg(name, args, kwargs):
    i = _OUTER_SAMPLE_ARGS.index(name)
    return args[i] if len(args) > i else kwargs.get(name)


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    original_options = guider.model_options
    transformer_options = original_options.get("transformer_options", {})
    controls = transformer_options.get(keys.CONTROLS, ())
    if not controls:
        return executor(*args, **kwargs)
    run = RunContext(guider.model_patcher, controls,
                     sample_sigmas=_sample_arg("sigmas", args, kwargs),
                     latent_image=_sample_arg("latent_image", args, kwargs),
                     transformer_options=transformer_options, model_options=original_options)
    try:
        guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
        guider.model_options["transformer_options"][keys.RUN] = run
        run.start()
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
        run.close()


def _without_control(controls, call: ModelCall, control, batch: int):
    """``control`` with the residuals of the rows the controls name in
    ``rows_without_control`` zeroed (new tensors; the caller's residuals untouched)."""
    if control is None:
        return None
    rows = set()
    for c in controls:
        asked = c.rows_without_control(call)
        bad = [i for i in asked if not 0 <= i < batch]
        if bad:
            raise ValueError(f"QKV Control: {c.name} expected sampler rows 0-{batch - 1} "
                             f"without ControlNet, got {bad}")
        rows.update(asked)
    return zero_control_rows(control, sorted(rows), batch)


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                        transformer_options={}, **kwargs):
    controls = transformer_options.get(keys.CONTROLS, ())
    if not controls:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    run = transformer_options.get(keys.RUN)
    if run is None:
        raise RuntimeError(
            "QKV Control: the patched model was called outside a ComfyUI sampling run "
            "(expected KSampler, SamplerCustom or another CFGGuider-based sampler)"
        )
    batch = x.shape[0]
    layout = RowLayout.from_cond_or_uncond(transformer_options["cond_or_uncond"], batch)
    call = ModelCall(x, t, layout, c_crossattn, kwargs, run, transformer_options, c_concat)
    control = _without_control(controls, call, control, batch)
    extras = [(c.name, row) for c in controls for row in c.extra_rows(call)]
    dit = run.family.uses_override
    lengths = text_lengths(c_crossattn, extras) if dit else None
    if extras:
        x, t, c_concat, c_crossattn, control, kwargs, layout = append_rows(
            x, t, c_concat, c_crossattn, control, kwargs, layout, extras, pad_text=dit)
    options = transformer_options.copy()
    options[keys.ROWS] = layout
    if dit:
        grid = run.family.image_grid(diffusion_model_of(run.model_patcher), tuple(x.shape[-2:]))
        geometry = CallGeometry(grid, int(c_crossattn.shape[1]) if c_crossattn is not None else 0)
        install_dit_route(options, run, layout, geometry, lengths)
    else:
        options["patches_replace"] = install_routes(transformer_options.get("patches_replace", {}), run, layout)
    out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
    for offset, (_, row) in enumerate(extras):
        if row.on_output is not None:
            row.on_output(out[batch + offset:batch + offset + 1])
    return out[:batch]
