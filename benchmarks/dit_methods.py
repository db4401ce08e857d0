"""The self-attention methods on diffusion transformers: rows per step, time and FLOPs against
plain sampling.

Two sizes of Flux.1 dev (guidance-distilled: cfg 1, one row) and SD3.5 (CFG: two rows), euler
steps, one CPU thread (as the tests run):

tiny          the test suite's models (64-128 channels, 256 image tokens): attention and per-op
              overhead weigh far more than in a real model
proportioned  the real models' proportions at a CPU's size (``--proportioned``, default on):
              heads of 128 (Flux) / 64 (SD3.5), 4 image tokens per 3 channels (FLUX.1 at
              1024x1024: 4096 per 3072; SD3.5 Large: 4096 per 2432), one text token per 8 image
              tokens (Flux) / 77 CLIP tokens (SD3.5), and the default blocks' share of the
              blocks (FLUX.1: 18 of 57, here 2 of 6; SD3.5: half)

Cases:

plain                 KSampler at the model's guidance (Flux cfg 1, SD3.5 cfg 3)
plain, N rows         KSampler at cfg 1 with a batch of N: the same row count as the patched run;
                      the ratio against it is the overhead beyond the extra rows (goal: within 1.10x)
InDetail-IP           the node's defaults (auto blocks, Stratified Attention then KV concatenation),
                      conflict-free: one reference row (Flux 2 rows against 1, SD3.5 3 against 2)
InDetail-IP, all      KV concatenation on every joint attention (the most attention it can add)
MCA-Ctrl replace      subject + scene streams, a box a quarter of the image; SD3.5: official (both
                      CFG branches, 6 rows) and conflict-free (4 rows)

The K/V bank is off in every case, so every run computes its stream rows (warm runs, with no
stream row: ``benchmarks/kv_bank.py``). Times: "vs plain, same rows" is the median (and range) over
rounds of the case's time over the mean of the plain N-row runs just before and after it (a
shared CPU's speed drifts over seconds; over one case's neighbours it less so); the plain row's
own figure (plain sampling against the same rows run as a batch) shows the noise. "vs plain
(best)": the best times' ratio. FLOPs: matrix products and attention (``torch.utils.flop_counter``,
SDPA's fused kernels counted as 4·Nq·Nk·d per head), one run each: the work the method adds,
free of timing noise.

Full size (``--full-size``, default on): FLUX.1 dev's structure with random weights on the meta
device (no weights are allocated, nothing is computed): per model call at 1024x1024 (128x128
latent, 512 T5 tokens), bf16, the FLOPs and the activation bytes alive at the peak, for plain
sampling with 1 and 2 rows and for InDetail-IP's 1 + 1 reference row; activations with
attention as a fused kernel (a GPU's flash attention: its output only) and as SDPA's math
decomposition (its N x N float32 scores, what a CPU without a fused kernel holds). Prints
ratios, asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import weakref
from dataclasses import dataclass

from common import argument_parser, bootstrap, print_table

bootstrap()

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

from qkv_control.attention import mca_ctrl as mca  # noqa: E402
from qkv_control.inversion.kv_bank import BankSettings  # noqa: E402
from qkv_control.mca_ctrl.config import Masks, Schedule, Streams  # noqa: E402
from qkv_control.mca_ctrl.control import MCACtrl  # noqa: E402
from qkv_control.nodes.ddim_inversion import QKVDDIMInversion  # noqa: E402
from qkv_control.nodes.indetail_ip import QKVInDetailReferenceAttention  # noqa: E402
from qkv_control.patching import keys  # noqa: E402
from qkv_control.patching.image_prompt_policy import ImagePromptPolicy  # noqa: E402
from qkv_control.patching.patch import add_control, set_transformer_option  # noqa: E402

GUIDANCE = {"flux": 1.0, "sd35": 3.0}
TINY_SIZE, TINY_STEPS = (32, 32), 4
# Config overrides, latent [h, w] and text tokens of the proportioned models (module docstring).
PROPORTIONED = {
    "flux": ({"hidden_size": 384, "num_heads": 3, "axes_dim": [16, 56, 56], "depth": 2, "depth_single_blocks": 4},
             (32, 64), 64),
    "sd35": ({"depth": 6, "num_blocks": 6, "context_embedder_config": {
        "target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 384}}}, (32, 64), 77),
}
PROPORTIONED_STEPS = 4


@dataclass
class Kit:
    model: object
    positive: list
    negative: list
    subject: object    # inverted streams
    scene: object
    latent_hw: tuple
    steps: int


def _inverted(kit_model, positive, latent_hw, steps, generator):
    latent = torch.randn(1, 16, *latent_hw, generator=generator) * 0.5
    return QKVDDIMInversion.execute(kit_model, {"samples": latent}, steps, "simple", positive).args[0]


def _tiny_kit(family) -> Kit:
    from qkv_control.tiny.dit import cached_dit_checkpoint

    model, clip, _ = cached_dit_checkpoint(family)

    def encode(text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    positive, negative = encode("a red fox in the snow"), encode("")
    g = torch.Generator().manual_seed(3)
    subject, scene = (_inverted(model, positive, TINY_SIZE, TINY_STEPS, g) for _ in range(2))
    return Kit(model, positive, negative, subject, scene, TINY_SIZE, TINY_STEPS)


def _proportioned_kit(family) -> Kit:
    """Random text embeddings of the real widths' stand-ins (no text encoder: the text length is
    the point), the model from ``tiny_dit`` with the proportioned overrides."""
    from qkv_control.tiny.dit import SD3_CONTEXT_WIDTH, SD3_POOLED_WIDTH, TEXT_WIDTH, tiny_dit

    overrides, latent_hw, text_tokens = PROPORTIONED[family]
    model = tiny_dit(family, overrides=overrides)
    g = torch.Generator().manual_seed(4)
    width, pooled = (SD3_CONTEXT_WIDTH, SD3_POOLED_WIDTH) if family == "sd35" else (TEXT_WIDTH, TEXT_WIDTH)

    def encode():
        return [[torch.randn(1, text_tokens, width, generator=g), {"pooled_output": torch.randn(1, pooled,
                                                                                                generator=g)}]]

    positive, negative = encode(), encode()
    subject, scene = (_inverted(model, positive, latent_hw, PROPORTIONED_STEPS, g) for _ in range(2))
    return Kit(model, positive, negative, subject, scene, latent_hw, PROPORTIONED_STEPS)


def _run(kit: Kit, model, cfg, batch=1):
    import nodes as comfy_nodes

    latent = {"samples": torch.zeros(batch, 16, *kit.latent_hw)}
    return lambda: comfy_nodes.common_ksampler(model, 0, kit.steps, cfg, "euler", "simple", kit.positive,
                                               kit.negative, latent)


def _rows(kit: Kit, run):
    rows = []
    handle = kit.model.model.diffusion_model.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        run()
    finally:
        handle.remove()
    return sum(rows) / kit.steps


def _mca(kit: Kit):
    h, w = (8 * s for s in kit.latent_hw)
    box = torch.zeros(1, h, w)
    box[:, h // 4:3 * h // 4, w // 4:3 * w // 4] = 1.0
    return MCACtrl(Streams(kit.subject, scene=kit.scene), Masks(box, box), Schedule(mca.PhaseSchedule(0.1, 1.0)))


def _cases(family, kit: Kit):
    # The bank off: every run computes its stream rows, as counted (warm runs: benchmarks/kv_bank.py).
    model = set_transformer_option(kit.model, keys.KV_BANK, BankSettings(enabled=False))
    indetail = QKVInDetailReferenceAttention.execute
    cases = [("InDetail-IP (defaults)", indetail(model, kit.subject, "auto", "stratified:0-0.2, concat:0.2-1", 0.5,
                                                 0.5).args[0]),
             ("InDetail-IP, concat on all blocks", indetail(model, kit.subject, "all", "concat:0-1", 0.5,
                                                            0.5).args[0]),
             ("MCA-Ctrl replace (official)", add_control(model, _mca(kit)))]
    if family == "sd35":
        cases.append(("MCA-Ctrl replace, conflict-free", set_transformer_option(
            add_control(model, _mca(kit)), keys.IMAGE_PROMPT_POLICY, ImagePromptPolicy("positive_only"))))
    return cases


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _bracketed(cases: dict, reference, rounds: int) -> tuple[dict, dict]:
    """(seconds of each case per round, each case's time over the mean of the ``reference`` runs
    just before and after it, per round): ``reference, case 1, reference, case 2, reference`` ...
    A shared CPU's speed drifts over seconds; over one case's neighbours it barely does."""
    for run in (reference, *cases.values()):
        run()
    seconds = {name: [] for name in cases}
    ratios = {name: [] for name in cases}
    for _ in range(rounds):
        before = _timed(reference)
        for name, run in cases.items():
            t = _timed(run)
            after = _timed(reference)
            seconds[name].append(t)
            ratios[name].append(t / ((before + after) / 2))
            before = after
    return seconds, ratios


def flops(run) -> int:
    """FLOPs of matrix products and attention in one ``run()`` (SDPA's fused CPU kernel included)."""
    fused_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def fused_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    with FlopCounterMode(display=False, custom_mapping={fused_cpu: fused_cpu_flops}) as counter:
        run()
    return counter.get_total_flops()


def _median_and_range(ratios: list) -> str:
    return f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"


def _table(family, kit: Kit, rounds):
    cfg = GUIDANCE[family]
    runs = {"plain": _run(kit, kit.model, cfg)}
    row_counts = {"plain": _rows(kit, runs["plain"])}
    for name, patched in _cases(family, kit):
        runs[name] = _run(kit, patched, cfg)
        row_counts[name] = _rows(kit, runs[name])
    # plain KSampler at cfg 1 with a batch of each count: the reference at the same rows
    same = {count: _run(kit, kit.model, 1.0, batch=count) for count in {int(round(n)) for n in row_counts.values()}}
    work = {name: flops(run) for name, run in runs.items()}
    same_work = {count: flops(run) for count, run in same.items()}
    seconds, same_ratio = {}, {}
    for count, reference in sorted(same.items()):
        group = {name: runs[name] for name, n in row_counts.items() if int(round(n)) == count}
        times, ratios = _bracketed(group, reference, rounds)
        seconds.update(times)
        same_ratio.update(ratios)
    rows = []
    for name, n in row_counts.items():
        count = int(round(n))
        rows.append({"case": name, "rows/step": f"{n:g}", "s/step": f"{min(seconds[name]) / kit.steps:.4f}",
                     "vs plain (best)": f"{min(seconds[name]) / min(seconds['plain']):.3f}",
                     "vs plain, same rows": _median_and_range(same_ratio[name]),
                     "GFLOP/step": f"{work[name] / kit.steps / 1e9:.2f}",
                     "FLOPs vs plain, same rows": f"{work[name] / same_work[count]:.3f}"})
    return rows


class ActivationPeak(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensors created under it and still alive, at their peak (views not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t._is_view():
                size = t.numel() * t.element_size()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, size)
        return out

    def _free(self, size):
        self.live -= size


class FusedAttention(torch.overrides.TorchFunctionMode):
    """SDPA as a fused kernel (flash / memory-efficient attention on a GPU): on the meta device its
    result only, instead of the math decomposition's N x N float32 scores."""

    def __init__(self):
        super().__init__()
        self.flops = 0  # the attention FLOPs the kernel would do (4·Nq·Nk·d per head)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            self.flops += sdpa_flop_count(q.shape, k.shape, v.shape)
            return torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        return func(*args, **kwargs)


def _full_size_flux():
    import comfy.model_patcher
    import comfy.supported_models

    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
              "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
              "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
              "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": [], "dtype": torch.bfloat16}
    model_config = comfy.supported_models.Flux(config)
    model_config.set_inference_dtype(torch.bfloat16, None)
    model = model_config.get_model({}, device=torch.device("meta"))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("meta"),
                                            offload_device=torch.device("meta"))


