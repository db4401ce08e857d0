"""State that lives for one sampling run and is freed when it ends."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ..attention.layers import AttentionLayer
from .layers import discover_layers

logger = logging.getLogger("qkv_control")


class RunState:
    """Created by the OUTER_SAMPLE wrapper, freed in its ``finally``.

    layers:        the model's attention layers (discovered, not hard-coded)
    routes:        (kind, layer key) -> controls acting there, in registration order
    sample_sigmas: the sampler's sigma schedule for this run
    latent_image:  the sampler's starting latent (for denoise < 1)
    """

    def __init__(self, model_patcher, controls, sample_sigmas: torch.Tensor,
                 latent_image: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None):
        self.model_patcher = model_patcher
        self.controls = tuple(controls)
        self.sample_sigmas = sample_sigmas
        self.latent_image = latent_image
        self.noise = noise
        self.layers: tuple[AttentionLayer, ...] = discover_layers(model_patcher)
        self.layers_by_key = {(layer.kind, layer.key): layer for layer in self.layers}
        self.routes: dict[tuple[str, tuple], list] = {}
        self._states: dict[str, dict[str, Any]] = {}
        self._started: list = []

    def start(self) -> None:
        for control in self.controls:
            for layer in control.select_layers(self.layers):
                self.routes.setdefault((layer.kind, layer.key), []).append(control)
            control.start_run(self)
            self._started.append(control)

    def state(self, control) -> dict[str, Any]:
        """Scratch space of one control for this run."""
        return self._states.setdefault(control.name, {})

    def step_index(self, sigma: float) -> int:
        """Index of ``sigma`` in this run's schedule (nearest match)."""
        return int(torch.argmin((self.sample_sigmas.float().cpu() - float(sigma)).abs()))

    def close(self) -> None:
        """Free everything; never raises, so it cannot hide the run's own exception."""
        for control in reversed(self._started):
            try:
                control.end_run(self)
            except Exception:  # noqa: BLE001 - cleanup must not mask the sampling error
                logger.exception("QKV Control: cleanup of %s failed", control.name)
        self._started.clear()
        self._states.clear()
        self.routes.clear()
        self.latent_image = None
        self.noise = None
