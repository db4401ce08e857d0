"""The inverted-latent chain: a reference latent at every sigma of its inversion schedule.

InDetail-IP (Sec. 3, "Self-attention-based Image Prompting") obtains the chain
{z_T^P, ..., z_0^P} by deterministic DDIM inversion and feeds z_t^P to the model
at the matching time step of generation. Here the chain lives in the sampler's
own space (ComfyUI's k-diffusion ``x`` = latent + sigma * eps for eps/v models),
so a branch can ask for the latent at *any* sigma a sampler uses:

- a sigma of the inversion schedule gives the stored latent exactly (the paper's
  setting: same scheduler, same step count);
- a sigma between two stored ones gives the DDIM step from the lower stored latent
  with the epsilon the chain implies on that segment, ``(x_hi - x_lo) / (s_hi - s_lo)``.
  In x-space the DDIM ODE is dx/dsigma = eps, so this is linear interpolation in
  sigma. Its error is that of a DDIM sub-step, O(dsigma^2 * |d eps/d sigma|), and it is
  exact at both ends of the segment. This covers other schedulers, step counts,
  ancestral/SDE samplers (which evaluate the model at intermediate sigmas) and
  denoise < 1. For flow models (x = (1 - sigma) * x0 + sigma * eps, ``inversion/flow.py``)
  the ODE is dx/dsigma = v and the same rule is an Euler sub-step with the segment's velocity;
- above the top sigma the last segment's epsilon is extrapolated (one DDIM step);
- below the bottom sigma (the clean level sigma_min of the official convention: a sampler
  may ask for sigmas between it and 0) the first segment's epsilon is extrapolated downwards,
  the DDIM step from the clean level towards sigma = 0.

No ComfyUI import here.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..attention.cover_crop import cover_crop

# Relative tolerance for "this sigma is a node of the schedule"
_NODE_RTOL = 1e-4
_NODE_ATOL = 1e-6


class InvertedChain:
    """Latents of one or more reference images at ascending sigmas.

    sigmas:  [N+1], ascending, >= 0; ``sigmas[0]`` is the clean latent's sigma: the model's
             ``sigma_min`` (the official code's ᾱ₀, the default) or 0.
    latents: [N+1, B, C, H, W]; ``latents[i]`` is the batch at ``sigmas[i]`` in the
             sampler's x-space (what ComfyUI samplers step, before ``calculate_input``).
    """

    def __init__(self, sigmas: torch.Tensor, latents: torch.Tensor):
        sigmas = torch.as_tensor(sigmas).detach().float().cpu().reshape(-1)
        if latents.ndim != 5:
            raise ValueError(f"inverted chain: expected latents [N+1, B, C, H, W], got shape {tuple(latents.shape)}")
        if latents.shape[0] != sigmas.shape[0]:
            raise ValueError(
                f"inverted chain: expected one latent per sigma, got {latents.shape[0]} latents for {sigmas.shape[0]} sigmas"
            )
        if sigmas.shape[0] < 2 or bool((sigmas[1:] <= sigmas[:-1]).any()) or float(sigmas[0]) < 0:
            raise ValueError(f"inverted chain: expected at least 2 strictly ascending sigmas >= 0, got {sigmas.tolist()}")
        self.sigmas = sigmas
        self.latents = latents.detach()
        self._resized: dict[tuple[int, int], "InvertedChain"] = {}

    # ----------------------------------------------------------------- shape
    @property
    def steps(self) -> int:
        """Number of inversion steps (UNet calls it took)."""
        return self.sigmas.shape[0] - 1

    @property
    def batch(self) -> int:
        return self.latents.shape[1]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """[C, H, W] of one latent."""
        return tuple(self.latents.shape[2:])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def z0(self) -> torch.Tensor:
        """The clean latent the inversion started from, [B, C, H, W], in x-space at ``sigmas[0]``
        (the VAE latent times √(1+σ₀²))."""
        return self.latents[0]

    @property
    def z_top(self) -> torch.Tensor:
        """The most-noised latent (z_T), [B, C, H, W], in x-space."""
        return self.latents[-1]

    # ---------------------------------------------------------------- lookup
    def node_index(self, sigma: float) -> Optional[int]:
        """Index of the stored sigma equal to ``sigma`` (within a relative 1e-4), else None."""
        diffs = (self.sigmas - float(sigma)).abs()
        i = int(torch.argmin(diffs))
        if float(diffs[i]) <= _NODE_ATOL + _NODE_RTOL * abs(float(sigma)):
            return i
        return None

    def is_exact(self, sigma: float) -> bool:
        return self.node_index(sigma) is not None

    def latent_at(self, sigma: float) -> torch.Tensor:
        """The chain's latent [B, C, H, W] at ``sigma`` (see the module docstring for the rule)."""
        sigma = float(sigma)
        exact = self.node_index(sigma)
        if exact is not None:
            return self.latents[exact]
        s = self.sigmas
        sigma = max(sigma, 0.0)
        if sigma <= float(s[0]):
            lo, hi = 0, 1
        elif sigma >= float(s[-1]):
            lo, hi = s.shape[0] - 2, s.shape[0] - 1
        else:
            hi = int(torch.searchsorted(s, torch.tensor([sigma]), right=True)[0])
            lo = hi - 1
        s_lo, s_hi = float(s[lo]), float(s[hi])
        eps = (self.latents[hi] - self.latents[lo]) / (s_hi - s_lo)
        return self.latents[lo] + (sigma - s_lo) * eps

    # ---------------------------------------------------------------- resize
    def resized(self, height: int, width: int) -> "InvertedChain":
        """This chain at another latent size (policy for a reference whose size differs from the
        target's): ``attention.cover_crop`` (cover, centre crop, nearest-exact, so the per-pixel
        noise statistics of each noisy latent are unchanged)."""
        if tuple(self.latents.shape[-2:]) == (height, width):
            return self
        cached = self._resized.get((height, width))
        if cached is not None:
            return cached
        chain = InvertedChain(self.sigmas, cover_crop(self.latents, (height, width)))
        self._resized[(height, width)] = chain
        return chain

    def to(self, device=None, dtype=None) -> "InvertedChain":
        return InvertedChain(self.sigmas, self.latents.to(device=device, dtype=dtype))

    def __repr__(self) -> str:
        return (f"InvertedChain(steps={self.steps}, batch={self.batch}, latent={self.latent_shape}, "
                f"sigma {float(self.sigmas[0]):.4f}..{self.sigma_max:.3f})")
