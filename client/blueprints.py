"""Subgraph blueprints made from workflows, and workflows that use them.

A blueprint (``subgraphs/<Display name>.json``, served by ComfyUI's subgraph manager into the
node library) is what the frontend writes when a subgraph is published: a UI-format workflow
(version 0.4) whose only node is one subgraph node, with the subgraph in
``definitions.subgraphs``. ``extract_blueprint`` turns a chosen set of a workflow's nodes into
one: links that enter the set become subgraph inputs (one per source output, however many
inner nodes it feeds), links that leave it become outputs, and chosen inner widgets are
promoted: a subgraph input linked to the widget, so the value is set on the subgraph node.
``wrap_in_blueprint`` does the opposite placement: it puts one instance of a blueprint where
its inner nodes are in the source workflow, wired to the same outer nodes, with the
workflow's widget values on the promoted widgets; queued, it must give the same prompt as the
workflow (tests/test_subgraph_blueprints.py).

Pure JSON; node types come from the server's ``/object_info``.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

from .ui_graph import SUBGRAPH_INPUT_NODE_ID, SUBGRAPH_OUTPUT_NODE_ID, Link, parse_links, subgraph_definitions
from .workflow_format import WorkflowError, input_spec, widget_names, widget_positions, widget_type

BLUEPRINT_NAMESPACE = uuid.UUID("5b0e3c52-6a57-4c1e-9a43-0f1b2a3c4d5e")


@dataclass(frozen=True)
class Promotion:
    """A subgraph input standing for inner widgets: ``targets`` are (inner node id, widget name)."""

    name: str
    targets: tuple[tuple[int, str], ...]
    default: Any = None  # None: keep the workflow's value


@dataclass(frozen=True)
class BlueprintSpec:
    name: str  # the file name and the name the node library shows
    description: str
    category: str
    inner: tuple[int, ...]  # node ids of the source workflow that go inside
    inputs: dict[tuple[int, int], str]  # (outer node id, output slot) -> subgraph input name
    outputs: dict[tuple[int, int], str]  # (inner node id, output slot) -> subgraph output name
    promotions: tuple[Promotion, ...] = field(default_factory=tuple)


def _uid(*parts: Any) -> str:
    return str(uuid.uuid5(BLUEPRINT_NAMESPACE, "/".join(map(str, parts))))


def _link_dict(link_id: int, origin: Any, origin_slot: int, target: Any, target_slot: int, type_: Any) -> dict:
    return {"id": link_id, "origin_id": origin, "origin_slot": origin_slot, "target_id": target,
            "target_slot": target_slot, "type": type_}


def extract_blueprint(workflow: dict, spec: BlueprintSpec, object_info: dict) -> dict:
    """The blueprint file (a dict) for ``spec``'s nodes of ``workflow``."""
    nodes = {n["id"]: copy.deepcopy(n) for n in workflow["nodes"] if n["id"] in spec.inner}
    if set(nodes) != set(spec.inner):
        raise WorkflowError(f"blueprint {spec.name!r}: nodes {sorted(set(spec.inner) - set(nodes))} not in the workflow")
    links = parse_links(workflow.get("links"))
    inner_links, input_links, output_links = [], {}, {}
    for link_id, link in sorted(links.items()):
        inside_origin, inside_target = link.origin_id in nodes, link.target_id in nodes
        if inside_origin and inside_target:
            inner_links.append(_link_dict(link_id, link.origin_id, link.origin_slot, link.target_id,
                                          link.target_slot, link.type))
        elif inside_target:
            key = (link.origin_id, link.origin_slot)
            if key not in spec.inputs:
                raise WorkflowError(f"blueprint {spec.name!r}: link {link_id} enters from {key}, which has no input name")
            input_links.setdefault(key, []).append((link_id, link))
        elif inside_origin:
            output_links.setdefault((link.origin_id, link.origin_slot), []).append((link_id, link))
    for key in output_links:
        if key not in spec.outputs:
            raise WorkflowError(f"blueprint {spec.name!r}: output {key} leaves the subgraph and has no output name")

    sub_inputs: list[dict] = []
    sub_links = list(inner_links)
    for key, name in spec.inputs.items():
        feeds = input_links.get(key, [])
        if not feeds:
            raise WorkflowError(f"blueprint {spec.name!r}: input {name!r} ({key}) feeds no inner node")
        slot = len(sub_inputs)
        sub_inputs.append({"id": _uid(spec.name, "input", name), "name": name, "type": feeds[0][1].type,
                           "linkIds": [i for i, _ in feeds], "localized_name": name})
        sub_links += [_link_dict(i, SUBGRAPH_INPUT_NODE_ID, slot, link.target_id, link.target_slot, link.type)
                      for i, link in feeds]

    next_link = max([*links, 0]) + 1
    promoted_values = []
    for promotion in spec.promotions:
        slot = len(sub_inputs)
        first_node, first_widget = promotion.targets[0]
        info = object_info[nodes[first_node]["type"]]
        type_ = widget_type(info, first_widget)
        link_ids = []
        for node_id, widget in promotion.targets:
            node = nodes[node_id]
            node_info = object_info[node["type"]]
            positions = widget_positions(node, node_info)
            if widget not in positions:
                raise WorkflowError(f"blueprint {spec.name!r}: node {node_id} ({node['type']}) has no widget {widget!r}")
            if promotion.default is not None:
                node["widgets_values"][positions[widget]] = promotion.default
            node.setdefault("inputs", []).append({"localized_name": widget, "name": widget, "type": type_,
                                                  "widget": {"name": widget}, "link": next_link})
            sub_links.append(_link_dict(next_link, SUBGRAPH_INPUT_NODE_ID, slot, node_id,
                                        len(node["inputs"]) - 1, type_))
            link_ids.append(next_link)
            next_link += 1
        first = nodes[first_node]
        promoted_values.append(first["widgets_values"][widget_positions(first, info)[first_widget]])
        sub_inputs.append({"id": _uid(spec.name, "input", promotion.name), "name": promotion.name, "type": type_,
                           "linkIds": link_ids, "localized_name": promotion.name})

    sub_outputs = []
    for (node_id, slot), name in spec.outputs.items():
        out_type = nodes[node_id]["outputs"][slot]["type"]
        index = len(sub_outputs)
        sub_outputs.append({"id": _uid(spec.name, "output", name), "name": name, "type": out_type,
                            "linkIds": [next_link], "localized_name": name})
        sub_links.append(_link_dict(next_link, node_id, slot, SUBGRAPH_OUTPUT_NODE_ID, index, out_type))
        next_link += 1

    for node in nodes.values():
        _canonical_inputs(node, object_info[node["type"]], sub_links)
    _relink(list(nodes.values()), parse_links(sub_links))
    xs = [n["pos"][0] for n in nodes.values()]
    ys = [n["pos"][1] for n in nodes.values()]
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    for position, entry in enumerate(sub_inputs):
        entry["pos"] = [min(xs) - 180, min(ys) + 20 * position]
    for position, entry in enumerate(sub_outputs):
        entry["pos"] = [right + 80, min(ys) + 20 * position]
    definition = {
        "id": _uid(spec.name), "version": 1,
        "state": {"lastGroupId": 0, "lastNodeId": max(nodes), "lastLinkId": next_link - 1, "lastRerouteId": 0},
        "revision": 0, "config": {}, "name": spec.name,
        "inputNode": {"id": SUBGRAPH_INPUT_NODE_ID, "bounding": [min(xs) - 200, min(ys), 120, 40 + 20 * len(sub_inputs)]},
        "outputNode": {"id": SUBGRAPH_OUTPUT_NODE_ID, "bounding": [right + 60, min(ys), 120, 40 + 20 * len(sub_outputs)]},
        "inputs": sub_inputs, "outputs": sub_outputs, "widgets": [],
        "nodes": sorted(nodes.values(), key=lambda n: n["id"]), "groups": [], "links": sub_links, "extra": {},
        "category": spec.category, "description": spec.description,
    }
    promoted_names = {p.name for p in spec.promotions}
    instance = {
        "id": 1, "type": definition["id"], "pos": [0, 0], "size": _instance_size(spec, nodes, object_info),
        "flags": {}, "order": 0, "mode": 0,
        "inputs": [{"localized_name": e["name"], "name": e["name"], "type": e["type"], "link": None,
                    **({"widget": {"name": e["name"]}} if e["name"] in promoted_names else {})} for e in sub_inputs],
        "outputs": [{"localized_name": e["name"], "name": e["name"], "type": e["type"], "links": []}
                    for e in sub_outputs],
        "title": spec.name, "properties": {}, "widgets_values": promoted_values,
    }
    return {"revision": 0, "last_node_id": 1, "last_link_id": 0, "nodes": [instance], "links": [], "version": 0.4,
            "definitions": {"subgraphs": [definition]}, "extra": {}}