def _meta_call(patcher, control, rows: int, fused: bool, sigma=0.75):
    """(peak activation bytes, FLOPs) of one diffusion-model call with ``rows`` sampler rows, or 1
    row plus ``control``'s extra rows routed through the pack (what APPLY_MODEL does, on the meta
    device)."""
    from qkv_control.attention.rows import RowLayout
    from qkv_control.families.base import CallGeometry
    from qkv_control.patching.branch_rows import append_rows
    from qkv_control.patching.control import ModelCall
    from qkv_control.patching.dit_route import install_dit_route
    from qkv_control.patching.run_context import RunContext

    meta, dtype = torch.device("meta"), torch.bfloat16
    x = torch.zeros(rows, 16, 128, 128, device=meta, dtype=dtype)
    context = torch.zeros(rows, 512, 4096, device=meta, dtype=dtype)
    conds = {"y": torch.zeros(rows, 768, device=meta, dtype=dtype), "guidance": torch.full((rows,), 3.5, device=meta)}
    sigmas = torch.tensor([sigma, 0.0])
    layout = RowLayout.from_cond_or_uncond([0], rows)
    options = {"sigmas": sigmas[:1], "cond_or_uncond": [0]}
    t = torch.full((rows,), sigma)
    if control is not None:
        run = RunContext(patcher, (control,), sample_sigmas=sigmas)
        run.start()
        call = ModelCall(x, t, layout, context, conds, run, options)
        extras = [(control.name, row) for row in control.extra_rows(call)]
        x, t, _, context, _, conds, layout = append_rows(x, t, None, context, None, conds, layout, extras,
                                                         pad_text=True)
        options = dict(options, **{keys.RUN: run})
        install_dit_route(options, run, layout, CallGeometry((64, 64), 512))
    timestep = patcher.model.model_sampling.timestep(t).to(meta)
    attention = FusedAttention() if fused else contextlib.nullcontext()
    with torch.no_grad(), ActivationPeak() as peak, attention, FlopCounterMode(display=False) as counter:
        patcher.model.diffusion_model(x, timestep, context, y=conds["y"], guidance=conds["guidance"].to(meta),
                                      transformer_options=options)
    return peak.peak, counter.get_total_flops() + (attention.flops if fused else 0)


