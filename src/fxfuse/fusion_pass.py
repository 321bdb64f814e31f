"""`FusionPass`: a named set of rewrites applied to a post-grad FX graph."""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from typing import Any, Iterable

import torch
import torch.fx

from . import compat, diagnosis
from .match_table import record, record_miss
from .cache_key import canonicalization_key, class_key, digest, framework_digest, rewrite_key, stable_repr
from .canonicalize import DEFAULT_CANONICALIZATIONS, Canonicalization, canonicalize, restore_custom_op_defaults
from .rewrite import Rewrite, RewriteError
from .tracing import TracedRewrite, Variant, _Skip, output_metas, tensor_meta

log = logging.getLogger("fxfuse")


class FusionWarning(UserWarning):
    """A match whose replacement failed; the graph was left as it was."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """A replacement that could not be made, and why."""

    pass_name: str
    rewrite: str
    node: str
    error: str


@dataclasses.dataclass(frozen=True)
class Misses:
    """The sites of one rewrite that one application of a pass left unreplaced."""

    rewrite: str
    sites: tuple[str, ...]  # node names, in graph order
    total: int  # sites of the rewrite's anchor op before the pass ran
    first_reason: str


class _Entry(compat.PatternEntry):
    """One search pattern in Inductor's matcher; prepares in `extra_check`, splices in `apply`."""

    def __init__(self, owner: FusionPass, traced: TracedRewrite, variant: Variant) -> None:
        self.owner, self.traced, self.variant = owner, traced, variant
        self.pattern = variant.pattern
        self.extra_check = self.prepare

    def evaluate(self, match: compat.Match, *, report: bool = True) -> str | None:
        """None when the match should be replaced, else the reason it should not.

        On success the traced replacement is stored on the match, so all fallible work
        happens here, before the graph is touched. ``report=False`` (diagnosis: explain,
        miss reasons) returns a failed replacement's reason without recording a failure.
        """
        traced, rewrite = self.traced, self.traced.rewrite
        try:
            values = traced.bound_values(match)
            if self.variant.needs_verification:
                traced.verify(self.variant, match, values)
            if not rewrite.check(match):
                return f"{rewrite.name}.check() returned False"
            repl = traced.replacement_for(self.variant, values)
            want = [tensor_meta(n) for n in match.output_nodes()]
            got = output_metas(repl)
            if want != got:
                raise RewriteError(f"replacement outputs {got} differ from the matched outputs {want}")
        except _Skip as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - a failing replacement is reported, never fatal
            if report:
                self.owner._fail(rewrite.name, match, e)
            return f"replacement failed: {type(e).__name__}: {e}"
        match.replacement_graph = repl
        return None

    def prepare(self, match: compat.Match) -> bool:
        reason = self.evaluate(match)
        if reason is not None:  # kept, so a near miss at these nodes can say why
            for node in match.nodes:
                self.owner._declined.setdefault((self.traced.name, node), reason)
        return reason is None

    def apply(self, match: compat.Match, graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        args = [match.kwargs[a.name] for a in self.traced.args]
        try:
            compat.replace_with_graph(match, graph, match.replacement_graph, args)
        except Exception as e:  # noqa: BLE001
            self.owner._fail(self.traced.name, match, e)
            return
        self.owner._count(self.traced.name)


class FusionPass:
    """A named set of rewrites; calling it on a graph applies them and counts the matches.

    Example:
        >>> fma = fxfuse.FusionPass("fma_fusion", [MulAddToFma()])
        >>> fma(gm.graph)          # number of replacements made
        1
        >>> fma.uuid()             # the cache key Inductor sees
        '3f1c...'
    """

    def __init__(
        self,
        name: str,
        rewrites: Iterable[Rewrite] = (),
        *,
        canonicalize: Iterable[Canonicalization] = DEFAULT_CANONICALIZATIONS,
    ) -> None:
        if not isinstance(name, str) or not name or "|" in name:
            raise RewriteError(f"a FusionPass needs a non-empty name without '|', got {name!r}")
        self.name = name
        self.rewrites: list[Rewrite] = []
        self.canonicalizations = tuple(canonicalize)
        self.failures: list[Failure] = []
        self.last_counts: dict[str, int] = {}
        self.last_misses: dict[str, Misses] = {}
        self._traced: list[TracedRewrite] = []
        self._keys: list[str] = []
        self._declined: dict[tuple[str, torch.fx.Node], str] = {}
        self._matcher = compat.PatternMatcherPass(pass_name=f"fxfuse:{name}")
        self._canon_key = canonicalization_key(self.canonicalizations)
        self._class_key = class_key(type(self))
        for rewrite in rewrites:
            self.register(rewrite)

    def register(self, rewrite: Rewrite) -> None:
        """Trace ``rewrite`` once into its search patterns; raises `RewriteError` if it cannot.

        A second instance of a class already in the pass is registered under the name
        ``ClassName(param=value, ...)`` (a copy carries it; ``rewrite`` is not changed).

        Example:
            >>> p = fxfuse.FusionPass("mine"); p.register(MulAddToFma())
        """
        if not isinstance(rewrite, Rewrite):
            raise RewriteError(f"pass {self.name}: {rewrite!r} is not an fxfuse.Rewrite")
        rewrite = self._named(rewrite)
        self._state(rewrite)  # an unrepresentable cache_state() fails here, not inside Inductor
        traced = TracedRewrite(rewrite, self.canonicalizations)
        for variant in traced.variants:
            _Entry(self, traced, variant).register(self._matcher)
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

    def __call__(self, graph: torch.fx.Graph | torch.fx.GraphModule) -> int:
        """Apply the rewrites to ``graph`` in place; returns the number of replacements.

        Also counts the near misses (`fxfuse.miss_table`) and logs, at INFO on the
        ``fxfuse`` logger, each rewrite that has some, with the first reason.
        """
        if isinstance(graph, torch.fx.GraphModule):
            graph = graph.graph
        if graph.owning_module is None:
            raise TypeError(f"pass {self.name}: the graph must belong to a GraphModule")
        self.last_counts, self.last_misses, self._declined = {}, {}, {}
        canonicalize(graph, self.canonicalizations)
        watched = [t for t in self._traced if t.rewrite.report_misses]
        sites = {t.name: diagnosis.sites(t, graph) for t in watched}
        try:
            self._matcher.apply(graph)
            for rewrite, n in self.last_counts.items():
                record(self.name, rewrite, n)
            self._count_misses(graph, watched, sites)
        finally:
            restore_custom_op_defaults(graph)  # the call form Inductor lowers
            self._declined = {}
            for traced in self._traced:
                traced.forget_traces()
        return sum(self.last_counts.values())

    def _count_misses(self, graph: torch.fx.Graph, watched: list[TracedRewrite], sites: dict) -> None:
        alive = set(graph.nodes)
        regions = None
        for traced in watched:
            missed = [n for n in sites[traced.name] if n in alive]
            if not missed:
                continue
            record_miss(self.name, traced.name, len(missed))
            reason = self._declined.get((traced.name, missed[0]))
            if reason is None:
                regions = regions or compat.mutation_region_ids(graph)
                entry = lambda v, m, t=traced: _Entry(self, t, v).evaluate(m, report=False)  # noqa: E731
                reason = diagnosis.why_not(traced, missed[0], entry, regions) or "matched only after the pass ran"
            misses = Misses(traced.name, tuple(n.name for n in missed), len(sites[traced.name]), reason)
            self.last_misses[traced.name] = misses
            log.info("fxfuse: %s/%s missed %d of %d site(s); first at %s: %s", self.name, traced.name,
                     len(missed), misses.total, misses.sites[0], reason)

    def uuid(self) -> str:
        """The cache key: equal across processes that build the same pass, different otherwise.

        Each rewrite's `Rewrite.cache_state` is evaluated now, at every call: Inductor
        asks at every compile, so a state change (a layer moved to another backend)
        yields a new key instead of a stale cached graph.
        """
        states = [self._state(r) for r in self.rewrites]
        return digest([framework_digest(), self._class_key, self.name, self._canon_key, *self._keys, *states])

    def _count(self, rewrite: str) -> None:
        self.last_counts[rewrite] = self.last_counts.get(rewrite, 0) + 1

    def _fail(self, rewrite: str, match: compat.Match, error: BaseException) -> None:
        node = match.output_nodes()[0]
        failure = Failure(self.name, rewrite, node.name if node is not None else "?", f"{type(error).__name__}: {error}")
        self.failures.append(failure)
        msg = f"fxfuse: {self.name}/{rewrite} left the match at {failure.node} unreplaced: {failure.error}"
        log.warning(msg)
        warnings.warn(msg, FusionWarning, stacklevel=2)

    def __repr__(self) -> str:
        return f"FusionPass({self.name!r}, {[r.name for r in self.rewrites]})"
