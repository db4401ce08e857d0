"""Image preprocessing for Grounding DINO and SAM, as the official libraries do it.

Both official libraries resize a PIL image made from uint8 pixels, bilinear:

- Grounding DINO (``groundingdino/datasets/transforms.py``): ``RandomResize([800], max_size=1333)`` ->
  ``torchvision.transforms.functional.resize(pil_image, (h, w))``, then ``ToTensor`` (``uint8 / 255``) and
  ``Normalize`` with the ImageNet statistics.
- SAM (``segment_anything/utils/transforms.py`` ``ResizeLongestSide.apply_image``):
  ``np.array(resize(to_pil_image(uint8_image), (h, w)))``, then ``Sam.preprocess``: ``(x - pixel_mean) /
  pixel_std`` on the 0-255 scale and zero padding at the bottom and right to a square.

torchvision's ``resize`` of a PIL image is ``PIL.Image.resize((w, h), BILINEAR)``; a float-tensor resize
(``F.interpolate(antialias=True)``) differs from it by about 1/255 per pixel, which moves detections and
flips mask pixels. ComfyUI images are float 0..1; an image loaded from an 8-bit file is ``k / 255`` exactly
in float32, and rounding ``255 * x`` gives back ``k``, so the official inputs are reproduced bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DETECTION_SIZE = 800
DETECTION_MAX_SIZE = 1333


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, W, C]`` image batch as RGB: grey (C=1) repeated, alpha (C=2, 4) dropped."""
    if images.ndim == 3:
        images = images.unsqueeze(-1)
    if images.ndim != 4:
        raise ValueError(f"expected an image batch [B, H, W, C], got shape {tuple(images.shape)}")
    channels = images.shape[-1]
    if channels in (1, 2):
        return images[..., :1].expand(*images.shape[:-1], 3)
    if channels in (3, 4):
        return images[..., :3]
    raise ValueError(f"expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA) channels, got {channels}")


def to_uint8(image_rgb: torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` float 0..1 -> ``[H, W, 3]`` uint8, rounded (exact for images read from 8-bit files)."""
    return (image_rgb.detach().float().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_uint8(pixels: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, h, w]`` uint8 tensor: PIL's bilinear resize, as torchvision's ``resize``
    of a PIL image (what both official libraries call)."""
    height, width = shape
    if pixels.shape[:2] != (height, width):
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # a writable copy


def detection_resize_shape(height: int, width: int, size: int = DETECTION_SIZE,
                           max_size: int | None = DETECTION_MAX_SIZE) -> tuple[int, int]:
    """Shortest side to ``size`` unless the longest would exceed ``max_size``: ``get_size_with_aspect_ratio``
    of Grounding DINO's ``resize`` (DETR's ``RandomResize``)."""
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def grounding_dino_pixels(image_rgb: torch.Tensor, size: int = DETECTION_SIZE,
                          max_size: int | None = DETECTION_MAX_SIZE) -> torch.Tensor:
    """``[H, W, 3]`` in 0..1 -> ``[1, 3, h, w]``: resized (uint8, PIL bilinear), ``/ 255``, ImageNet-normalised."""
    height, width = image_rgb.shape[:2]
    resized = resize_uint8(to_uint8(image_rgb), detection_resize_shape(height, width, size, max_size))
    chw = resized.float().div(255)  # torchvision's ToTensor
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return chw.sub(mean).div(std).unsqueeze(0)  # torchvision's Normalize


def sam_input_shape(height: int, width: int, target: int) -> tuple[int, int]:
    """segment-anything's ``ResizeLongestSide.get_preprocess_shape``."""
    scale = target * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_pixels(image_rgb: torch.Tensor, target: int, mean, std) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[H, W, 3]`` in 0..1 -> (``[1, 3, target, target]`` normalised and padded, resized shape)."""
    height, width = image_rgb.shape[:2]
    shape = sam_input_shape(height, width, target)
    resized = resize_uint8(to_uint8(image_rgb), shape).unsqueeze(0)
    normalised = (resized - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    return F.pad(normalised, (0, target - shape[1], 0, target - shape[0])), shape
