"""`FusionPass`: a named set of rewrites applied to a post-grad FX graph."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import gc
import dataclasses
import logging
import os
import threading
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.fx

from . import compat, diagnosis, splice
from .cache_key import canonicalization_key, class_key, digest, framework_digest, rewrite_key, stable_repr
from .canonicalize import DEFAULT_CANONICALIZATIONS, Canonicalization, canonicalize
from .match_table import record, record_miss, remember, watch_cache_hits
from .matcher import Context, Match, guards_hold, match_at
from .matcher import Failure as MatchFailure
from .rewrite import Rewrite, RewriteError
from .tracing import Skip, TracedRewrite, Variant

log = logging.getLogger("fxfuse")

#: Where a pass runs in Inductor: before its own graph passes, or after its post-grad patterns.
STAGES = ("pre", "post")


class FusionWarning(UserWarning):
    """A match whose replacement failed; the graph was left as it was."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """A replacement that could not be made, and why."""

    pass_name: str
    rewrite: str
    node: str
    error: str

    @property
    def message(self) -> str:
        return f"fxfuse: {self.pass_name}/{self.rewrite} left the match at {self.node} unreplaced: {self.error}"


@dataclasses.dataclass(frozen=True)
class Misses:
    """The near misses of one rewrite in one application of a pass."""

    rewrite: str
    sites: tuple[str, ...]  # the anchor node of each missed chain, in graph order
    total: int  # chains of the rewrite: replaced plus missed
    first_reason: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What became of one chain of a rewrite in one application (what `explain` lists).

    ``status``: ``"match"`` (replaced), ``"miss"`` (a near miss, with its reason) or
    ``"taken"`` (its anchor node went into another rewrite's replacement, ``reason`` names it).
    """

    node: str
    form: str
    status: str
    reason: str = ""


@dataclasses.dataclass
class Application:
    """The result of applying a pass to one graph."""

    counts: dict[str, int]
    misses: dict[str, Misses]
    outcomes: dict[str, list[Outcome]]
    failures: list[Failure] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector off while the passes run. Matching allocates many small
    objects, and each allocation threshold crossed walks the whole heap, which in a compile
    holds Dynamo's and Inductor's: a third of the passes' time at 32 layers, for nothing
    (what the passes drop is freed by reference counting; cycles wait for the next
    collection after the stage)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


_fresh = threading.local()


