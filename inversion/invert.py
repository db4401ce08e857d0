"""Running DDIM inversion on a ComfyUI model, with a result cache.

The inversion goes through ComfyUI's own sampling machinery (CFGGuider at cfg 1, so
one UNet row per step and no CFG; conds, model loading, latent scaling and every
model wrapper behave as in a normal run) with a sampler function that walks the
ascending schedule and records the latent at every sigma. Flow-matching models (Flux,
SD3: ``model_sampling`` CONST) use the Euler inversion of ``inversion/flow.py``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.utils
from comfy.patcher_extension import WrappersMP

from ..patching import keys
from ..families.base import model_config_of
from ..families.registry import family_of
from ..patching.model_info import model_family
from ..patching.patch import add_outermost_wrapper, without_controls
from . import flow
from .chain import InvertedChain
from .ddim import ddim_step, eps_from_denoised, inversion_input_scale
from .result import InversionResult

logger = logging.getLogger("qkv_control")

# Results kept per base model (weakly keyed: freed with the model).
_CACHE_SIZE = 8
_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()
_CAPTURE_KEY = "qkv_control.inversion_capture"


def prediction_type(model) -> str:
    """'eps', 'v' or 'flow' for the model's ``model_sampling``; a ValueError for anything the
    inversion cannot invert."""
    ms = model.get_model_object("model_sampling")
    if flow.is_flow(ms):
        return flow.FLOW
    if isinstance(ms, comfy.model_sampling.V_PREDICTION):
        return "v"
    if isinstance(ms, comfy.model_sampling.EPS) and not isinstance(ms, comfy.model_sampling.X0):
        return "eps"
    raise ValueError(
        f"DDIM Inversion: expected an eps- or v-prediction model (SD1.5, SD2.x, SDXL) or a flow model "
        f"(Flux, SD3), "
        f"got model_sampling {type(ms).__name__}"
    )


def inversion_sigmas(model, steps: int, scheduler: str) -> torch.Tensor:
    """The ascending inversion schedule [0, ..., sigma_max]: the sampler's schedule for
    (scheduler, steps) walked backwards, so both meet at the same sigmas."""
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps).float().cpu()
    return torch.flip(sigmas, dims=(0,))


def empty_conditioning(model):
    """Zero text conditioning of the model's widths, used when no prompt is connected."""
    return family_of(model).empty_conditioning(model_config_of(model))


def _hash_tensor(h, tensor) -> None:
    t = tensor.detach().float().cpu().contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())


def _hash_conditioning(h, conditioning) -> None:
    for cond, extra in conditioning:
        _hash_tensor(h, cond)
        for name in sorted(extra):
            value = extra[name]
            h.update(name.encode())
            if torch.is_tensor(value):
                _hash_tensor(h, value)
            elif isinstance(value, (int, float, str, bool, type(None))):
                h.update(repr(value).encode())
            else:
                h.update(type(value).__name__.encode())


def cache_key(model, samples: torch.Tensor, sigmas: torch.Tensor, conditioning) -> str:
    """Content key: image latent, schedule, prompt, and the model's weight patches (LoRA ...)."""
    h = hashlib.sha256()
    _hash_tensor(h, samples)
    _hash_tensor(h, sigmas)
    _hash_conditioning(h, conditioning)
    h.update(str(model.patches_uuid).encode())
    h.update(repr(sorted(model.patches.keys())).encode())
    h.update(repr(sorted(str(k) for k in model.object_patches)).encode())
    h.update(_options_fingerprint(model.model_options).encode())
    return h.hexdigest()


