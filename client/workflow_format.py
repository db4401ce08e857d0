"""ComfyUI workflow formats: UI format -> API format, tiny-model substitution, running a prompt.

The UI format (what the frontend saves: ``nodes``, ``links``, ``widgets_values``) stores
widget values by position; the API format (what ``POST /prompt`` takes) stores them by
name. The mapping needs each node's input order from the server's ``/object_info``, and
follows the frontend's rules: a seed-like widget is followed by its
``control_after_generate`` value, an image-upload combo by its upload button's value,
notes/reroutes/primitive nodes exist only in the frontend, muted nodes are dropped and
bypassed nodes pass their matching input through.

Pure Python + ``requests``: the tests, ``make demo`` and the batch CLI share this module.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import requests

# Node types that live only in the frontend.
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE_TYPE = "Reroute"
PRIMITIVE_TYPE = "PrimitiveNode"
FRONTEND_ONLY_TYPES = NOTE_TYPES | {REROUTE_TYPE, PRIMITIVE_TYPE}

# LiteGraph node modes.
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_AFTER_GENERATE_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
# The frontend gives these INT inputs a control widget even without the flag.
SEED_WIDGET_NAMES = frozenset({"seed", "noise_seed"})
UPLOAD_WIDGET_VALUES = frozenset({"image", "video", "audio", "file", "3d"})


class WorkflowError(ValueError):
    """A workflow that cannot be converted (unknown node types, broken links, ...)."""


class PromptError(RuntimeError):
    """The server rejected or failed a prompt. ``details`` holds the server's JSON."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


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


def _input_spec(info: dict, name: str) -> tuple[Any, dict]:
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


def widget_values_by_name(node: dict, info: dict) -> dict[str, Any]:
    """Map a UI node's ``widgets_values`` onto input names, in the server's input order."""
    values = node.get("widgets_values")
    order = _input_order(info)
    if isinstance(values, dict):
        return {name: values[name] for name in order if name in values}
    values = list(values or [])
    result: dict[str, Any] = {}
    pos = 0
    widgets = [name for name in order if _is_widget(*_input_spec(info, name))]
    for index, name in enumerate(widgets):
        io_type, opts = _input_spec(info, name)
        if pos >= len(values):
            break
        result[name] = values[pos]
        pos += 1
        if _has_control_widget(name, io_type, opts) and pos < len(values) \
                and values[pos] in CONTROL_AFTER_GENERATE_VALUES:
            pos += 1
        if _has_upload_widget(opts) and pos < len(values) and values[pos] in UPLOAD_WIDGET_VALUES:
            following = widgets[index + 1] if index + 1 < len(widgets) else None
            options = _combo_options(*_input_spec(info, following)) if following else None
            if not options or values[pos] not in options:
                pos += 1
    return result