def _meta_inversion(steps=4):
    from qkv_control.inversion.chain import InvertedChain
    from qkv_control.inversion.result import InversionResult

    meta, dtype = torch.device("meta"), torch.bfloat16
    sigmas = torch.linspace(0.0, 1.0, steps + 1)
    return InversionResult(chain=InvertedChain(sigmas, torch.zeros(steps + 1, 1, 16, 128, 128, device=meta, dtype=dtype)),
                           context=torch.zeros(1, 512, 4096, device=meta, dtype=dtype),
                           conds={"y": torch.zeros(1, 768, device=meta, dtype=dtype),
                                  "guidance": torch.full((1,), 3.5, device=meta)},
                           latent_channels=16, context_dim=4096, model_family="Flux", prediction="flow")


def _full_size_table():
    from qkv_control.indetail_ip.blocks import default_blocks
    from qkv_control.indetail_ip.control import ReferenceAttentionControl
    from qkv_control.families.registry import family_of
    from qkv_control.patching.layers import discover_layers

    patcher = _full_size_flux()
    inversion = _meta_inversion()
    blocks = default_blocks(family_of(patcher), discover_layers(patcher))
    gib = 1024 ** 3
    cases = [("plain, 1 row", None, 1), ("plain, 2 rows", None, 2)]
    cases += [(f"InDetail-IP {schedule.split(':')[0]} ({spec})", ReferenceAttentionControl(inversion, spec, schedule), 1)
              for spec, schedule in ((blocks, "stratified:0-1"), (blocks, "concat:0-1"), (blocks, "replace:0-1"),
                                     ("all", "concat:0-1"))]
    rows = []
    for fused in (True, False):
        (one, one_flops), (two, two_flops) = _meta_call(patcher, None, 1, fused), _meta_call(patcher, None, 2, fused)
        for name, control, n in cases:
            peak, work = ({1: (one, one_flops), 2: (two, two_flops)}[n] if control is None
                          else _meta_call(patcher, control, n, fused))
            rows.append({"attention": "fused" if fused else "math", "case": name,
                         "peak activations GiB": f"{peak / gib:.2f}", "vs plain": f"{peak / one:.3f}",
                         "vs plain, same rows": f"{peak / two:.3f}", "TFLOP/call": f"{work / 1e12:.2f}",
                         "FLOPs vs plain, same rows": f"{work / two_flops:.3f}"})
    return rows


