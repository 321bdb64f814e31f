"""Every difference between the supported torch releases (2.9 to 2.15) lives here.

The rest of fxfuse imports Inductor internals only through this module, so a torch
upgrade that moves or renames something breaks in one place. Branches test for the
feature (a parameter, an attribute) rather than the version string where they can,
because nightlies and vendor builds carry version strings that lie.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx

# The releases this code is tested on (scripts/test-torch.sh runs each; docs/compat.md).
SUPPORTED = ((2, 9), (2, 15))


def release(version: str) -> tuple[int, int]:
    """The ``(major, minor)`` release of a torch version string.

    Local and pre-release parts are dropped: a CUDA or ROCm build and a nightly of a
    release are that release.

    >>> release("2.9.1+rocm6.4"), release("2.15.0a0+git3f1c2d")
    ((2, 9), (2, 15))
    """
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) if len(parts) > 1 else "")
    except ValueError:
        raise ValueError(f"cannot read a torch release from the version string {version!r}") from None


TORCH_VERSION: tuple[int, int] = release(torch.__version__)


def stable_topological_sort(graph: torch.fx.Graph) -> None:
    """Reorder ``graph`` so every node comes after its inputs, moving as little as possible."""
    from torch._inductor.pattern_matcher import stable_topological_sort as sort

    sort(graph)


def check_torch_version(version: str | None = None) -> None:
    """Raise a clear ImportError when ``version`` (default: the installed torch) is outside
    the supported releases.

    >>> check_torch_version("2.15.0")        # fine
    >>> check_torch_version("2.16.0")
    Traceback (most recent call last):
    ImportError: fxfuse 0.1.0 supports torch 2.9 to 2.15; found torch 2.16.0 ...
    """
    version = torch.__version__ if version is None else version
    lo, hi = SUPPORTED
    if not (lo <= release(version) <= hi):
        from . import __version__

        raise ImportError(
            f"fxfuse {__version__} supports torch {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}; found torch {version} "
            f"(at {torch.__file__}). Install a supported release, e.g. pip install 'torch>={lo[0]}.{lo[1]},<"
            f"{hi[0]}.{hi[1] + 1}'"
        )


# --------------------------------------------------------------------------- tracing


def fake_mode() -> Any:
    """A fresh fake-tensor mode that lets CPU-traced patterns carry any device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def new_fake_tensor(mode: Any, shape: Sequence[Any], stride: Sequence[Any], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """A fresh fake tensor of ``mode`` (its own storage), made without dispatching through
    the mode: at symbolic sizes that dispatch (argument hashing, the fake-op cache, the
    output rebuilt from it) costs 2.5x the tensor itself, ~0.45 ms, and a pass applying
    one replacement per layer makes hundreds. Call it outside ``mode``.
    ``FakeTensor(mode, meta tensor, device)`` is the same constructor in torch 2.9 to 2.15.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    meta = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    return FakeTensor(mode, meta, device)


def trace_functional(fn: Callable[..., Any], args: Sequence[Any], *, v2: bool) -> torch.fx.GraphModule:
    """Trace ``fn`` as Inductor's post-grad graph would hold it: functionalized.

    A mutating custom op called as the user calls it comes out as
    ``auto_functionalized`` (``v2=False``) or ``auto_functionalized_v2`` (``v2=True``),
    the two forms Inductor produces depending on ``enable_auto_functionalized_v2``.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.post_grad import remove_noop_ops
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    with inductor_config.patch(enable_auto_functionalized_v2=v2), torch.no_grad():
        from torch._dispatch.python import enable_python_dispatcher
        from torch.fx.traceback import preserve_node_meta

        with enable_python_dispatcher(), preserve_node_meta():
            gm = make_fx(dispatch_functionalize(fn), select_decomp_table(), tracing_mode="real")(*args)
    remove_noop_ops(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


# --------------------------------------------------------------------------- auto_functionalized


def decide_statically(expr: Any, shape_env: Any) -> bool | None:
    """True/False where ``shape_env`` proves a size condition over its symbols from what
    the compiled graph already assumes (each symbol's range: a dynamic size is >= 2 where
    0 and 1 are specialized), None where it cannot; no guard is added.

    >>> decide_statically(sympy.Ne(s0, 1), graph_shape_env)  # doctest: +SKIP
    True
    """
    if shape_env is None:
        return None
    import sympy

    try:
        # Private, with the same signature from 2.9 through 2.15 (the version tests check it).
        value = shape_env._maybe_evaluate_static(expr)
    except Exception:  # noqa: BLE001 - an expression it cannot evaluate is undecided
        return None
    if value is None:
        return None
    if value == sympy.true:
        return True
    if value == sympy.false:
        return False
    return None


@functools.cache
def auto_functionalized_ops() -> dict[str, Any]:
    """The higher-order ops that wrap a mutating custom op in a functional graph (the
    same objects for the process: asked at every node a pass visits)."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

    return {"v1": auto_functionalized, "v2": auto_functionalized_v2}


# --------------------------------------------------------------------------- Inductor config


def custom_post_pass_key() -> str:
    """The Inductor option of the custom pass that runs after Inductor's post-grad patterns."""
    return "post_grad_custom_post_pass"


def custom_pre_pass_key() -> str:
    """The Inductor option of the custom pass that sees the graph as Inductor receives it:
    before its joint-graph passes (which already rewrite ``softmax(x * s)``) and before its
    post-grad patterns (which make ``addmm`` of ``mm + bias``)."""
    return "joint_custom_pre_pass"


def current_custom_post_pass() -> Any:
    """The post-grad custom pass installed in global Inductor config, as one pass (or None)."""
    from torch._inductor import config

    return one_custom_pass(getattr(config, custom_post_pass_key(), None))


def current_custom_pre_pass() -> Any:
    """The pre-stage custom pass installed in global Inductor config, as one pass (or None)."""
    from torch._inductor import config

    return one_custom_pass(getattr(config, custom_pre_pass_key(), None))


def custom_graph_pass_base() -> type:
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


def register_custom_pass(*classes: type) -> None:
    """Make instances of ``classes`` Inductor custom passes (virtual subclasses of its
    ``CustomGraphPass`` ABC), without importing Inductor until a pass is built."""
    base = custom_graph_pass_base()
    for cls in classes:
        if not issubclass(cls, base):
            base.register(cls)


def one_custom_pass(setting: Any) -> Any:
    """A custom-pass setting as one pass: None, the pass itself, or the passes of a list
    run in order.

    From torch 2.13 Inductor's custom-pass settings also take a list of passes (2.9 to
    2.12: one pass); fxfuse chains whatever the user installed as a single callable
    with a single ``uuid()``, on every release.

    >>> one_custom_pass([p1, p2])(graph)     # runs p1, then p2
    >>> one_custom_pass([p1, p2]).uuid()     # (p1.uuid(), p2.uuid()); None if either has none
    """
    if not isinstance(setting, (list, tuple)):
        return setting
    passes = [p for p in setting if p is not None]
    if len(passes) <= 1:
        return passes[0] if passes else None
    return _CustomPassList(passes)


class _CustomPassList:
    """Passes run in order, keyed together. Only ever chained inside fxfuse's
    `PassManager` (the `CustomGraphPass` Inductor sees), so it needs no base class."""

    def __init__(self, passes: Sequence[Callable[[torch.fx.Graph], Any]]) -> None:
        self.passes = tuple(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Any:
        # Without a key for every pass no cached graph is safe: None bypasses the cache.
        keys = tuple(p.uuid() if callable(getattr(p, "uuid", None)) else None for p in self.passes)
        return None if any(k is None for k in keys) else keys


# --------------------------------------------------------------------------- counters


def inductor_counters() -> Counter:
    """Inductor's counter table; FX-graph-cache hits replay its per-compile deltas.

    That replay (``counters["inductor"] += graph.counter_deltas`` on a hit) is what
    lets fxfuse report matches for graphs whose passes never ran in this process.
    """
    from torch._dynamo.utils import counters

    return counters["inductor"]


class _ReplayingCounter(Counter):
    """Inductor's counter table, whose ``+=`` (only a cache hit adds a whole Counter to it:
    fxfuse and Inductor count key by key) is also told to the replay listeners."""

    listeners: tuple[Callable[[Counter], None], ...] = ()

    def __iadd__(self, other: Counter) -> Counter:  # type: ignore[override]
        result = super().__iadd__(other)
        for listener in self.listeners:
            listener(other)
        return result


def on_cache_replay(listener: Callable[[Counter], None]) -> None:
    """Call ``listener(deltas)`` whenever Inductor serves a graph from its FX graph cache.

    A hit runs no pass, so what a pass said while it compiled the graph (a near miss, a
    failed replacement) would be said only by the process that compiled it. The one act of
    a hit that reaches fxfuse is ``counters["inductor"] += graph.counter_deltas`` (the same
    line in torch 2.9 to 2.15): the table is made a Counter whose ``+=`` also calls the
    listeners. Cheap and idempotent; called at every compile (a pass's key is asked for
    before the cache is looked up), since a test harness may clear Dynamo's counters and
    with them this table.
    """
    from torch._dynamo.utils import counters

    table = counters["inductor"]
    if type(table) is not _ReplayingCounter:
        table = counters["inductor"] = _ReplayingCounter(table)
    if listener not in _ReplayingCounter.listeners:
        _ReplayingCounter.listeners += (listener,)


# --------------------------------------------------------------------------- op registration


_LIBRARIES: dict[str, Any] = {}


def define_mutating_op(qualname: str, schema: str, impl: Callable[..., Any], fake: Callable[..., Any]) -> Any:
    """Register a custom op that mutates some of its arguments; returns its OpOverload.

    ``torch.library.custom_op`` wraps a mutating op in an ADInplaceOrView kernel that, in
    torch 2.9 to 2.12, indexes the mutated arguments positionally without filling
    defaults, so ``op(q, k, v, out, name)`` raises IndexError when a later mutable
    argument is left at its default (2.13 fills them). Defining the op on a `torch.library.Library` directly
    skips that wrapper on every release: the version counter bump it would add is not
    needed by inference graphs, and functionalization (`auto_functionalized`) reads the
    alias annotations from the schema either way.
    """
    namespace, name = qualname.split("::")
    lib = _LIBRARIES.get(namespace)
    if lib is None:
        lib = _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")  # noqa: TOR901
    lib.define(name + schema)
    lib.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=lib)
    return getattr(getattr(torch.ops, namespace), name).default


# --------------------------------------------------------------------------- reading tensor data


def has_readable_data(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read here (``t.item()``) without tracing breaking.

    False while ``torch.compile`` traces (Dynamo folds ``is_compiling()`` to True, so the
    rest is never traced), and for tensors that hold no data of their own: fake and
    meta tensors (fake impls, pattern tracing) and functionalization or functorch
    wrappers (AOT tracing). An op's real implementation gets plain tensors, so a check
    skipped at trace time still runs when the compiled graph calls the op.

    >>> has_readable_data(torch.ones(1)), has_readable_data(torch.ones(1, device="meta"))
    (True, False)
    """
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    if torch.compiler.is_compiling():
        return False
    if t.device.type == "meta" or is_fake(t) or isinstance(t, FunctionalTensor):
        return False
    return not (torch._is_functional_tensor(t) or torch._C._functorch.is_functorch_wrapped_tensor(t))


# --------------------------------------------------------------------------- block-scaled FP8 GEMM


def _blockwise_scaled_mm_call(
    a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    F = torch.nn.functional
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        # Releases with the explicit-recipe API: say which scaling is meant.
        recipe = F.ScalingType
        return F.scaled_mm(a, b, scale_a, recipe.BlockWise1x128, scale_b, recipe.BlockWise128x128,
                           output_dtype=out_dtype)
    # Older releases infer the recipe from the scale shapes ([M, K/128] and [K/128, N/128]).
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def blockwise_fp8_scaled_mm(
    a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``a @ b`` on FP8 tensor cores with DeepSeek-style block scales.

    ``a`` is ``[M, K]`` row-major FP8 with 1x128 scales ``scale_a [M, K/128]`` stored
    column-major (strides ``(1, M)``); ``b`` is ``[K, N]`` column-major FP8 (a weight
    ``[N, K]`` transposed) with 128x128 scales ``scale_b [K/128, N/128]``, the transpose
    of a row-major ``[N/128, K/128]`` whose rows are padded to a multiple of 4. Only call
    it where `blockwise_fp8_scaled_mm_supported` says so.

    >>> out = blockwise_fp8_scaled_mm(x_q, w_q.t(), x_scales, w_scales.t(), torch.bfloat16)  # doctest: +SKIP
    """
    return _blockwise_scaled_mm_call(a, b, scale_a, scale_b, out_dtype)


_BLOCKWISE_SUPPORT: dict[int, bool] = {}


def blockwise_fp8_scaled_mm_supported(device: torch.device) -> bool:
    """Whether `blockwise_fp8_scaled_mm` works on this CUDA device with this torch build.

    It depends on the release, the CUDA/cuBLAS version and the GPU (Hopper with cuBLAS
    12.9+ at the time of writing), and the scale layouts it wants are not documented, so
    this runs it once per device on a small odd problem with distinct power-of-two scales
    and compares with an fp32 computation: a release that rejects it, or reads the scales
    in another layout, answers False. Not cached while a CUDA graph is being captured
    (the probe synchronizes), where it answers False.

    >>> blockwise_fp8_scaled_mm_supported(torch.device("cpu"))
    False
    """
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _BLOCKWISE_SUPPORT:
        if torch.cuda.is_current_stream_capturing():
            return False
        _BLOCKWISE_SUPPORT[index] = _probe_blockwise_scaled_mm(torch.device("cuda", index))
    return _BLOCKWISE_SUPPORT[index]


def _probe_blockwise_scaled_mm(device: torch.device) -> bool:
    m, k, n = 3, 384, 256
    kb, nb, kb_pad = k // 128, n // 128, 4
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=gen).to(torch.float8_e4m3fn)
    w = torch.randn(n, k, device=device, generator=gen).to(torch.float8_e4m3fn)
    # Exact powers of two, all different, so any layout mix-up changes the product.
    pow2 = lambda *shape: torch.exp2(torch.randint(-3, 4, shape, device=device, generator=gen).float())  # noqa: E731
    scale_a = pow2(kb, m).t()  # [m, kb], column-major
    scale_w = pow2(nb, kb_pad)[:, :kb]  # [nb, kb], rows padded to 4
    try:
        out = _blockwise_scaled_mm_call(a, w.t(), scale_a, scale_w.t(), torch.bfloat16)
        torch.cuda.synchronize(device)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    a_f = a.float() * scale_a.repeat_interleave(128, 1)
    w_f = w.float() * scale_w.repeat_interleave(128, 0).repeat_interleave(128, 1)
    ref = a_f @ w_f.t()
    return tuple(out.shape) == (m, n) and bool(torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max())))


