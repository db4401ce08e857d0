"""MCA-Ctrl cost: UNet rows per step, time and peak memory against plain sampling.

plain 2 rows:   KSampler, one image, cfg > 1 (cond + uncond)
plain 4 rows:   KSampler, two images, cfg > 1: the same row count as conflict-free replacement
replace / add:  MCA-Ctrl with a subject and a scene inversion. Official (no guidance node): both CFG
                branches, a subject and a scene row per branch: 6 rows (the official code's 6).
                Conflict-free (Image Prompt Guidance positive_only): 2 + subject + scene = 4 rows.
generation:     MCA-Ctrl with the automatic target mask, no condition stream (official): target
                cond + uncond + a subject row per branch = 4 rows (official 4); conflict-free 3.
                Its first step is plain (the automatic mask needs a step of maps): 8 steps
                average (7 x 4 + 2) / 8 = 3.75 and (7 x 3 + 2) / 8 = 2.875.
Inversions run before timing (they are cached per image in real use). Prints ratios, asserts nothing.
"""

from __future__ import annotations

import os


import time

from common import (PeakMemory, argument_parser, bootstrap, mca_masks, memory_columns, print_table,
                    random_full_size_sd15)

bootstrap()
# The rows a first run computes (the cold path); benchmarks/kv_bank.py measures the K/V bank.
os.environ.setdefault("QKV_KV_BANK_MB", "0")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Tiny models on a shared CPU: one thread gives the steadiest ratios.
    torch.set_num_threads(1)

from qkv_control.attention import mca_ctrl as mca  # noqa: E402
from qkv_control.inversion.invert import invert  # noqa: E402
from qkv_control.mca_ctrl.config import AutoMask, Masks, Schedule, Streams  # noqa: E402
from qkv_control.mca_ctrl.control import MCACtrl  # noqa: E402
from qkv_control.patching import keys  # noqa: E402
from qkv_control.patching.image_prompt_policy import ImagePromptPolicy  # noqa: E402
from qkv_control.patching.patch import add_control, set_transformer_option  # noqa: E402


def _conditioning(context_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, context_dim, generator=generator), {"pooled_output": torch.zeros(1, 64)}]]


def _ksampler(model, pos, neg, size, steps, batch, cfg=5.0):
    import nodes as comfy_nodes

    latent = {"samples": torch.zeros(batch, 4, size, size)}

    def run():
        comfy_nodes.common_ksampler(model, 0, steps, cfg, "ddim", "normal", pos, neg, latent)

    return run


class RowCounter:
    """Counts UNet rows of every call (sampler rows + appended rows) of one run."""

    def __init__(self, control):
        self.rows = 0
        extra_rows = control.extra_rows

        def counted(call):
            rows = extra_rows(call)
            self.rows += len(call.layout) + len(rows)
            return rows

        control.extra_rows = counted


def _interleaved(cases: dict, repeats: int):
    """Best time and peak memory per case, the cases interleaved so that load from other
    processes hits them alike (one warm-up each first)."""
    for fn in cases.values():
        fn()
    best = {name: float("inf") for name in cases}
    peak = {name: 0 for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            with PeakMemory() as memory:
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
            best[name] = min(best[name], elapsed)
            peak[name] = max(peak[name], memory.peak)
    return best, peak


def _rows(name, model, context_dim, size, steps, repeats):
    pos, neg = _conditioning(context_dim, 1), _conditioning(context_dim, 2)
    generator = torch.Generator().manual_seed(3)
    subject, _ = invert(model, torch.randn(1, 4, size, size, generator=generator) * 0.5, steps, "normal")
    scene, _ = invert(model, torch.randn(1, 4, size, size, generator=generator) * 0.5, steps, "normal")
    subject_mask, region = mca_masks(size)
    schedule = Schedule(mca.PhaseSchedule(0.1, 1.0))

    def conflict_free(model):
        return set_transformer_option(model, keys.IMAGE_PROMPT_POLICY, ImagePromptPolicy("positive_only"))

    controls = {
        "replace / add": (MCACtrl(Streams(subject, scene=scene), Masks(subject_mask, region), schedule), None),
        "replace / add, conflict-free": (MCACtrl(Streams(subject, scene=scene), Masks(subject_mask, region),
                                                 schedule), conflict_free),
        "generation (auto mask)": (MCACtrl(Streams(subject), Masks(subject_mask, auto=AutoMask((1, 2))), schedule),
                                   None),
        "generation, conflict-free": (MCACtrl(Streams(subject), Masks(subject_mask, auto=AutoMask((1, 2))),
                                              schedule), conflict_free),
    }
    counters = {case: RowCounter(control) for case, (control, _) in controls.items()}
    cases = {
        "plain, 1 image": _ksampler(model, pos, neg, size, steps, 1),
        "plain, 2 images": _ksampler(model, pos, neg, size, steps, 2),
    }
    for case, (control, wrap) in controls.items():
        patched = add_control(model, control)
        cases[case] = _ksampler(wrap(patched) if wrap else patched, pos, neg, size, steps, 1)
    best, peak = _interleaved(cases, repeats)
    plain_t, four_t, plain_m = best["plain, 1 image"], best["plain, 2 images"], peak["plain, 1 image"]
    table = []
    for case in cases:
        t = best[case]
        if case in counters:
            rows = f"{counters[case].rows / ((repeats + 1) * steps):.2f}"
            label = f"MCA-Ctrl {case}"
        else:
            rows, label = ("2" if case == "plain, 1 image" else "4"), case
        table.append({"model": name, "case": label, "rows/step": rows, "s/step": f"{t / steps:.4f}",
                      "time vs plain": f"{t / plain_t:.3f}", "time vs plain 4 rows": f"{t / four_t:.3f}",
                      **memory_columns(plain_m, peak[case])})
    return table


def main():
    parser = argument_parser(__doc__, full_size=True, repeats=3)
    parser.add_argument("--size", type=int, default=16, help="latent size (pixels / 8)")
    opts = parser.parse_args()

    from qkv_control.tiny.models import TEXT_WIDTH, tiny_checkpoint

    table = _rows(f"tiny sd15 ({opts.size}x{opts.size} latent)", tiny_checkpoint("sd15")[0], TEXT_WIDTH,
                  opts.size, 8, opts.repeats)
    if opts.full_size:
        with random_full_size_sd15() as model:
            steps = 8 if torch.cuda.is_available() else 2
            table += _rows(f"random full-size sd15 ({opts.size}x{opts.size} latent)", model, 768, opts.size, steps,
                           max(1, opts.repeats - 2))
    print_table("MCA-Ctrl: rows per step, time and peak memory against plain sampling (DDIM, cfg 5)", table)


if __name__ == "__main__":
    main()
