"""Running DDIM inversion on a ComfyUI model, with a result cache.

The inversion goes through ComfyUI's own sampling machinery (CFGGuider at cfg 1, so
one UNet row per step and no CFG; conds, model loading, latent scaling and every
model wrapper behave as in a normal run) with a sampler function that walks the
ascending schedule and records the latent at every sigma.

Where the walk starts is the *clean level* (``clean_sigma``, built per prediction type):
the official InDetail-IP code inverts with diffusers' ``DDIMScheduler(set_alpha_to_one=False)``,
whose first step leaves from ``final_alpha_cumprod = alphas_cumprod[0]``: the VAE latent is
the latent at ᾱ₀, i.e. at σ₀ = √((1−ᾱ₀)/ᾱ₀) = ``model_sampling.sigma_min`` (0.0292 on SD's
discrete schedule), and in ComfyUI's x-space it is ``z0·√(1+σ₀²)``. ``zero`` keeps σ = 0.
Flow-matching models (Flux, SD3: ``model_sampling`` CONST) use the Euler inversion of
``inversion/flow.py`` from their clean level σ = 0.
"""

from __future__ import annotations

import dataclasses
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

from ..families.base import model_config_of
from ..families.registry import family_of
from ..patching.model_info import model_family
from ..patching.patch import add_outermost_wrapper, without_controls
from . import flow
from .chain import InvertedChain
from .fingerprint import hash_conditioning, hash_tensor, model_fingerprint
from .ddim import ddim_step, eps_from_denoised, inversion_input_scale, vp_scale
from .result import InversionResult

logger = logging.getLogger("qkv_control")

# Results kept per base model (weakly keyed: freed with the model).
_CACHE_SIZE = 8
_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()
_CAPTURE_KEY = "qkv_control.inversion_capture"

# Clean levels: the sigma the VAE latent is taken to be at.
CLEAN_SIGMA_MIN = "sigma_min"  # the official code's ᾱ₀ (diffusers DDIM, set_alpha_to_one=False)
CLEAN_ZERO = "zero"            # σ = 0: the mirror of a ComfyUI sampler's last step to 0
CLEAN_LEVELS = (CLEAN_SIGMA_MIN, CLEAN_ZERO)
DEFAULT_CLEAN_LEVEL = CLEAN_SIGMA_MIN
# Schedule sigmas within this relative distance of the clean level are the clean level itself.
_AT_CLEAN_RTOL = 1e-4


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


def clean_sigma(model_sampling, prediction: str, clean_level: str = DEFAULT_CLEAN_LEVEL) -> float:
    """The sigma of the clean (VAE) latent, per prediction type.

    eps / v (DDPM-discrete schedules): ``sigma_min`` = √((1−ᾱ₀)/ᾱ₀), the level diffusers' DDIM
    with ``set_alpha_to_one=False`` starts its inversion from and ends its sampling at (the
    official code's scheduler); ``zero`` gives σ = 0. Another prediction type needs its own
    rule here (a flow model's clean level is σ = 0 of its own parametrisation).
    """
    if clean_level not in CLEAN_LEVELS:
        raise ValueError(f"DDIM Inversion: expected a clean level in {', '.join(CLEAN_LEVELS)}, got '{clean_level}'")
    if prediction not in ("eps", "v"):
        raise ValueError(f"DDIM Inversion: expected an eps- or v-prediction schedule, got '{prediction}'")
    if clean_level == CLEAN_ZERO:
        return 0.0
    return float(model_sampling.sigma_min)


def inversion_sigmas(model, steps: int, scheduler: str, clean_level: str = DEFAULT_CLEAN_LEVEL) -> torch.Tensor:
    """The ascending inversion schedule [σ_clean, ..., sigma_max]: the sampler's schedule for
    (scheduler, steps) walked backwards, so both meet at the same sigmas, starting at the
    clean level. The sampler's schedule ends at 0; sigmas at or below the clean level are not
    inversion steps (a schedule ending [..., sigma_min, 0] has none there: its latent at
    sigma_min is the clean latent), so 'normal' and 'karras' invert in ``steps - 1`` steps."""
    ms = model.get_model_object("model_sampling")
    clean = clean_sigma(ms, prediction_type(model), clean_level)
    ascending = torch.flip(comfy.samplers.calculate_sigmas(ms, scheduler, steps).float().cpu(), dims=(0,))
    above = ascending[ascending > clean * (1 + _AT_CLEAN_RTOL)]
    if above.numel() == 0:
        raise ValueError(f"DDIM Inversion: expected a schedule with a sigma above the clean level {clean:.4f}, "
                         f"got {ascending.tolist()} ({scheduler}, {steps} steps)")
    return torch.cat([torch.tensor([clean]), above])


def empty_conditioning(model):
    """Zero text conditioning of the model's widths, used when no prompt is connected."""
    return family_of(model).empty_conditioning(model_config_of(model))


def cache_key(model, samples: torch.Tensor, sigmas: torch.Tensor, conditioning,
              clean_level: str = DEFAULT_CLEAN_LEVEL) -> str:
    """Content key: image latent, schedule and clean level, prompt, and the model's patches
    (weight patches such as a LoRA, object patches, other nodes' callables: ``fingerprint``)."""
    h = hashlib.sha256()
    hash_tensor(h, samples)
    hash_tensor(h, sigmas)
    h.update(f"clean={clean_level}".encode())
    hash_conditioning(h, conditioning)
    h.update(model_fingerprint(model).encode())
    return h.hexdigest()


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


def _per_row(value, batch: int) -> bool:
    return torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch


