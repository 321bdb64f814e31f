"""`PassManager`: the custom passes installed into Inductor, and `compile` that installs them.

A compile runs fxfuse at two points. The *pre* stage (Inductor's ``joint_custom_pre_pass``)
sees the graph as Inductor receives it, before Inductor's own rewrites; it runs the
``stage="pre"`` passes, then notes, for every rewrite of the ``stage="post"`` passes, the
chains the graph holds. The *post* stage (``post_grad_custom_post_pass``) runs after
Inductor's post-grad patterns: the post passes, then the cleanup tail. A chain noted at
the pre stage that is gone by the post stage was rewritten by Inductor first (``mm`` +
bias became ``addmm``); it is counted and reported as a near miss of its rewrite, never
left silent.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx

from . import compat
from .cache_key import digest, framework_digest
from .fusion_pass import FusionPass, collector_paused, on_fresh_stack
from .schema import op_name

log = logging.getLogger("fxfuse")


def _passes_list(passes: Any, where: str) -> list[FusionPass]:
    if isinstance(passes, FusionPass):
        hint = passes.name if passes.name.isidentifier() else "the_pass"
        raise TypeError(f"{where} takes a list of passes, got the FusionPass {passes.name!r} itself; "
                        f"write passes=[{hint}]")
    try:
        out = list(passes)
    except TypeError:
        raise TypeError(f"{where} takes a list of FusionPass objects, got {type(passes).__name__}") from None
    for p in out:
        if isinstance(p, type) and issubclass(p, FusionPass):
            raise TypeError(f"{where} takes FusionPass objects, got the class {p.__name__}; write {p.__name__}()")
        if not isinstance(p, FusionPass):
            raise TypeError(f"{where} takes FusionPass objects, got {type(p).__name__}")
    return out


@dataclasses.dataclass(frozen=True)
class Observation:
    """The graph as the pre stage left it: its node names, and per post pass the chains of
    each of its rewrites that it holds whole."""

    names: frozenset[str]
    chains: dict[str, dict[str, list]]


@dataclasses.dataclass(frozen=True)
class Rewritten:
    """What Inductor's own passes did to one pass's chains between the two stages.

    ``chains``: per rewrite, ``(anchor node, [nodes gone], [all its nodes])`` of each chain
    no longer whole; ``born``: the nodes Inductor made (what remains of such a chain is
    that chain, counted once).
    """

    chains: dict[str, list[tuple[str, list[str], list[str]]]]
    born: frozenset[str]


def observe(passes: Sequence[FusionPass], graph: torch.fx.Graph) -> Observation:
    """What the post passes expect to find after Inductor's own passes ran."""
    chains = {}
    for p in passes:
        seen = p.observe(graph)
        if seen:
            chains[p.name] = seen
    return Observation(frozenset(n.name for n in graph.nodes), chains)


def vanished(seen: Observation, graph: torch.fx.Graph) -> dict[str, Rewritten]:
    """Per post pass, the chains `observe` saw that ``graph`` no longer holds whole."""
    alive = {n.name: n.target for n in graph.nodes}
    born = frozenset(alive) - seen.names
    out: dict[str, Rewritten] = {}
    for pass_name, per_rewrite in seen.chains.items():
        for rewrite, chains in per_rewrite.items():
            for anchor, nodes in chains:
                missing = [f"{name} ({op_name(t)})" for name, t in nodes if alive.get(name) is not t]
                if missing:
                    entry = out.setdefault(pass_name, Rewritten({}, born))
                    entry.chains.setdefault(rewrite, []).append((anchor, missing, [n for n, _ in nodes]))
    return out


