"""Helpers shared by rewriting passes: replacing a set of nodes with one, and ordering."""

from __future__ import annotations

import heapq

from moec.ir.graph import Graph, Namespace, Node, Ref, renamed_inputs


def single_user(graph: Graph, name: str) -> str | None:
    users = graph.users[name]
    return users[0] if len(users) == 1 else None


def only_used_inside(graph: Graph, absorbed: set[str], roots: set[str]) -> bool:
    """No node of ``absorbed`` except the ``roots`` is read from outside the set."""
    for name in absorbed - roots:
        if any(user not in absorbed for user in graph.users[name]):
            return False
    return True


def replace_subgraphs(graph: Graph, replacements: list[tuple[set[str], Node, dict[Ref, Ref]]]) -> Graph:
    """For each ``(absorbed, new_node, mapping)``: drop ``absorbed``, add ``new_node``, redirect reads of old outputs.

    The replacements must be disjoint (a pass matches them all on one graph, then rewrites once:
    one rewrite per match would copy and re-sort the whole graph each time, quadratic in depth).
    """
    new_at = {ref.node: new_node for _, new_node, mapping in replacements for ref in mapping}  # root -> its new node
    absorbed = set().union(*(dropped for dropped, _, _ in replacements))
    mapping = {old: new for _, _, redirects in replacements for old, new in redirects.items()}
    nodes, placed = [], set()
    for node in graph.nodes:
        new_node = new_at.get(node.name)
        if new_node is not None and new_node.name not in placed:
            nodes.append(renamed_inputs(new_node, mapping))  # where its first root was (it may read another's root)
            placed.add(new_node.name)
        if node.name not in absorbed:
            nodes.append(renamed_inputs(node, mapping))
    outputs = tuple(mapping.get(ref, ref) for ref in graph.outputs)
    return graph.with_nodes(stable_toposort(nodes), outputs=outputs)


def fresh_names(graph: Graph) -> Namespace:
    """Names ``<prefix>_<n>`` with n past every ``<prefix>_<m>`` in the graph: names grow in creation order."""
    return Namespace(taken=(node.name for node in graph.nodes))


def stable_toposort(nodes: list[Node]) -> list[Node]:
    """Topological order that keeps the given order wherever the dependencies allow."""
    position = {node.name: i for i, node in enumerate(nodes)}
    waiting = {node.name: {ref.node for ref in node.inputs if ref.node in position} for node in nodes}
    readers: dict[str, list[str]] = {node.name: [] for node in nodes}
    for node in nodes:
        for dep in waiting[node.name]:
            readers[dep].append(node.name)
    ready = [position[name] for name, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    ordered: list[Node] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        ordered.append(node)
        for reader in readers[node.name]:
            waiting[reader].discard(node.name)
            if not waiting[reader]:
                heapq.heappush(ready, position[reader])
    assert len(ordered) == len(nodes), "cycle in graph"
    return ordered