def main():
    parser = argument_parser(__doc__, full_size=True, repeats=5,
                             full_size_help="also measure FLUX.1 dev at full size on the meta device")
    parser.add_argument("--proportioned", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the models with the real proportions (minutes on one CPU thread)")
    parser.add_argument("--tiny-rounds", type=int, default=15, help="rounds of the tiny models (--repeats: of the "
                        "proportioned ones)")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    label = {"flux": "Flux.1 dev, cfg 1", "sd35": "SD3.5, cfg 3"}
    for family in ("flux", "sd35"):
        kit = _tiny_kit(family)
        print_table(f"Tiny {label[family]}: {kit.latent_hw[0]}x{kit.latent_hw[1]} latent, {kit.steps} euler steps, "
                    f"{opts.tiny_rounds} rounds", _table(family, kit, opts.tiny_rounds))
    if opts.proportioned:
        for family in ("flux", "sd35"):
            kit = _proportioned_kit(family)
            overrides, latent_hw, text_tokens = PROPORTIONED[family]
            tokens = latent_hw[0] * latent_hw[1] // 4
            print_table(f"{label[family]} with the real proportions: {tokens} image tokens, {text_tokens} text "
                        f"tokens, {kit.steps} euler steps, {opts.repeats} rounds", _table(family, kit, opts.repeats))
    if opts.full_size:
        print_table("FLUX.1 dev full size on the meta device: one model call at 1024x1024, bf16 activations",
                    _full_size_table())


if __name__ == "__main__":
    main()
