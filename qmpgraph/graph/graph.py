"""The block graph container: named nodes, root parents, and graph walks.

Lives here: ``BlockGraph`` (name lookup in O(1), the naming-ordered node list
with O(1) removal and newest-first iteration, the registered BlockBackends and
jobs) and the navigation helpers of section 1.9 of the reference (filter and
COW children, cycle test, topological sort).

Rules: ``BlockGraph`` does not mutate on its own; the transaction actions call
its ``_link``/``_unlink``/``_relink`` methods, which are O(1).  Nothing here
scans the whole graph, except the explicit whole-graph iterators used by
queries, digests and invariant checks.

What does not live here: permissions (``qmpgraph.transactions.refresh``), the
actions, and drivers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from qmpgraph.graph.model import BlockBackend, Edge, Job, Node
from qmpgraph.graph.names import NameGenerator
from qmpgraph.graph.perms import Role


class _Link:
    """One entry of the intrusive doubly linked list of named nodes."""

    __slots__ = ("next", "node", "prev")

    def __init__(self, node: Node | None) -> None:
        self.node = node
        self.prev: _Link = self
        self.next: _Link = self


class BlockGraph:
    """All nodes of one daemon, with their BlockBackends and jobs.

    Public reads: ``lookup``, ``__contains__``, ``named_nodes_newest_first``,
    ``named_nodes_oldest_first``, ``backends``, ``jobs``, ``names``.
    """

    def __init__(self, *, name_seed: int | None = None) -> None:
        self._by_name: dict[str, _Link] = {}
        self._head = _Link(None)
        self.names = NameGenerator(name_seed)
        # Insertion-ordered dicts used as ordered sets (O(1) removal).
        self.backends: dict[BlockBackend, None] = {}
        self.jobs: dict[Job, None] = {}

    # -- reads ---------------------------------------------------------------

    def lookup(self, name: str) -> Node | None:
        """The node called ``name``, or None."""
        link = self._by_name.get(name)
        return link.node if link is not None else None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def named_nodes_newest_first(self) -> Iterator[Node]:
        """Named nodes, newest first (query-named-block-nodes order)."""
        link = self._head.prev
        while link is not self._head:
            assert link.node is not None
            yield link.node
            link = link.prev

    def named_nodes_oldest_first(self) -> Iterator[Node]:
        """Named nodes in naming order (QEMU's global list order)."""
        link = self._head.next
        while link is not self._head:
            assert link.node is not None
            yield link.node
            link = link.next

    def backend_by_name(self, name: str) -> BlockBackend | None:
        """A BlockBackend with this name (anonymous ones never match)."""
        if not name:
            return None
        for bb in self.backends:
            if bb.name == name:
                return bb
        return None

    # -- O(1) mutation primitives; called only by transaction actions --------

    def _link(self, node: Node) -> None:
        assert node.node_name not in self._by_name
        link = _Link(node)
        tail = self._head.prev
        link.prev, link.next = tail, self._head
        tail.next = link
        self._head.prev = link
        self._by_name[node.node_name] = link

    def _unlink(self, node: Node) -> _Link:
        """Remove ``node``; its link keeps its neighbours for ``_relink``."""
        link = self._by_name.pop(node.node_name)
        link.prev.next = link.next
        link.next.prev = link.prev
        return link

    def _relink(self, link: _Link) -> None:
        """Undo ``_unlink`` (dancing links: exact when undone in reverse order)."""
        link.prev.next = link
        link.next.prev = link
        assert link.node is not None
        self._by_name[link.node.node_name] = link


# -- navigation helpers (section 1.9) -----------------------------------------


def cow_child(node: Node) -> Edge | None:
    """The backing edge of a non-filter node."""
    if node.driver is not None and node.driver.is_filter:
        return None
    return node.backing


def filter_child(node: Node) -> Edge | None:
    """The filtered edge of a filter node (``backing`` or ``file``)."""
    if node.driver is None or not node.driver.is_filter:
        return None
    return node.backing or node.file


def filter_or_cow_child(node: Node) -> Edge | None:
    """Whichever of the filter child and the COW child exists."""
    return filter_child(node) or cow_child(node)


def primary_child(node: Node) -> Edge | None:
    """The unique PRIMARY child edge, if any."""
    for edge in node.children:
        if edge.role & Role.PRIMARY:
            return edge
    return None


def skip_filters(node: Node | None) -> Node | None:
    """Follow filter children down while the node is a filter."""
    while node is not None:
        edge = filter_child(node)
        if edge is None:
            return node
        node = edge.child
    return node


def skip_implicit_filters(node: Node | None) -> Node | None:
    """Follow filter children down while the node is an implicit filter."""
    while node is not None and node.implicit:
        edge = filter_child(node)
        if edge is None:
            return node
        node = edge.child
    return node


def recursive_has_child(node: Node, target: Node) -> bool:
    """Whether ``target`` is ``node`` or reachable through any of its children."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if cur is target:
            return True
        if cur.id in seen:
            continue
        seen.add(cur.id)
        stack.extend(e.child for e in cur.children if e.child is not None)
    return False


def topological_sort(starts: Iterable[Node], found: set[int] | None = None) -> list[Node]:
    """QEMU's bdrv_topological_dfs over several start nodes.

    Each node is prepended after its children (in ``children`` order), and all
    start nodes share one list and one found set, so a start node's exclusive
    descendants come before earlier start nodes' subtrees.
    """
    found = set() if found is None else found
    result: list[Node] = []  # built reversed; prepending = appending here
    for start in starts:
        _dfs(start, found, result)
    result.reverse()
    return result


def _dfs(node: Node, found: set[int], out: list[Node]) -> None:
    # Iterative post-order so deep chains do not hit the recursion limit.
    if node.id in found:
        return
    found.add(node.id)
    stack: list[tuple[Node, Iterator[Edge]]] = [(node, iter(node.children))]
    while stack:
        cur, it = stack[-1]
        for edge in it:
            child = edge.child
            if child is not None and child.id not in found:
                found.add(child.id)
                stack.append((child, iter(child.children)))
                break
        else:
            stack.pop()
            out.append(cur)
