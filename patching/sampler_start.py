"""Where a sampling run starts: controls that say "start at this latent" (MCA-Ctrl's target
starting from the scene's inverted noise) get it through ComfyUI's own noise scaling.

ComfyUI's sampler starts at ``model_sampling.noise_scaling(sigma_0, noise, latent,
max_denoise)`` with ``max_denoise`` decided by the sampler itself (``Sampler.max_denoise``).
That is affine in the noise for every model family (eps/v: ``latent + noise * s``, flow:
``sigma * noise + (1 - sigma) * latent``), so the noise that starts at ``x`` is solved from
two evaluations of ComfyUI's own function, never re-derived here. The SAMPLER_SAMPLE
wrapper below sees exactly what the sampler will scale: the noise, the processed latent and
the sigmas of this run.
"""

from __future__ import annotations

import torch

from . import keys

# SAMPLER_SAMPLE wrapper arguments after the executor: (model_wrap, sigmas, extra_args,
# callback, noise, latent_image, denoise_mask, disable_pbar), as comfy.samplers calls it.
_NOISE_ARG = 4
_LATENT_ARG = 5


def noise_for_start(model_sampling, sigma: torch.Tensor, start: torch.Tensor, latent_image: torch.Tensor,
                    max_denoise: bool) -> torch.Tensor:
    """The noise for which ``model_sampling.noise_scaling(sigma, noise, latent_image, max_denoise)``
    equals ``start``."""
    base = model_sampling.noise_scaling(sigma, torch.zeros_like(start), latent_image, max_denoise)
    unit = model_sampling.noise_scaling(sigma, torch.ones_like(start), latent_image, max_denoise) - base
    return (start - base) / unit


def sampler_sample_wrapper(executor, *args, **kwargs):
    model_wrap, sigmas, extra_args = args[0], args[1], args[2]
    run = extra_args.get("model_options", {}).get("transformer_options", {}).get(keys.RUN)
    if run is None or len(args) <= _LATENT_ARG or sigmas.shape[-1] < 2 or float(sigmas[0]) <= 0:
        return executor(*args, **kwargs)
    noise, latent_image = args[_NOISE_ARG], args[_LATENT_ARG]
    start = None
    for control in run.controls:
        wanted = control.start_latent(run, noise)
        if wanted is not None:
            start = wanted.to(noise)
    if start is None:
        return executor(*args, **kwargs)
    if latent_image is None:
        latent_image = torch.zeros_like(noise)
    sampler = executor.class_obj
    model_sampling = model_wrap.inner_model.model_sampling
    noise = noise_for_start(model_sampling, sigmas[0], start.expand_as(noise), latent_image,
                            sampler.max_denoise(model_wrap, sigmas))
    args = args[:_NOISE_ARG] + (noise,) + args[_NOISE_ARG + 1:]
    return executor(*args, **kwargs)
