"""The run context: what every control reads during one sampling run, resolved once.

Built by the OUTER_SAMPLE wrapper (``patching.patch``) when a run starts and freed in its
``finally``. Controls read it; none re-derives any of it per call:

- ``family`` / ``layers`` / ``routes``: the model's family adapter (``families``), its
  attention layers (discovered, not hard-coded) and which controls act on which layer;
- ``clock``: the run's sigmas and the step of a call's sigma, so every schedule (a
  ``StepWindow`` of fractions) is resolved one way;
- ``policy``: the image-prompt guidance policy in force (conflict-free when no node set one;
  ``policy_set`` says whether one did, for a method whose official default differs), and
  ``image_prompt_rows(layout)``: which rows of a call see the positive or the negative
  image prompt, from the rows' own ``image_prompt`` property;
- ``scratch(control)``: the small dataclass a control returned from ``start_run``, its
  only place for state that lives during the run;
- ``service(kind)``: one object of a kind several controls share during the run (the reference
  K/V bank's session, ``inversion.reference_kv``), closed when the run ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..attention.layers import AttentionLayer
from ..attention.rows import PROMPT_NEGATIVE, PROMPT_POSITIVE, RowLayout
from ..attention.step_window import StepWindow
from ..families.registry import family_of
from . import keys
from .image_prompt_policy import ImagePromptPolicy, get_policy
from .layers import discover_layers

logger = logging.getLogger("qkv_control")


class RunClock:
    """The run's sigma schedule, and where a sigma falls in it.

    sigmas: the sampler's schedule for this run, descending, ``steps + 1`` values.
    A call's step is the index of the nearest schedule sigma (samplers that evaluate the
    model between two sigmas count as the nearer step).
    """

    def __init__(self, sigmas: Optional[torch.Tensor]):
        if sigmas is None or torch.as_tensor(sigmas).numel() == 0:
            sigmas = torch.zeros(1)
        self.sigmas = torch.as_tensor(sigmas).detach().float().cpu().reshape(-1)
        self.steps = max(self.sigmas.shape[0] - 1, 1)

    def step(self, sigma: float) -> int:
        """Index of ``sigma`` in this run's schedule (nearest match)."""
        return int(torch.argmin((self.sigmas - float(sigma)).abs()))

    def active(self, window: StepWindow, sigma: float) -> bool:
        """Whether a model call at ``sigma`` lies in ``window``."""
        return window.contains(self.step(sigma), self.steps)

    @property
    def first_sigma(self) -> float:
        return float(self.sigmas[0])


@dataclass(frozen=True)
class ImagePromptRows:
    """Rows of one call that see an image prompt: ``positive`` (the image prompt) and
    ``negative`` (rows of the negative branch that get one under the policy: the same image
    under ``both``, a negative image under ``negative_image``; empty when conflict-free)."""

    positive: list[int]
    negative: list[int]

    @property
    def all(self) -> list[int]:
        return sorted(self.positive + self.negative)


class RunContext:
    """One sampling run, for every control registered on the model.

    model_patcher: the sampled model; controls: the registered controls, in order;
    latent_image:  the sampler's starting latent (for denoise < 1);
    model_options: the sampler's model options (default: the model's own).
    """

    def __init__(self, model_patcher, controls, sample_sigmas: Optional[torch.Tensor],
                 latent_image: Optional[torch.Tensor] = None, transformer_options: Optional[dict] = None,
                 model_options: Optional[dict] = None):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options if model_options is None else model_options
        self.controls = tuple(controls)
        self.clock = RunClock(sample_sigmas)
        self.latent_image = latent_image
        if transformer_options is None:
            transformer_options = model_patcher.model_options.get("transformer_options", {})
        self.policy: ImagePromptPolicy = get_policy(transformer_options)
        # Whether an Image Prompt Guidance node chose the policy (else the default above).
        self.policy_set = keys.IMAGE_PROMPT_POLICY in transformer_options
        self.family = family_of(model_patcher, node="QKV Control")
        self.layers: tuple[AttentionLayer, ...] = discover_layers(model_patcher)
        self.layers_by_key = {(layer.kind, layer.key): layer for layer in self.layers}
        self.routes: dict[tuple[str, tuple], list] = {}
        self._scratch: dict[str, Any] = {}
        self._services: dict[type, Any] = {}
        self._started: list = []
        self._warned: set = set()

    def start(self) -> None:
        if self.family.uses_override:
            unready = [c.name for c in self.controls if not c.dit_ready]
            if unready:
                raise ValueError(f"QKV Control: expected an SD1.5 / SD2.x / SDXL (UNet) model for {', '.join(unready)}, "
                                 f"got a {self.family.name} model (these methods do not run on diffusion "
                                 "transformers yet: see docs/dit.md)")
        for control in self.controls:
            for layer in control.select_layers(self.layers):
                self.routes.setdefault((layer.kind, layer.key), []).append(control)
        for control in self.controls:
            self._scratch[control.name] = control.start_run(self)
            self._started.append(control)

    def scratch(self, control) -> Any:
        """The scratch space ``control.start_run`` returned for this run."""
        return self._scratch[control.name]

    def service(self, kind: type) -> Any:
        """The run's one ``kind(self)``, built on first use; its ``close()`` runs when the run ends,
        after every control's ``end_run``."""
        if kind not in self._services:
            self._services[kind] = kind(self)
        return self._services[kind]

    def layers_of(self, control) -> frozenset:
        """Keys of the layers ``control`` acts on in this run."""
        return frozenset(key for (_, key), controls in self.routes.items() if control in controls)

    def warn_once(self, key, message: str, *args) -> None:
        """Log a warning the first time ``key`` comes up in this run."""
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def image_prompt_rows(self, layout: RowLayout) -> ImagePromptRows:
        positive = layout.image_prompt_rows(PROMPT_POSITIVE)
        negative = [] if self.policy.positive_only else layout.image_prompt_rows(PROMPT_NEGATIVE)
        return ImagePromptRows(positive, negative)

    def close(self) -> None:
        """Free everything; never raises, so it cannot hide the run's own exception."""
        for control in reversed(self._started):
            try:
                control.end_run(self)
            except Exception:  # noqa: BLE001 - cleanup must not mask the sampling error
                logger.exception("QKV Control: cleanup of %s failed", control.name)
        self._started.clear()
        for service in reversed(list(self._services.values())):
            try:
                service.close()
            except Exception:  # noqa: BLE001 - cleanup must not mask the sampling error
                logger.exception("QKV Control: closing %s failed", type(service).__name__)
        self._services.clear()
        self._scratch.clear()
        self._warned.clear()
        self.routes.clear()
        self.latent_image = None
