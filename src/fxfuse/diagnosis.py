"""Near misses, and the state a rewrite reads that its cache key would not see.

**A near miss** is a chain of a rewrite's pattern that the graph holds and the pass did
not replace. After a pass has swept a graph, each node still running the rewrite's
anchor op (and not made by the pass) is looked at once:

1. if the whole chain was there and was declined (a typed argument that did not fit,
   a failed ``check``, a failed replacement, an extra user, a size the trace did not
   assume), it is a near miss with that reason;
2. otherwise `fxfuse.matcher.partial` follows the pattern's edges from it by op alone:
   a node that shares only its op with the pattern is not a near miss (three unrelated
   ``mul`` nodes are not near misses of a pattern with one ``mul``), while two or more
   pattern nodes in place, or the whole of a one-op pattern, or a custom op (an engine
   op is itself the chain's defining op: an RMSNorm feeding an unquantized head), are;
3. the graph nodes a near miss takes up are not looked at again, so one chain counts
   once however many of its nodes run the anchor op;
4. a chain that was whole in the graph Inductor received and is gone after Inductor's
   own passes (``gone``, from the `PassManager`) is a near miss with that reason.

The reason is the deepest failure of the match from that site: the first pattern node
that failed, naming the extra user, the two nodes one argument was bound to, or the
argument whose value differs from the pattern's.
"""

from __future__ import annotations

import dis
import inspect
import os
import types
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
import torch.fx

from .matcher import Match, match_at, partial
from .pattern import specificity
from .rewrite import Rewrite

if TYPE_CHECKING:
    from .fusion_pass import Outcome, _Run
    from .tracing import TracedRewrite


def form_of(node: torch.fx.Node) -> str:
    """``functional``, or ``v1``/``v2`` for a node wrapped in ``auto_functionalized(_v2)``."""
    from . import compat

    for form, hop in compat.auto_functionalized_ops().items():
        if node.target is hop:
            return form
    return "functional"


def near_misses(traced: TracedRewrite, run: _Run, gone: Iterable[Any] = (),
                born: frozenset[str] = frozenset()) -> list[Outcome]:
    """The near misses of ``traced`` after ``run`` swept its graph (see the module docstring).

    ``gone``: this rewrite's chains Inductor rewrote before the pass ran; ``born``: the
    nodes Inductor made meanwhile. What is left of such a chain, or made from it, is
    that chain: counted once, as rewritten.
    """
    from .fusion_pass import Outcome

    ctx = run.ctx
    sites = {n for a in traced.anchors for n in a.sites(run.graph) if n not in run.new}
    out: list[Outcome] = []
    claimed: set[torch.fx.Node] = set()
    gone = list(gone)
    if gone:
        alive = {n.name: n for n in run.graph.nodes}
        claimed.update(alive[name] for _, _, names in gone for name in names if name in alive)
        claimed.update(n for name, n in alive.items() if name in born)
    for site in sorted(sites, key=lambda n: ctx.position.get(n, 0.0)):
        if site in claimed:
            continue
        variants = [v for v in traced.variants if v.anchor.matches(site)]
        declined = run.declined.get((traced.name, site))
        # A chain written with its operands the other way round is one too (the reason says
        # that `commute = True` would match it).
        shapes = variants if traced.rewrite.commute else variants + traced.commuted(variants)
        chain = max((partial(v.pattern, site, ctx) for v in shapes), key=len, default=[])
        if declined is None:
            need = min(2, max(len(v.pattern.nodes) for v in variants))
            defining = any(specificity(v.pattern.anchor_node) == 0 for v in variants)
            if not (len(chain) >= need or (defining and chain)) or claimed.intersection(chain):
                continue
        claimed.update(chain)
        reason = declined or _reason(traced, run, site, variants)
        out.append(Outcome(site.name, form_of(site), "miss", reason))
    for anchor, missing, _ in gone:
        out.append(Outcome(anchor, "functional", "miss",
                           f"rewritten by Inductor before this pass ran (its {', '.join(missing)} are gone); "
                           "stage='pre' would see it"))
    return out


def _reason(traced: TracedRewrite, run: _Run, site: torch.fx.Node, variants: list[Any]) -> str:
    failure = run.failed.get((traced.name, site))
    reason = failure.reason if failure is not None else f"{site.name} is not where a chain of {traced.name} starts"
    if not traced.rewrite.commute:
        for v in traced.commuted([v for v in variants if not v.swaps]):
            if isinstance(match_at(v.pattern, site, run.ctx), Match):
                reason += f" (it would match with commute = True: operands of {', '.join(sorted(v.swaps))} swapped)"
                break
    return reason


# --------------------------------------------------------------------------- state outside the key


class CacheStateWarning(UserWarning):
    """A rewrite's ``check``/``replacement`` reads state its cache key does not cover."""


_FRAMEWORK_ATTRIBUTES = frozenset({"commute", "free_dtypes", "report_misses", "anchor", "name"})
_IMMUTABLE = (bool, int, float, complex, str, bytes, tuple, frozenset, type(None), torch.dtype, torch.device)
_warned: set[type] = set()


