"""Reference K/V bank: rows per step and time of cold and warm runs against plain sampling, on a
UNet (tiny SD1.5; ``--full-size``: a random full-size SD1.5) and on diffusion transformers (tiny
Flux.1 dev at cfg 1 and SD3.5 at cfg 3, euler / simple; ``--no-dit`` skips them).

plain CFG                 KSampler, cfg 5, one image: 2 rows per step (Flux.1 dev at cfg 1: 1 row)
InDetail-IP cold / warm   default schedule (Stratified 20 %, then concat), conflict-free: the cold run
                          computes the reference row (3 rows) and fills the bank; the warm run reads
                          it (2 rows). Goal: warm <= 1.15x plain.
MCA-Ctrl replacement      subject + scene, conflict-free (Image Prompt Guidance positive_only): cold
                          4 rows, warm 2. Goal: warm <= 1.2x plain.
MCA-Ctrl official         both CFG branches (no guidance node): cold 6 rows, warm 2 with the same
                          prompts; a new positive prompt misses the positive branch's streams (4).
                          Flux at cfg 1: one branch, cold 3, warm 1 (no separate conflict-free case).
Cold runs start from an empty bank, warm runs from a filled one, all measured in one process,
interleaved (round-robin best-of), one torch thread. Two clocks: wall time and this process's CPU
time (``time.process_time``: on a shared machine other processes' load inflates wall time but not
CPU time). Peak memory: CUDA allocator peak, or sampled RSS growth on CPU (the bank's own bytes
are reported apart). Prints ratios, asserts nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from common import (PeakMemory, argument_parser, bootstrap, mca_masks, memory_columns, print_table,
                    random_full_size_sd15)

bootstrap()
os.environ.setdefault("QKV_KV_BANK_MB", "auto")

import torch  # noqa: E402

if not torch.cuda.is_available():
    torch.set_num_threads(1)

from qkv_control.attention import mca_ctrl as mca  # noqa: E402
from qkv_control.families.registry import family_of  # noqa: E402
from qkv_control.indetail_ip.blocks import default_blocks  # noqa: E402
from qkv_control.indetail_ip.control import ReferenceAttentionControl  # noqa: E402
from qkv_control.inversion.invert import invert  # noqa: E402
from qkv_control.inversion.kv_bank import BANK, MB  # noqa: E402
from qkv_control.mca_ctrl.config import Masks, Schedule, Streams  # noqa: E402
from qkv_control.mca_ctrl.control import MCACtrl  # noqa: E402
from qkv_control.patching import keys  # noqa: E402
from qkv_control.patching.image_prompt_policy import ImagePromptPolicy  # noqa: E402
from qkv_control.patching.layers import discover_layers  # noqa: E402
from qkv_control.patching.patch import add_control, set_transformer_option  # noqa: E402

SCHEDULER = "ddim_uniform"


@dataclass
class Kit:
    """One model's benchmark setup: its text, how KSampler runs it, its latent channels."""

    name: str
    model: object
    positive: list
    negative: list
    other: list                # another positive prompt (MCA-Ctrl's "new prompt" case)
    cfg: float = 5.0
    sampler: str = "ddim"
    scheduler: str = SCHEDULER
    channels: int = 4
    plain: str = "plain CFG"   # the plain case's label
    conflict_free_mca: bool = True  # a conflict-free MCA-Ctrl case (not at cfg 1: the same rows as official)


def _conditioning(context_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, context_dim, generator=generator), {"pooled_output": torch.zeros(1, 1280)}]]


def _unet_kit(name, model, context_dim):
    pos, neg, other = (_conditioning(context_dim, s) for s in (1, 2, 3))
    return Kit(name, model, pos, neg, other)