class PassManager:
    """Runs fusion passes in order at their stages, then the cleanup tail.

    Installed as the post-grad custom pass (it is one), with `PassManager.pre_stage` as
    the pre-stage pass; `compile` and `inductor_options` install both. The cleanup tail
    removes dead code, restores topological order and lints the graph, so a pass that
    leaves debris fails here with a clear error instead of deep inside Inductor.

    Example:
        >>> pm = fxfuse.PassManager([fma])
        >>> torch.compile(fn, options=fxfuse.inductor_options(pm))
    """

    def __init__(self, passes: Sequence[FusionPass], *, cleanup: bool = True, chain: Callable[..., Any] | None = None,
                 pre_chain: Callable[..., Any] | None = None) -> None:
        # Inductor accepts custom passes that are CustomGraphPass instances; registered
        # here, not inherited, so that `import fxfuse` does not import Inductor.
        compat.register_custom_pass(PassManager, _PreStage)
        passes = _passes_list(passes, "PassManager")
        names = [p.name for p in passes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"PassManager: pass names must be unique, repeated: {dupes}")
        self.passes = passes
        self.cleanup = cleanup
        self.chain = chain
        self.pre_chain = pre_chain
        self.pre_stage = _PreStage(self)
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> chains noted at the pre stage
        self._warned = False
        #: Seconds spent in each stage over every graph so far: fxfuse's share of compiles.
        self.seconds = {"pre": 0.0, "post": 0.0}

    @property
    def pre_passes(self) -> list[FusionPass]:
        return [p for p in self.passes if p.stage == "pre"]

    @property
    def post_passes(self) -> list[FusionPass]:
        return [p for p in self.passes if p.stage == "post"]

    def run_pre(self, graph: torch.fx.Graph) -> None:
        """The pre stage: the pre passes, a chained pre-stage pass, then the chains the post
        passes expect. The pre passes' counts are recorded at the post stage, where
        Inductor keeps what a compile counted for its FX graph cache to replay."""
        if graph in self._seen:
            return  # torch 2.9 runs Inductor's joint-graph passes, and so this hook, twice a graph
        t0 = time.perf_counter()
        # fxfuse's own work on a fresh stack; a chained pass on the caller's thread, which
        # holds Inductor's thread-local state (`V.fake_mode`, the tracing context) it may read.
        with collector_paused():
            results = on_fresh_stack(lambda: [(p, p.apply(graph)) for p in self.pre_passes])
            if self.pre_chain is not None:
                self.pre_chain(graph)
            self._seen[graph] = (results, on_fresh_stack(observe, self.post_passes, graph))
        self.seconds["pre"] += time.perf_counter() - t0

    def __call__(self, graph: torch.fx.Graph) -> None:
        """The post stage (and, where the pre stage was not installed, the pre passes first)."""
        t0 = time.perf_counter()
        try:
            with collector_paused():
                on_fresh_stack(self._post, graph)
                if self.chain is not None:
                    self.chain(graph)  # on the caller's thread, as in `run_pre`
                if self.cleanup:
                    # Sort before dead-code elimination: some releases lint inside it, and a
                    # replacement may have been spliced in ahead of a constant it reads.
                    compat.stable_topological_sort(graph)
                    graph.eliminate_dead_code()
                    graph.lint()
        finally:
            self.seconds["post"] += time.perf_counter() - t0

    def _post(self, graph: torch.fx.Graph) -> None:
        results, seen = self._seen.pop(graph, ([], None))
        for p, result in results:
            p.record(result)
        if seen is None and self.pre_passes:  # the pre stage did not run
            if not self._warned:
                self._warned = True
                log.warning("fxfuse: the pre stage was not installed (use fxfuse.compile or fxfuse.inductor_options); "
                            "passes %s run after Inductor's own rewrites instead",
                            ", ".join(p.name for p in self.pre_passes))
            for p in self.pre_passes:
                p(graph)
        gone = vanished(seen, graph) if seen is not None else {}
        for p in self.post_passes:
            p(graph, gone=gone.get(p.name))

    def uuid(self) -> str | None:
        """The passes' keys in order (each with its stage), the cleanup flag, and the chained passes' keys.

        A chained pass without a ``uuid()`` makes this ``None``, which tells Inductor to
        bypass its FX graph cache: without a key for that pass no cached graph is safe.
        """
        chained = []
        for c in (self.chain, self.pre_chain):
            if c is None:
                chained.append("")
                continue
            uuid = getattr(c, "uuid", None)
            key = uuid() if callable(uuid) else None
            if key is None:
                return None
            chained.append(str(key))
        return digest([framework_digest(), repr(self.cleanup), *chained, *(p.uuid() for p in self.passes)])

    def describe(self) -> list[str]:
        """One line per stage of the pipeline, in the order they run."""
        lines = []
        for p in self.pre_passes:
            lines.append(f"{p.name} (before Inductor's rewrites): {', '.join(r.name for r in p.rewrites) or '(no rewrites)'}")
        if self.pre_chain is not None:
            lines.append(f"(chained, pre stage) {getattr(self.pre_chain, '__qualname__', type(self.pre_chain).__name__)}")
        lines += [f"{p.name}: {', '.join(r.name for r in p.rewrites) or '(no rewrites)'}" for p in self.post_passes]
        if self.chain is not None:
            lines.append(f"(chained) {getattr(self.chain, '__qualname__', type(self.chain).__name__)}")
        if self.cleanup:
            lines.append("cleanup: dead-code elimination, topological sort, lint")
        return lines

    def __deepcopy__(self, memo: dict) -> PassManager:
        # torch.compile deep-copies its options; the manager is configuration, shared as it
        # is (copying would also copy every traced pattern, and warn about pytree specs).
        return self


