"""``x-debug-query-block-graph``: every BlockBackend, job and named node, with edges.

Ids are given on first encounter (backends and their root edges, then jobs
and their edges, then named nodes in list order and their children), and
both lists come out reversed, because QEMU prepends to them (section 5.11).

What does not live here: the per-node queries (``device_info.py``).
"""

from __future__ import annotations

from typing import Any

from qmpgraph.commands.context import CommandContext
from qmpgraph.commands.registry import command
from qmpgraph.graph.model import BlockBackend, Edge, Job, Node
from qmpgraph.graph.perms import perm_qapi_names


class _GraphDump:
    """XDbgBlockGraph under construction: ids on first encounter, lists prepended."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}
        self.nodes: list[dict[str, Any]] = []
        self.edges: list[dict[str, Any]] = []

    def node_id(self, obj: Node | BlockBackend | Job) -> int:
        key = id(obj)
        got = self.ids.get(key)
        if got is None:
            got = self.ids[key] = len(self.ids) + 1
        return got

    def add_node(self, obj: Node | BlockBackend | Job, kind: str, name: str) -> None:
        self.nodes.append({"id": self.node_id(obj), "type": kind, "name": name})

    def add_edge(self, parent: Node | BlockBackend | Job, edge: Edge) -> None:
        assert edge.child is not None
        self.edges.append(
            {
                "parent": self.node_id(parent),
                "child": self.node_id(edge.child),
                "name": edge.name,
                "perm": perm_qapi_names(edge.perm),
                "shared-perm": perm_qapi_names(edge.shared),
            }
        )


@command("x-debug-query-block-graph")
def x_debug_query_block_graph(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """The whole graph: BlockBackends, jobs and named nodes, with every edge."""
    graph = ctx.daemon.graph
    dump = _GraphDump()
    for bb in graph.backends:
        dump.add_node(bb, "block-backend", bb.name or bb.device or "")
        if bb.root is not None and bb.root.child is not None:
            dump.add_edge(bb, bb.root)
    for job in graph.jobs:
        dump.add_node(job, "block-job", job.job_id)
        for edge in job.edges:
            if edge.child is not None:
                dump.add_edge(job, edge)
    for node in graph.named_nodes_oldest_first():
        dump.add_node(node, "block-driver", node.node_name)
        for edge in node.children:
            if edge.child is not None:
                dump.add_edge(node, edge)
    # QEMU prepends to both lists.
    dump.nodes.reverse()
    dump.edges.reverse()
    return {"nodes": dump.nodes, "edges": dump.edges}
