"""The pack's ComfyExtension: collects the node classes of every node module."""

from __future__ import annotations

import importlib
import logging
import os

from comfy_api.latest import ComfyExtension, io

from ..patching.comfy_hooks import gate_nodes

logger = logging.getLogger("qkv_control")

# Each module lists its node classes in a module-level ``NODES`` list.
NODE_MODULES = (
    "mca_ctrl_nodes",
    "ip_adapter_nodes",
    "text_guidance_nodes",
    "ddim_inversion",
    "kv_bank",
    "indetail_ip",
    "image_prompt_guidance",
    "adain_noise",
    "localization_nodes",
)

# Loader nodes for tiny random-weight models. They stand in for the core loaders
# (which cannot recognise tiny models) in the test suite and `make demo`'s tiny
# mode, and are never registered in a user's normal ComfyUI.
TINY_MODELS_ENV = "QKV_CONTROL_TINY_MODELS"
TINY_NODE_MODULES = ("tiny_loaders", "tiny_controlnet")


def tiny_models_enabled() -> bool:
    return os.environ.get(TINY_MODELS_ENV, "") == "1"


def collect_nodes() -> list[type[io.ComfyNode]]:
    """Every node class of the pack; where this ComfyUI lacks a hook the pack relies on, each
    one fails at execute naming it (``patching.comfy_hooks``), and still registers."""
    names = list(NODE_MODULES)
    if tiny_models_enabled():
        names += TINY_NODE_MODULES
    nodes: list[type[io.ComfyNode]] = []
    for name in names:
        module = importlib.import_module(f"{__package__}.{name}")
        nodes.extend(module.NODES)
    return gate_nodes(nodes)


class QKVControlExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return collect_nodes()
