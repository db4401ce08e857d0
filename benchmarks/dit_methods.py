"""The self-attention methods on diffusion transformers: rows per step, time against plain sampling.

Tiny Flux.1 dev (guidance-distilled: cfg 1, one row) and SD3.5 (CFG: two rows), 32x32 latents,
4 euler steps, one CPU thread (as the tests run):

plain                 KSampler at the model's guidance (Flux cfg 1, SD3.5 cfg 3)
plain, N rows         KSampler at cfg 1 with a batch of N: the same row count as the patched run;
                      the ratio against it is the overhead beyond the extra rows (goal: within 1.10x)
InDetail-IP           the node's defaults (auto blocks, Stratified Attention then KV concatenation),
                      conflict-free: one reference row (Flux 2 rows against 1, SD3.5 3 against 2)
InDetail-IP, all      KV concatenation on every joint attention (the most attention it can add)
MCA-Ctrl replace      subject + scene streams; SD3.5: official (both CFG branches, 6 rows) and
                      conflict-free (4 rows)

Full size (``--full-size``, default on): FLUX.1 dev's structure with random weights on the meta
device (no weights are allocated, nothing is computed): the activation bytes alive at the peak
of one model call at 1024x1024 (128x128 latent, 512 T5 tokens), bf16, for plain sampling with 1
and 2 rows and for InDetail-IP's 1 + 1 reference row; with attention as a fused kernel (a GPU's
flash attention: its output only) and as SDPA's math decomposition (its N x N float32 scores,
what a CPU without a fused kernel holds). Prints ratios, asserts nothing.
"""

from __future__ import annotations

import contextlib
import time
import weakref

from common import argument_parser, bootstrap, print_table

bootstrap()

import torch  # noqa: E402

from qkv_control.attention import mca_ctrl as mca  # noqa: E402
from qkv_control.mca_ctrl.config import Masks, Schedule, Streams  # noqa: E402
from qkv_control.mca_ctrl.control import MCACtrl  # noqa: E402
from qkv_control.nodes.ddim_inversion import QKVDDIMInversion  # noqa: E402
from qkv_control.nodes.indetail_ip import QKVInDetailReferenceAttention  # noqa: E402
from qkv_control.patching import keys  # noqa: E402
from qkv_control.patching.image_prompt_policy import ImagePromptPolicy  # noqa: E402
from qkv_control.patching.patch import add_control, set_transformer_option  # noqa: E402

SIZE, STEPS = 32, 4
GUIDANCE = {"flux": 1.0, "sd35": 3.0}


def _kit(family):
    from qkv_control.tiny.dit import cached_dit_checkpoint

    model, clip, _ = cached_dit_checkpoint(family)

    def encode(text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    positive, negative = encode("a red fox in the snow"), encode("")
    g = torch.Generator().manual_seed(3)

    def inverted():
        latent = torch.randn(1, 16, SIZE, SIZE, generator=g) * 0.5
        return QKVDDIMInversion.execute(model, {"samples": latent}, STEPS, "simple", positive).args[0]

    return model, positive, negative, inverted(), inverted()


def _run(model, positive, negative, cfg, batch=1):
    import nodes as comfy_nodes

    latent = {"samples": torch.zeros(batch, 16, SIZE, SIZE)}
    return lambda: comfy_nodes.common_ksampler(model, 0, STEPS, cfg, "euler", "simple", positive, negative, latent)


def _rows(model, run):
    rows = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        run()
    finally:
        handle.remove()
    return sum(rows) / STEPS


def _mca(subject, scene):
    box = torch.zeros(1, SIZE * 8, SIZE * 8)
    box[:, 64:192, 64:192] = 1.0
    return MCACtrl(Streams(subject, scene=scene), Masks(box, box), Schedule(mca.PhaseSchedule(0.1, 1.0)))


def _cases(family, model, subject, scene):
    indetail = QKVInDetailReferenceAttention.execute
    cases = [("InDetail-IP (defaults)", indetail(model, subject, "auto", "stratified:0-0.2, concat:0.2-1", 0.5,
                                                 0.5).args[0]),
             ("InDetail-IP, concat on all blocks", indetail(model, subject, "all", "concat:0-1", 0.5, 0.5).args[0]),
             ("MCA-Ctrl replace (official)", add_control(model, _mca(subject, scene)))]
    if family == "sd35":
        cases.append(("MCA-Ctrl replace, conflict-free", set_transformer_option(
            add_control(model, _mca(subject, scene)), keys.IMAGE_PROMPT_POLICY, ImagePromptPolicy("positive_only"))))
    return cases


def _round_robin(runs: dict, repeats: int) -> dict:
    """Best seconds of each run, the runs interleaved (a shared CPU's load then hits all alike)."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _table(family, repeats):
    model, positive, negative, subject, scene = _kit(family)
    cfg = GUIDANCE[family]
    runs = {"plain": _run(model, positive, negative, cfg)}
    row_counts = {"plain": _rows(model, runs["plain"])}
    for name, patched in _cases(family, model, subject, scene):
        runs[name] = _run(patched, positive, negative, cfg)
        row_counts[name] = _rows(model, runs[name])
    for count in sorted({int(round(n)) for n in row_counts.values()}):
        # plain KSampler at cfg 1 with a batch of that many rows
        runs[count] = _run(model, positive, negative, 1.0, batch=count)
    best = _round_robin(runs, repeats)
    rows = []
    for name, n in row_counts.items():
        t = best[name]
        rows.append({"case": name, "rows/step": f"{n:g}", "s/step": f"{t / STEPS:.4f}",
                     "vs plain": f"{t / best['plain']:.3f}",
                     "vs plain, same rows": f"{t / best[int(round(n))]:.3f}"})
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

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, v = args[0], args[2]
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
    """Peak activation bytes of one diffusion-model call with ``rows`` sampler rows, or 1 row plus
    ``control``'s extra rows routed through the pack (what APPLY_MODEL does, on the meta device)."""
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
    with torch.no_grad(), ActivationPeak() as peak, (FusedAttention() if fused else contextlib.nullcontext()):
        patcher.model.diffusion_model(x, timestep, context, y=conds["y"], guidance=conds["guidance"].to(meta),
                                      transformer_options=options)
    return peak.peak


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
        one, two = _meta_call(patcher, None, 1, fused), _meta_call(patcher, None, 2, fused)
        for name, control, n in cases:
            peak = {1: one, 2: two}[n] if control is None else _meta_call(patcher, control, n, fused)
            rows.append({"attention": "fused" if fused else "math", "case": name,
                         "peak activations GiB": f"{peak / gib:.2f}", "vs plain": f"{peak / one:.3f}",
                         "vs plain, same rows": f"{peak / two:.3f}"})
    return rows


def main():
    parser = argument_parser(__doc__, full_size=True, repeats=3)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    for family in ("flux", "sd35"):
        label = "Flux.1 dev, cfg 1" if family == "flux" else "SD3.5, cfg 3"
        print_table(f"Tiny {label}: {SIZE}x{SIZE} latent, {STEPS} euler steps, best of {opts.repeats}",
                    _table(family, opts.repeats))
    if opts.full_size:
        print_table("FLUX.1 dev full size on the meta device: one model call at 1024x1024, bf16 activations",
                    _full_size_table())


if __name__ == "__main__":
    main()
