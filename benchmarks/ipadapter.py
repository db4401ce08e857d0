"""Cost of the IP-Adapter family against plain sampling (same sampler rows, cfg 5).

ip decoupled / joint:  image tokens in every cross-attention layer (policy positive only, and both)
mask guidance:         word map + value scaling in the '-level:0' cross-attention layers
condition guidance:    preset K/V projected once per layer per run, shared in every cross-attention layer
                       (concat: one attention call over twice the text tokens); no extra row (2 rows)
Prints time per step and ratios (patched / plain); never pass/fail.
"""

from __future__ import annotations


from common import argument_parser, bootstrap, measure, print_table, random_full_size_sd15

bootstrap()

import torch  # noqa: E402


def _cases(model, context_dim, tokens_count):
    from qkv_control.attention.layers import select_layers
    from qkv_control.ipadapter.control import IPAdapterControl, Reference
    from qkv_control.ipadapter.files import parse_state
    from qkv_control.text_guidance.condition import ConditionGuidanceControl
    from qkv_control.text_guidance.mask import MaskGuidanceControl
    from qkv_control.ipadapter.model import IPAdapterModel, ImageTokens, diffusers_order
    from qkv_control.patching import keys
    from qkv_control.patching.image_prompt_policy import ImagePromptPolicy
    from qkv_control.patching.layers import discover_layers
    from qkv_control.patching.patch import add_control, set_transformer_option
    from qkv_control.tiny.ipadapter_files import adapter_state

    layers = discover_layers(model)
    widths = tuple(layer.heads * layer.dim_head for layer in diffusers_order(layers))
    adapter = IPAdapterModel(parse_state(adapter_state("sd15", "linear", widths=widths, cross_dim=context_dim)))
    layer_kv = adapter.layer_map(layers, context_dim, "bench")
    g = torch.Generator().manual_seed(1)
    tokens = ImageTokens(torch.randn(1, tokens_count, context_dim, generator=g),
                         torch.randn(1, tokens_count, context_dim, generator=g))

    def ip(mode):
        return add_control(model, IPAdapterControl(layer_kv, (Reference("image", tokens, 1.0),), mode))

    both = set_transformer_option(model, keys.IMAGE_PROMPT_POLICY, ImagePromptPolicy("both"))
    select_layers("-level:0", layers, "attn2")
    preset = torch.randn(1, 77, context_dim, generator=g)
    return {
        "ip decoupled (positive only)": ip("decoupled"),
        "ip decoupled (both branches)": add_control(both, IPAdapterControl(layer_kv, (Reference("image", tokens, 1.0),))),
        "ip joint (positive only)": ip("joint"),
        "mask guidance (-level:0)": add_control(model, MaskGuidanceControl([5, 6], 77, 0.5, 0.5, "-level:0")),
        "condition guidance concat (no extra row)": add_control(model, ConditionGuidanceControl(preset, "concat")),
    }


def _ksampler(model, context_dim, size, steps):
    import nodes as comfy_nodes

    generator = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, context_dim, generator=generator), {"pooled_output": torch.zeros(1, 64)}]]
    neg = [[torch.randn(1, 77, context_dim, generator=generator), {"pooled_output": torch.zeros(1, 64)}]]
    latent = {"samples": torch.zeros(1, 4, size, size)}

    def run():
        comfy_nodes.common_ksampler(model, 0, steps, 5.0, "ddim", "normal", pos, neg, latent)

    return run


def _rows(name, model, context_dim, size, steps, repeats):
    plain_t, _ = measure(_ksampler(model, context_dim, size, steps), repeats)
    table = []
    for case, patched in _cases(model, context_dim, 4).items():
        t, _ = measure(_ksampler(patched, context_dim, size, steps), repeats)
        table.append({"model": name, "case": case, "s/step plain": f"{plain_t / steps:.4f}",
                      "s/step patched": f"{t / steps:.4f}", "time ratio": f"{t / plain_t:.3f}"})
    return table


def main():
    parser = argument_parser(__doc__, full_size=True, repeats=3)
    parser.add_argument("--size", type=int, default=16, help="latent size of the full-size runs")
    opts = parser.parse_args()

    from qkv_control.tiny.models import TEXT_WIDTH, tiny_checkpoint

    table = _rows("tiny sd15 (16x16 latent)", tiny_checkpoint("sd15")[0], TEXT_WIDTH, 16, 8, opts.repeats)
    if opts.full_size:
        with random_full_size_sd15() as model:
            table += _rows(f"random full-size sd15 ({opts.size}x{opts.size} latent)", model, 768, opts.size, 2,
                           max(1, opts.repeats - 2))
    print_table("IP-Adapter family cost (patched / plain, cfg 5)", table)


if __name__ == "__main__":
    main()
