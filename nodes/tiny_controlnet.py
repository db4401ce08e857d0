"""Tiny ControlNet loader node: stands in for ControlNetLoader in the test server and
`make demo`'s tiny mode. Registered only when QKV_CONTROL_TINY_MODELS=1."""

from __future__ import annotations

from comfy_api.latest import io

from ..tiny.controlnet import cached_tiny_controlnet
from ..tiny.models import FAMILIES


class QKVTinyControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVTinyControlNetLoader",
            display_name="QKV Tiny ControlNet (test)",
            category="QKV Control/testing",
            description="Builds a tiny random-weight ControlNet for the tiny checkpoint of the same family, "
                        "with ComfyUI's own ControlNet classes. For tests and the demo without model files.",
            search_aliases=["tiny", "test", "random controlnet"],
            inputs=[
                io.Combo.Input("family", options=list(FAMILIES), default="sd15",
                               tooltip="Family of the tiny checkpoint the ControlNet pairs with."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random weights; the same seed gives the same ControlNet."),
            ],
            outputs=[io.ControlNet.Output(tooltip="The tiny ControlNet.")],
        )

    @classmethod
    def execute(cls, family: str, seed: int) -> io.NodeOutput:
        return io.NodeOutput(cached_tiny_controlnet(family, seed))


NODES = [QKVTinyControlNetLoader]
