"""``noop_elimination``: reshapes, views and slices that do nothing are replaced by their input.

Shape-dependent, so not expressible as a pattern: it is a `FusionPass` with its own
graph walk. Removing them first lets later patterns see producer and consumer adjacent.
"""

from __future__ import annotations

import torch
import torch.fx

from ..match_table import record
from ..fusion_pass import FusionPass

aten = torch.ops.aten


def _known_true(cond: object) -> bool:
    """``statically_known_true``, imported when first needed (it imports sympy)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(cond))
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _same_shape(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)) or va.dim() != vb.dim():
        return False
    return va.dtype == vb.dtype and all(_known_true(x == y) for x, y in zip(va.shape, vb.shape))


def _is_full_slice(node: torch.fx.Node) -> bool:
    src = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or step != 1 or start not in (None, 0):
        return False
    if isinstance(end, torch.fx.Node):  # a symbolic bound: its value lives in the meta
        end = end.meta.get("val")
        if not isinstance(end, (int, torch.SymInt)):
            return False
    size = val.shape[dim]
    return end is None or _known_true(end >= size)


class NoopElimination(FusionPass):
    """Replaces no-op reshape/view (same shape) and full slices by their input.

    Example:
        >>> NoopElimination()(gm.graph)   # number of nodes removed
        2
    """

    def __init__(self) -> None:
        super().__init__("noop_elimination")

    def __call__(self, graph: torch.fx.Graph | torch.fx.GraphModule, *, gone: object = None) -> int:
        if isinstance(graph, torch.fx.GraphModule):
            graph = graph.graph
        counts = {"reshape": 0, "slice": 0}
        for node in list(graph.nodes):
            if node.op != "call_function" or not isinstance(node.args[0] if node.args else None, torch.fx.Node):
                continue
            if node.target in _RESHAPES and _same_shape(node, node.args[0]):
                kind = "reshape"
            elif node.target is aten.slice.Tensor and _is_full_slice(node) and _same_shape(node, node.args[0]):
                kind = "slice"
            else:
                continue
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            counts[kind] += 1
        self.last_counts = {k: n for k, n in counts.items() if n}
        for kind, n in self.last_counts.items():
            record(self.name, kind, n)
        return sum(counts.values())
