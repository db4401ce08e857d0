"""Attention fusion schedule: which self-attention mode runs at which sampling step
(InDetail-IP Sec. 3 "Attention Fusion", Suppl. B: Stratified Attention for the first 10 of 50
steps, 25 of 50 with ControlNet, KV concatenation after).

Ranges are step windows (``attention.step_window``): fractions of the run's sampling steps,
so "the first 10 of 50" written as ``stratified:0-0.2`` stays "the first fifth" at 20, 30 or
100 steps and under denoise < 1 (the steps the run actually takes). Step i of N is in ``a-b``
when a <= i/N < b (b = 1 includes the last step).

Spec: comma-separated ``mode:start-end`` items, modes ``stratified``, ``concat``, ``replace``,
``none`` (unpatched). Later items win where ranges overlap; uncovered steps run unpatched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .step_window import StepWindow

STRATIFIED = "stratified"
CONCAT = "concat"
REPLACE = "replace"
NONE = "none"
MODES = (STRATIFIED, CONCAT, REPLACE, NONE)

DEFAULT_SPEC = "stratified:0-0.2, concat:0.2-1"
CONTROLNET_SPEC = "stratified:0-0.5, concat:0.5-1"

_ITEM = re.compile(r"^([a-z]+)\s*:\s*([0-9]*\.?[0-9]+)\s*-\s*([0-9]*\.?[0-9]+)$")


@dataclass(frozen=True)
class FusionSchedule:
    segments: tuple[tuple[str, StepWindow], ...]

    def mode_at(self, step: int, steps: int) -> str:
        """The mode at step ``step`` (0-based) of a run of ``steps`` steps."""
        mode = NONE
        for name, window in self.segments:
            if window.contains(step, steps):
                mode = name
        return mode

    def modes_used(self) -> set[str]:
        return {name for name, _ in self.segments}


def parse_fusion_schedule(spec: str) -> FusionSchedule:
    """Parse ``mode:start-end, ...``; errors name what was expected and what came."""
    items = [part.strip().lower() for part in str(spec).split(",") if part.strip()]
    if not items:
        raise ValueError(f"fusion schedule: expected items like '{DEFAULT_SPEC}', got an empty schedule")
    segments = []
    for item in items:
        m = _ITEM.match(item)
        if not m:
            raise ValueError(f"fusion schedule: expected 'mode:start-end' (e.g. 'stratified:0-0.2'), got '{item}'")
        mode, start, end = m.group(1), float(m.group(2)), float(m.group(3))
        if mode not in MODES:
            raise ValueError(f"fusion schedule: expected a mode in {', '.join(MODES)}, got '{mode}' in '{item}'")
        if not (0.0 <= start < end <= 1.0):
            raise ValueError(
                f"fusion schedule: expected 0 <= start < end <= 1 (fractions of the steps), got {start}-{end} in '{item}'"
            )
        segments.append((mode, StepWindow(start, end)))
    return FusionSchedule(tuple(segments))
