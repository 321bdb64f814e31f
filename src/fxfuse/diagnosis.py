"""Where a rewrite could apply in a graph, and why it did not.

A *site* of a rewrite is a node running the op its chain starts with (`Anchor`). After a
pass has run, a site still in the graph is a *near miss*: the chain starts there but
was not replaced. The reason is the one recorded when a candidate match was declined
(a failed ``check``, a typed argument that did not fit, a failed replacement), or else
the first pattern node that failed when matching from the ops the site's value reaches.
Both `FusionPass` (miss counts, log lines) and `fxfuse.explain` use these functions, so
the two always agree.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
import torch.fx

from . import compat
from .tracing import _SHAPE_OPS, _SHAPE_QUERIES, TracedRewrite, Variant

# How a candidate match is judged beyond its structure: None to replace, else the reason.
Evaluate = Callable[[Variant, compat.Match], Optional[str]]


def sites(traced: TracedRewrite, graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The nodes of ``graph`` where ``traced``'s chain could start, in graph order."""
    anchors = {v.anchor for v in traced.variants}
    found = {n for a in anchors for n in a.sites(graph)}
    return [n for n in graph.nodes if n in found]


def why_not(
    traced: TracedRewrite,
    site: torch.fx.Node,
    evaluate: Evaluate,
    regions: Callable[[torch.fx.Node], int],
) -> Optional[str]:
    """Why ``traced`` does not replace the chain starting at ``site`` (None: it would).

    A rewrite without ``commute`` that would match with its operands swapped says so.
    """
    variants = [v for v in traced.variants if _starts(v, site)]
    reasons = [_why_variant(v, site, evaluate, regions) for v in variants]
    if any(r is None for r in reasons):
        return None
    reason = reasons[0] if reasons else f"{site.name} is not a site of {traced.name}"
    if not traced.rewrite.commute:
        swapped = [v for v in traced.commuted(variants) if _structural(v, site, regions)]
        if swapped:
            reason += f" (it would match with commute = True: operands of {', '.join(sorted(swapped[0].swaps))} swapped)"
    return reason


def _starts(variant: Variant, site: torch.fx.Node) -> bool:
    a = variant.anchor
    return site.target is a.target and (a.wrapped is None or (site.args and site.args[0] is a.wrapped))


def _why_variant(variant: Variant, site: torch.fx.Node, evaluate: Evaluate, regions: Any) -> Optional[str]:
    candidates = _candidates(variant, site)
    if not candidates:
        ends = _output_op(variant)
        return f"the value of {site.name} does not reach {ends} (it flows to: {_flows_to(site)})"
    first_failure = None
    for node in candidates:
        m = variant.pattern.match(node)
        if not compat.is_match(m):
            first_failure = first_failure or f"matching from {node.name}: {_failed(m)}{_extra_users(site, node, m)}"
            continue
        if site not in m.nodes:
            continue
        if len({regions(n) for n in m.nodes}) != 1:
            return f"the match at {node.name} crosses a mutation barrier"
        return evaluate(variant, m)
    return first_failure or f"no match from {', '.join(n.name for n in candidates)} includes {site.name}"


def _structural(variant: Variant, site: torch.fx.Node, regions: Any) -> bool:
    for node in _candidates(variant, site):
        m = variant.pattern.match(node)
        if compat.is_match(m) and site in m.nodes:
            return True
    return False


def _output_first(variant: Variant) -> Any:
    p = variant.pattern
    return p.outputs[0] if isinstance(p, compat.MultiOutputPattern) else p


def _searches_from(variant: Variant, node: torch.fx.Node) -> bool:
    """Whether the pattern's search starts at ``node``: its output op, and for
    ``getitem(op(...))`` outputs only items taken from ``op``."""
    first = _output_first(variant)
    if node.target not in first.fns:
        return False
    if first.fns == [operator.getitem] and isinstance(first.args[0], compat.CallFunction):
        src = node.args[0]
        return isinstance(src, torch.fx.Node) and src.target in first.args[0].fns
    return True


def _output_op(variant: Variant) -> str:
    first = _output_first(variant)
    if first.fns == [operator.getitem] and isinstance(first.args[0], compat.CallFunction):
        first = first.args[0]
    return " or ".join(str(f) for f in first.fns)


def _candidates(variant: Variant, site: torch.fx.Node) -> list[torch.fx.Node]:
    """Nodes within the pattern's depth downstream of ``site`` where its search can start."""
    depth = sum(1 for n in variant.graph.graph.nodes if n.op == "call_function")
    seen, frontier, found = {site}, [site], []
    for _ in range(depth + 1):
        found += [n for n in frontier if _searches_from(variant, n)]
        frontier = [u for n in frontier for u in n.users if u not in seen and not seen.add(u)]
    return found


def _extra_users(site: torch.fx.Node, end: torch.fx.Node, failure: Any) -> str:
    """For a ``multiple_users`` failure: the users outside the chain from ``site`` to ``end``."""
    if "multiple_users" not in compat.failed_match_reason(failure):
        return ""
    chain = _between(site, end)
    extra = [f"{n.name} is also used by {u.name} ({_target_name(u)})"
             for n in chain if n is not end for u in n.users if u not in chain and not _is_size_query(u)]
    return f" — {'; '.join(extra)}" if extra else ""


def _between(site: torch.fx.Node, end: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes on paths from ``site`` to ``end`` (both included)."""
    ancestors, stack = {end}, [end]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in ancestors:
                ancestors.add(a)
                stack.append(a)
    down, stack = {site}, [site]
    while stack:
        for u in stack.pop().users:
            if u not in down and u in ancestors:
                down.add(u)
                stack.append(u)
    return down


def _is_size_query(node: torch.fx.Node) -> bool:
    return node.target in _SHAPE_QUERIES


def _flows_to(site: torch.fx.Node) -> str:
    """The first ops (past getitems and views) that use ``site``'s value."""
    out, stack, seen = [], list(site.users), set()
    while stack:
        u = stack.pop(0)
        if u in seen:
            continue
        seen.add(u)
        if u.target is operator.getitem or u.target in _SHAPE_OPS or u.target in _SHAPE_QUERIES:
            stack.extend(u.users)
        else:
            out.append(f"{u.name} ({_target_name(u)})")
    return ", ".join(out) or "nothing"


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)) if not isinstance(t, torch._ops.OpOverload) else str(t)


def _failed(m: Any) -> str:
    text = compat.failed_match_reason(m) or type(m).__name__  # str() of some raises on torch 2.9
    return text.replace("\n", " ")
