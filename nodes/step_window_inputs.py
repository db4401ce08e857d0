"""The start/end inputs every windowed node shares, and what a user's numbers mean.

They are a step window (``attention.step_window``): fractions of the sampler run's steps."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.step_window import StepWindow

# What a fraction of the steps means beyond one KSampler at full denoise: said once, in every tooltip.
STEP_FRACTION_MEANING = ("A fraction of the sampler's steps: step i of N counts as i/N, so another step count "
                         "keeps the share; with denoise < 1 it is a share of the steps the run takes; with a split "
                         "sampler (two KSampler Advanced) each sampler applies it to its own steps.")


def window_inputs() -> list:
    return [
        io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Where it starts acting (0 = first step). " + STEP_FRACTION_MEANING),
        io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Where it stops acting (1 = through the last step; steps from here on are "
                               "untouched). " + STEP_FRACTION_MEANING),
    ]


def step_window(start_at: float, end_at: float) -> StepWindow:
    """The window of the two inputs; an error naming both when they are out of order."""
    if not 0.0 <= float(start_at) <= float(end_at) <= 1.0:
        raise ValueError(f"expected 0 <= start_at <= end_at <= 1, got start_at={start_at}, end_at={end_at}")
    return StepWindow(float(start_at), float(end_at))
