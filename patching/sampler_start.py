"""Where a sampling run starts and ends.

Start: controls that say "start at this latent" (MCA-Ctrl's target starting from the
scene's inverted noise, AdaIN noise) get it through ComfyUI's own noise scaling.

ComfyUI's sampler starts at ``model_sampling.noise_scaling(sigma_0, noise, latent,
max_denoise)`` with ``max_denoise`` decided by the sampler itself (``Sampler.max_denoise``).
That is affine in the noise for every model family (eps/v: ``latent + noise * s``, flow:
``sigma * noise + (1 - sigma) * latent``), so the noise that starts at ``x`` is solved from
two evaluations of ComfyUI's own function, never re-derived here. The SAMPLER_SAMPLE
wrapper below sees exactly what the sampler will scale: the noise, the processed latent and
the sigmas of this run.

End: ComfyUI's schedules end at sigma = 0, where a sampler's last step returns the model's x0
prediction. DDIM as diffusers runs it with ``set_alpha_to_one=False`` (the official
InDetail-IP code) ends at the clean level ᾱ₀ instead: its last step goes to
``final_alpha_cumprod = alphas_cumprod[0]`` (sigma_min) and that latent, z = x/√(1+σ₀²), is the
result. A control whose ``end_sigma(run)`` names such a level gets it: the final 0 of the
schedule is replaced by it where the last step would pass it (``schedule_ending_at``), and the
sampler's result is read there with ComfyUI's own ``calculate_input`` (the VP latent the model
would see). Runs that do not end at 0 (a partial KSamplerAdvanced), schedules whose last step
already leaves from the level ('normal', 'karras') and inpainting runs (a denoise mask: the kept
region must stay the given latent) are left as they are.
"""

from __future__ import annotations

import torch

from . import keys

# SAMPLER_SAMPLE wrapper arguments after the executor: (model_wrap, sigmas, extra_args,
# callback, noise, latent_image, denoise_mask, disable_pbar), as comfy.samplers calls it.
_SIGMAS_ARG = 1
_NOISE_ARG = 4
_LATENT_ARG = 5
_MASK_ARG = 6
# Schedule sigmas within this relative distance of the end level are the end level itself.
_AT_END_RTOL = 1e-4


def noise_for_start(model_sampling, sigma: torch.Tensor, start: torch.Tensor, latent_image: torch.Tensor,
                    max_denoise: bool) -> torch.Tensor:
    """The noise for which ``model_sampling.noise_scaling(sigma, noise, latent_image, max_denoise)``
    equals ``start``."""
    base = model_sampling.noise_scaling(sigma, torch.zeros_like(start), latent_image, max_denoise)
    unit = model_sampling.noise_scaling(sigma, torch.ones_like(start), latent_image, max_denoise) - base
    return (start - base) / unit


def schedule_ending_at(sigmas: torch.Tensor, end: float) -> torch.Tensor:
    """``sigmas`` (descending, ending at 0) with the last step going to ``end`` instead of 0,
    when that step would pass it (a DDIM-like schedule: ddim_uniform's last step leaves from
    σ(t=1)). Unchanged when the last step already leaves from ``end`` or below ('normal' and
    'karras' end [..., sigma_min, 0]: that step is ComfyUI's own, from the clean level)."""
    if float(sigmas[-2]) <= end * (1 + _AT_END_RTOL):
        return sigmas
    return torch.cat([sigmas[:-1], sigmas.new_tensor([end])])


def _end_sigma(run, sigmas: torch.Tensor, denoise_mask) -> float | None:
    if float(sigmas[-1]) != 0.0 or denoise_mask is not None:
        return None
    for control in run.controls:
        end = control.end_sigma(run)
        if end is not None and end > 0:
            return float(end)
    return None


def _start_noise(run, executor, args) -> torch.Tensor | None:
    """The noise that starts the run where a control wants it, or None (ComfyUI's own start)."""
    model_wrap, sigmas = args[0], args[_SIGMAS_ARG]
    if float(sigmas[0]) <= 0:
        return None
    noise, latent_image = args[_NOISE_ARG], args[_LATENT_ARG]
    start = None
    for control in run.controls:
        wanted = control.start_latent(run, noise)
        if wanted is not None:
            start = wanted.to(noise)
    if start is None:
        return None
    if latent_image is None:
        latent_image = torch.zeros_like(noise)
    sampler = executor.class_obj
    model_sampling = model_wrap.inner_model.model_sampling
    return noise_for_start(model_sampling, sigmas[0], start.expand_as(noise), latent_image,
                           sampler.max_denoise(model_wrap, sigmas))


def sampler_sample_wrapper(executor, *args, **kwargs):
    extra_args = args[2]
    run = extra_args.get("model_options", {}).get("transformer_options", {}).get(keys.RUN)
    if run is None or len(args) <= _LATENT_ARG or args[_SIGMAS_ARG].shape[-1] < 2:
        return executor(*args, **kwargs)
    args = list(args)
    mask = args[_MASK_ARG] if len(args) > _MASK_ARG else kwargs.get("denoise_mask")
    end = _end_sigma(run, args[_SIGMAS_ARG], mask)
    ends_early = False
    if end is not None:
        sigmas = schedule_ending_at(args[_SIGMAS_ARG], end)
        ends_early = sigmas is not args[_SIGMAS_ARG]
        args[_SIGMAS_ARG] = sigmas
    noise = _start_noise(run, executor, args)
    if noise is not None:
        args[_NOISE_ARG] = noise
    samples = executor(*args, **kwargs)
    if ends_early:
        # The latent at the end level read as the VP latent there (diffusers' DDIM result).
        samples = args[0].inner_model.model_sampling.calculate_input(args[_SIGMAS_ARG][-1], samples)
    return samples
