"""Tiny diffusion transformers: time per step, and the DiT attention route's overhead.

For each tiny family at a 32x32 latent on one CPU thread (as the tests run):
plain:   KSampler (euler, simple), cfg 3.0 (2 rows: cond + uncond) and cfg 1.0 (1 row)
router:  the same with a pass-through control on every joint attention (the override routes
         each call, q/k/v converted to [B, N, heads*dim] and back)
rows:    1 sampler row + 1 appended extra row vs 2 sampler rows (cfg 1, batch 2)
Prints seconds per step and the patched / plain ratios (target: within 1.10x).
"""

from __future__ import annotations

from common import argument_parser, bootstrap, measure, print_table

bootstrap()

import torch  # noqa: E402

from qkv_control.attention.layers import select_layers  # noqa: E402
from qkv_control.attention.rows import ROLE_REFERENCE  # noqa: E402
from qkv_control.patching.control import AttentionControl, ExtraRow  # noqa: E402
from qkv_control.patching.patch import add_control  # noqa: E402

SIZE, STEPS = 32, 4
LATENT_CHANNELS = {"flux2": 128}


class PassThrough(AttentionControl):
    dit_ready = True

    def select_layers(self, layers):
        return select_layers("all", layers, "attn1")


class OneExtraRow(AttentionControl):
    dit_ready = True

    def extra_rows(self, call):
        return [ExtraRow(ROLE_REFERENCE, x=call.x[:1], context=call.context[:1])]


def _conditioning(family):
    from qkv_control.tiny.dit import CHECKPOINT_FAMILIES, TEXT_WIDTH, cached_dit_checkpoint, tiny_dit

    if family in CHECKPOINT_FAMILIES:
        model, clip, _ = cached_dit_checkpoint(family)

        def encode(text):
            cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            return [[cond, {"pooled_output": pooled}]]

        return model, encode("a red fox in the snow"), encode("")
    generator = torch.Generator().manual_seed(0)
    return (tiny_dit(family), [[torch.randn(1, 12, TEXT_WIDTH, generator=generator), {}]],
            [[torch.randn(1, 12, TEXT_WIDTH, generator=generator), {}]])


def _ksampler(model, family, positive, negative, batch, cfg):
    import nodes as comfy_nodes

    latent = {"samples": torch.zeros(batch, LATENT_CHANNELS.get(family, 16), SIZE, SIZE)}

    def run():
        comfy_nodes.common_ksampler(model, 0, STEPS, cfg, "euler", "simple", positive, negative, latent)

    return run


def _rows(family, repeats):
    model, positive, negative = _conditioning(family)
    two_t, _ = measure(_ksampler(model, family, positive, negative, 1, 3.0), repeats)
    one_t, _ = measure(_ksampler(model, family, positive, negative, 1, 1.0), repeats)
    routed_t, _ = measure(_ksampler(add_control(model, PassThrough()), family, positive, negative, 1, 3.0), repeats)
    pair_t, _ = measure(_ksampler(model, family, positive, negative, 2, 1.0), repeats)
    extra_t, _ = measure(_ksampler(add_control(model, OneExtraRow()), family, positive, negative, 1, 1.0), repeats)
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    return {"model": f"tiny {family} ({params / 1e6:.2f} M)", "s/step 1 row": f"{one_t / STEPS:.4f}",
            "s/step 2 rows": f"{two_t / STEPS:.4f}", "router ratio (2 rows)": f"{routed_t / two_t:.3f}",
            "1+1 extra row vs 2 rows": f"{extra_t / pair_t:.3f}"}


def main():
    parser = argument_parser(__doc__, full_size=False, repeats=3)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    table = [_rows(family, opts.repeats) for family in ("flux", "flux_schnell", "sd35", "chroma", "flux2")]
    print_table(f"Tiny DiTs, {SIZE}x{SIZE} latent, {STEPS} euler steps, 1 CPU thread (best of {opts.repeats})",
                table)


if __name__ == "__main__":
    main()
