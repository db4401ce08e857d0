"""Overhead of the attention router and branch rows at equal batch rows.

plain:   KSampler with B sampler rows
router:  the same with a pass-through control on every attention layer
rows:    plain with 3 sampler rows vs 2 sampler rows + 1 appended extra row
Prints time per step and peak memory as ratios (target: within 1.10x).
"""

from __future__ import annotations


from common import argument_parser, bootstrap, measure, memory_columns, print_table, random_full_size_sd15

bootstrap()

import torch  # noqa: E402

from qkv_control.attention.layers import select_layers  # noqa: E402
from qkv_control.attention.rows import ROLE_REFERENCE  # noqa: E402
from qkv_control.patching.control import AttentionControl, ExtraRow  # noqa: E402
from qkv_control.patching.patch import add_control  # noqa: E402


class PassThrough(AttentionControl):
    def select_layers(self, layers):
        return select_layers("all", layers, "attn1") + select_layers("all", layers, "attn2")


class OneExtraRow(AttentionControl):
    def extra_rows(self, call):
        if 0 not in call.transformer_options["cond_or_uncond"]:
            return []
        return [ExtraRow(ROLE_REFERENCE, x=call.x[:1], context=call.context[:1])]


def _ksampler(model, context_dim, size, steps, batch, cfg=5.0):
    import nodes as comfy_nodes

    generator = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, context_dim, generator=generator), {"pooled_output": torch.zeros(1, 64)}]]
    neg = [[torch.randn(1, 77, context_dim, generator=generator), {"pooled_output": torch.zeros(1, 64)}]]
    latent = {"samples": torch.zeros(batch, 4, size, size)}

    def run():
        comfy_nodes.common_ksampler(model, 0, steps, cfg, "ddim", "normal", pos, neg, latent)

    return run


def _rows(name, model, context_dim, size, steps, repeats):
    table = []
    plain_t, plain_m = measure(_ksampler(model, context_dim, size, steps, 1), repeats)
    routed_t, routed_m = measure(_ksampler(add_control(model, PassThrough()), context_dim, size, steps, 1), repeats)
    table.append({"model": name, "case": "router on every layer (2 rows)", "s/step plain": f"{plain_t / steps:.4f}",
                  "s/step patched": f"{routed_t / steps:.4f}", "time ratio": f"{routed_t / plain_t:.3f}",
                  **memory_columns(plain_m, routed_m)})
    # 3 rows either way: cfg=1 with batch 3, vs cfg=1 with batch 2 plus one extra row
    three_t, three_m = measure(_ksampler(model, context_dim, size, steps, 3, cfg=1.0), repeats)
    extra_t, extra_m = measure(_ksampler(add_control(model, OneExtraRow()), context_dim, size, steps, 2, cfg=1.0), repeats)
    table.append({"model": name, "case": "2 rows + 1 extra row vs 3 rows", "s/step plain": f"{three_t / steps:.4f}",
                  "s/step patched": f"{extra_t / steps:.4f}", "time ratio": f"{extra_t / three_t:.3f}",
                  **memory_columns(three_m, extra_m)})
    return table


def main():
    parser = argument_parser(__doc__, full_size=True, repeats=3)
    opts = parser.parse_args()

    from qkv_control.tiny.models import TEXT_WIDTH, tiny_checkpoint

    table = _rows("tiny sd15 (16x16 latent)", tiny_checkpoint("sd15")[0], TEXT_WIDTH, 16, 8, opts.repeats)
    if opts.full_size:
        with random_full_size_sd15() as model:
            table += _rows("random full-size sd15 (16x16 latent)", model, 768, 16, 2, max(1, opts.repeats - 2))
    print_table("Router and branch-row overhead (patched / plain, same rows)", table)


if __name__ == "__main__":
    main()
