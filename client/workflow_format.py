"""ComfyUI workflow formats: UI format -> API format, and tiny-model substitution.

The UI format (what the frontend saves: ``nodes``, ``links``, ``widgets_values``, subgraph
``definitions``) stores widget values by position; the API format (what ``POST /prompt``
takes) stores them by name. The mapping needs each node's input order from the server's
``/object_info``, and follows the frontend's rules: a seed-like widget is followed by its
``control_after_generate`` value, an image-upload combo by its upload button's value.
Following links (reroutes, bypassed and muted nodes, subgraphs, nested ones too) is
``client.subgraphs``; running a prompt is ``client.prompt_api``.

Pure Python + ``requests``: the tests, ``make demo`` and the batch CLI share this module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import requests

from .subgraphs import FlatGraph, GraphError, NodeWidgets, drop_dangling_links

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_AFTER_GENERATE_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
# The frontend gives these INT inputs a control widget even without the flag.
SEED_WIDGET_NAMES = frozenset({"seed", "noise_seed"})
UPLOAD_WIDGET_VALUES = frozenset({"image", "video", "audio", "file", "3d"})
# Promoted widgets kept in the pre-1.4x frontend layout, which the frontend migrates on load.
LEGACY_PROMOTION_KEY = "proxyWidgets"


class WorkflowError(ValueError):
    """A workflow that cannot be converted (unknown node types, broken links, ...)."""


# --------------------------------------------------------------------------- formats

def is_api_format(workflow: dict) -> bool:
    """True for ``{node_id: {"class_type": ..., "inputs": ...}}`` (optionally under "prompt")."""
    if not isinstance(workflow, dict) or not workflow or "nodes" in workflow:
        return False
    return all(isinstance(v, dict) and "class_type" in v for v in workflow.values())


def fetch_object_info(url: str, timeout: float = 60) -> dict:
    r = requests.get(f"{url}/object_info", timeout=timeout)
    r.raise_for_status()
    return r.json()


def input_spec(info: dict, name: str) -> tuple[Any, dict]:
    """(type, options) of a node type's input in ``/object_info`` (None, {} when it has none)."""
    for section in ("required", "optional"):
        spec = info.get("input", {}).get(section, {}).get(name)
        if spec is not None:
            return spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return None, {}


def _input_order(info: dict) -> list[str]:
    order = info.get("input_order")
    if order:
        return list(order.get("required", [])) + list(order.get("optional", []))
    inputs = info.get("input", {})
    return list(inputs.get("required", {})) + list(inputs.get("optional", {}))


def _combo_options(io_type: Any, opts: dict) -> list | None:
    if isinstance(io_type, list):
        return io_type
    if io_type == "COMBO":
        return list(opts.get("options", []))
    return None