def state_reads(fn: Any, owner: Optional[type] = None) -> set[str]:
    """The module-level mutable state ``fn`` reads, following functions of its own module:
    mutable globals, class attributes holding mutable values, environment variables.

    >>> state_reads(lambda: CONFIG["fast"])  # CONFIG a module-level dict
    {'global CONFIG'}
    """
    reads: set[str] = set()
    _scan(fn, owner, reads, set())
    return reads


def _scan(fn: Any, owner: Optional[type], reads: set[str], seen: set[int]) -> None:
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    code = getattr(fn, "__code__", None)
    if code is None or id(code) in seen:
        return
    seen.add(id(code))
    _scan_code(code, getattr(fn, "__globals__", {}), getattr(fn, "__module__", None), owner, reads, seen)


def _scan_code(code: types.CodeType, globs: dict, module: Optional[str], owner: Optional[type],
               reads: set[str], seen: set[int]) -> None:
    instrs = list(dis.get_instructions(code))
    self_name = code.co_varnames[0] if code.co_argcount else None
    for i, ins in enumerate(instrs):
        nxt = instrs[i + 1] if i + 1 < len(instrs) else None
        attr = nxt.argval if nxt is not None and nxt.opname in ("LOAD_ATTR", "LOAD_METHOD") else None
        if ins.opname == "LOAD_GLOBAL":
            name = ins.argval
            value = globs.get(name, _MISSING)
            if value is _MISSING:
                continue
            if value is os and attr in ("environ", "getenv"):
                reads.add(f"environment variable {_const_after(instrs, i) or '(os.environ)'}")
            elif inspect.isfunction(value) and getattr(value, "__module__", None) == module:
                _scan(value, owner, reads, seen)
            elif inspect.isclass(value) and attr is not None and attr in vars(value):
                if _mutable(vars(value)[attr]):
                    reads.add(f"class attribute {value.__qualname__}.{attr}")
            elif _mutable(value):
                reads.add(f"global {name}")
        elif ins.opname in ("LOAD_FAST", "LOAD_DEREF") and ins.argval == self_name and owner is not None and attr:
            if attr in _FRAMEWORK_ATTRIBUTES:
                continue
            for klass in owner.__mro__:
                if attr in vars(klass):
                    value = vars(klass)[attr]
                    if inspect.isfunction(value) and getattr(value, "__module__", None) == module:
                        _scan(value, owner, reads, seen)
                    elif _mutable(value):
                        reads.add(f"class attribute {klass.__qualname__}.{attr}")
                    break
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _scan_code(const, globs, module, owner, reads, seen)


_MISSING = object()


def _const_after(instrs: list, i: int) -> Optional[str]:
    for ins in instrs[i + 1:i + 5]:
        if ins.opname == "LOAD_CONST" and isinstance(ins.argval, str):
            return repr(ins.argval)
    return None


def _mutable(value: Any) -> bool:
    """Whether a value is state that can change under the same source: a container or a
    plain object (not a function, class, module, op or immutable constant)."""
    if isinstance(value, _IMMUTABLE) or inspect.isroutine(value) or inspect.isclass(value) or inspect.ismodule(value):
        return False
    if isinstance(value, (property, staticmethod, classmethod, torch._ops.OpOverload, torch._ops.OpOverloadPacket,
                          torch._ops.HigherOrderOperator)):
        return False
    if isinstance(value, (dict, list, set, bytearray)):
        return True
    return hasattr(value, "__dict__") and not callable(value)


def unreported_state(rewrite: Rewrite) -> list[str]:
    """What ``rewrite``'s ``check``/``replacement`` read (`state_reads`) that its
    ``cache_state`` does not read too, sorted."""
    cls = type(rewrite)
    reads: set[str] = set()
    for name in ("check", "replacement"):
        fn = getattr(cls, name, None)
        if fn is not None and fn is not getattr(Rewrite, name, None):
            reads |= state_reads(fn if not isinstance(fn, property) else fn.fget, cls)
    state = getattr(cls, "cache_state", None)
    reported = state_reads(state, cls) if state is not None and state is not Rewrite.cache_state else set()
    return sorted(reads - reported)


def warn_unreported_state(rewrite: Rewrite) -> None:
    """Warn once per class when ``check``/``replacement`` read mutable module-level state
    that ``cache_state()`` does not report: Inductor would serve a graph compiled under
    another value of it."""
    cls = type(rewrite)
    if cls in _warned:
        return
    _warned.add(cls)
    try:
        reads = unreported_state(rewrite)
    except Exception:  # noqa: BLE001 - a scan that cannot read the code warns about nothing
        return
    if reads:
        warnings.warn(
            f"rewrite {rewrite.name}: check()/replacement() read {', '.join(reads)}, which cache_state() does not "
            "report; a compiled graph would be served unchanged after it changes. Return it from cache_state() "
            "(docs/design-notes.md, 'State outside the graph').",
            CacheStateWarning,
            stacklevel=4,
        )
