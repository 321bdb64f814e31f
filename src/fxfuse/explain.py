"""Why a rewrite did or did not match: every anchor site, and the first reason it failed."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx

from . import compat
from .canonicalize import canonicalize
from .fusion_pass import FusionPass, _Entry


@dataclasses.dataclass(frozen=True)
class Site:
    """One node where a rewrite's anchor op occurs, and what became of it."""

    pass_name: str
    rewrite: str
    form: str
    node: str
    matched: bool
    reason: str  # empty when matched

    def __str__(self) -> str:
        verdict = "MATCH" if self.matched else f"no: {self.reason}"
        return f"{self.pass_name}/{self.rewrite} [{self.form}] at {self.node}: {verdict}"


@dataclasses.dataclass
class Explanation:
    """All sites of all rewrites; ``str()`` gives a readable report."""

    sites: list[Site]

    def for_rewrite(self, name: str) -> list[Site]:
        return [s for s in self.sites if s.rewrite == name]

    def __str__(self) -> str:
        if not self.sites:
            return "no anchor op of any rewrite occurs in the graph"
        return "\n".join(str(s) for s in self.sites)


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def capture_post_grad_graph(fn: Callable[..., Any], *args: Any) -> torch.fx.GraphModule:
    """Compile ``fn`` on ``args`` and return the post-grad graph, as fusion passes see it.

    Example:
        >>> gm = fxfuse.capture_post_grad_graph(model, ids)
    """
    captured: list[torch.fx.GraphModule] = []

    class _Capture(compat.custom_graph_pass_base()):  # type: ignore[misc]
        def __call__(self, graph: torch.fx.Graph) -> None:
            captured.append(_copy(graph.owning_module))

        def uuid(self) -> None:
            return None  # never cached: we need the pass to run

    torch._dynamo.reset()
    compiled = torch.compile(fn, options={compat.custom_post_pass_key(): _Capture()})
    compiled(*args)
    if not captured:
        raise RuntimeError("no graph reached Inductor's post-grad stage (did the function compile?)")
    return captured[-1]


def explain(
    target: torch.fx.GraphModule | Callable[..., Any],
    passes: Sequence[FusionPass],
    *args: Any,
    rewrite: str | None = None,
) -> Explanation:
    """Report every site where a rewrite's anchor op occurs and why it did or did not match.

    ``target`` is a post-grad GraphModule, or a function compiled on ``args`` to get one.
    The graph is not modified.

    Example:
        >>> print(fxfuse.explain(gm, [fma]))
        fma_fusion/MulAddToFma [functional] at add: MATCH
        fma_fusion/MulAddToFma [functional] at add_1: no: multiple_users ...
    """
    gm = target if isinstance(target, torch.fx.GraphModule) else capture_post_grad_graph(target, *args)
    sites: list[Site] = []
    for p in passes:
        work = _copy(gm)
        canonicalize(work.graph, p.canonicalizations)
        regions = compat.mutation_region_ids(work.graph)
        for traced in p.traced:
            if rewrite is not None and traced.name != rewrite:
                continue
            for variant in traced.variants:
                entry = _Entry(p, traced, variant)
                for node in _anchor_sites(work.graph, variant.pattern):
                    sites.append(_site(p, traced.name, variant.form, entry, node, regions))
            traced.forget_traces()  # they hold this graph's fake tensors
    return Explanation(sites)


def _anchor_sites(graph: torch.fx.Graph, pattern: compat.PatternExpr) -> list[torch.fx.Node]:
    """Nodes where the pattern's anchor op occurs.

    A pattern whose first output is ``getitem(op(...), i)`` anchors on every getitem of
    the graph; only those taken from ``op`` are sites worth reporting.
    """
    first = pattern.outputs[0] if isinstance(pattern, compat.MultiOutputPattern) else pattern
    nodes = [n for fn in first.fns for n in graph.find_nodes(op="call_function", target=fn)]
    if first.fns == [operator.getitem] and isinstance(first.args[0], compat.CallFunction):
        producers = set(first.args[0].fns)
        nodes = [n for n in nodes if isinstance(n.args[0], torch.fx.Node) and n.args[0].target in producers]
    return nodes


def _site(p: FusionPass, name: str, form: str, entry: _Entry, node: torch.fx.Node, regions: Any) -> Site:
    m = entry.pattern.match(node)
    if not compat.is_match(m):
        return Site(p.name, name, form, node.name, False, str(m) or type(m).__name__)
    if len({regions(n) for n in m.nodes}) != 1:
        return Site(p.name, name, form, node.name, False, "the match crosses a mutation barrier")
    reason = entry.evaluate(m)
    return Site(p.name, name, form, node.name, reason is None, reason or "")
