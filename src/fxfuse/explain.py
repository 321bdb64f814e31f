"""Why a rewrite did or did not match: every chain of it in every graph, and what became of it.

``explain`` runs the passes as a compile runs them (in order, each at its stage, each on
the graph the passes before it left) on copies of the graphs, recording nothing, and
reports what each application said: the chains replaced, the near misses with their
reasons (`fxfuse.diagnosis`, the same code that fills `fxfuse.miss_table`), and the
chains another rewrite took. So ``explain``, the miss table and ``fxfuse demo`` agree.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx

from . import compat
from .fusion_pass import FusionPass, Outcome


@dataclasses.dataclass(frozen=True)
class Site:
    """One chain of a rewrite (named by its anchor node), and what became of it.

    ``status`` is ``"match"`` (replaced), ``"miss"`` (a near miss; ``reason`` says why) or
    ``"taken"`` (another rewrite's replacement took it; ``reason`` names it). ``form`` is
    the functional form of the anchor node (``"functional"``, or ``"v1"``/``"v2"`` for a
    mutating op in ``auto_functionalized(_v2)``); ``graph`` is the graph's index, in
    compile order.
    """

    pass_name: str
    rewrite: str
    form: str
    node: str
    matched: bool
    reason: str  # empty when matched
    graph: int = 0
    status: str = ""

    def __str__(self) -> str:
        status = self.status or ("match" if self.matched else "miss")
        verdict = {"match": "MATCH", "miss": f"no: {self.reason}", "taken": f"taken: {self.reason}"}[status]
        return f"{self.pass_name}/{self.rewrite} [{self.form}] at {self.node}: {verdict}"


@dataclasses.dataclass(frozen=True)
class RewriteReport:
    """One rewrite's part of an `Explanation`: its pattern, once, and all its chains."""

    pass_name: str
    rewrite: str
    pattern: str  # the search pattern as readable Python
    anchor: str  # the op a chain is found from; named when no graph holds it
    sites: tuple[Site, ...]

    def summary(self) -> str:
        n = {s: sum(x.status == s for x in self.sites) for s in ("match", "miss", "taken")}
        parts = [f"{n['match']} matched", f"{n['miss']} near miss{'es' if n['miss'] != 1 else ''}"]
        if n["taken"]:
            parts.append(f"{n['taken']} taken by other rewrites")
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Every rewrite's chains in every graph; ``str()`` gives the readable report.

    Per rewrite with chains: a summary line, its pattern once, then one line per chain
    (prefixed with the graph's index when there are several graphs). Rewrites without
    any chain get one line together, naming their anchor ops; ``verbose`` lists each.
    """

    rewrites: tuple[RewriteReport, ...]
    num_graphs: int = 1
    verbose: bool = False

    @property
    def sites(self) -> list[Site]:
        return [s for r in self.rewrites for s in r.sites]

    def for_rewrite(self, name: str) -> list[Site]:
        return [s for s in self.sites if s.rewrite == name]

    def __str__(self) -> str:
        if not self.rewrites:
            return "no rewrites to explain"
        where = "the graph" if self.num_graphs == 1 else f"any of the {self.num_graphs} graphs"
        lines, quiet = [], []
        for r in self.rewrites:
            if not r.sites and not self.verbose:
                quiet.append(r)
                continue
            lines.append(f"== {r.pass_name}/{r.rewrite}: {r.summary()}")
            lines += ["    " + line for line in r.pattern.splitlines()]
            if not r.sites:
                lines.append(f"{r.pass_name}/{r.rewrite}: no site: {r.anchor} does not occur in {where}")
            for s in r.sites:
                lines.append(str(s) if self.num_graphs == 1 else f"graph {s.graph}: {s}")
        if len(quiet) == 1:
            r = quiet[0]
            lines.append(f"{r.pass_name}/{r.rewrite}: no site: {r.anchor} does not occur in {where}")
        elif quiet:
            groups: dict[tuple[str, str], int] = {}
            for r in quiet:
                groups[(r.pass_name, r.anchor)] = groups.get((r.pass_name, r.anchor), 0) + 1
            parts = [f"{p}: {n} rewrite{'s' if n > 1 else ''} found from {a}" for (p, a), n in groups.items()]
            lines.append(f"no site in {where} for {len(quiet)} rewrites ({'; '.join(parts)}); "
                         "verbose=True (`fxfuse explain --all`) lists each")
        return "\n".join(lines)


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return torch.fx.GraphModule(gm, graph)


@dataclasses.dataclass
class _Captured:
    """One graph Dynamo handed Inductor: as received (``pre``) and after Inductor's own passes (``post``)."""

    pre: torch.fx.GraphModule | None
    post: torch.fx.GraphModule | None = None


def _capture(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict, pre_passes: Sequence[FusionPass] = ()) -> list[_Captured]:
    captured: list[_Captured] = []
    seen: weakref.WeakSet = weakref.WeakSet()
    base = compat.custom_graph_pass_base()

    class _Pre(base):  # type: ignore[misc, valid-type]
        def __call__(self, graph: torch.fx.Graph) -> None:
            if graph in seen:
                return  # torch 2.9 runs this hook twice a graph; the first sees it as received
            seen.add(graph)
            captured.append(_Captured(_copy(graph.owning_module)))
            for p in pre_passes:  # as a compile runs them: Inductor's passes see their result
                p.apply(graph, report=False)

        def uuid(self) -> None:
            return None  # no key: Inductor must not serve a cached graph, or this would not run

    class _Post(base):  # type: ignore[misc, valid-type]
        def __call__(self, graph: torch.fx.Graph) -> None:
            if not captured or captured[-1].post is not None:
                captured.append(_Captured(None))
            captured[-1].post = _copy(graph.owning_module)

        def uuid(self) -> None:
            return None

    options = {compat.custom_pre_pass_key(): _Pre(), compat.custom_post_pass_key(): _Post()}
    compiled = compat.compile_isolated(fn, options=options)
    compiled(*args, **kwargs)
    if not captured:
        raise RuntimeError("no graph reached Inductor's post-grad stage (did the function compile?)")
    return captured


def capture_post_grad_graphs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[torch.fx.GraphModule]:
    """Compile ``fn`` and call it on ``args``; return every post-grad graph, in compile order.

    These are the graphs post-stage fusion passes see: one per graph that Dynamo hands
    Inductor, so several when ``fn`` has graph breaks. The compile has a Dynamo cache of
    its own: ``fn``'s other compiles keep their compiled code and their recompile budget
    (nothing is reset), and global Inductor config is not touched.

    Example:
        >>> gms = fxfuse.capture_post_grad_graphs(fn, x)
        >>> len(gms)       # 2: fn has one graph break
        2
    """
    return [c.post for c in _capture(fn, args, kwargs) if c.post is not None]


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
    verbose: bool = False,
) -> Explanation:
    """Report every chain of every rewrite, and what became of it and why.

    ``target`` is a post-grad GraphModule, a list of them, or a function that is compiled
    and called on ``args`` to get its graphs (all of them, when it has graph breaks), as
    Inductor receives them and after its own passes: a chain Inductor rewrote before a
    post-stage pass ran is reported as such. The passes run in order on copies, as a
    compile runs them; nothing is counted and the graphs given are not changed.
    ``rewrite`` restricts the report to one rewrite (a name no pass holds raises
    ``ValueError`` listing the known ones); ``verbose`` lists rewrites without any chain
    one by one.

    Example:
        >>> print(fxfuse.explain(gm, [fma]))
        == fma_fusion/MulAddToFma: 1 matched, 1 near miss
            def MulAddToFma(x, y, z):
                mul = aten.mul.Tensor(x, y)
                add = aten.add.Tensor(mul, z)
                return add
        fma_fusion/MulAddToFma [functional] at mul: MATCH
        fma_fusion/MulAddToFma [functional] at mul_1: no: mul_1 (aten.mul.Tensor) is also used by sum_1 ...
    """
    passes = list(passes)
    if isinstance(passes, FusionPass) or any(not isinstance(p, FusionPass) for p in passes):
        raise TypeError("explain takes a list of FusionPass objects")
    known = [t.name for p in passes for t in p.traced]
    if rewrite is not None and rewrite not in known:
        raise ValueError(f"explain: no rewrite named {rewrite!r}; known: {', '.join(known) or '(none)'}")
    if isinstance(target, torch.fx.GraphModule):
        graphs = [_Captured(None, target)]
    elif isinstance(target, (list, tuple)):
        graphs = [_Captured(None, gm) for gm in target]
    else:
        graphs = _capture(target, args, {}, [p for p in passes if p.stage == "pre"])
    if not graphs:
        raise ValueError("explain: no graph to explain (an empty list of GraphModules)")
    outcomes: dict[tuple[str, str], list[Site]] = {}
    for i, g in enumerate(graphs):
        for p, found in _run(passes, g):
            for name, items in found.items():
                if rewrite is None or name == rewrite:
                    outcomes.setdefault((p.name, name), []).extend(_site(p.name, name, o, i) for o in items)
    reports = [
        _report(p, traced, outcomes.get((p.name, traced.name), []))
        for p in passes
        for traced in p.traced
        if rewrite is None or traced.name == rewrite
    ]
    return Explanation(tuple(reports), len(graphs), verbose)


def _run(passes: Sequence[FusionPass], g: _Captured) -> list[tuple[FusionPass, dict[str, list[Outcome]]]]:
    """Apply ``passes`` to copies of one captured graph as a compile would; each pass's outcomes."""
    from .pass_manager import observe, vanished

    out = []
    pre = [p for p in passes if p.stage == "pre"]
    post = [p for p in passes if p.stage == "post"]
    seen = None
    if g.pre is not None:
        work = _copy(g.pre)
        for p in pre:
            out.append((p, p.apply(work, report=False).outcomes))
        seen = observe(post, work.graph)
    if g.post is None:
        return out
    work = _copy(g.post)
    if g.pre is None:  # a graph given as it is: every pass runs on it, in order
        for p in pre:
            out.append((p, p.apply(work, report=False).outcomes))
    gone = vanished(seen, work.graph) if seen is not None else {}
    for p in post:
        out.append((p, p.apply(work, gone=gone.get(p.name), report=False).outcomes))
    return out


def _site(pass_name: str, rewrite: str, o: Outcome, graph: int) -> Site:
    return Site(pass_name, rewrite, o.form, o.node, o.status == "match", o.reason, graph, o.status)


def _report(p: FusionPass, traced: Any, sites: list[Site]) -> RewriteReport:
    # One pattern per rewrite: the plain variant of the form the chains are in (the graph
    # holds one functional form of a mutating op; the other variant never applies).
    forms = {s.form for s in sites}
    plain = [v for v in traced.variants if not v.swaps]
    shown = next((v for v in plain if v.form in forms), plain[0])
    anchors = list(dict.fromkeys(str(v.anchor) for v in plain))
    source = shown.pattern.source(traced.name, [a.name for a in traced.args])
    return RewriteReport(p.name, traced.name, source, " or ".join(anchors), tuple(sites))