def _instance_size(spec: BlueprintSpec, nodes: dict, object_info: dict) -> list[int]:
    """Room for the subgraph node's sockets and promoted widgets (a multiline text box is taller)."""
    height = 30 + 20 * max(len(spec.inputs), len(spec.outputs))
    for promotion in spec.promotions:
        node_id, widget = promotion.targets[0]
        _type, opts = input_spec(object_info[nodes[node_id]["type"]], widget)
        height += 72 if opts.get("multiline") else 24
    return [440, height]


def _canonical_inputs(node: dict, info: dict, links: list[dict]) -> None:
    """Order a node's inputs as the frontend does (sockets, then a slot per widget in the node
    type's order) and point the links at their slots' new indices."""
    sockets = [i for i in node.get("inputs") or [] if "widget" not in i]
    linked = {i["widget"]["name"]: i["link"] for i in node.get("inputs") or [] if "widget" in i}
    widgets = [{"localized_name": name, "name": name, "type": widget_type(info, name), "widget": {"name": name},
                "link": linked.get(name)} for name in widget_names(info)]
    node["inputs"] = sockets + widgets
    slot_of = {inp["link"]: index for index, inp in enumerate(node["inputs"]) if inp.get("link") is not None}
    for link in links:
        if link["target_id"] == node["id"] and link["id"] in slot_of:
            link["target_slot"] = slot_of[link["id"]]


