"""The ComfyUI hooks the pack relies on, probed once at load.

Every control runs through ComfyUI's keyed patcher wrappers, attention replace patches and the
``transformer_options`` entries ComfyUI fills for each call; the DiT work runs through the
attention override. A ComfyUI without one of them would load the pack and then fail deep inside
a sampler (or, worse, sample unpatched). So each hook is probed here, by feature, never by version
string, and ``nodes/registry.py`` turns every node into one that fails at execute with one message
naming the missing hooks and the supported range, while its schema still registers (a workflow
opens, its widgets keep their values).
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import logging
import textwrap
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger("qkv_control")

# pyproject.toml [tool.comfy] requires-comfyui, the README and CI's oldest pass say the same.
SUPPORTED_COMFYUI = ">=0.16.3"
TESTED_COMFYUI = ("0.16.3", "0.30.0")


@dataclass(frozen=True)
class Hook:
    """One thing the pack needs from ComfyUI; ``probe()`` is true when the running ComfyUI has it."""

    name: str
    where: str
    probe: Callable[[], bool]


def _attribute(module: str, path: str) -> bool:
    try:
        value = importlib.import_module(module)
    except ImportError:
        return False
    for part in path.split("."):
        if not hasattr(value, part):
            return False
        value = getattr(value, part)
    return True


def _string_constants(module_name: str) -> frozenset[str]:
    """The string literals in a module's source (dict keys it sets and reads among them)."""
    try:
        tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    except (ImportError, OSError, TypeError, SyntaxError):
        return frozenset()
    return frozenset(node.value for node in ast.walk(tree)
                     if isinstance(node, ast.Constant) and isinstance(node.value, str))


def _function_mentions(module: str, function: str, literal: str) -> bool:
    """``module.function`` exists and its source holds the string ``literal``."""
    if not _attribute(module, function):
        return False
    try:
        source = inspect.getsource(getattr(importlib.import_module(module), function))
    except (OSError, TypeError):
        return False
    return any(isinstance(node, ast.Constant) and node.value == literal
               for node in ast.walk(ast.parse(textwrap.dedent(source))))


def _module_sets(module: str, *keys: str) -> Callable[[], bool]:
    return lambda: set(keys) <= _string_constants(module)


def _all(*probes: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: all(probe() for probe in probes)


_SAMPLERS = "comfy.samplers"
_ATTENTION = "comfy.ldm.modules.attention"
_UNET = "comfy.ldm.modules.diffusionmodules.openaimodel"

HOOKS: tuple[Hook, ...] = (
    Hook("patcher wrappers (OUTER_SAMPLE, APPLY_MODEL)",
         "comfy.patcher_extension.WrappersMP, ModelPatcher.add_wrapper_with_key / remove_wrappers_with_key",
         _all(lambda: _attribute("comfy.patcher_extension", "WrappersMP.OUTER_SAMPLE"),
              lambda: _attribute("comfy.patcher_extension", "WrappersMP.APPLY_MODEL"),
              lambda: _attribute("comfy.model_patcher", "ModelPatcher.add_wrapper_with_key"),
              lambda: _attribute("comfy.model_patcher", "ModelPatcher.remove_wrappers_with_key"),
              lambda: _attribute("comfy.model_patcher", "create_model_options_clone"))),
    Hook("attention replace patches (patches_replace attn1/attn2)", f"{_ATTENTION} BasicTransformerBlock",
         _module_sets(_ATTENTION, "patches_replace", "attn1", "attn2")),
    Hook("transformer_options cond_or_uncond, sigmas, sample_sigmas", _SAMPLERS,
         _module_sets(_SAMPLERS, "cond_or_uncond", "sigmas", "sample_sigmas")),
    Hook("transformer_options original_shape", _UNET, _module_sets(_UNET, "original_shape")),
    Hook("transformer_options n_heads, activations_shape", _ATTENTION,
         _module_sets(_ATTENTION, "n_heads", "activations_shape")),
    Hook("attention override (optimized_attention_override)", f"{_ATTENTION}.wrap_attn",
         lambda: _function_mentions(_ATTENTION, "wrap_attn", "optimized_attention_override")),
)


@functools.cache
def missing_hooks() -> tuple[Hook, ...]:
    """The hooks this ComfyUI lacks (probed once; ``missing_hooks.cache_clear()`` probes again)."""
    missing = []
    for hook in HOOKS:
        try:
            found = bool(hook.probe())
        except Exception:  # a probe never breaks loading: whatever it cannot confirm is missing
            logger.debug("QKV Control: probing %s failed", hook.name, exc_info=True)
            found = False
        if not found:
            missing.append(hook)
    return tuple(missing)


def missing_message(missing: tuple[Hook, ...]) -> str:
    names = "; ".join(f"{hook.name} [{hook.where}]" for hook in missing)
    return (f"this ComfyUI lacks what QKV Control relies on: {names}. QKV Control supports ComfyUI "
            f"{SUPPORTED_COMFYUI} (tested with {' and '.join(TESTED_COMFYUI)}): update ComfyUI")


class MissingComfyUIHook(RuntimeError):
    """Raised by every node of the pack when the running ComfyUI lacks a hook it relies on."""


def gate_nodes(nodes: list[type]) -> list[type]:
    """``nodes`` as they are when every hook is there; otherwise each one replaced by a subclass
    with the same schema whose ``execute`` raises one message naming the missing hooks."""
    missing = missing_hooks()
    if not missing:
        return list(nodes)
    message = missing_message(missing)
    logger.error("QKV Control: %s. Its nodes are registered but will not run.", message)
    return [_failing_node(node, message) for node in nodes]


def _failing_node(node: type, message: str) -> type:
    display_name = node.define_schema().display_name or node.__name__

    def execute(cls, **kwargs):
        raise MissingComfyUIHook(f"{display_name}: {message}")

    return type(node.__name__, (node,), {"execute": classmethod(execute), "__module__": node.__module__,
                                          "__doc__": node.__doc__, "__qualname__": node.__qualname__})
