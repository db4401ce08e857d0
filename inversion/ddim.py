"""DDIM inversion steps and AdaIN of the initial noise, as pure tensor math.

Spaces: ComfyUI samplers step ``x = z0 + sigma * eps`` (k-diffusion space); the
model sees ``x / sqrt(sigma^2 + sigma_data^2)`` (the DDPM/VP latent z_t), and
``alpha_bar = 1 / (1 + sigma^2)`` for sigma_data = 1. In x-space a DDIM (eta 0)
step from sigma_a to sigma_b is ``x_b = x_a + (sigma_b - sigma_a) * eps``.
"""

from __future__ import annotations

import math

import torch


def ddim_step(x: torch.Tensor, eps: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2020, eq. 12 with eta = 0) in x-space, either
    direction: x0 = x - sigma_from * eps, x_to = x0 + sigma_to * eps."""
    return x + (float(sigma_to) - float(sigma_from)) * eps


def inversion_input_scale(sigma_lo: float, sigma_hi: float, sigma_data: float = 1.0) -> float:
    """Factor that makes the model see the *lower*-noise VP latent z_lo at the higher sigma.

    DDIM inversion (diffusers' DDIMInverseScheduler, the official InDetail-IP/RIVAL code)
    evaluates eps(z_{t-1}, t): the latent of the current, less noisy step with the next
    step's timestep. ComfyUI's ``calculate_input`` divides by sqrt(sigma_hi^2 + sd^2); scaling
    x_lo by this factor first makes the model input exactly z_lo = x_lo / sqrt(sigma_lo^2 + sd^2).
    """
    return math.sqrt(float(sigma_hi) ** 2 + sigma_data ** 2) / math.sqrt(float(sigma_lo) ** 2 + sigma_data ** 2)


def eps_from_denoised(x_in: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """The model's epsilon from its x0 prediction, for eps- and v-prediction alike
    (ComfyUI's ``calculate_denoised`` already converted the raw output)."""
    return (x_in - denoised) / float(sigma)


def vp_scale(sigma: float, sigma_data: float = 1.0) -> float:
    """x-space -> VP space: z = x / sqrt(sigma^2 + sigma_data^2) (unit-variance noise at sigma_max)."""
    return 1.0 / math.sqrt(float(sigma) ** 2 + sigma_data ** 2)


def adain(x: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN (InDetail-IP eq. 2, from StyleID): sigma(y) * (x - mu(x)) / sigma(x) + mu(y).

    Per sample and channel over the spatial positions, unbiased variance, ``eps`` added to
    both variances (the official code's convention). ``reference`` [B_ref, C, H', W'] has one
    sample (used for every x) or as many as ``x`` (sample i styles x[i]); its spatial size may
    differ from x's.
    """
    if x.ndim != 4 or reference.ndim != 4:
        raise ValueError(f"adain: expected [B, C, H, W] tensors, got {tuple(x.shape)} and {tuple(reference.shape)}")
    if reference.shape[1] != x.shape[1]:
        raise ValueError(f"adain: expected {x.shape[1]} reference channels, got {reference.shape[1]}")
    if reference.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"adain: expected 1 or {x.shape[0]} reference samples, got {reference.shape[0]}")
    x32, y32 = x.float(), reference.float().to(x.device)
    mu_x = x32.mean(dim=(2, 3), keepdim=True)
    mu_y = y32.mean(dim=(2, 3), keepdim=True)
    std_x = (x32.var(dim=(2, 3), keepdim=True, unbiased=True) + eps).sqrt()
    std_y = (y32.var(dim=(2, 3), keepdim=True, unbiased=True) + eps).sqrt()
    return (std_y * (x32 - mu_x) / std_x + mu_y).to(x.dtype)
