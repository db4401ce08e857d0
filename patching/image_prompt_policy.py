"""The image-prompt guidance policy: whether an image prompt reaches the negative CFG branch.

Set by the conflict-free guidance node at ``transformer_options[keys.IMAGE_PROMPT_POLICY]``
and read by every image-prompt control (self-attention reference rows, IP-Adapter image
tokens, subject streams ...). InDetail-IP (Sec. 4.1, Suppl. E):

- ``positive_only`` (conflict-free guidance, the default; the official ``sain: cond``): the
  image prompt conditions the positive branch only; negative-branch rows attend to their own
  keys/values (plain attention) and get no image tokens.
- ``both``: the conflicting baseline, the paper's ablation (the official ``sain: all``): each
  branch sees the image prompt *as that branch conditions it*. How each control reads it:
  - a self-attention reference stream computed with text (InDetail-IP) gives each branch the
    reference row computed with that branch's reference text: the inversion prompt for the
    positive rows, the inversion's ``negative`` text for the negative rows (official: the
    empty prompt), a second row. When both texts are the same the two rows are identical, so
    one row serves both branches (the pre-existing shared row, 2N+1 rows; 2N+2 otherwise):
    the shared variant needs no name of its own;
  - image tokens that do not depend on text (IP-Adapter) are the same image prompt in both
    branches;
  - a control that edits the generated rows (MCA-Ctrl) edits the negative rows too.
- ``negative_image``: the positive branch gets the image prompt, the negative branch a
  different "negative" image (``negative_inversion`` for self-attention controls,
  ``negative_image`` pixels for encoder-based ones); a control that cannot use the given
  negative treats the negative branch as under ``positive_only``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import keys

POSITIVE_ONLY = "positive_only"
BOTH = "both"
NEGATIVE_IMAGE = "negative_image"
MODES = (POSITIVE_ONLY, BOTH, NEGATIVE_IMAGE)

_ALIASES = {"positive": POSITIVE_ONLY, "positive only": POSITIVE_ONLY, "conflict_free": POSITIVE_ONLY,
            "conflict-free": POSITIVE_ONLY, "cond": POSITIVE_ONLY, "both": BOTH, "conflicting": BOTH,
            "negative image": NEGATIVE_IMAGE, "negative-image": NEGATIVE_IMAGE}


def normalise_mode(mode: str) -> str:
    name = str(mode).strip().lower()
    name = _ALIASES.get(name, name.replace(" ", "_").replace("-", "_"))
    if name not in MODES:
        raise ValueError(f"image prompt policy: expected one of {', '.join(MODES)}, got '{mode}'")
    return name


@dataclass(frozen=True, eq=False)
class ImagePromptPolicy:
    """Configuration only (lives in model_options, which ComfyUI copies per clone)."""

    mode: str = POSITIVE_ONLY
    # IMAGE [B, H, W, C] in 0..1, for controls that encode images (IP-Adapter ...)
    negative_image: Optional[torch.Tensor] = None
    # QKV_INVERSION (inversion.result.InversionResult), for self-attention controls
    negative_inversion: Optional[Any] = None

    def __post_init__(self):
        object.__setattr__(self, "mode", normalise_mode(self.mode))

    @property
    def value(self) -> str:
        return self.mode

    @property
    def positive_only(self) -> bool:
        return self.mode == POSITIVE_ONLY

    @property
    def include_negative(self) -> bool:
        """Whether the negative branch gets *some* image prompt (the same one, or a negative image)."""
        return self.mode != POSITIVE_ONLY

    def __str__(self) -> str:
        return self.mode


DEFAULT_POLICY = ImagePromptPolicy(POSITIVE_ONLY)


def get_policy(transformer_options: dict) -> ImagePromptPolicy:
    """The policy in force for a run or call; conflict-free (positive only) when no node set one."""
    policy = (transformer_options or {}).get(keys.IMAGE_PROMPT_POLICY)
    if policy is None:
        return DEFAULT_POLICY
    if isinstance(policy, ImagePromptPolicy):
        return policy
    return ImagePromptPolicy(str(getattr(policy, "value", policy)))