def blueprint_definition(blueprint: dict) -> dict:
    """The subgraph a blueprint's one node is an instance of."""
    (instance,) = blueprint["nodes"]
    return subgraph_definitions(blueprint)[instance["type"]]


def _relink(nodes: list[dict], links: dict[int, Link]) -> None:
    """Set every node's input ``link`` and output ``links`` from the link table."""
    for node in nodes:
        for slot, inp in enumerate(node.get("inputs") or []):
            inp["link"] = next((i for i, link in links.items()
                                if link.target_id == node["id"] and link.target_slot == slot), None)
        for slot, output in enumerate(node.get("outputs") or []):
            output["links"] = [i for i, link in links.items()
                               if link.origin_id == node["id"] and link.origin_slot == slot]


def wrap_in_blueprint(workflow: dict, blueprint: dict, object_info: dict) -> dict:
    """``workflow`` with the blueprint's inner nodes replaced by one instance of it.

    The inner nodes are found by id; each subgraph input is wired to the outer output that fed
    its first inner target, each promoted widget gets the workflow's value of its first
    target, each subgraph output feeds the outer inputs its inner source fed."""
    definition = copy.deepcopy(blueprint_definition(blueprint))
    inner = {n["id"]: n for n in definition["nodes"]}
    sub_links = parse_links(definition["links"])
    nodes = {n["id"]: copy.deepcopy(n) for n in workflow["nodes"]}
    links = parse_links(workflow.get("links"))
    instance_id = max(nodes) + 1
    new_ids = itertools.count(max([*links, 0]) + 1)
    table = {i: link for i, link in links.items() if link.origin_id not in inner and link.target_id not in inner}

    inputs, promoted = [], []
    for slot, entry in enumerate(definition["inputs"]):
        first = sub_links[entry["linkIds"][0]]
        target_input = next(i for i in inner[first.target_id]["inputs"] if i.get("link") == entry["linkIds"][0])
        inp = {"localized_name": entry["name"], "name": entry["name"], "type": entry["type"], "link": None}
        widget = (target_input.get("widget") or {}).get("name")
        if widget:
            source = nodes[first.target_id]
            promoted.append(source["widgets_values"][widget_positions(source, object_info[source["type"]])[widget]])
            inp["widget"] = {"name": entry["name"]}
        else:  # the link that fed the same-named input of the inner node in the workflow
            original = next((i.get("link") for i in nodes[first.target_id].get("inputs") or []
                             if i.get("name") == target_input.get("name")), None)
            if original in links:
                outer = links[original]
                table[next(new_ids)] = Link(outer.origin_id, outer.origin_slot, instance_id, slot, outer.type)
        inputs.append(inp)
    outputs = []
    for slot, entry in enumerate(definition["outputs"]):
        source = sub_links[entry["linkIds"][0]]
        for link in links.values():
            if (link.origin_id, link.origin_slot) == (source.origin_id, source.origin_slot) \
                    and link.target_id not in inner:
                table[next(new_ids)] = Link(instance_id, slot, link.target_id, link.target_slot, link.type)
        outputs.append({"localized_name": entry["name"], "name": entry["name"], "type": entry["type"], "links": []})
    instance = {"id": instance_id, "type": definition["id"], "pos": [0, 0], "size": [400, 300], "flags": {},
                "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs, "title": definition["name"],
                "properties": {}, "widgets_values": promoted}
    kept = [n for i, n in nodes.items() if i not in inner] + [instance]
    _relink(kept, table)
    result = copy.deepcopy(workflow)
    result.update(nodes=kept, last_node_id=instance_id, last_link_id=max(table, default=0),
                  links=[[i, x.origin_id, x.origin_slot, x.target_id, x.target_slot, x.type] for i, x in table.items()],
                  definitions={"subgraphs": [definition]})
    return result


def strip_instance_prefix(prompt: dict, instance_id: str) -> dict:
    """An API prompt with ``"<instance>:<inner>"`` ids, and links to them, back to ``"<inner>"``:
    what a workflow wrapped by ``wrap_in_blueprint`` queues, in the ids of the workflow itself."""
    prefix = f"{instance_id}:"

    def bare(node_id: str) -> str:
        return node_id[len(prefix):] if node_id.startswith(prefix) else node_id

    result = {}
    for node_id, node in prompt.items():
        inputs = {name: [bare(v[0]), v[1]] if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) else v
                  for name, v in node["inputs"].items()}
        result[bare(node_id)] = {**node, "inputs": inputs}
    return result