def _normalise_links(workflow: dict) -> dict[int, tuple[int, int, int, int, Any]]:
    """``{link_id: (origin_id, origin_slot, target_id, target_slot, type)}`` from either link layout."""
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                 link.get("type"))
        else:
            links[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    return links


def _types_match(a: Any, b: Any) -> bool:
    if a in (None, "*") or b in (None, "*"):
        return True
    set_a, set_b = set(str(a).split(",")), set(str(b).split(","))
    return bool(set_a & set_b)


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """Convert a UI-format workflow to an API-format prompt using the server's ``/object_info``."""
    if is_api_format(workflow):
        return copy.deepcopy(workflow)
    if "nodes" not in workflow:
        raise WorkflowError("workflow: expected a UI-format workflow (with 'nodes') or an API-format prompt, "
                            f"got a dict with keys {sorted(workflow)[:8]}")
    subgraph_ids = {sg.get("id") for sg in (workflow.get("definitions") or {}).get("subgraphs") or []}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = _normalise_links(workflow)

    missing = sorted({n["type"] for n in nodes.values()
                      if n["type"] not in object_info and n["type"] not in FRONTEND_ONLY_TYPES})
    if missing:
        nested = [t for t in missing if t in subgraph_ids]
        if nested:
            raise WorkflowError(f"workflow: subgraphs are not supported by this converter, got subgraph nodes {nested}")
        raise WorkflowError(f"workflow: node types not known to the server: {missing} "
                            "(is the custom node pack installed and loaded?)")

    def resolve(link_id: int, seen: frozenset = frozenset()) -> tuple[str, Any] | None:
        """Follow a link to a real producing node: ("link", [id, slot]), ("value", v) or None."""
        if link_id in seen or link_id not in links:
            return None
        seen = seen | {link_id}
        origin_id, origin_slot, _target, _slot, link_type = links[link_id]
        src = nodes.get(origin_id)
        if src is None:
            raise WorkflowError(f"workflow: link {link_id} starts at node {origin_id}, which does not exist")
        mode = src.get("mode", MODE_ALWAYS)
        if src["type"] == REROUTE_TYPE:
            upstream = (src.get("inputs") or [{}])[0].get("link")
            return resolve(upstream, seen) if upstream is not None else None
        if src["type"] == PRIMITIVE_TYPE:
            return ("value", (src.get("widgets_values") or [None])[0])
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            out_type = link_type
            outputs = src.get("outputs") or []
            if origin_slot < len(outputs):
                out_type = outputs[origin_slot].get("type", out_type)
            inputs = src.get("inputs") or []
            candidates = ([inputs[origin_slot]] if origin_slot < len(inputs) else []) + list(inputs)
            for inp in candidates:
                if inp.get("link") is not None and _types_match(inp.get("type"), out_type):
                    return resolve(inp["link"], seen)
            return None
        return ("link", [str(origin_id), origin_slot])

    prompt: dict[str, dict] = {}
    for node_id, node in nodes.items():
        if node["type"] in FRONTEND_ONLY_TYPES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[node["type"]]
        inputs = widget_values_by_name(node, info)
        for inp in node.get("inputs") or []:
            name = (inp.get("widget") or {}).get("name") or inp["name"]
            if inp.get("link") is None:
                continue
            source = resolve(inp["link"])
            if source is None:
                inputs.pop(name, None)
            else:
                inputs[name] = source[1]
        prompt[str(node_id)] = {
            "class_type": node["type"],
            "inputs": inputs,
            "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]},
        }
    return prompt


# --------------------------------------------------------------------------- tiny mode

@dataclass(frozen=True)
class TinySubstitute:
    """How a core loader that cannot read tiny models is replaced in an API prompt.

    ``make_inputs(original_inputs, family)`` gives the tiny loader's inputs;
    ``output_slots[i]`` is the tiny node's output slot for the core node's slot ``i``
    (None: same order).
    """

    tiny_class: str
    make_inputs: Callable[[dict, str], dict]
    output_slots: tuple[int, ...] | None = None


TINY_SEED = 0

# core class_type -> substitute. Add an entry for each core loader the tiny models stand in for.
TINY_SUBSTITUTES: dict[str, TinySubstitute] = {
    "CheckpointLoaderSimple": TinySubstitute(
        "QKVTinyCheckpointLoader", lambda inputs, family: {"family": family, "seed": TINY_SEED}),
    "CLIPVisionLoader": TinySubstitute("QKVTinyCLIPVisionLoader", lambda inputs, family: {"seed": TINY_SEED}),
    "ControlNetLoader": TinySubstitute(
        "QKVTinyControlNetLoader", lambda inputs, family: {"family": family, "seed": TINY_SEED}),
}


def register_tiny_substitute(core_class: str, substitute: TinySubstitute) -> None:
    TINY_SUBSTITUTES[core_class] = substitute


# Diffusion-transformer workflows (issue 14) load the model, the text encoders and the VAE
# separately: each of these loaders becomes the tiny checkpoint of the workflow's family,
# its one output taken from the tiny loader's MODEL (0), CLIP (1) or VAE (2) slot.
DIT_LOADER_SLOTS = {"UNETLoader": 0, "DualCLIPLoader": 1, "TripleCLIPLoader": 1, "VAELoader": 2}
for _core_class, _slot in DIT_LOADER_SLOTS.items():
    register_tiny_substitute(_core_class, TinySubstitute(
        "QKVTinyCheckpointLoader", lambda inputs, family: {"family": family, "seed": TINY_SEED}, (_slot,)))
# Filename (or loader type) tags of the diffusion-transformer families, checked first; "t5xxl"
# (a T5-XXL text encoder file) is no SDXL hint.
_DIT_HINTS = (("schnell", "flux_schnell"), ("flux", "flux"), ("sd3", "sd35"), ("sd_3", "sd35"))


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


# --------------------------------------------------------------------------- running

def format_prompt_error(body: Any) -> str:
    """A readable message from ``POST /prompt``'s error JSON, node_errors included."""
    if not isinstance(body, dict):
        return str(body)
    lines = []
    err = body.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('message', '')} {err.get('details', '')}".strip())
    elif err:
        lines.append(str(err))
    for node_id, node_err in (body.get("node_errors") or {}).items():
        for e in node_err.get("errors", []):
            lines.append(f"node {node_id} ({node_err.get('class_type', '?')}): {e.get('message', '')}: "
                         f"{e.get('details', '')}".rstrip(": "))
    return "\n".join(lines) or str(body)


