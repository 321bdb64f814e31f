"""`PassManager`: the one custom pass installed into Inductor, and `compile` that installs it."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx

from . import compat
from .cache_key import digest, framework_digest
from .fusion_pass import FusionPass


class PassManager(compat.custom_graph_pass_base()):  # type: ignore[misc]
    """Runs fusion passes in order, then a custom pass installed before it, then a cleanup tail.

    The cleanup tail removes dead code, restores topological order and lints the graph,
    so a pass that leaves debris fails here with a clear error instead of deep inside
    Inductor's lowering.

    Example:
        >>> pm = fxfuse.PassManager([fma])
        >>> torch.compile(fn, options={"post_grad_custom_post_pass": pm})
    """

    def __init__(self, passes: Sequence[FusionPass], *, cleanup: bool = True, chain: Callable[..., Any] | None = None) -> None:
        passes = list(passes)
        for p in passes:
            if not isinstance(p, FusionPass):
                raise TypeError(f"PassManager takes FusionPass objects, got {type(p).__name__}")
        names = [p.name for p in passes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"PassManager: pass names must be unique, repeated: {dupes}")
        self.passes = passes
        self.cleanup = cleanup
        self.chain = chain

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self.passes:
            p(graph)
        if self.chain is not None:
            self.chain(graph)
        if self.cleanup:
            # Sort before dead-code elimination: some releases lint inside it, and a
            # replacement may have been spliced in ahead of a constant it reads.
            compat.stable_topological_sort(graph)
            graph.eliminate_dead_code()
            graph.lint()

    def uuid(self) -> str | None:
        """The passes' keys in order, the cleanup flag, and the chained pass's key.

        A chained pass without a ``uuid()`` makes this ``None``, which tells Inductor to
        bypass its FX graph cache: without a key for that pass no cached graph is safe.
        """
        chained = ""
        if self.chain is not None:
            uuid = getattr(self.chain, "uuid", None)
            chained = uuid() if callable(uuid) else None
            if chained is None:
                return None
        return digest([framework_digest(), repr(self.cleanup), str(chained), *(p.uuid() for p in self.passes)])

    def describe(self) -> list[str]:
        """One line per stage of the pipeline, in the order they run."""
        lines = [f"{p.name}: {', '.join(r.name for r in p.rewrites) or '(no rewrites)'}" for p in self.passes]
        if self.chain is not None:
            lines.append(f"(chained) {getattr(self.chain, '__qualname__', type(self.chain).__name__)}")
        if self.cleanup:
            lines.append("cleanup: dead-code elimination, topological sort, lint")
        return lines


def _manager(passes: Sequence[FusionPass] | PassManager, existing: Any) -> PassManager:
    if isinstance(passes, PassManager):
        if existing is not None and passes.chain is None and existing is not passes:
            return PassManager(passes.passes, cleanup=passes.cleanup, chain=existing)
        return passes
    return PassManager(passes, chain=existing)


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
    mode: str | None = None,
    dynamic: bool | None = None,
) -> dict[str, Any]:
    """The ``options=`` for `torch.compile` that install ``passes`` for that compile only.

    A post-grad custom pass already installed in global Inductor config (or given as
    ``chain``) keeps running, after the fusion passes. ``mode`` adds the options that
    ``torch.compile(mode=mode)`` implies (``dynamic`` as you pass it to `torch.compile`),
    since `torch.compile` takes ``mode`` or ``options`` but not both.

    Example:
        >>> torch.compile(fn, options=fxfuse.inductor_options([fma]))
        >>> torch.compile(fn, options=fxfuse.inductor_options([fma], mode="reduce-overhead"))
    """
    options = compat.mode_options(mode, dynamic) if mode is not None else {}
    _require_post_grad_passes(options, f"mode={mode!r}")
    existing = chain if chain is not None else compat.current_custom_post_pass()
    options[compat.custom_post_pass_key()] = _manager(passes, existing)
    return options


def compile(model_or_fn: Any, *, passes: Sequence[FusionPass] | PassManager, **torch_compile_kwargs: Any) -> Any:
    """`torch.compile` with ``passes`` installed, leaving global Inductor config untouched.

    Every ``mode`` works: its options are applied together with the passes, as
    `torch.compile` would apply them, and explicit ``options`` win over the mode's.
    A post-grad custom pass in ``options`` runs after the fusion passes.

    Example:
        >>> compiled = fxfuse.compile(fn, passes=[fma])
        >>> compiled(x, y, z)
        >>> graphed = fxfuse.compile(model, passes=[fma], mode="reduce-overhead")  # CUDA graphs
    """
    backend = torch_compile_kwargs.pop("backend", "inductor")
    if backend != "inductor":
        raise ValueError(f"fxfuse.compile installs Inductor passes; backend={backend!r} is not Inductor")
    mode = torch_compile_kwargs.pop("mode", None)
    user = dict(torch_compile_kwargs.pop("options", None) or {})
    user_pass = user.pop(compat.custom_post_pass_key(), None)
    implied = compat.mode_options(mode, torch_compile_kwargs.get("dynamic")) if mode is not None else {}
    options = {**implied, **user, **inductor_options(passes, chain=user_pass)}
    _require_post_grad_passes(options, "options" if "use_post_grad_passes" in user else f"mode={mode!r}")
    return torch.compile(model_or_fn, backend="inductor", options=options, **torch_compile_kwargs)
