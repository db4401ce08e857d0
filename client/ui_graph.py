"""A saved UI-format graph as the frontend reads it: links, subgraph definitions, node ids.

The root graph and each subgraph definition are a ``GraphLevel``: nodes by id and links by id
(either layout: ``[id, origin, slot, target, slot, type]`` lists or dicts). Inside a
definition, links from the subgraph's inputs start at node ``SUBGRAPH_INPUT_NODE_ID`` and
links to its outputs end at ``SUBGRAPH_OUTPUT_NODE_ID``. ``client.subgraphs`` walks them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

SUBGRAPH_INPUT_NODE_ID = -10
SUBGRAPH_OUTPUT_NODE_ID = -20

# LiteGraph node modes.
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
SKIPPED_MODES = (MODE_NEVER, MODE_BYPASS)

REROUTE_TYPE = "Reroute"
PRIMITIVE_TYPE = "PrimitiveNode"
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
FRONTEND_ONLY_TYPES = NOTE_TYPES | {REROUTE_TYPE, PRIMITIVE_TYPE}


@dataclass(frozen=True)
class Link:
    origin_id: Any
    origin_slot: int
    target_id: Any
    target_slot: int
    type: Any = None


def parse_links(raw: list | None) -> dict[int, Link]:
    """``{link_id: Link}`` from either layout: ``[id, origin, slot, target, slot, type]`` or a dict."""
    links = {}
    for link in raw or []:
        if isinstance(link, dict):
            links[link["id"]] = Link(link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                     link.get("type"))
        else:
            links[link[0]] = Link(link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    return links


def subgraph_definitions(workflow: dict) -> dict[str, dict]:
    """Every subgraph definition of a workflow by id, in file order, nested ``definitions`` included."""
    found: dict[str, dict] = {}
    pending = [workflow]
    while pending:
        holder = pending.pop(0)
        for definition in (holder.get("definitions") or {}).get("subgraphs") or []:
            if definition.get("id") not in found:
                found[definition["id"]] = definition
                pending.append(definition)
    return found


def deduplicate_node_ids(workflow: dict, definitions: dict[str, dict]) -> dict[str, dict]:
    """Copies of the definitions with inner node ids that are already taken (by the root graph or an
    earlier definition) renumbered from the workflow's last node id on, as the frontend does when it
    loads a workflow. A workflow the frontend saved has none; a hand-made one may."""
    used = {str(node["id"]) for node in workflow.get("nodes") or []}
    last = max(workflow.get("last_node_id") or 0, (workflow.get("state") or {}).get("lastNodeId") or 0)
    result = {}
    for definition_id, definition in definitions.items():
        definition = copy.deepcopy(definition)
        renamed: dict[str, int] = {}
        for node in definition.get("nodes") or []:
            key = str(node["id"])
            if key in used:
                while str(last + 1) in used:
                    last += 1
                last += 1
                renamed[key] = node["id"] = last
                used.add(str(last))
            else:
                used.add(key)
                if isinstance(node["id"], int):
                    last = max(last, node["id"])
        for link in definition.get("links") or []:
            if isinstance(link, dict):
                link["origin_id"] = renamed.get(str(link["origin_id"]), link["origin_id"])
                link["target_id"] = renamed.get(str(link["target_id"]), link["target_id"])
            else:
                link[1] = renamed.get(str(link[1]), link[1])
                link[3] = renamed.get(str(link[3]), link[3])
        result[definition_id] = definition
    return result


@dataclass
class GraphLevel:
    """The root graph, or one subgraph definition (shared by all its instances)."""

    nodes: dict[str, dict]
    links: dict[int, Link]
    definition: dict | None = None
    primitive_values: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, holder: dict, definition: dict | None = None) -> "GraphLevel":
        return cls(nodes={str(n["id"]): n for n in holder.get("nodes") or []}, links=parse_links(holder.get("links")),
                   definition=definition)

    def input_link_ids(self, slot: int) -> list[int]:
        """Links from this subgraph's input ``slot`` to inner nodes, in the definition's order."""
        inputs = (self.definition or {}).get("inputs") or []
        ids = inputs[slot].get("linkIds") if slot < len(inputs) else None
        if ids is None:
            ids = [i for i, link in self.links.items()
                   if link.origin_id == SUBGRAPH_INPUT_NODE_ID and link.origin_slot == slot]
        return list(ids)

    def output_link(self, slot: int) -> Link | None:
        """The inner link that feeds this subgraph's output ``slot`` (the first, as the frontend)."""
        outputs = (self.definition or {}).get("outputs") or []
        ids = outputs[slot].get("linkIds") if slot < len(outputs) else None
        if ids is None:
            ids = [i for i, link in self.links.items()
                   if link.target_id == SUBGRAPH_OUTPUT_NODE_ID and link.target_slot == slot]
        return next((self.links[i] for i in ids if i in self.links), None)
