"""ComfyUI IO types the pack's nodes exchange, declared once."""

from __future__ import annotations

from comfy_api.latest import io

from ..inversion.result import INVERSION_TYPE

# An inverted reference (inversion.result.InversionResult), from the DDIM Inversion node.
Inversion = io.Custom(INVERSION_TYPE)
