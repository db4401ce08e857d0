"""The interface every attention control implements, and the per-call views it gets."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..attention.layers import AttentionLayer
from ..attention.rows import RowLayout, put_rows, take_rows
from ..families.layout import TokenLayout

_ids = itertools.count()


@dataclass
class ExtraRow:
    """A batch row a control appends to a UNet call.

    x:       the row's noisy latent at ``sigma``, in the same space as the sampler's
             ``x`` (ComfyUI applies ``calculate_input`` itself), shape [1, C, H, W].
    context: its cross-attention context [1, T, D] (token count may differ from the
             sampler rows'; contexts are repeated to a common length as ComfyUI does).
    sigma:   defaults to the call's sigma.
    conds:   other per-row model inputs by name (e.g. SDXL's ``y``); missing ones
             copy a positive sampler row.
    on_output: called with the row's denoised prediction (a [1, C, H, W] tensor).
    image_prompt: which image prompt the row sees (``attention.rows.PROMPT_POSITIVE`` /
             ``PROMPT_NEGATIVE``), or None (the default: e.g. an inverted reference stream).
             Image-prompt controls of any method honour it.
    """

    role: str
    x: torch.Tensor
    context: torch.Tensor
    sigma: Optional[torch.Tensor] = None
    conds: dict[str, torch.Tensor] = field(default_factory=dict)
    on_output: Optional[Callable[[torch.Tensor], None]] = None
    item: int = 0
    image_prompt: Optional[str] = None


@dataclass
class ModelCall:
    """One UNet call as the APPLY_MODEL wrapper sees it, before extra rows."""

    x: torch.Tensor
    sigma: torch.Tensor
    layout: RowLayout
    context: Optional[torch.Tensor]
    conds: dict[str, Any]
    run: Any
    transformer_options: dict
    c_concat: Optional[torch.Tensor] = None  # concat conditioning (inpainting models), batched like x

    @property
    def sigma_value(self) -> float:
        return float(self.sigma.reshape(-1)[0])

    def active(self, window) -> bool:
        """Whether this call lies in ``window`` (an ``attention.step_window.StepWindow``)."""
        return self.run.clock.active(window, self.sigma_value)


@dataclass
class AttentionCall:
    """One attention layer call as a control sees it.

    q/k/v reach ``attend`` as ``[B, N, heads*dim]`` on every model family; on a diffusion
    transformer N is the joint sequence (text, image and reference tokens: ``tokens`` says
    which are which), after the model's q/k norms and RoPE."""

    layer: AttentionLayer
    layout: RowLayout
    run: Any
    extra_options: dict
    # Plain attention ``(q, k, v, mask=None)`` (``patching.plain_attention``: ComfyUI's
    # optimized attention, heads bound) for queries/keys that are not the layer's own rows:
    # gathered key subsets, a subset of rows. ``attend_next`` expects the layer's full rows;
    # this bypasses the chain.
    plain: Callable[..., torch.Tensor]
    # True when the control is the layer's only one and no foreign replace patch is
    # installed, so ``plain`` on a row subset equals ``attend_next`` on those rows.
    exclusive: bool = False
    # The call's token layout; None on UNets, where ``tokens`` derives it (all image tokens).
    token_layout: Optional[TokenLayout] = None
    # DiTs: rows -> the additive mask of those rows' own keys (``text_padding_mask``); None on UNets.
    key_padding: Optional[Callable[[list[int]], Optional[torch.Tensor]]] = None

    @property
    def tokens(self) -> TokenLayout:
        """Which tokens of q (and of k/v, for self- and joint attention) are text, which image,
        and the image grid. UNet self-attention: every token is an image token."""
        if self.token_layout is not None:
            return self.token_layout
        shape = self.extra_options["activations_shape"]
        return TokenLayout.image_only((int(shape[-2]), int(shape[-1])))

    @property
    def joint(self) -> bool:
        """Whether this is a diffusion transformer's joint attention: text (or reference-latent)
        tokens beside the image's. False on UNets and image-only DiT attention."""
        return self.token_layout is not None and not self.token_layout.image_only_call

    def image_part(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The image tokens of ``x`` (rows of q/k/v or of an output, tokens along ``dim``): a view,
        ``x`` itself unless the call is joint."""
        return self.token_layout.image_tokens(x, dim) if self.joint else x

    @property
    def heads(self) -> int:
        return self.extra_options["n_heads"]

    @property
    def sigma_value(self) -> float:
        return float(self.extra_options["sigmas"].reshape(-1)[0])

    def active(self, window) -> bool:
        """Whether this call lies in ``window`` (an ``attention.step_window.StepWindow``)."""
        return self.run.clock.active(window, self.sigma_value)

    def rows(self, role: str, source: str | None = None) -> list[int]:
        return self.layout.indices(role, source)

    def text_padding_mask(self, rows: list[int]) -> Optional[torch.Tensor]:
        """Additive mask ``[len(rows), 1, N]`` over the ``rows``' own keys: -inf on the text tokens
        that are zero padding (a DiT row whose text is shorter than the call's, padded by
        ``branch_rows.pad_contexts``), or None when none of ``rows`` is padded (always on UNets).
        A control attending rows' own keys through ``plain`` passes it, as the route itself does
        at the end of the chain."""
        return None if self.key_padding is None else self.key_padding(list(rows))

    def non_image_keys(self, rows: list[int], k, v) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """On a DiT's joint attention, ``rows``' text (and reference-latent) keys and values
        ``[len(rows), T, C]`` and which of those T tokens are the rows' own: a bool ``[len(rows), T]``,
        False on zero padding (``text_padding_mask``), or None where no row is padded."""
        tokens = self.tokens
        padding = self.text_padding_mask(rows)
        keep = None if padding is None else tokens.non_image_tokens(padding, dim=-1)[:, 0] == 0
        return tokens.non_image_tokens(take_rows(k, rows)), tokens.non_image_tokens(take_rows(v, rows)), keep


def kept_outputs(call: AttentionCall, q, k, v, attend_next, targets: list[int], own_images: bool = False):
    """The attention output ``[B, N, D]`` a control that rewrites the image-token outputs of the
    ``targets`` rows starts from: every other row's output, and the targets' text (and reference-
    latent) tokens' outputs, as the rest of the chain computes them (on UNets every token is an
    image token).

    The targets' image tokens hold their own attention when ``own_images`` (a mode mixing it in,
    Stratified Attention) or when other controls / another pack's patch follow (not
    ``call.exclusive``: they expect the full rows); otherwise they are left unset for the
    caller, and only plain attention runs for what is kept: no doubled attention."""
    if own_images or not call.exclusive:
        return attend_next(q, k, v)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    target_set = set(targets)
    others = [i for i in range(q.shape[0]) if i not in target_set]
    if others:
        put_rows(out, others, call.plain(take_rows(q, others), take_rows(k, others), take_rows(v, others),
                                         mask=call.text_padding_mask(others)))
    if targets and call.joint:
        # The targets' text queries attend to their own joint keys, as in the unpatched model.
        tokens = call.tokens
        kept = call.plain(tokens.non_image_tokens(take_rows(q, targets)), take_rows(k, targets),
                          take_rows(v, targets), mask=call.text_padding_mask(targets))
        _scatter_non_image(tokens, out, targets, kept)
    return out


def _scatter_non_image(tokens: TokenLayout, out: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    """Write ``values`` (``rows``' non-image tokens, in sequence order) into ``out`` in place."""
    start = 0
    for part in sorted((p for p in (tokens.text, *tokens.extra) if p.stop > p.start), key=lambda p: p.start):
        n = part.stop - part.start
        put_rows(out, rows, values.narrow(1, start, n), part=lambda block, p=part, n=n: block.narrow(1, p.start, n))
        start += n


def write_image_tokens(call: AttentionCall, out: torch.Tensor, rows: list[int], image_out: torch.Tensor) -> None:
    """``out``'s image-token outputs of ``rows`` set to ``image_out`` (in place); the rows' other
    tokens keep theirs. On UNets (every token an image token) the rows are replaced whole."""
    put_rows(out, rows, image_out, part=call.image_part if call.joint else None)


AttendNext = Callable[..., torch.Tensor]


class AttentionControl:
    """Base class: a control is configuration (immutable after construction); anything it
    accumulates during a run lives in its scratch space, ``run.scratch(self)`` (what
    ``start_run`` returned). ``run`` is the ``patching.run_context.RunContext``.

    Subclasses override what they need (and set ``dit_ready = True`` once they handle
    diffusion transformers' token layouts):
      select_layers(layers)          which layers it acts on, resolved per model
      start_run(run)                 set up the run; return the scratch space (a small
                                     dataclass) or None
      end_run(run)                   hand results out (the context frees the scratch)
      extra_rows(call)               rows to append to this UNet call
      rows_without_control(call)     sampler rows of this UNet call that get no
                                     ControlNet residuals (default: none)
      start_latent(run, noise)       where the sampler starts (default: where ComfyUI
                                     puts it)
      end_sigma(run)                 where a run that ends at sigma 0 ends instead
                                     (default: at 0, as ComfyUI's samplers)
      attend(call, q, k, v, attend_next)  the attention itself; ``attend_next``
                                     is the rest of the chain (other controls,
                                     another pack's replace patch, or ComfyUI's
                                     optimized attention) with the same
                                     ``(q, k, v, mask=None)`` signature.
    """

    kind: str = "attn1"
    # True when ``attend`` is correct for queries (and self-attention keys) of any token count,
    # e.g. after another patch merged tokens (ToMe); False when it needs the layer's token grid
    # (per-token masks, maps). See ``patching.router``.
    handles_token_changes: bool = False
    # Whether the control works on diffusion transformers: it reads ``call.tokens`` (text and
    # image tokens of a joint attention) instead of assuming every token is an image token.
    # A control that does not is refused on a DiT when the run starts, never run there.
    dit_ready: bool = False
    # Whether the control may change rows it did not append whose ``image_prompt`` is None (another
    # control's inverted stream). The reference K/V bank keys a stream on every such control, so
    # a stream computed under it is never reused without it. The pack's controls act on sampler
    # rows and image-prompt rows only.
    changes_stream_rows: bool = False

    def __init__(self) -> None:
        self.name = f"{type(self).__name__}#{next(_ids)}"

    def select_layers(self, layers: tuple[AttentionLayer, ...]) -> tuple[AttentionLayer, ...]:
        return ()

    def start_run(self, run) -> Any:
        return None

    def end_run(self, run) -> None:
        pass

    def extra_rows(self, call: ModelCall) -> list[ExtraRow]:
        return []

    def rows_without_control(self, call: ModelCall) -> list[int]:
        """Indices of sampler rows of ``call`` (from ``call.layout`` roles, never fixed
        positions) whose ControlNet residuals are zeroed for this call: ComfyUI computes a
        ControlNet for the whole batch, so "this CFG branch uncontrolled" must be said here.
        Extra rows get zero residuals anyway."""
        return []

    def start_latent(self, run, noise: torch.Tensor) -> Optional[torch.Tensor]:
        """The sampler-space latent the run starts from at its first sigma (``noise`` gives
        shape, device and dtype), or None to start where ComfyUI puts it. ComfyUI's own
        noise scaling is solved for the noise that starts there (``patching.sampler_start``)."""
        return None

    def end_sigma(self, run) -> Optional[float]:
        """A sigma > 0 at which a run whose schedule ends at 0 ends instead, its result read
        there as the VP latent (the model input at that sigma), or None to end at 0. DDIM with
        ``set_alpha_to_one=False`` (diffusers, the official code of InDetail-IP) ends at ᾱ₀,
        i.e. sigma_min (``patching.sampler_start``)."""
        return None

    def attend(self, call: AttentionCall, q, k, v, attend_next: AttendNext) -> torch.Tensor:
        return attend_next(q, k, v)