def queue_prompt(url: str, prompt: dict, client_id: str | None = None, timeout: float = 60) -> str:
    """POST /prompt; returns the prompt id or raises PromptError with the node errors."""
    payload: dict[str, Any] = {"prompt": prompt}
    if client_id:
        payload["client_id"] = client_id
    r = requests.post(f"{url}/prompt", json=payload, timeout=timeout)
    try:
        body = r.json()
    except ValueError:
        body = r.text
    if r.status_code != 200 or not isinstance(body, dict) or "prompt_id" not in body:
        raise PromptError(f"server rejected the prompt (HTTP {r.status_code}):\n{format_prompt_error(body)}", body)
    if body.get("node_errors"):
        raise PromptError(f"server reported node errors:\n{format_prompt_error(body)}", body)
    return body["prompt_id"]


def history_entry(url: str, prompt_id: str, timeout: float = 30) -> dict | None:
    r = requests.get(f"{url}/history/{prompt_id}", timeout=timeout)
    r.raise_for_status()
    return r.json().get(prompt_id)


def execution_error_message(entry: dict) -> str:
    for kind, data in (entry.get("status") or {}).get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            where = f"node {data.get('node_id')} ({data.get('node_type')})" if data.get("node_id") else "prompt"
            return f"{kind} in {where}: {data.get('exception_type', '')} {data.get('exception_message', '')}".strip()
    return f"prompt failed: {entry.get('status')}"


def entry_finished(entry: dict | None) -> bool:
    status = (entry or {}).get("status") or {}
    return bool(status.get("completed")) or status.get("status_str") in ("success", "error")


def check_entry(entry: dict) -> dict:
    """Raise PromptError when a history entry records a failed run."""
    status = entry.get("status") or {}
    if status.get("status_str") == "error" or not status.get("completed", True):
        raise PromptError(execution_error_message(entry), entry)
    return entry


def wait_for_prompt(url: str, prompt_id: str, timeout: float = 600, poll: float = 0.25) -> dict:
    """Poll /history until the prompt finished; returns its entry or raises PromptError/TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        entry = history_entry(url, prompt_id)
        if entry_finished(entry):
            return check_entry(entry)
        if time.monotonic() > deadline:
            raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s on {url}")
        time.sleep(poll)


def run_prompt(url: str, prompt: dict, timeout: float = 600) -> dict:
    """Queue an API-format prompt and wait for it; returns the history entry."""
    return wait_for_prompt(url, queue_prompt(url, prompt), timeout=timeout)


def output_files(entry: dict, kinds: tuple[str, ...] = ("images", "gifs", "videos", "audio")) -> list[dict]:
    """``[{"node_id", "filename", "subfolder", "type"}, ...]`` of a history entry, in node order."""
    files = []
    for node_id, outputs in (entry.get("outputs") or {}).items():
        for kind in kinds:
            for item in outputs.get(kind) or []:
                if isinstance(item, dict) and "filename" in item:
                    files.append({"node_id": node_id, "filename": item["filename"],
                                  "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")})
    return files


def download_file(url: str, item: dict, timeout: float = 60) -> bytes:
    """GET /view for one output file."""
    params = {"filename": item["filename"], "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")}
    r = requests.get(f"{url}/view", params=params, timeout=timeout)
    r.raise_for_status()
    return r.content


def upload_image(url: str, path, subfolder: str = "", overwrite: bool = True, timeout: float = 60) -> str:
    """POST /upload/image into the input folder; returns the name for a LoadImage ``image`` input."""
    from pathlib import Path

    path = Path(path)
    with open(path, "rb") as fh:
        r = requests.post(f"{url}/upload/image", files={"image": (path.name, fh)},
                          data={"overwrite": "true" if overwrite else "false", "type": "input",
                                "subfolder": subfolder}, timeout=timeout)
    r.raise_for_status()
    body = r.json()
    return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]