def _options_fingerprint(options) -> str:
    """Identity of the callables another node patched into model_options (attention patches,
    wrappers, cfg functions): clones share those objects, a different patch is another object.
    This pack's own controls are stripped before inverting, so they are left out."""
    parts = []

    def walk(value, path):
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                if key in (keys.CONTROLS, keys.IMAGE_PROMPT_POLICY, keys.WRAPPER):
                    continue
                walk(value[key], f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")
        elif callable(value):
            parts.append(f"{path}={id(value)}")

    walk(options, "")
    return ";".join(parts)


def _cached(model, key: str):
    with _cache_lock:
        per_model = _cache.get(model.model)
        if per_model is None or key not in per_model:
            return None
        per_model.move_to_end(key)
        return per_model[key]


def _store(model, key: str, result: InversionResult) -> None:
    with _cache_lock:
        per_model = _cache.setdefault(model.model, OrderedDict())
        per_model[key] = result
        while len(per_model) > _CACHE_SIZE:
            per_model.popitem(last=False)


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _capture_wrapper(record: dict):
    """APPLY_MODEL wrapper recording the per-row inputs of the first call, so the
    reference row later gets exactly the context/conds the inversion used."""

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if "context" not in record and c_crossattn is not None:
            record["context"] = c_crossattn[:1].detach().cpu()
            conds = {}
            for name, value in kwargs.items():
                if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == x.shape[0]:
                    conds[name] = value[:1].detach().cpu()
            record["conds"] = conds
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    return wrapper


def _inversion_sampler(record: dict, progress, sigma_data: float):
    """A k-diffusion style sampler function walking an ascending schedule with DDIM steps."""

    @torch.no_grad()
    def sample_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        s_in = x.new_ones([x.shape[0]])
        latents = [x.detach().cpu()]
        for i in range(len(sigmas) - 1):
            comfy.model_management.throw_exception_if_processing_interrupted()
            sigma_lo, sigma_hi = float(sigmas[i]), float(sigmas[i + 1])
            # eps(z_lo, t_hi): the official/diffusers inversion convention (see ddim.py)
            x_in = x * inversion_input_scale(sigma_lo, sigma_hi, sigma_data)
            denoised = model(x_in, sigmas[i + 1] * s_in, **extra_args)
            eps = eps_from_denoised(x_in, denoised, sigma_hi)
            x = ddim_step(x, eps, sigma_lo, sigma_hi)
            latents.append(x.detach().cpu())
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i + 1], "sigma_hat": sigmas[i + 1], "denoised": denoised})
            progress.update(1)
        record["latents"] = latents
        return x

    return sample_ddim_inversion


def invert(model, samples: torch.Tensor, steps: int, scheduler: str, conditioning=None,
           use_cache: bool = True) -> tuple[InversionResult, bool]:
    """DDIM-invert ``samples`` (a VAE-encoded LATENT's tensor, [B, C, H, W]) with ``model``.

    Returns (result, from_cache). One UNet row per image per step, conditional only.
    """
    prediction = prediction_type(model)
    if conditioning is None:
        conditioning = empty_conditioning(model)
    if prediction == flow.FLOW:
        sigmas = flow.inversion_sigmas(model.get_model_object("model_sampling"), steps, scheduler)
    else:
        sigmas = inversion_sigmas(model, steps, scheduler)
    key = cache_key(model, samples, sigmas, conditioning)
    if use_cache:
        hit = _cached(model, key)
        if hit is not None:
            logger.info("QKV Control: DDIM inversion reused from cache (%s)", hit.describe())
            return hit, True

    record: dict = {}
    # The inversion is a plain pass of the model (other nodes' patches kept, the pack's removed).
    plain = without_controls(model)
    # Outermost APPLY_MODEL wrapper: it records what the model is given, whatever other wrappers do.
    add_outermost_wrapper(plain, WrappersMP.APPLY_MODEL, _CAPTURE_KEY, _capture_wrapper(record))
    progress = comfy.utils.ProgressBar(steps)
    sigma_data = float(getattr(model.get_model_object("model_sampling"), "sigma_data", 1.0))
    if prediction == flow.FLOW:
        sampler = comfy.samplers.KSAMPLER(flow.flow_inversion_sampler(record, progress))
    else:
        sampler = comfy.samplers.KSAMPLER(_inversion_sampler(record, progress, sigma_data))
    latent = samples.float()
    noise = torch.zeros_like(latent)
    comfy.samplers.sample(plain, noise, conditioning, conditioning, 1.0, plain.load_device, sampler, sigmas,
                          model_options=plain.model_options, latent_image=latent, disable_pbar=True)
    latents = torch.stack(record["latents"])  # [N+1, B, C, H, W], x-space, process_latent_in applied
    latent_format = model.get_model_object("latent_format")
    result = InversionResult(
        chain=InvertedChain(sigmas, latents),
        context=record["context"],
        conds=record.get("conds", {}),
        latent_channels=int(latents.shape[2]),
        context_dim=int(record["context"].shape[-1]),
        model_family=model_family(model),
        prediction=prediction,
        key=key,
        latent_format=latent_format,
        model_sampling=model.get_model_object("model_sampling"),
    )
    if use_cache:
        _store(model, key, result)
    logger.info("QKV Control: DDIM inversion done (%s)", result.describe())
    return result, False
