"""Which tokens of one attention call are text and which are image: the token layout.

A UNet's self-attention sees image tokens only. A diffusion transformer's joint attention
sees one sequence per row: the text tokens, the generated image's tokens (its latent
patchified into a ``grid`` of height x width patches, row-major), and possibly further
image tokens (Kontext-style reference latents a model appends after its own). The family
adapter (``families.*``) says where each part lies; controls read it from the call and
never assume an order. Pure torch; no ComfyUI import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EMPTY = slice(0, 0)


@dataclass(frozen=True)
class TokenLayout:
    """The token positions of one attention call's query sequence (and key sequence: the
    same for self- and joint attention).

    length: tokens in the sequence.
    text:   the text tokens (empty for UNets and image-only attention).
    image:  the generated image's tokens, ``grid[0] * grid[1]`` of them, row-major.
    grid:   (height, width) of the image tokens in patches.
    extra:  further tokens (reference latents appended by the model), in order.
    """

    length: int
    text: slice
    image: slice
    grid: tuple[int, int]
    extra: tuple[slice, ...] = ()

    def __post_init__(self):
        h, w = self.grid
        if self.image.stop - self.image.start != h * w:
            raise ValueError(f"token layout: expected {h}x{w} = {h * w} image tokens, "
                             f"got {self.image.stop - self.image.start}")
        covered = sorted([self.text, self.image, *self.extra], key=lambda s: s.start)
        end = 0
        for part in covered:
            if part.stop == part.start:
                continue
            if part.start != end:
                raise ValueError(f"token layout: expected contiguous parts covering 0-{self.length}, "
                                 f"got text {self.text}, image {self.image}, extra {self.extra}")
            end = part.stop
        if end != self.length:
            raise ValueError(f"token layout: expected parts covering {self.length} tokens, got {end}")

    @classmethod
    def image_only(cls, grid: tuple[int, int]) -> "TokenLayout":
        """All tokens are the image's (UNet self-attention, image-only DiT attention)."""
        n = int(grid[0]) * int(grid[1])
        return cls(n, _EMPTY, slice(0, n), (int(grid[0]), int(grid[1])))

    @classmethod
    def text_first(cls, length: int, grid: tuple[int, int], extra_tokens: tuple[int, ...] = ()) -> "TokenLayout":
        """Text, then the image, then ``extra_tokens`` reference parts (Flux, SD3, Qwen-Image):
        the text is whatever precedes the image."""
        n_image = int(grid[0]) * int(grid[1])
        n_text = int(length) - n_image - sum(extra_tokens)
        if n_text < 0:
            raise ValueError(f"token layout: expected at least {n_image + sum(extra_tokens)} tokens "
                             f"({grid[0]}x{grid[1]} image, {sum(extra_tokens)} reference), got {length}")
        extra, start = [], n_text + n_image
        for count in extra_tokens:
            extra.append(slice(start, start + int(count)))
            start += int(count)
        return cls(int(length), slice(0, n_text), slice(n_text, n_text + n_image),
                   (int(grid[0]), int(grid[1])), tuple(extra))

    @property
    def n_text(self) -> int:
        return self.text.stop - self.text.start

    @property
    def n_image(self) -> int:
        return self.image.stop - self.image.start

    @property
    def image_only_call(self) -> bool:
        return self.n_text == 0 and not self.extra

    def image_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The image part of ``x`` along its token dimension ``dim`` (a view)."""
        return x.narrow(dim, self.image.start, self.n_image)

    def text_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x.narrow(dim, self.text.start, self.n_text)

    def non_image_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The text and extra (reference-latent) parts of ``x`` along ``dim``, in sequence order:
        every token that is not the generated image's (a copy when there are several parts)."""
        parts = sorted((part for part in (self.text, *self.extra) if part.stop > part.start), key=lambda s: s.start)
        if not parts:
            return x.narrow(dim, 0, 0)
        if len(parts) == 1:
            return x.narrow(dim, parts[0].start, parts[0].stop - parts[0].start)
        return torch.cat([x.narrow(dim, part.start, part.stop - part.start) for part in parts], dim=dim)

    @property
    def n_non_image(self) -> int:
        return self.length - self.n_image

    def with_image(self, x: torch.Tensor, image: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``x`` with its image tokens replaced by ``image`` (a new tensor; text and extra
        tokens are ``x``'s own, bit for bit)."""
        out = x.clone()
        out.narrow(dim, self.image.start, self.n_image).copy_(image)
        return out
