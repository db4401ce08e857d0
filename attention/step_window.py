"""When a control acts: a window of a sampling run's steps, given as fractions.

Every schedule of the pack (InDetail-IP's attention fusion, MCA-Ctrl's SAGI/SALQ phases,
the IP-Adapter family's start/end) is written this one way. A window ``start-end`` holds
step ``i`` of a run of ``N`` steps when ``start <= i/N < end``; an end of 1 includes the last
step. The run context (``patching.run_context.RunClock``) turns the sigma of a model call
into its step, so a window means the same for every sampler and scheduler:

- another step count: the same share of the steps (``0-0.2`` is the first 10 of 50 steps,
  the first 4 of 20);
- denoise < 1: fractions of the steps the run actually takes;
- a split sampler (two KSampler Advanced nodes, or SamplerCustom over part of the sigmas):
  each sampler node is its own run, so the window applies to each part's own steps.

No ComfyUI import here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Window ends computed from other fractions (0.8 - 0.1) carry float noise; a step on a
# boundary must land on the same side however the boundary was computed.
_EPS = 1e-9


@dataclass(frozen=True)
class StepWindow:
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"step window: expected 0 <= start <= end <= 1 (fractions of the steps), "
                             f"got {self.start}-{self.end}")

    def contains(self, step: int, steps: int) -> bool:
        """Whether step ``step`` (0-based) of a run of ``steps`` steps lies in the window."""
        fraction = step / max(int(steps), 1)
        if self.end >= 1.0 - _EPS:
            return fraction >= self.start - _EPS
        return self.start - _EPS <= fraction < self.end - _EPS

    @property
    def empty(self) -> bool:
        return self.start >= self.end

    def __str__(self) -> str:
        return f"{self.start:g}-{self.end:g}"


ALWAYS = StepWindow(0.0, 1.0)