def _is_widget(io_type: Any, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(io_type, list) or io_type in WIDGET_TYPES


def _has_control_widget(name: str, io_type: Any, opts: dict) -> bool:
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return io_type == "INT" and name in SEED_WIDGET_NAMES


def _has_upload_widget(opts: dict) -> bool:
    return any(key.endswith("_upload") and value for key, value in opts.items())


def widget_positions(node: dict, info: dict) -> dict[str, int]:
    """Where each widget's value sits in a UI node's ``widgets_values`` list, by input name.

    The frontend stores a seed-like widget's ``control_after_generate`` value right after it,
    and an image-upload combo's upload-button value after that combo."""
    values = list(node.get("widgets_values") or [])
    widgets = widget_names(info)
    positions: dict[str, int] = {}
    pos = 0
    for index, name in enumerate(widgets):
        io_type, opts = input_spec(info, name)
        if pos >= len(values):
            break
        positions[name] = pos
        pos += 1
        if _has_control_widget(name, io_type, opts) and pos < len(values) \
                and values[pos] in CONTROL_AFTER_GENERATE_VALUES:
            pos += 1
        if _has_upload_widget(opts) and pos < len(values) and values[pos] in UPLOAD_WIDGET_VALUES:
            following = widgets[index + 1] if index + 1 < len(widgets) else None
            options = _combo_options(*input_spec(info, following)) if following else None
            if not options or values[pos] not in options:
                pos += 1
    return positions


_UNSET = object()


def widget_default(info: dict, name: str) -> Any:
    """The value the frontend gives a widget the saved node has no value for (a widget added to
    the node type after the workflow was saved): the input's default, else 0 / "" / False /
    the first option."""
    io_type, opts = input_spec(info, name)
    options = _combo_options(io_type, opts)
    if options is not None:
        return opts.get("default") or (options[0] if options else _UNSET)
    default = opts.get("default")
    return {"INT": 0, "FLOAT": 0, "STRING": "", "BOOLEAN": False}.get(io_type, _UNSET) if default is None else default


def widget_values_by_name(node: dict, info: dict) -> dict[str, Any]:
    """A UI node's widget values by input name, in the server's input order: its ``widgets_values``,
    and the frontend's default for widgets it has no value for."""
    values = node.get("widgets_values")
    if isinstance(values, dict):
        saved = {name: values[name] for name in _input_order(info) if name in values}
    else:
        saved = {name: values[pos] for name, pos in widget_positions(node, info).items()}
    result = {}
    for name in widget_names(info):
        value = saved[name] if name in saved else widget_default(info, name)
        if value is not _UNSET:
            result[name] = value
    return result


def widget_names(info: dict) -> list[str]:
    """A node type's widget inputs, in the server's input order."""
    return [name for name in _input_order(info) if _is_widget(*input_spec(info, name))]


def widget_type(info: dict, name: str) -> str:
    """The slot type the frontend gives a widget input ("INT", "STRING", "COMBO", ...)."""
    io_type, _opts = input_spec(info, name)
    return "COMBO" if isinstance(io_type, list) else str(io_type)


@dataclass(frozen=True)
class PromotedWidget:
    """A widget of a subgraph node (``node_id``, ``title``) and the prompt inputs that take its value."""

    node_id: str
    title: str
    name: str
    targets: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Expansion:
    prompt: dict[str, dict]
    promoted: tuple[PromotedWidget, ...] = ()


def expand_workflow(workflow: dict, object_info: dict) -> Expansion:
    """A UI-format workflow as an API-format prompt using the server's ``/object_info``, and the
    promoted widgets of its subgraph nodes (an API-format prompt is returned as it is).

    Subgraph nodes are expanded into their inner nodes (ids ``"<subgraph node>:<inner node>"``),
    exactly as the frontend does when it queues (see ``client.subgraphs``)."""
    if is_api_format(workflow):
        return Expansion(copy.deepcopy(workflow))
    if "nodes" not in workflow:
        raise WorkflowError("workflow: expected a UI-format workflow (with 'nodes') or an API-format prompt, "
                            f"got a dict with keys {sorted(workflow)[:8]}")

    def info_of(node: dict) -> dict:
        return object_info.get(node.get("type"), {})

    widgets = NodeWidgets(values=lambda node: widget_values_by_name(node, info_of(node)),
                          has_widget=lambda node, name: name in widget_names(info_of(node)))
    try:
        graph = FlatGraph(workflow, widgets)
    except GraphError as exc:
        raise WorkflowError(str(exc)) from exc
    legacy = sorted(dto.id for dto in graph.nodes.values()
                    if dto.inner is not None and (dto.node.get("properties") or {}).get(LEGACY_PROMOTION_KEY))
    if legacy:
        raise WorkflowError(f"workflow: subgraph nodes {legacy} promote widgets the pre-1.4x way "
                            f"(properties.{LEGACY_PROMOTION_KEY}); open the workflow in a current ComfyUI "
                            "frontend and save it again, which turns them into subgraph inputs")
    executed = graph.executed()
    missing = sorted({dto.node["type"] for dto in executed if dto.node["type"] not in object_info})
    if missing:
        raise WorkflowError(f"workflow: node types not known to the server: {missing} "
                            "(is the custom node pack installed and loaded?)")
    prompt: dict[str, dict] = {}
    try:
        for dto in executed:
            info = object_info[dto.node["type"]]
            prompt[dto.id] = {
                "class_type": dto.node["type"],
                "inputs": graph.prompt_inputs(dto),
                "_meta": {"title": dto.node.get("title") or info.get("display_name") or dto.node["type"]},
            }
    except GraphError as exc:
        raise WorkflowError(str(exc)) from exc
    drop_dangling_links(prompt)
    promoted = tuple(PromotedWidget(node_id, graph.subgraph_title(node_id), name,
                                    tuple(t for t in targets if t[0] in prompt))
                     for (node_id, name), targets in graph.promoted_targets.items())
    return Expansion(prompt, promoted)


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """Convert a UI-format workflow to an API-format prompt (``expand_workflow`` without the widgets)."""
    return expand_workflow(workflow, object_info).prompt


# --------------------------------------------------------------------------- tiny mode

@dataclass(frozen=True)
class TinySubstitute:
    """How a core loader that cannot read tiny models is replaced in an API prompt.

    ``make_inputs(original_inputs, family)`` gives the tiny loader's inputs;
    ``output_slots[i]`` is the tiny node's output slot for the core node's slot ``i``
    (None: same order). ``model_file`` is (models/ folder, input, ...) of the files the core
    loader reads (DualCLIPLoader: two inputs), so that a test server can list the file names
    without having the files.
    """

    tiny_class: str
    make_inputs: Callable[[dict, str], dict]
    output_slots: tuple[int, ...] | None = None
    model_file: tuple[str, ...] | None = None


TINY_SEED = 0

# core class_type -> substitute. Add an entry for each core loader the tiny models stand in for.
TINY_SUBSTITUTES: dict[str, TinySubstitute] = {
    "CheckpointLoaderSimple": TinySubstitute(
        "QKVTinyCheckpointLoader", lambda inputs, family: {"family": family, "seed": TINY_SEED},
        model_file=("checkpoints", "ckpt_name")),
    "CLIPVisionLoader": TinySubstitute("QKVTinyCLIPVisionLoader", lambda inputs, family: {"seed": TINY_SEED},
                                       model_file=("clip_vision", "clip_name")),
    "ControlNetLoader": TinySubstitute(
        "QKVTinyControlNetLoader", lambda inputs, family: {"family": family, "seed": TINY_SEED},
        model_file=("controlnet", "control_net_name")),
}


def register_tiny_substitute(core_class: str, substitute: TinySubstitute) -> None:
    TINY_SUBSTITUTES[core_class] = substitute


# Diffusion-transformer workflows (issue 14) load the model, the text encoders and the VAE
# separately: each of these loaders becomes the tiny checkpoint of the workflow's family,
# its one output taken from the tiny loader's MODEL (0), CLIP (1) or VAE (2) slot.
DIT_LOADER_SLOTS = {"UNETLoader": 0, "DualCLIPLoader": 1, "TripleCLIPLoader": 1, "VAELoader": 2}
DIT_LOADER_FILES = {"UNETLoader": ("diffusion_models", "unet_name"),
                    "DualCLIPLoader": ("text_encoders", "clip_name1", "clip_name2"),
                    "TripleCLIPLoader": ("text_encoders", "clip_name1", "clip_name2", "clip_name3"),
                    "VAELoader": ("vae", "vae_name")}
for _core_class, _slot in DIT_LOADER_SLOTS.items():
    register_tiny_substitute(_core_class, TinySubstitute(
        "QKVTinyCheckpointLoader", lambda inputs, family: {"family": family, "seed": TINY_SEED}, (_slot,),
        model_file=DIT_LOADER_FILES[_core_class]))
# Filename (or loader type) tags of the diffusion-transformer families, checked first; "t5xxl"
# (a T5-XXL text encoder file) is no SDXL hint.
_DIT_HINTS = (("schnell", "flux_schnell"), ("flux", "flux"), ("sd3", "sd35"), ("sd_3", "sd35"))


def substituted_model_files(prompt: dict, substitutes: dict[str, TinySubstitute] | None = None) -> dict[str, set[str]]:
    """The files the core loaders of an API prompt read and tiny mode replaces, by models/ folder."""
    table = TINY_SUBSTITUTES if substitutes is None else substitutes
    files: dict[str, set[str]] = {}
    for node in prompt.values():
        sub = table.get(node["class_type"])
        if sub is None or sub.model_file is None:
            continue
        folder, *input_names = sub.model_file
        for input_name in input_names:
            name = node["inputs"].get(input_name)
            if isinstance(name, str) and name:
                files.setdefault(folder, set()).add(name)
    return files


def family_hint(text: str) -> str | None:
    """"sdxl" when a model filename says so ("sd_xl_base_1.0", "juggernautXL"), "sd15" for "v1-5"/"sd15";
    "flux", "flux_schnell" and "sd35" for Flux.1 / SD3.x names ("flux1-dev", DualCLIPLoader type "sd3")."""
    lowered = text.lower()
    for tag, family in _DIT_HINTS:
        if tag in lowered:
            return family
    lowered = lowered.replace("t5xxl", "")
    if "xl" in lowered:
        return "sdxl"
    if any(tag in lowered for tag in ("v1-5", "v1_5", "sd15", "sd1.5", "sd_1.5")):
        return "sd15"
    return None


def workflow_family(prompt: dict, default: str = "sd15") -> str:
    """The model family a prompt's checkpoint names hint at (see ``family_hint``), else ``default``."""
    for node in prompt.values():
        if node["class_type"] in ("CheckpointLoaderSimple", "CheckpointLoader", "UNETLoader"):
            for value in node["inputs"].values():
                if isinstance(value, str) and family_hint(value):
                    return family_hint(value)
    return default


def apply_tiny_substitutions(prompt: dict, object_info: dict | None = None, family: str | None = None,
                             substitutes: dict[str, TinySubstitute] | None = None) -> tuple[dict, list[str]]:
    """Replace core loaders by tiny-model loaders. Returns (new prompt, ["id: Core -> Tiny", ...])."""
    table = TINY_SUBSTITUTES if substitutes is None else substitutes
    prompt = copy.deepcopy(prompt)
    default_family = family or workflow_family(prompt)
    replaced, slot_maps = [], {}
    for node_id, node in prompt.items():
        sub = table.get(node["class_type"])
        if sub is None:
            continue
        if object_info is not None and sub.tiny_class not in object_info:
            raise WorkflowError(f"tiny mode: the server has no {sub.tiny_class} node, got a server started without "
                                "QKV_CONTROL_TINY_MODELS=1 (or the pack failed to load)")
        node_family = family
        if node_family is None:
            hints = [family_hint(v) for v in node["inputs"].values() if isinstance(v, str)]
            node_family = next((h for h in hints if h), default_family)
        replaced.append(f"{node_id}: {node['class_type']} -> {sub.tiny_class}")
        node["class_type"] = sub.tiny_class
        node["inputs"] = sub.make_inputs(node["inputs"], node_family)
        if sub.output_slots is not None:
            slot_maps[node_id] = sub.output_slots
    if slot_maps:
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and value[0] in slot_maps:
                    node["inputs"][name] = [value[0], slot_maps[value[0]][value[1]]]
    return prompt, replaced