class _PreStage:
    """The pre-stage half of a `PassManager`, installed as ``joint_custom_pre_pass``."""

    def __init__(self, manager: PassManager) -> None:
        self.manager = manager

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.manager.run_pre(graph)

    def uuid(self) -> str | None:
        return self.manager.uuid()

    def __deepcopy__(self, memo: dict) -> _PreStage:
        return self


def _manager(passes: Sequence[FusionPass] | PassManager, existing: Any, existing_pre: Any = None) -> PassManager:
    """``passes`` as a manager that also runs the custom passes installed before it."""
    if not isinstance(passes, PassManager):
        return PassManager(_passes_list(passes, "fxfuse"), chain=existing, pre_chain=existing_pre)
    chain = passes.chain if passes.chain is not None or existing is passes else existing
    pre_chain = passes.pre_chain if passes.pre_chain is not None or existing_pre is passes.pre_stage else existing_pre
    if chain is passes.chain and pre_chain is passes.pre_chain:
        return passes
    return PassManager(passes.passes, cleanup=passes.cleanup, chain=chain, pre_chain=pre_chain)


def _require_post_grad_passes(options: dict[str, Any], source: str) -> None:
    """Raise unless a compile with ``options`` (set by ``source``) runs the post-grad custom pass.

    Some modes ("lite") switch Inductor's post-grad stage off, and fxfuse's passes with it.
    """
    if compat.post_grad_passes_enabled(options):
        return
    culprit = source if "use_post_grad_passes" in options else "Inductor's global config"
    raise ValueError(
        f"fxfuse: {culprit} turns Inductor's post-grad passes off (use_post_grad_passes=False); "
        "fxfuse's passes run there, so the compile would fuse nothing"
    )


def inductor_options(
    passes: Sequence[FusionPass] | PassManager,
    *,
    chain: Any = None,
    pre_chain: Any = None,
    mode: str | None = None,
    dynamic: bool | None = None,
) -> dict[str, Any]:
    """The ``options=`` for `torch.compile` that install ``passes`` for that compile only.

    Custom passes already installed in global Inductor config (or given as ``chain``,
    ``pre_chain``) keep running, after the fusion passes of their stage. ``mode`` adds the
    options that ``torch.compile(mode=mode)`` implies (``dynamic`` as you pass it to
    `torch.compile`), since `torch.compile` takes ``mode`` or ``options`` but not both.

    Example:
        >>> torch.compile(fn, options=fxfuse.inductor_options([fma]))
        >>> torch.compile(fn, options=fxfuse.inductor_options([fma], mode="reduce-overhead"))
    """
    options = compat.mode_options(mode, dynamic) if mode is not None else {}
    _require_post_grad_passes(options, f"mode={mode!r}")
    existing = chain if chain is not None else compat.current_custom_post_pass()
    existing_pre = pre_chain if pre_chain is not None else compat.current_custom_pre_pass()
    manager = _manager(passes, existing, existing_pre)
    options[compat.custom_post_pass_key()] = manager
    options[compat.custom_pre_pass_key()] = manager.pre_stage
    return options


def compile(model_or_fn: Any, *, passes: Sequence[FusionPass] | PassManager, **torch_compile_kwargs: Any) -> Any:
    """`torch.compile` with ``passes`` installed, leaving global Inductor config untouched.

    Every ``mode`` works: its options are applied together with the passes, as
    `torch.compile` would apply them, and explicit ``options`` win over the mode's.
    Custom passes in ``options`` run after the fusion passes of their stage.

    Example:
        >>> compiled = fxfuse.compile(fn, passes=[fma])
        >>> compiled(x, y, z)
        >>> graphed = fxfuse.compile(model, passes=[fma], mode="reduce-overhead")  # CUDA graphs
    """
    if not isinstance(passes, PassManager):
        passes = _passes_list(passes, "fxfuse.compile")
    backend = torch_compile_kwargs.pop("backend", "inductor")
    if backend != "inductor":
        raise ValueError(f"fxfuse.compile installs Inductor passes; backend={backend!r} is not Inductor")
    mode = torch_compile_kwargs.pop("mode", None)
    user = dict(torch_compile_kwargs.pop("options", None) or {})
    user_pass = user.pop(compat.custom_post_pass_key(), None)
    user_pre = user.pop(compat.custom_pre_pass_key(), None)
    implied = compat.mode_options(mode, torch_compile_kwargs.get("dynamic")) if mode is not None else {}
    options = {**implied, **user, **inductor_options(passes, chain=user_pass, pre_chain=user_pre)}
    _require_post_grad_passes(options, "options" if "use_post_grad_passes" in user else f"mode={mode!r}")
    return torch.compile(model_or_fn, backend="inductor", options=options, **torch_compile_kwargs)