def _dit_kit(family, size):
    """Tiny Flux.1 dev (guidance-distilled: cfg 1, one row) or SD3.5 (cfg 3), with their tiny text encoders."""
    from qkv_control.tiny.dit import cached_dit_checkpoint

    model, clip, _ = cached_dit_checkpoint(family)

    def encode(text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    flux = family == "flux"
    return Kit(f"tiny {'Flux.1 dev' if flux else 'SD3.5'} ({size}x{size} latent)", model,
               encode("a red fox in the snow"), encode(""), encode("a blue boat on a calm lake"),
               cfg=1.0 if flux else 3.0, sampler="euler", scheduler="simple", channels=16,
               plain="plain (cfg 1)" if flux else "plain CFG", conflict_free_mca=not flux)


class Rows:
    """Diffusion-model rows of every call of one run (a forward pre-hook)."""

    def __init__(self, model):
        self.unet = model.model.diffusion_model
        self.rows = []

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(lambda m, a: self.rows.append(a[0].shape[0]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _cases(kit: Kit, size, steps):
    """name -> (run(), prepare()), in order: prepare() puts the bank in the case's state."""
    import nodes as comfy_nodes

    model = kit.model
    generator = torch.Generator().manual_seed(4)
    reference, subject, scene = (invert(model, torch.randn(1, kit.channels, size, size, generator=generator), steps,
                                        kit.scheduler, kit.positive)[0] for _ in range(3))
    latent = {"samples": torch.zeros(1, kit.channels, size, size)}

    def sampler(m, positive=kit.positive):
        return lambda: comfy_nodes.common_ksampler(m, 0, steps, kit.cfg, kit.sampler, kit.scheduler, positive,
                                                   kit.negative, latent)

    def conflict_free(m):
        return set_transformer_option(m, keys.IMAGE_PROMPT_POLICY, ImagePromptPolicy("positive_only"))

    subject_mask, region = mca_masks(size)
    blocks = default_blocks(family_of(model), discover_layers(model))
    indetail = conflict_free(add_control(model, ReferenceAttentionControl(reference, blocks)))
    replace = MCACtrl(Streams(subject, scene), Masks(subject_mask, region), Schedule(mca.PhaseSchedule(0.1, 1.0)))
    mca_official = add_control(model, replace)
    patched_cases = [("InDetail-IP", indetail)]
    if kit.conflict_free_mca:
        patched_cases.append(("MCA-Ctrl replacement, conflict-free", conflict_free(add_control(model, replace))))
    patched_cases.append(("MCA-Ctrl replacement, official (both branches)", mca_official))

    # Each warm case follows its cold case, whose run filled the bank; cold cases start empty.
    def empty():
        BANK.clear()

    def as_left():
        pass

    cases = {kit.plain: (sampler(model), empty)}
    for label, patched in patched_cases:
        cases[f"{label}, cold"] = (sampler(patched), empty)
        cases[f"{label}, warm"] = (sampler(patched), as_left)
    cases["MCA-Ctrl official, warm, new prompt"] = (sampler(mca_official, kit.other), as_left)
    return cases


def _measure(kit: Kit, size, steps, repeats):
    cases = _cases(kit, size, steps)
    best = {case: (float("inf"), float("inf")) for case in cases}
    peak, rows, bank = {case: 0 for case in cases}, {}, {}
    for case, (run, prepare) in cases.items():  # warm-up, and the row counts
        prepare()
        with Rows(kit.model) as counter:
            run()
        rows[case] = sum(counter.rows) / steps
    for _ in range(repeats):
        for case, (run, prepare) in cases.items():
            prepare()
            with PeakMemory() as memory:
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[case] = (min(best[case][0], wall), min(best[case][1], cpu))
            peak[case] = max(peak[case], memory.peak)
            bank[case] = BANK.stats().nbytes
    plain_wall, plain_cpu = best[kit.plain]
    table = []
    for case in cases:
        wall, cpu = best[case]
        table.append({"model": kit.name, "case": case, "rows/step": f"{rows[case]:.1f}",
                      "s/step": f"{wall / steps:.4f}", "time vs plain": f"{wall / plain_wall:.3f}",
                      "cpu s/step": f"{cpu / steps:.4f}", "cpu time vs plain": f"{cpu / plain_cpu:.3f}",
                      **memory_columns(peak[kit.plain], peak[case]), "bank MB": f"{bank[case] / MB:.1f}"})
    BANK.clear()
    return table


def main():
    parser = argument_parser(__doc__, full_size=False, repeats=3)
    parser.add_argument("--size", type=int, default=24, help="latent size (pixels / 8)")
    parser.add_argument("--steps", type=int, default=10, help="steps of the tiny model's runs (divide 1000)")
    parser.add_argument("--full-size-steps", type=int, default=2)
    parser.add_argument("--no-dit", dest="dit", action="store_false", help="skip the tiny Flux.1 dev and SD3.5 rows")
    parser.add_argument("--dit-steps", type=int, default=10, help="steps of the tiny DiTs' runs (simple scheduler)")
    opts, _ = parser.parse_known_args()

    from qkv_control.tiny.models import TEXT_WIDTH, tiny_checkpoint

    table = _measure(_unet_kit(f"tiny sd15 ({opts.size}x{opts.size} latent)", tiny_checkpoint("sd15")[0],
                               TEXT_WIDTH), opts.size, opts.steps, opts.repeats)
    if opts.dit:
        for family in ("flux", "sd35"):
            table += _measure(_dit_kit(family, opts.size), opts.size, opts.dit_steps, opts.repeats)
    if opts.full_size:
        with random_full_size_sd15() as model:
            table += _measure(_unet_kit(f"random full-size sd15 ({opts.size}x{opts.size} latent)", model, 768),
                              opts.size, opts.full_size_steps, max(1, opts.repeats - 1))
    print_table("Reference K/V bank: rows per step and time, cold and warm, against plain sampling", table)


if __name__ == "__main__":
    main()
