"""Graph normalizations applied identically to traced patterns and to graphs being matched.

A pattern written with ``view`` must match a graph that holds ``reshape``; a pattern
must not fail because the graph carries a permute that does nothing. Each
canonicalization is a plain function ``graph -> number of nodes changed``; its source
is part of every pass's cache key, because changing one changes what matches.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx

aten = torch.ops.aten

Canonicalization = Callable[[torch.fx.Graph], int]

_VIEWS = (aten.view.default, aten._unsafe_view.default)


def view_to_reshape(graph: torch.fx.Graph) -> int:
    """``view``/``_unsafe_view`` -> ``reshape``: Inductor's post-grad graphs hold reshape."""
    changed = 0
    for target in _VIEWS:
        for node in graph.find_nodes(op="call_function", target=target):
            node.target = aten.reshape.default
            changed += 1
    return changed


def remove_noop_permute(graph: torch.fx.Graph) -> int:
    """``permute(x, [0, 1, ..., n-1])`` -> ``x``."""
    changed = 0
    for node in list(graph.find_nodes(op="call_function", target=aten.permute.default)):
        dims = list(node.args[1])
        if dims == list(range(len(dims))):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed += 1
    return changed


DEFAULT_CANONICALIZATIONS: tuple[Canonicalization, ...] = (view_to_reshape, remove_noop_permute)


def canonicalize(graph: torch.fx.Graph, canonicalizations: tuple[Canonicalization, ...]) -> int:
    """Apply each canonicalization in order; returns the number of nodes changed."""
    return sum(c(graph) for c in canonicalizations)