# --------------------------------------------------------------------------- compile modes, isolated compiles, caches


def mode_options(mode: str, dynamic: bool | None = None) -> dict[str, Any]:
    """The Inductor options that ``torch.compile(mode=mode)`` applies, as an ``options=`` dict.

    ``torch.compile`` refuses ``mode`` and ``options`` together, and fxfuse needs
    ``options`` to install its pass for one compile only; so it asks Inductor what a mode
    means and passes that as options instead (torch does the same internally).

    >>> mode_options("reduce-overhead")
    {'triton.cudagraphs': True}
    """
    from torch._inductor import list_mode_options

    known = list_mode_options()
    if mode not in known:
        raise ValueError(f"unknown torch.compile mode {mode!r}; known modes: {', '.join(sorted(known))}")
    if "dynamic" in inspect.signature(list_mode_options).parameters:
        return dict(list_mode_options(mode, dynamic))
    return dict(list_mode_options(mode))  # pragma: no cover - releases without the parameter


def post_grad_passes_enabled(options: dict[str, Any]) -> bool:
    """Whether a compile with these Inductor ``options`` runs the post-grad custom pass.

    Some modes (``"lite"``) turn Inductor's post-grad stage off, and fxfuse's passes with it.
    """
    return bool(options.get("use_post_grad_passes", getattr(torch._inductor.config, "use_post_grad_passes", True)))