def on_fresh_stack(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` run on a thread of its own while the caller waits: what passes run on.

    Why: CPython (3.11 on) keeps frames in 16 KiB chunks and frees a chunk as soon as its
    first frame returns, so a call that lands on a chunk boundary maps and unmaps memory
    each time: ~9 us instead of 0.05 us. Inductor calls custom passes 50 to 60 frames
    deep, and whichever hot loop of a pass sits on that boundary pays it at every call
    (canonicalizing a 32-layer graph: 7 ms instead of 0.5 ms). A thread's stack starts
    empty, so the passes' own depth (tens of frames) stays inside one chunk: the stages of
    a 32-layer compile ran 8-20% faster. Context variables (Inductor's config overrides),
    grad mode and the current CUDA device are carried over; thread-local state is not
    (`PassManager` runs chained passes, which may read Inductor's, on the caller's
    thread). Exceptions are raised in the caller. ``FXFUSE_FRESH_STACK=0`` runs inline
    (a debugger's breakpoint in a pass, say).

    Example:
        >>> on_fresh_stack(sum, [1, 2])
        3
    """
    if getattr(_fresh, "active", False) or os.environ.get("FXFUSE_FRESH_STACK", "1") == "0":
        return fn(*args)
    grad = torch.is_grad_enabled()
    # The current CUDA device is per thread too (a rank of a tensor-parallel model sets its own).
    cuda = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    # Context variables (Inductor's config overrides for this compile among them) go along.
    context = contextvars.copy_context()
    out: dict[str, Any] = {}

    def run() -> None:
        _fresh.active = True
        try:
            if cuda is not None:
                torch.cuda.set_device(cuda)
            with torch.set_grad_enabled(grad):
                out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller
            out["error"] = e

    thread = threading.Thread(target=context.run, args=(run,), name="fxfuse-pass")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


class FusionPass:
    """A named set of rewrites; calling it on a graph applies them and counts the matches.

    Example:
        >>> fma = fxfuse.FusionPass("fma_fusion", [MulAddToFma()])
        >>> fma(gm.graph)          # number of replacements made
        1
        >>> fma.uuid()             # the cache key Inductor sees
        '3f1c...'
        >>> early = fxfuse.FusionPass("mm_bias", [MmAddToLinear()], stage="pre")  # before Inductor's rewrites
    """

    def __init__(
        self,
        name: str,
        rewrites: Iterable[Rewrite] = (),
        *,
        canonicalize: Iterable[Canonicalization] = DEFAULT_CANONICALIZATIONS,
        stage: str = "post",
    ) -> None:
        if not isinstance(name, str) or not name or "|" in name:
            raise RewriteError(f"a FusionPass needs a non-empty name without '|', got {name!r}")
        if stage not in STAGES:
            raise RewriteError(f"pass {name}: stage must be 'pre' or 'post', got {stage!r}")
        if isinstance(rewrites, Rewrite) or (isinstance(rewrites, type) and issubclass(rewrites, Rewrite)):
            shown = rewrites.__name__ if isinstance(rewrites, type) else type(rewrites).__name__
            raise RewriteError(f"pass {name}: rewrites must be a list; write FusionPass({name!r}, [{shown}()])")
        self.name = name
        self.stage = stage
        self.rewrites: list[Rewrite] = []
        self.canonicalizations = tuple(canonicalize)
        self.failures: list[Failure] = []
        self.last_counts: dict[str, int] = {}
        self.last_misses: dict[str, Misses] = {}
        self._traced: list[TracedRewrite] = []
        self._keys: list[str] = []
        self._canon_key = canonicalization_key(self.canonicalizations)
        self._class_key = class_key(type(self))
        for rewrite in rewrites:
            self.register(rewrite)

    def register(self, rewrite: Rewrite) -> None:
        """Trace ``rewrite`` into its search patterns; raises `RewriteError` if it cannot.

        A second instance of a class already in the pass is registered under the name
        ``ClassName(param=value, ...)`` (a copy carries it; ``rewrite`` is not changed).

        Example:
            >>> p = fxfuse.FusionPass("mine"); p.register(MulAddToFma())
        """
        if isinstance(rewrite, type) and issubclass(rewrite, Rewrite):
            raise RewriteError(f"pass {self.name}: {rewrite.__name__} is a Rewrite class; register an instance: "
                               f"{rewrite.__name__}()")
        if not isinstance(rewrite, Rewrite):
            raise RewriteError(f"pass {self.name}: {rewrite!r} is not an fxfuse.Rewrite")
        rewrite = self._named(rewrite)
        self._state(rewrite)  # an unrepresentable cache_state() fails here, not inside Inductor
        traced = TracedRewrite(rewrite, self.canonicalizations, self._canon_key)
        diagnosis.warn_unreported_state(rewrite)
        self.rewrites.append(rewrite)
        self._traced.append(traced)
        # The source of what the rewrite is, and the graphs it traced to: code it runs
        # from other modules (a native implementation, an op's schema) reaches the key.
        self._keys.append(digest([rewrite_key(rewrite), traced.graphs_key()]))

    def _named(self, rewrite: Rewrite) -> Rewrite:
        qualified = repr(rewrite)
        if any(type(r) is type(rewrite) and repr(r) == qualified for r in self.rewrites):
            raise RewriteError(f"pass {self.name}: a rewrite named {rewrite.name} is registered already, "
                               f"with the same parameters ({qualified})")
        taken = {r.name for r in self.rewrites}
        if rewrite.name not in taken:
            return rewrite
        if type(rewrite).name is not Rewrite.name or qualified in taken:
            # A name the rewrite chose itself: the framework must not rename it.
            raise RewriteError(f"pass {self.name}: a rewrite named {rewrite.name} is registered already")
        named = copy.copy(rewrite)
        named.__dict__["_fxfuse_name"] = qualified
        return named

    def _state(self, rewrite: Rewrite) -> str:
        where = f"cache_state() of rewrite {rewrite.name} in pass {self.name}"
        try:
            state = rewrite.cache_state()
        except Exception as e:  # noqa: BLE001 - a user bug, reported with the rewrite's name
            raise RewriteError(f"{where} raised {type(e).__name__}: {e}") from e
        return stable_repr(state, where)

    @property
    def traced(self) -> list[TracedRewrite]:
        return list(self._traced)

    # -- applying ------------------------------------------------------------------

    def __call__(self, graph: torch.fx.Graph | torch.fx.GraphModule, *, gone: Any = None) -> int:
        """Apply the rewrites to ``graph`` in place; returns the number of replacements.

        Also counts the near misses (`fxfuse.miss_table`) and logs, at INFO on the
        ``fxfuse`` logger, each rewrite that has some, with the first reason. ``gone``
        (from the `PassManager`): chains seen before Inductor's own passes ran and gone
        after, per rewrite; each is a near miss.
        """
        result = on_fresh_stack(lambda: self.apply(graph, gone=gone, report=True))
        self.record(result)
        return sum(result.counts.values())

    def record(self, result: Application) -> None:
        """Count an application's matches and near misses (`fxfuse.match_table`,
        `fxfuse.miss_table`) and log each rewrite with misses.

        Inductor replays the counts a compile recorded when its FX graph cache serves the
        graph, but only those recorded while Inductor's post-grad stage ran: the
        `PassManager` records a pre-stage pass's result there, not when it ran.
        """
        self.last_counts = result.counts
        self.last_misses = result.misses
        for rewrite, n in result.counts.items():
            record(self.name, rewrite, n)
        for rewrite, misses in result.misses.items():
            record_miss(self.name, rewrite, len(misses.sites))
            line = (f"fxfuse: {self.name}/{rewrite} missed {len(misses.sites)} of {misses.total} site(s); "
                    f"first at {misses.sites[0]}: {misses.first_reason}")
            log.info(line)
            remember(logging.INFO, line)
        for failure in result.failures:  # warned when it happened; kept here for cache hits
            remember(logging.WARNING, failure.message)

    def apply(self, graph: torch.fx.Graph | torch.fx.GraphModule, *, gone: Any = None,
              report: bool = True) -> Application:
        """Apply the rewrites to ``graph`` and say what became of every chain; records nothing
        in the match table (`__call__` does). ``report=False`` (diagnosis): a failing
        replacement is not warned about or kept in `failures`."""
        if isinstance(graph, torch.fx.GraphModule):
            graph = graph.graph
        if graph.owning_module is None:
            raise TypeError(f"pass {self.name}: the graph must belong to a GraphModule")
        with collector_paused():
            canonicalize(graph, self.canonicalizations)
            run = _Run(self, graph, report)
            failed_before = len(self.failures)
            try:
                run.sweep()
                result = run.result(gone)
                result.failures.extend(self.failures[failed_before:])
                return result
            finally:
                for traced in self._traced:
                    traced.forget_traces()

    def evaluate(self, traced: TracedRewrite, variant: Variant, match: Match, ctx: Context, *,
                 report: bool = True) -> tuple[Optional[str], Any]:
        """``(None, prepared replacement)`` when ``match`` should be replaced, else ``(reason, None)``.

        All fallible work happens here, before the graph is touched: typed binding,
        verification, ``check``, the replacement and its outputs' shapes and dtypes.
        """
        rewrite = traced.rewrite
        try:
            values = traced.bound_values(match, variant)
            if variant.needs_verification or not guards_hold(match, ctx):
                traced.verify(variant, match, values, ctx)
            if not rewrite.check(match):
                return f"{rewrite.name}.check() returned False", None
            prepared = traced.replacement_for(variant, match, values, ctx)
        except Skip as e:
            return str(e), None
        except Exception as e:  # noqa: BLE001 - a failing replacement is reported, never fatal
            if report:
                self._fail(rewrite.name, match, e)
            return f"replacement failed: {type(e).__name__}: {e}", None
        return None, prepared

    def observe(self, graph: torch.fx.Graph) -> dict[str, list[tuple[str, tuple[tuple[str, Any], ...]]]]:
        """The chains of each rewrite that ``graph`` holds whole (structure only), as
        ``(anchor node name, ((node name, target), ...))``: what a post-stage pass expects
        to find after Inductor's own passes ran (`PassManager`)."""
        canonicalize(graph, self.canonicalizations)
        ctx = Context(graph)
        seen: dict[str, list[tuple[str, tuple[tuple[str, Any], ...]]]] = {}
        for traced in self._traced:
            if not traced.rewrite.report_misses:
                continue
            for anchor in traced.anchors:
                for site in anchor.sites(graph):
                    for v in traced.variants:
                        if v.anchor != anchor:
                            continue
                        m = match_at(v.pattern, site, ctx)
                        if isinstance(m, Match):
                            chain = tuple((n.name, n.target) for n in m.nodes)
                            seen.setdefault(traced.name, []).append((site.name, chain))
                            break
        return seen

    def uuid(self) -> str:
        """The cache key: equal across processes that build the same pass, different otherwise.

        Each rewrite's `Rewrite.cache_state` is evaluated now, at every call: Inductor
        asks at every compile, so a state change (a layer moved to another backend)
        yields a new key instead of a stale cached graph.
        """
        watch_cache_hits()  # Inductor asks for the key before it looks the graph up
        states = [self._state(r) for r in self.rewrites]
        return digest([framework_digest(), self._class_key, self.name, self.stage, self._canon_key, *self._keys, *states])

    def _fail(self, rewrite: str, match: Match, error: BaseException) -> None:
        node = match.output_nodes()[0] if match.output_nodes() else None
        failure = Failure(self.name, rewrite, node.name if node is not None else "?", f"{type(error).__name__}: {error}")
        self.failures.append(failure)
        log.warning(failure.message)
        warnings.warn(failure.message, FusionWarning, stacklevel=3)

    def __deepcopy__(self, memo: dict) -> FusionPass:
        # torch.compile deep-copies its options; a pass is configuration, shared as it is.
        return self

    def __repr__(self) -> str:
        stage = "" if self.stage == "post" else f", stage={self.stage!r}"
        return f"FusionPass({self.name!r}, {[r.name for r in self.rewrites]}{stage})"


_HOPS: tuple[Any, ...] = ()


def _anchor_key(node: torch.fx.Node) -> tuple[Any, Any]:
    global _HOPS
    if not _HOPS:
        _HOPS = tuple(compat.auto_functionalized_ops().values())
    return node.target, (node.args[0] if node.target in _HOPS and node.args else None)


class _Run:
    """One application of a pass to one graph: the sweep, then the accounting."""

    def __init__(self, owner: FusionPass, graph: torch.fx.Graph, report: bool) -> None:
        self.owner, self.graph, self.report = owner, graph, report
        self.ctx = Context(graph)
        # Only rewrites whose anchor op the graph holds are looked at (their patterns are
        # read from the trace cache now, the first time a graph could hold their chain).
        # Nodes are found by op from the graph's own index (`find_nodes`), not by walking
        # every node of the graph once per pass.
        self._running: dict[Any, list[torch.fx.Node]] = {}
        self.by_anchor: dict[tuple[Any, Any], list[tuple[TracedRewrite, Variant]]] = {}
        for traced in owner._traced:
            if not any(self.running(a.target, a.wrapped) for a in traced.anchors):
                continue
            for v in traced.variants:
                self.by_anchor.setdefault(v.pattern.anchor_key(), []).append((traced, v))
        self.counts: dict[str, int] = {}
        self.matched: dict[str, list[Outcome]] = {}
        self.declined: dict[tuple[str, torch.fx.Node], str] = {}
        self.failed: dict[tuple[str, torch.fx.Node], MatchFailure] = {}
        self.taken: dict[str, list[Outcome]] = {}
        self.new: set[torch.fx.Node] = set()
        self.erased: set[torch.fx.Node] = set()

    def running(self, target: Any, wrapped: Any = None) -> list[torch.fx.Node]:
        """The graph's nodes that call ``target`` (wrapping ``wrapped``: an auto_functionalized op)."""
        nodes = self._running.get(target)
        if nodes is None:
            nodes = self._running[target] = self.graph.find_nodes(op="call_function", target=target, sort=False)
        return nodes if wrapped is None else [n for n in nodes if n.args and n.args[0] is wrapped]

    def sweep(self) -> None:
        """Each node running an anchor op, in graph order: of the rewrites whose chain starts
        there, the one with the longest chain (then the first registered) whose replacement
        succeeds replaces it."""
        found_at = {n for target in {t for t, _ in self.by_anchor} for n in self.running(target)}
        position = self.ctx.position
        sites = sorted((n for n in found_at if _anchor_key(n) in self.by_anchor), key=position.__getitem__)
        for node in sites:
            if node in self.erased:
                continue
            found = []
            for order, (traced, variant) in enumerate(self.by_anchor[_anchor_key(node)]):
                m = match_at(variant.pattern, node, self.ctx)
                if isinstance(m, MatchFailure):
                    key = (traced.name, node)
                    if key not in self.failed or m.depth > self.failed[key].depth:
                        self.failed[key] = m
                    continue
                found.append((-len(m.nodes), order, traced, variant, m))
            # The longest chain wins (fused_add_rms_norm + quant over fused_add_rms_norm
            # alone), then registration order; a declined match leaves the next its turn.
            for _, _, traced, variant, m in sorted(found, key=lambda f: f[:2]):
                reason, prepared = self.owner.evaluate(traced, variant, m, self.ctx, report=self.report)
                if reason is not None:
                    self.declined.setdefault((traced.name, node), reason)
                    continue
                self.splice(traced, variant, m, prepared)
                break
        if self.ctx.needs_sort:
            compat.stable_topological_sort(self.graph)

    def splice(self, traced: TracedRewrite, variant: Variant, m: Match, prepared: Any) -> None:
        chain = list(m.nodes)
        self.new.update(splice.apply(prepared, m, self.ctx))
        gone = [n for n in chain if n.graph is not self.graph or _erased(n)]
        self.erased.update(gone)
        self.counts[traced.name] = self.counts.get(traced.name, 0) + 1
        self.matched.setdefault(traced.name, []).append(Outcome(m.anchor.name, variant.form, "match"))
        for n in gone:
            for other, v in self.by_anchor.get(_anchor_key(n), ()):
                if other is not traced and not any(o.node == n.name for o in self.taken.get(other.name, ())):
                    self.taken.setdefault(other.name, []).append(
                        Outcome(n.name, v.form, "taken", f"fused into {self.owner.name}/{traced.name}"))

    def result(self, gone: Any) -> Application:
        misses: dict[str, Misses] = {}
        outcomes: dict[str, list[Outcome]] = {}
        for traced in self.owner._traced:
            chains = gone.chains.get(traced.name, ()) if gone is not None else ()
            missed = diagnosis.near_misses(traced, self, chains, gone.born if chains else frozenset())
            listed = self.matched.get(traced.name, []) + missed + self.taken.get(traced.name, [])
            outcomes[traced.name] = listed
            if missed and traced.rewrite.report_misses:
                total = len(missed) + self.counts.get(traced.name, 0)
                misses[traced.name] = Misses(traced.name, tuple(o.node for o in missed), total, missed[0].reason)
        return Application(dict(self.counts), misses, outcomes)


def _erased(node: torch.fx.Node) -> bool:
    return bool(getattr(node, "_erased", False))
