"""Whole-graph invariant checker, for tests and debugging (never on a command path).

``check_invariants(graph)`` returns a list of violations (empty when sound):

* children/parents lists agree, and every edge is in each list once;
* ``file``/``backing`` are exactly what the role rule of section 2.2 derives;
* permissions of committed edges are conflict-free on every node;
* node names are unique and the name index matches the node list;
* there is no cycle;
* every refcount equals incoming edges + monitor ownership + ``extra_refs``.
"""

from __future__ import annotations

from collections.abc import Mapping

from qmpgraph.graph.graph import BlockGraph
from qmpgraph.graph.model import Edge, Node
from qmpgraph.graph.permissions import conflict_error
from qmpgraph.graph.perms import Role


def expected_file_backing(node: Node) -> tuple[Edge | None, Edge | None]:
    """Recompute (file, backing) from the children's roles (section 2.2)."""
    file = backing = None
    drv = node.driver
    is_filter = drv is not None and drv.is_filter
    for edge in node.children:
        role = edge.role
        if is_filter or role & Role.FILTERED:
            if role & Role.PRIMARY:
                if drv is not None and drv.filtered_child_is_backing:
                    backing = edge
                else:
                    file = edge
        elif role & Role.COW:
            backing = edge
        elif role & Role.PRIMARY:
            file = edge
    return file, backing


def check_invariants(graph: BlockGraph, extra_refs: Mapping[str, int] | None = None) -> list[str]:
    """All invariant violations found in ``graph`` (empty list when sound)."""
    errors: list[str] = []
    extra = extra_refs or {}
    nodes = list(graph.named_nodes_oldest_first())
    names = [n.node_name for n in nodes]
    if len(set(names)) != len(names):
        errors.append(f"duplicate names: {names}")
    for n in nodes:
        if graph.lookup(n.node_name) is not n:
            errors.append(f"index mismatch for {n.node_name}")
    if len(graph) != len(nodes):
        errors.append("index size differs from the node list")
    alive = {id(n) for n in nodes}
    for n in nodes:
        for e in n.children:
            if e.parent is not n:
                errors.append(f"{n.node_name}: child edge {e!r} has another parent")
            if e.child is None or id(e.child) not in alive:
                errors.append(f"{n.node_name}: child edge {e!r} points at a dead node")
            elif sum(1 for p in e.child.parents if p is e) != 1:
                errors.append(f"{n.node_name}: {e!r} not once in the child's parents")
        if len({id(e) for e in n.children}) != len(n.children):
            errors.append(f"{n.node_name}: repeated child edge")
        for e in n.parents:
            if e.child is not n:
                errors.append(f"{n.node_name}: parent edge {e!r} points elsewhere")
            p = e.parent
            if isinstance(p, Node):
                if id(p) not in alive:
                    errors.append(f"{n.node_name}: parent {p.node_name} is dead")
                elif sum(1 for c in p.children if c is e) != 1:
                    errors.append(f"{n.node_name}: {e!r} not once in the parent's children")
            elif p.kind.name == "BLOCK_BACKEND":
                if getattr(p, "root", None) is not e:
                    errors.append(f"{n.node_name}: BB edge {e!r} not the BB's root")
            elif e not in getattr(p, "edges", []):
                errors.append(f"{n.node_name}: job edge {e!r} not listed by the job")
        file, backing = expected_file_backing(n)
        if n.file is not file or n.backing is not backing:
            errors.append(f"{n.node_name}: file/backing do not match the roles")
        err = conflict_error(n)
        if err is not None:
            errors.append(err.desc)
        want = len(n.parents) + (1 if n.monitor_owned else 0) + extra.get(n.node_name, 0)
        if n.refcnt != want:
            errors.append(f"{n.node_name}: refcnt {n.refcnt} != {want}")
    errors.extend(_cycles(nodes))
    return errors


def _cycles(nodes: list[Node]) -> list[str]:
    white, grey, black = 0, 1, 2
    colour = {id(n): white for n in nodes}
    for root in nodes:
        if colour[id(root)] != white:
            continue
        stack = [(root, iter(root.children))]
        colour[id(root)] = grey
        while stack:
            node, it = stack[-1]
            for e in it:
                c = e.child
                if c is None or id(c) not in colour:
                    continue
                if colour[id(c)] == grey:
                    return [f"cycle through {c.node_name}"]
                if colour[id(c)] == white:
                    colour[id(c)] = grey
                    stack.append((c, iter(c.children)))
                    break
            else:
                colour[id(node)] = black
                stack.pop()
    return []
