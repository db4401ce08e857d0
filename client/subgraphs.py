"""Flattening a UI-format graph, subgraphs included, into the nodes the server executes.

The same walk the ComfyUI frontend does when it queues (``graphToPrompt`` and
``ExecutableNodeDTO`` in frontend 1.47): every node gets an execution id, the ids of the
subgraph nodes it sits in joined by ``:`` (``"12:5"`` is node 5 inside subgraph node 12,
``"12:7:3"`` one level deeper), and every input is followed to the node that really produces
it: through reroutes, across subgraph boundaries (a subgraph input leads to whatever feeds the
subgraph node outside, or to the value of its promoted widget), through bypassed nodes (the
first input whose type fits) and out of subgraph outputs. Muted nodes produce nothing.

Where the frontend has a quirk this keeps it, so that the batch CLI and the browser queue the
same prompt for the same saved workflow (tests/test_browser.py checks that they do):
- a Primitive node sets the widget of the nodes it is linked to directly; an input reached
  through a Primitive keeps that widget value (a Primitive behind a reroute, or feeding a
  subgraph node's input, leaves the inner widget at its own value);
- the inner nodes of a muted or bypassed subgraph node nested inside another subgraph are
  still queued (only top-level subgraph nodes are skipped whole).

Knowledge about node types (which inputs are widgets, their values by name) comes from the
caller (``NodeWidgets``): this module knows the graph, not ``/object_info``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .ui_graph import (FRONTEND_ONLY_TYPES, MODE_ALWAYS, MODE_BYPASS, MODE_NEVER, PRIMITIVE_TYPE, SKIPPED_MODES,
                       SUBGRAPH_INPUT_NODE_ID, GraphLevel, deduplicate_node_ids, subgraph_definitions)

class GraphError(ValueError):
    """A graph the frontend could not queue either (broken links, circular subgraphs, ...)."""


@dataclass(frozen=True)
class NodeWidgets:
    """What the flattening needs to know about node types.

    ``values(node)``: the node's widget values by input name; ``has_widget(node, name)``:
    whether a node of that type has a widget called ``name``.
    """

    values: Callable[[dict], dict[str, Any]]
    has_widget: Callable[[dict, str], bool]


@dataclass
class ExecutableNode:
    """One node at one place in the flattened graph (the frontend's ExecutableNodeDTO)."""

    id: str
    node: dict
    level: GraphLevel
    path: tuple[str, ...]
    inner: GraphLevel | None = None  # set for subgraph nodes
    # Subgraph nodes: their inputs as (serialized input, definition slot), and promoted widget values.
    instance_inputs: list[tuple[dict, int]] = field(default_factory=list)
    promoted: dict[int, Any] = field(default_factory=dict)

    @property
    def mode(self) -> int:
        return self.node.get("mode", MODE_ALWAYS) or MODE_ALWAYS

    @property
    def owner_id(self) -> str:
        return ":".join(self.path)

    @property
    def inputs(self) -> list[dict]:
        return self.node.get("inputs") or []


def is_valid_connection(type_a: Any, type_b: Any) -> bool:
    """LiteGraph's type check: "*"/"" match anything, comma lists match when one pair matches."""
    a = 0 if type_a in ("", "*") else type_a
    b = 0 if type_b in ("", "*") else type_b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(is_valid_connection(x, y) for x in a.split(",") for y in b.split(","))


class FlatGraph:
    """A workflow's executable nodes by execution id, and the frontend's input resolution."""

    def __init__(self, workflow: dict, widgets: NodeWidgets):
        self.widgets = widgets
        self.definitions = deduplicate_node_ids(workflow, subgraph_definitions(workflow))
        self.levels = {sid: GraphLevel.of(d, d) for sid, d in self.definitions.items()}
        self.root = GraphLevel.of(workflow)
        for level in [self.root, *self.levels.values()]:
            self._apply_primitives(level)
        self._bindings: dict[int, tuple[list[tuple[dict, int]], dict[int, Any]]] = {}
        # (subgraph node id, promoted widget) -> the (node id, input) of the prompt that take its value
        self.promoted_targets: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self.nodes: dict[str, ExecutableNode] = {}
        for node_id, node in self.root.nodes.items():
            dto = self._add(node, self.root, ())
            if dto.inner is not None and dto.mode not in SKIPPED_MODES:
                self._add_inner(dto, (dto.id,))

    # -- building
    def is_subgraph(self, node: dict) -> bool:
        return node.get("type") in self.levels

    def _add(self, node: dict, level: GraphLevel, path: tuple[str, ...]) -> ExecutableNode:
        dto = ExecutableNode(id=":".join(path + (str(node["id"]),)), node=node, level=level, path=path)
        if self.is_subgraph(node):
            dto.inner = self.levels[node["type"]]
            self._bind_instance(dto)
        self.nodes[dto.id] = dto
        return dto

    def _add_inner(self, owner: ExecutableNode, path: tuple[str, ...], stack: tuple[str, ...] = ()) -> None:
        definition_id = owner.node["type"]
        if definition_id in stack:
            name = owner.inner.definition.get("name") or definition_id
            raise GraphError(f"workflow: subgraph {name!r} contains itself (node {owner.id})")
        for node in owner.inner.nodes.values():
            dto = self._add(node, owner.inner, path)
            if dto.inner is not None:  # nested: added whatever its mode, as the frontend does
                self._add_inner(dto, path + (str(node["id"]),), stack + (definition_id,))

    def _apply_primitives(self, level: GraphLevel) -> None:
        """A Primitive node writes its value into the widgets it is linked to (the frontend's applyToGraph)."""
        for node in level.nodes.values():
            if node.get("type") != PRIMITIVE_TYPE:
                continue
            value = (node.get("widgets_values") or [None])[0]
            for link in level.links.values():
                if str(link.origin_id) != str(node["id"]) or link.origin_slot != 0:
                    continue
                target = level.nodes.get(str(link.target_id))
                if target is None or self.is_subgraph(target):
                    continue
                inputs = target.get("inputs") or []
                name = ((inputs[link.target_slot] if link.target_slot < len(inputs) else {}).get("widget") or {}).get("name")
                if name and self.widgets.has_widget(target, name):
                    level.primitive_values.setdefault(str(target["id"]), {})[name] = value

    def _bind_instance(self, dto: ExecutableNode) -> None:
        dto.instance_inputs, dto.promoted = self._instance_binding(dto.node)

    def _instance_binding(self, node: dict, depth: int = 0) -> tuple[list[tuple[dict, int]], dict[int, Any]]:
        """A subgraph node's inputs, one per definition input (matched by name and type, then name,
        as the frontend's configure), and the values of its promoted widgets by definition slot:
        the value saved on the node (``widgets_values``: one per widget input, in input order),
        else the value of the inner widget it stands for."""
        cached = self._bindings.get(id(node))
        if cached is not None:
            return cached
        if depth > 64:
            raise GraphError("workflow: subgraphs nested more than 64 deep")
        level = self.levels[node["type"]]
        # One input per definition slot, in the definition's order (what the frontend rebuilds on
        # load); its link from the saved input of that name. A saved file leaves out widget
        # inputs that are not linked.
        saved_inputs = list(node.get("inputs") or [])
        taken: set[int] = set()
        instance_inputs = []
        for index, slot in enumerate(level.definition.get("inputs") or []):
            free = [i for i in saved_inputs if id(i) not in taken and i.get("name") == slot.get("name")]
            match = next((i for i in free if str(i.get("type")) == str(slot.get("type"))), free[0] if free else None)
            if match is not None:
                taken.add(id(match))
            instance_inputs.append((match if match is not None else {"name": slot.get("name"), "link": None}, index))
        saved = node.get("widgets_values")
        promoted: dict[int, Any] = {}
        for _inp, slot in instance_inputs:
            found, value = self._promoted_default(level, slot, depth)
            if not found:
                continue
            position = len(promoted)
            if isinstance(saved, list) and position < len(saved):
                value = saved[position]
            promoted[slot] = value
        self._bindings[id(node)] = (instance_inputs, promoted)
        return instance_inputs, promoted

    def _promoted_default(self, level: GraphLevel, slot: int, depth: int) -> tuple[bool, Any]:
        """(whether subgraph input ``slot`` is a widget input, the value its widget starts with).

        The first inner input it links to that has a widget decides, as in the frontend; an
        inner subgraph node's input counts when it is itself a promoted widget."""
        for link_id in level.input_link_ids(slot):
            link = level.links.get(link_id)
            target = level.nodes.get(str(link.target_id)) if link else None
            inp = next((i for i in (target or {}).get("inputs") or [] if i.get("link") == link_id), None)
            if inp is None:
                continue
            if self.is_subgraph(target):
                inputs, promoted = self._instance_binding(target, depth + 1)
                inner_slot = next((s for i, s in inputs if i is inp), None)
                if inner_slot in promoted:
                    return True, promoted[inner_slot]
                continue
            name = (inp.get("widget") or {}).get("name")
            if name and self.widgets.has_widget(target, name):
                return True, self.widgets.values(target).get(name)
        return False, None

    # -- resolution
    def widget_values(self, dto: ExecutableNode) -> dict[str, Any]:
        values = dict(self.widgets.values(dto.node))
        values.update(dto.level.primitive_values.get(str(dto.node["id"]), {}))
        return values

    def resolve_input(self, dto: ExecutableNode, slot: int, seen: set, wanted_type: Any = None):
        """``("link", exec_id, slot)``, ``("value", v, promoted_by)`` or None for input ``slot`` of
        ``dto``; ``promoted_by`` is (subgraph node id, widget name) when the value is a promoted widget's."""
        key = (id(dto.level), dto.id, "I", slot)
        if key in seen:
            raise GraphError(f"workflow: circular link at input {slot} of node {dto.id}")
        seen.add(key)
        if slot >= len(dto.inputs):
            raise GraphError(f"workflow: node {dto.id} has no input slot {slot}")
        inp = dto.inputs[slot]
        if inp.get("link") is None:
            return None
        link = dto.level.links.get(inp["link"])
        if link is None:
            raise GraphError(f"workflow: node {dto.id} input {inp.get('name')!r} names link {inp['link']}, "
                             "which does not exist")
        owner = self.nodes.get(dto.owner_id) if dto.path else None
        if owner is not None and link.origin_id == SUBGRAPH_INPUT_NODE_ID:
            if link.origin_slot >= len(owner.instance_inputs):
                raise GraphError(f"workflow: subgraph node {owner.id} has no input slot {link.origin_slot}")
            outer, definition_slot = owner.instance_inputs[link.origin_slot]
            if outer.get("link") is None:
                if definition_slot in owner.promoted:
                    return ("value", owner.promoted[definition_slot], (owner.id, outer.get("name")))
                return None
            outer_link = owner.level.links.get(outer["link"])
            if outer_link is None:
                raise GraphError(f"workflow: subgraph node {owner.id} input {outer.get('name')!r} names link "
                                 f"{outer['link']}, which does not exist")
            index = next((k for k, i in enumerate(owner.inputs) if i is outer), outer_link.target_slot)
            return self.resolve_input(owner, index, seen)
        source = self.nodes.get(":".join(dto.path + (str(link.origin_id),)))
        if source is None:
            raise GraphError(f"workflow: link {inp['link']} into node {dto.id} starts at node {link.origin_id}, "
                             "which does not exist")
        return self.resolve_output(source, link.origin_slot, wanted_type or inp.get("type"), seen)

    def resolve_output(self, dto: ExecutableNode, slot: int, wanted_type: Any, seen: set):
        key = (id(dto.level), dto.id, "O", slot)
        if key in seen:
            raise GraphError(f"workflow: circular link at output {slot} of node {dto.id}")
        seen.add(key)
        if dto.mode == MODE_NEVER:
            return None
        if dto.mode == MODE_BYPASS:
            index = self._bypass_input(dto, slot, wanted_type)
            return None if index < 0 else self.resolve_input(dto, index, seen)
        if dto.inner is not None:
            link = dto.inner.output_link(slot)
            if link is None:
                return None
            inner = self.nodes.get(":".join(dto.path + (str(dto.node["id"]), str(link.origin_id))))
            if inner is None:
                raise GraphError(f"workflow: output {slot} of subgraph node {dto.id} comes from no inner node")
            return self.resolve_output(inner, link.origin_slot, wanted_type, seen)
        if dto.node.get("type") in FRONTEND_ONLY_TYPES:
            # A virtual node passes on what feeds its input of the same index (a reroute); a
            # Primitive has no input: its value was written into the widgets it feeds.
            inputs = dto.inputs
            if slot < len(inputs) and inputs[slot].get("link") is not None \
                    and inputs[slot]["link"] in dto.level.links:
                return self.resolve_input(dto, slot, seen, wanted_type)
            return None
        return ("link", dto.id, slot)

    @staticmethod
    def _bypass_input(dto: ExecutableNode, slot: int, wanted_type: Any) -> int:
        """The input a bypassed node passes to output ``slot`` (the frontend's _getBypassSlotIndex)."""
        inputs = dto.inputs
        outputs = dto.node.get("outputs") or []
        if wanted_type in ("*", ""):
            return slot if len(inputs) > slot else 0
        out_type = outputs[slot].get("type") if slot < len(outputs) else None
        if slot < len(inputs) and is_valid_connection(inputs[slot].get("type"), out_type) \
                and is_valid_connection(inputs[slot].get("type"), wanted_type):
            return slot
        exact = next((i for i, inp in enumerate(inputs) if inp.get("type") == wanted_type), -1)
        if exact >= 0:
            return exact
        return next((i for i, inp in enumerate(inputs) if is_valid_connection(inp.get("type"), out_type)
                     and is_valid_connection(inp.get("type"), wanted_type)), -1)

    # -- the prompt
    def executed(self) -> list[ExecutableNode]:
        """Nodes the server runs: not frontend-only, not a subgraph node, not muted or bypassed."""
        return [dto for dto in self.nodes.values()
                if dto.inner is None and dto.node.get("type") not in FRONTEND_ONLY_TYPES
                and dto.mode not in SKIPPED_MODES]

    def prompt_inputs(self, dto: ExecutableNode) -> dict[str, Any]:
        """The API-format inputs of one executed node: widget values, then resolved links.

        Inputs that take a subgraph node's promoted widget are recorded in ``promoted_targets``."""
        inputs = {name: api_value(value) for name, value in self.widget_values(dto).items()}
        for index, inp in enumerate(dto.inputs):
            source = self.resolve_input(dto, index, set())
            if source is None:
                continue
            if source[0] == "value":
                inputs[inp["name"]] = api_value(source[1])
                if source[2] is not None:
                    self.promoted_targets.setdefault(source[2], []).append((dto.id, inp["name"]))
            else:
                inputs[inp["name"]] = [source[1], source[2]]
        return inputs

    def subgraph_title(self, node_id: str) -> str:
        dto = self.nodes[node_id]
        return dto.node.get("title") or (dto.inner.definition or {}).get("name") or dto.node["type"]


def api_value(value: Any) -> Any:
    """A widget value as the frontend puts it into a prompt: lists wrapped, so they never read as links."""
    return {"__value__": value} if isinstance(value, list) else value


def drop_dangling_links(prompt: dict[str, dict]) -> dict[str, dict]:
    """Remove link inputs that point at nodes the prompt does not have (the frontend does the same)."""
    for node in prompt.values():
        for name, value in list(node["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del node["inputs"][name]
    return prompt
