"""Sweeps for the batch CLI: which node inputs take which values, and every item they make.

``--set NODE.INPUT=VALUES`` and ``--images NODE.INPUT=FOLDER`` (see ``client.queue``) become
axes of a ``Sweep``; its items are the combinations (or the element-wise pairs with ``--zip``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class UsageError(ValueError):
    """Bad command-line input; exit status 2."""


def parse_values(text: str) -> list:
    """``1..3`` -> [1, 2, 3]; ``0..10:5``; JSON list; ``@file`` lines; else one (JSON or string) value."""
    text = text.strip()
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise UsageError(f"--set: expected a file after '@', got {text!r} (not found)")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if ".." in text and not text.startswith(("[", '"')):
        span, _, step = text.partition(":")
        start, _, stop = span.partition("..")
        try:
            a, b, s = int(start), int(stop), int(step or 1)
        except ValueError:
            pass
        else:
            if s <= 0:
                raise UsageError(f"--set: range step must be positive, got {text!r}")
            return list(range(a, b + 1, s)) if a <= b else list(range(a, b - 1, -s))
    try:
        value = json.loads(text)
    except ValueError:
        return [text]
    if isinstance(value, list):
        if not value:
            raise UsageError(f"--set: expected at least one value, got {text!r}")
        return value
    return [value]


def image_folder(folder: str) -> list[str]:
    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"--images: expected a folder, got {folder!r}")
    images = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UsageError(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder!r}")
    return images


def split_assignment(text: str, option: str) -> tuple[str, str, str]:
    target, sep, values = text.partition("=")
    node, dot, input_name = target.rpartition(".")
    if not sep or not dot or not node or not input_name:
        raise UsageError(f"{option}: expected NODE.INPUT=VALUES, got {text!r}")
    return node.strip(), input_name.strip(), values


def find_node(prompt: dict, ref: str) -> str:
    """A node id by id, title (``_meta.title``) or class type; an error names the candidates."""
    if ref in prompt:
        return ref
    for key in (lambda n: n.get("_meta", {}).get("title"), lambda n: n["class_type"]):
        hits = [nid for nid, node in prompt.items() if key(node) == ref]
        if not hits:
            hits = [nid for nid, node in prompt.items() if str(key(node) or "").lower() == ref.lower()]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise UsageError(f"node {ref!r} is ambiguous: ids {hits}; use the node id")
    names = sorted(f"{nid} ({n.get('_meta', {}).get('title', n['class_type'])})" for nid, n in prompt.items())
    raise UsageError(f"no node {ref!r} in the workflow; nodes: {', '.join(names)}")


@dataclass(frozen=True)
class Axis:
    """One swept parameter: the prompt inputs (node id, input name) it sets, and its values."""

    targets: tuple[tuple[str, str], ...]
    values: list
    is_image: bool = False


@dataclass
class Sweep:
    """Parameter name ("Title.input") -> Axis."""

    axes: dict[str, Axis] = field(default_factory=dict)

    def items(self, zipped: bool = False) -> list[dict[str, Any]]:
        names = list(self.axes)
        columns = [self.axes[n].values for n in names]
        if zipped:
            lengths = {len(c) for c in columns}
            if len(lengths) > 1:
                raise UsageError(f"--zip: every sweep needs the same length, got {dict(zip(names, map(len, columns)))}")
            rows = list(zip(*columns))
        else:
            rows = list(itertools.product(*columns))
        return [dict(zip(names, row)) for row in rows] or [{}]


def subgraph_widgets(promoted, ref: str) -> dict[str, Any]:
    """The promoted widgets (by name) of the subgraph node ``ref`` (its id, title, or title in any case)."""
    nodes = ({w.node_id for w in promoted if w.node_id == ref} or {w.node_id for w in promoted if w.title == ref}
             or {w.node_id for w in promoted if w.title.lower() == ref.lower()})
    if len(nodes) > 1:
        raise UsageError(f"subgraph node {ref!r} is ambiguous: ids {sorted(nodes)}; use the node id")
    return {w.name: w for w in promoted if w.node_id in nodes}


def build_sweep(prompt: dict, sets: list[str], images: list[str], object_info: dict | None,
                promoted=()) -> Sweep:
    """``promoted``: the subgraph nodes' widgets (``workflow_format.expand_workflow``): a NODE that
    names a subgraph node sets every inner input its widget feeds."""
    sweep = Sweep()
    for option, text in [("--set", s) for s in sets] + [("--images", s) for s in images]:
        ref, input_name, raw = split_assignment(text, option)
        widgets = subgraph_widgets(promoted, ref)
        if input_name in widgets:
            targets = widgets[input_name].targets
        else:
            try:
                targets = ((_node_input(prompt, ref, input_name, option, object_info), input_name),)
            except UsageError as exc:
                if not widgets:
                    raise
                raise UsageError(f"{option}: subgraph node {ref!r} has no widget {input_name!r} that reaches a node; "
                                 f"widgets: {', '.join(sorted(widgets))}") from exc
        name = f"{ref}.{input_name}"
        if name in sweep.axes:
            raise UsageError(f"{option}: {name} is set twice")
        is_image = option == "--images"
        values = image_folder(raw) if is_image else parse_values(raw)
        sweep.axes[name] = Axis(targets, values, is_image)
    return sweep


def _node_input(prompt: dict, ref: str, input_name: str, option: str, object_info: dict | None) -> str:
    """The id of the prompt node ``ref`` after checking it has an unconnected input ``input_name``."""
    node_id = find_node(prompt, ref)
    node = prompt[node_id]
    known = set(node["inputs"])
    if object_info and node["class_type"] in object_info:
        spec = object_info[node["class_type"]].get("input", {})
        known |= set(spec.get("required", {})) | set(spec.get("optional", {}))
    if input_name not in known:
        raise UsageError(f"{option}: node {ref!r} ({node['class_type']}) has no input {input_name!r}; "
                         f"inputs: {', '.join(sorted(known))}")
    if isinstance(node["inputs"].get(input_name), list):
        raise UsageError(f"{option}: {ref}.{input_name} is connected to another node; set that node instead")
    return node_id


def item_key(params: dict) -> str:
    """A short stable key for one item's parameters (the manifest matches runs by it)."""
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
