"""Why a rewrite did or did not match: every site where its chain starts, and the reason.

Sites and reasons come from `fxfuse.diagnosis`, the code that counts near misses during
a compile, so ``explain`` and `fxfuse.miss_table` always agree. This module captures the
graphs a function compiles into and turns the diagnosis into a report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
import torch.fx

from . import compat, diagnosis
from .canonicalize import canonicalize
from .fusion_pass import FusionPass, _Entry
from .tracing import TracedRewrite, Variant


@dataclasses.dataclass(frozen=True)
class Site:
    """One node where a rewrite's chain starts (its anchor op), and what became of it.

    ``form`` is the functional form of that node (``"functional"``, or ``"v1"``/``"v2"``
    for a mutating op wrapped in ``auto_functionalized(_v2)``); ``graph`` is the index of
    the graph it is in, in compile order.
    """

    pass_name: str
    rewrite: str
    form: str
    node: str
    matched: bool
    reason: str  # empty when matched
    graph: int = 0

    def __str__(self) -> str:
        verdict = "MATCH" if self.matched else f"no: {self.reason}"
        return f"{self.pass_name}/{self.rewrite} [{self.form}] at {self.node}: {verdict}"


@dataclasses.dataclass(frozen=True)
class RewriteReport:
    """One rewrite's part of an `Explanation`: its pattern, once, and all its sites."""

    pass_name: str
    rewrite: str
    pattern: str  # the search pattern as the Python that builds it
    anchor: str  # the op a site runs; named when no graph holds it
    sites: tuple[Site, ...]


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Every rewrite's sites in every graph; ``str()`` gives the readable report.

    The report gives, per rewrite, its pattern once, then one line per site (prefixed
    with the graph's index when there are several graphs), or one line naming the
    anchor op when no graph holds it.
    """

    rewrites: tuple[RewriteReport, ...]
    num_graphs: int = 1

    @property
    def sites(self) -> list[Site]:
        return [s for r in self.rewrites for s in r.sites]

    def for_rewrite(self, name: str) -> list[Site]:
        return [s for s in self.sites if s.rewrite == name]

    def __str__(self) -> str:
        if not self.rewrites:
            return "no rewrites to explain"
        lines = []
        for r in self.rewrites:
            matched = sum(s.matched for s in r.sites)
            lines.append(f"== {r.pass_name}/{r.rewrite}: {matched} of {len(r.sites)} site(s) match")
            lines += ["    " + line for line in r.pattern.splitlines()]
            if not r.sites:
                where = "the graph" if self.num_graphs == 1 else f"any of the {self.num_graphs} graphs"
                lines.append(f"{r.pass_name}/{r.rewrite}: no site: {r.anchor} does not occur in {where}")
            for s in r.sites:
                lines.append(str(s) if self.num_graphs == 1 else f"graph {s.graph}: {s}")
        return "\n".join(lines)


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


def capture_post_grad_graphs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[torch.fx.GraphModule]:
    """Compile ``fn`` and call it on ``args``; return every post-grad graph, in compile order.

    These are the graphs fusion passes see: one per graph that Dynamo hands Inductor,
    so several when ``fn`` has graph breaks. The compile has a Dynamo cache of its own:
    ``fn``'s other compiles keep their compiled code and their recompile budget
    (nothing is reset), and global Inductor config is not touched.

    Example:
        >>> gms = fxfuse.capture_post_grad_graphs(fn, x)
        >>> len(gms)       # 2: fn has one graph break
        2
    """
    captured: list[torch.fx.GraphModule] = []

    class _Capture(compat.custom_graph_pass_base()):  # type: ignore[misc]
        def __call__(self, graph: torch.fx.Graph) -> None:
            captured.append(_copy(graph.owning_module))

        def uuid(self) -> None:
            return None  # no key: Inductor must not serve a cached graph, or this would not run

    compiled = compat.compile_isolated(fn, options={compat.custom_post_pass_key(): _Capture()})
    compiled(*args, **kwargs)
    if not captured:
        raise RuntimeError("no graph reached Inductor's post-grad stage (did the function compile?)")
    return captured


def capture_post_grad_graph(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.fx.GraphModule:
    """`capture_post_grad_graphs` for a function that compiles into one graph.

    Raises ``ValueError`` when it compiles into several (graph breaks): pick from
    `capture_post_grad_graphs`, or pass ``fn`` to `explain`, which reports them all.

    Example:
        >>> gm = fxfuse.capture_post_grad_graph(model, ids)
    """
    graphs = capture_post_grad_graphs(fn, *args, **kwargs)
    if len(graphs) != 1:
        raise ValueError(
            f"{getattr(fn, '__qualname__', type(fn).__name__)} compiles into {len(graphs)} graphs (graph breaks); "
            "use capture_post_grad_graphs() for all of them"
        )
    return graphs[0]


def explain(
    target: torch.fx.GraphModule | Sequence[torch.fx.GraphModule] | Callable[..., Any],
    passes: Sequence[FusionPass],
    *args: Any,
    rewrite: str | None = None,
) -> Explanation:
    """Report every site where a rewrite's chain starts, and why it did or did not match.

    ``target`` is a post-grad GraphModule, a list of them, or a function that is compiled
    and called on ``args`` to get its graphs (all of them, when it has graph breaks; see
    `capture_post_grad_graphs`). ``rewrite`` restricts the report to one rewrite; a name
    that no pass holds raises ``ValueError`` listing the known names. The graphs are not
    changed and no match or miss is counted.

    Example:
        >>> print(fxfuse.explain(gm, [fma]))
        == fma_fusion/MulAddToFma: 1 of 2 site(s) match
            mul_tensor = CallFunction(aten.mul.Tensor, KeywordArg('x'), KeywordArg('y'))
            ...
        fma_fusion/MulAddToFma [functional] at mul: MATCH
        fma_fusion/MulAddToFma [functional] at mul_1: no: matching from add_1: multiple_users ... — mul_1 is also used by sum_1 (aten.sum.default)
    """
    known = [t.name for p in passes for t in p.traced]
    if rewrite is not None and rewrite not in known:
        raise ValueError(f"explain: no rewrite named {rewrite!r}; known: {', '.join(known) or '(none)'}")
    if isinstance(target, torch.fx.GraphModule):
        graphs = [target]
    elif isinstance(target, (list, tuple)):
        graphs = list(target)
    else:
        graphs = capture_post_grad_graphs(target, *args)
    if not graphs:
        raise ValueError("explain: no graph to explain (an empty list of GraphModules)")
    sites: dict[tuple[str, str], list[Site]] = {}
    for i, gm in enumerate(graphs):
        for p in passes:
            work = _copy(gm)
            canonicalize(work.graph, p.canonicalizations)
            regions = compat.mutation_region_ids(work.graph)
            for traced in p.traced:
                if rewrite is None or traced.name == rewrite:
                    sites.setdefault((p.name, traced.name), []).extend(_sites(p, traced, work.graph, regions, i))
                traced.forget_traces()  # they hold this graph's fake tensors
    reports = [
        _report(p, traced, sites.get((p.name, traced.name), []))
        for p in passes
        for traced in p.traced
        if rewrite is None or traced.name == rewrite
    ]
    return Explanation(tuple(reports), len(graphs))


def _sites(p: FusionPass, traced: TracedRewrite, graph: torch.fx.Graph, regions: Any, index: int) -> list[Site]:
    def evaluate(variant: Variant, match: compat.Match) -> str | None:
        return _Entry(p, traced, variant).evaluate(match, report=False)  # explaining records nothing

    out = []
    for node in diagnosis.sites(traced, graph):
        reason = diagnosis.why_not(traced, node, evaluate, regions)
        out.append(Site(p.name, traced.name, _form(node), node.name, reason is None, reason or "", index))
    return out


def _form(node: torch.fx.Node) -> str:
    for form, hop in compat.auto_functionalized_ops().items():
        if node.target is hop:
            return form
    return "functional"


def _report(p: FusionPass, traced: TracedRewrite, sites: list[Site]) -> RewriteReport:
    # One pattern per rewrite: the uncommuted variant of the form the sites are in (the
    # graph holds one functional form of a mutating op; the other variant never applies).
    forms = {s.form for s in sites}
    plain = [v for v in traced.variants if not v.swaps]
    shown = next((v for v in plain if v.form in forms), plain[0])
    anchors = list(dict.fromkeys(str(v.anchor) for v in plain))
    return RewriteReport(
        p.name, traced.name, compat.pattern_source(shown.pattern, traced.name), " or ".join(anchors), tuple(sites)
    )