def _capture_wrapper(record: dict, run_model: bool = True):
    """APPLY_MODEL wrapper recording the per-row inputs of the first call, so the
    reference row later gets exactly the context/conds the inversion used. With
    ``run_model=False`` it only records (a probe of what the model would be given)."""

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if "context" not in record and c_crossattn is not None:
            record["context"] = c_crossattn[:1].detach().cpu()
            conds = {}
            for name, value in kwargs.items():
                if _per_row(value, x.shape[0]):
                    conds[name] = value[:1].detach().cpu()
                elif isinstance(value, list) and value and all(_per_row(v, x.shape[0]) for v in value):
                    # a list of per-row tensors (Flux Kontext's ref_latents): the first row of each
                    conds[name] = [v[:1].detach().cpu() for v in value]
            record["conds"] = conds
        if not run_model:
            return x  # denoised = x: the probe's one sampler step changes nothing
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    return wrapper


def _inversion_sampler(record: dict, progress, sigma_data: float):
    """A k-diffusion style sampler function walking an ascending schedule with DDIM steps."""

    @torch.no_grad()
    def sample_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        s_in = x.new_ones([x.shape[0]])
        # The clean latent z0 is the VP latent at the clean level sigmas[0]: x = z0·√(σ₀² + σ_data²)
        # (z0 itself for σ₀ = 0).
        x = x / vp_scale(float(sigmas[0]), sigma_data)
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


def _one_call_sampler():
    """A sampler function that calls the model once (the probe of ``model_inputs``)."""

    @torch.no_grad()
    def sample_probe(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args)

    return sample_probe


def model_inputs(model, conditioning, samples: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(context [1, T, D], per-row conds) ComfyUI gives the model for ``conditioning`` with a
    latent like ``samples``: what a stream row with this text needs. No UNet call: ComfyUI's
    own cond processing runs, the outermost APPLY_MODEL wrapper records and returns."""
    record: dict = {}
    plain = without_controls(model)
    add_outermost_wrapper(plain, WrappersMP.APPLY_MODEL, _CAPTURE_KEY, _capture_wrapper(record, run_model=False))
    sigmas = torch.tensor([float(model.get_model_object("model_sampling").sigma_max), 0.0])
    latent = samples.float()
    comfy.samplers.sample(plain, torch.zeros_like(latent), conditioning, conditioning, 1.0, plain.load_device,
                          comfy.samplers.KSAMPLER(_one_call_sampler()), sigmas,
                          model_options=plain.model_options, latent_image=latent, disable_pbar=True)
    return record["context"], record.get("conds", {})


def _same_tensors(a, b) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and \
            all(_same_tensors(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and torch.equal(a, b)


def _same_text(context_a, conds_a: dict, context_b, conds_b: dict) -> bool:
    if not _same_tensors(context_a, context_b) or set(conds_a) != set(conds_b):
        return False
    return all(_same_tensors(conds_a[k], conds_b[k]) for k in conds_a)


def invert(model, samples: torch.Tensor, steps: int, scheduler: str, conditioning=None,
           use_cache: bool = True, clean_level: str = DEFAULT_CLEAN_LEVEL,
           negative=None) -> tuple[InversionResult, bool]:
    """DDIM-invert ``samples`` (a VAE-encoded LATENT's tensor, [B, C, H, W]) with ``model``.

    ``clean_level``: the sigma the latent is taken to be at (``clean_sigma``). ``negative``:
    the reference's text in the negative CFG branch (a CONDITIONING, official: the empty
    prompt), used where the guidance policy gives that branch its own reference row; None or
    the same text as ``conditioning``: one reference text for both branches.
    Returns (result, from_cache). One UNet row per image per step, conditional only.
    """
    prediction = prediction_type(model)
    if conditioning is None:
        conditioning = empty_conditioning(model)
    if prediction == flow.FLOW:
        # A flow model's clean latent is its sigma = 0 (x = (1 - sigma) x0 + sigma eps).
        clean_level = CLEAN_ZERO
        sigmas = flow.inversion_sigmas(model.get_model_object("model_sampling"), steps, scheduler)
    else:
        sigmas = inversion_sigmas(model, steps, scheduler, clean_level)
    key = cache_key(model, samples, sigmas, conditioning, clean_level)
    result = _cached(model, key) if use_cache else None
    from_cache = result is not None
    if from_cache:
        logger.info("QKV Control: DDIM inversion reused from cache (%s)", result.describe())
    else:
        result = _run_inversion(model, samples, sigmas, conditioning, prediction, key, clean_level)
        if use_cache:
            _store(model, key, result)
        logger.info("QKV Control: DDIM inversion done (%s)", result.describe())
    if negative is not None:
        # The chain does not depend on the negative text: it is attached to the (cached) result.
        context, conds = model_inputs(model, negative, samples)
        if not _same_text(context, conds, result.context, result.conds):
            result = dataclasses.replace(result, negative_context=context, negative_conds=conds)
    return result, from_cache


def _run_inversion(model, samples, sigmas, conditioning, prediction, key, clean_level) -> InversionResult:
    record: dict = {}
    # The inversion is a plain pass of the model (other nodes' patches kept, the pack's removed).
    plain = without_controls(model)
    # Outermost APPLY_MODEL wrapper: it records what the model is given, whatever other wrappers do.
    add_outermost_wrapper(plain, WrappersMP.APPLY_MODEL, _CAPTURE_KEY, _capture_wrapper(record))
    progress = comfy.utils.ProgressBar(sigmas.shape[0] - 1)
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
    return InversionResult(
        chain=InvertedChain(sigmas, latents),
        context=record["context"],
        conds=record.get("conds", {}),
        latent_channels=int(latents.shape[2]),
        context_dim=int(record["context"].shape[-1]),
        model_family=model_family(model),
        prediction=prediction,
        key=key,
        latent_format=model.get_model_object("latent_format"),
        model_sampling=model.get_model_object("model_sampling"),
        clean_level=clean_level,
    )