def compile_isolated(fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``torch.compile(fn, **kwargs)`` whose Dynamo cache entries are its own.

    Dynamo caches compiled frames on the code objects they run, shared by every
    ``torch.compile`` of the same function, and one code object's entries count against
    one recompile limit. A throw-away compile (``fxfuse.explain``) must neither reset
    that cache nor eat into the limit of the user's own compiles of ``fn``: where
    ``torch.compile`` takes ``isolate_recompiles`` its entries go to a region of their
    own. Older releases lack it; there the compile starts from a fresh entry function
    (a code object no one else runs), so a function that compiles into one graph leaves
    the user's entries and limit alone (frames compiled after a graph break inside
    ``fn`` still share them).
    """
    # An already compiled module or function: compile what it wraps (the inner compile
    # would otherwise take over its frames, with its own backend).
    if isinstance(fn, torch._dynamo.eval_frame.OptimizedModule):
        fn = fn._orig_mod
    else:
        fn = getattr(fn, "_torchdynamo_orig_callable", fn)
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        return torch.compile(fn, isolate_recompiles=True, **kwargs)

    def entry(*args: Any, **kw: Any) -> Any:  # pragma: no cover - releases before isolate_recompiles
        return fn(*args, **kw)

    entry.__code__ = entry.__code__.replace()  # an equal but distinct code object: a cache of its own
    return torch.compile(entry, **kwargs)


@contextlib.contextmanager
def compile_caches_disabled() -> Iterator[None]:
    """Within the block, every compile runs from scratch: no FX graph, AOTAutograd,
    autotuning or profile-guided cache is read or written.

    For timing compiles against each other: a variant served from a cache (because an
    earlier run compiled it) would otherwise look faster than one that was not.
    """
    compiler_config = getattr(torch.compiler, "config", None)
    if compiler_config is not None and hasattr(compiler_config, "force_disable_caches"):
        patch = compiler_config.patch(force_disable_caches=True)
    else:  # pragma: no cover - releases where the switch lived in Inductor's config
        patch = torch._inductor.config.patch(force_disable_caches=True)
    with patch, warnings.catch_warnings():
        # Dynamo warns once that the switch also turns its profile-guided cache off: intended here.
        warnings.filterwarnings("ignore", message=".*force disabled by .*force_disable_caches")
        yield


# --------------------------------------------------------------------------- process groups, symmetric memory
#
# c10d keeps its registry of process groups in private tables, and symmetric memory is a
# private module whose API moved between releases (group names became optional when
# allocating, `enable_symm_mem_for_group` became unnecessary and deprecated); fxfuse's
# all-reduce ops and pass read both through these functions only.


def process_group_names() -> list[str]:
    """The names (``ProcessGroup.group_name``) of the process groups of this process, sorted.

    Empty where torch.distributed is unavailable or not initialized.

    >>> process_group_names()  # doctest: +SKIP  (after init_process_group and one new_group)
    ['0', '1']
    """
    import torch.distributed as dist

    if not dist.is_available():
        return []
    from torch.distributed import distributed_c10d as c10d

    return sorted(c10d._world.pg_names.values())


def resolve_process_group(name: str) -> Any:
    """The process group of this process named ``name``, or None.

    >>> resolve_process_group("no such group") is None
    True
    """
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(name, str):
        return None
    from torch.distributed import distributed_c10d as c10d

    return next((pg for pg, pg_name in c10d._world.pg_names.items() if pg_name == name), None)


def process_group_backends(group: Any) -> dict[str, str]:
    """The backend of ``group`` for each device type it serves: ``{"cpu": "gloo", "cuda": "nccl"}``.

    >>> process_group_backends(dist.group.WORLD)  # doctest: +SKIP  (a gloo world)
    {'cpu': 'gloo', 'cuda': 'gloo'}
    """
    import torch.distributed as dist

    config = str(dist.get_backend_config(group))  # "cpu:gloo,cuda:nccl", or one name for every device
    if ":" not in config:
        return {device: config for device in ("cpu", "cuda")}
    return dict(sorted(tuple(part.split(":", 1)) for part in config.split(",")))  # type: ignore[misc]


def symmetric_memory() -> Any:
    """torch's symmetric-memory module where it has what fxfuse's all-reduce kernels use
    (``empty``, ``rendezvous``, handles with device arrays of the peers' buffer and signal-pad
    pointers), else None.

    >>> symmetric_memory() is None or hasattr(symmetric_memory(), "rendezvous")
    True
    """
    try:
        import torch.distributed._symmetric_memory as symm_mem
        from torch._C._distributed_c10d import _SymmetricMemory
    except ImportError:
        return None
    handle_api = ("buffer_ptrs_dev", "signal_pad_ptrs_dev", "signal_pad_size")
    if not all(hasattr(symm_mem, f) for f in ("empty", "rendezvous")) or not all(
        hasattr(_SymmetricMemory, a) for a in handle_api
    ):
        return None
    return symm_mem


def symmetric_memory_rendezvous(tensor: torch.Tensor, group_name: str) -> Any:
    """Exchange ``tensor`` (allocated by ``symmetric_memory().empty``) with the ranks of
    ``group_name``; returns the handle. A collective.

    Some releases need ``enable_symm_mem_for_group(group_name)`` before a group's first
    rendezvous; later ones deprecate it (it warns and is not needed), so it is called
    wherever it exists, its warning silenced.
    """
    symm_mem = symmetric_memory()
    if symm_mem is None:
        raise RuntimeError(f"torch {torch.__version__} has no usable symmetric memory")
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            enable(group_name)
    return symm_mem.rendezvous(tensor, group_name)
