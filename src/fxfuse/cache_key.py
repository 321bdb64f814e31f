"""The cache key: changes whenever a pass could produce a different graph, and only then.

Inductor reuses a compiled graph while the custom pass's ``uuid()`` is unchanged and
then never runs the pass. So the key covers everything that decides the rewritten
graph (DESIGN §4) and nothing that differs between two processes building the same
passes: keys are built from source text and stable ``repr``s, never ids or addresses.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import os
import pathlib
import sys
from typing import Any, Iterable

import torch

from .rewrite import Rewrite, RewriteError, TensorSpec

# The framework modules whose code decides how patterns are traced and applied.
_FRAMEWORK = ("rewrite", "schema", "pattern", "tracing", "matcher", "splice", "diagnosis", "canonicalize",
              "fusion_pass", "pass_manager", "cache_key", "trace_cache", "compat")


def digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def framework_digest() -> str:
    """fxfuse's version, torch's version and the source of the framework modules."""
    from . import __version__

    here = pathlib.Path(__file__).parent
    return digest([__version__, torch.__version__, *((here / f"{m}.py").read_text() for m in _FRAMEWORK)])


def stable_repr(value: Any, where: str) -> str:
    """A representation that is equal across processes for equal values."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(stable_repr(v, where) for v in value)
        return f"{type(value).__name__}({inner})"
    if isinstance(value, dict):
        items = sorted((stable_repr(k, where), stable_repr(v, where)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, (set, frozenset)):
        return "set(" + ", ".join(sorted(stable_repr(v, where) for v in value)) + ")"
    if isinstance(value, torch.Tensor):
        data = bytes(value.detach().cpu().contiguous().view(torch.uint8).flatten().tolist())
        return f"tensor({value.dtype}, {list(value.shape)}, {hashlib.sha256(data).hexdigest()})"
    if isinstance(value, TensorSpec) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return f"{type(value).__qualname__}{stable_repr(fields, where)}"
    if inspect.isfunction(value) or inspect.isclass(value):
        return f"{value.__module__}.{value.__qualname__}:{_source(value, where)}"
    if isinstance(value, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(value)
    raise RewriteError(
        f"{where} is a {type(value).__name__}, which has no stable representation for the cache key; "
        "use a bool, int, float, str, dtype, enum, tuple, dict, dataclass or tensor"
    )


def _source(obj: Any, where: str) -> str:
    """What identifies a function's or class's code: its source, else its code objects.

    A class defined where no source can be read (a REPL, ``python -c``, stdin, ``exec``)
    is keyed by `code_fingerprint` instead, which is as stable across processes and as
    sensitive to a change of the code.
    """
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return "code:" + code_fingerprint(obj)


def _module_source(cls: type, where: str) -> str:
    """The digest of the defining module's source, or, where it has none, the code of what
    ``cls`` uses.

    The module matters because a rewrite calls module-level helpers; without a file,
    `code_fingerprint` follows those helpers through the names the class's code reads.
    """
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if path and pathlib.Path(path).is_file():
        return file_digest(path)
    return "code:" + code_fingerprint(cls)


_FILE_DIGESTS: dict[str, tuple[int, int, str]] = {}


def file_digest(path: str | pathlib.Path) -> str:
    """The sha256 of a file's content, read again only when its size or mtime changed.

    >>> len(file_digest(__file__))
    64
    """
    st = os.stat(path)
    known = _FILE_DIGESTS.get(str(path))
    if known is not None and known[:2] == (st.st_mtime_ns, st.st_size):
        return known[2]
    value = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    _FILE_DIGESTS[str(path)] = (st.st_mtime_ns, st.st_size, value)
    return value


# -- keys from code objects -------------------------------------------------------------

# Attributes every class has whose value says nothing about what the class computes.
_CLASS_NOISE = frozenset({"__dict__", "__weakref__", "__module__", "__doc__", "__qualname__", "__firstlineno__",
                          "__static_attributes__", "__abstractmethods__", "_abc_impl", "__parameters__",
                          "__orig_bases__"})


class Uncacheable(Exception):
    """A value in a rewrite's code that has no identity stable across processes."""


def code_fingerprint(obj: Any, *, strict: bool = False) -> str:
    """A digest of what a function or class computes, read from its code objects.

    Covers bytecode, constants (nested code objects recursively), names, argument
    layout, defaults and closure values, and, through the global names the code reads,
    the functions and classes of the same module that it calls. Leaves out what does
    not change behaviour and differs between processes or edits: file names, line
    numbers, docstrings, addresses. ``strict``: a value without a stable identity (an
    object with only an address) raises `Uncacheable` instead of standing in as its
    type's name.

    Example:
        >>> ns = {}; exec("def f(x):\n    return x * 2", ns)
        >>> len(code_fingerprint(ns["f"]))
        64
    """
    return digest(_Fingerprinter(strict).of(obj))


class _Fingerprinter:
    def __init__(self, strict: bool = False) -> None:
        self.seen: set[int] = set()
        self.strict = strict

    def of(self, obj: Any) -> list[str]:
        if id(obj) in self.seen:  # recursion (a helper calling itself, a class naming itself)
            return [f"<seen {getattr(obj, '__qualname__', type(obj).__name__)}>"]
        self.seen.add(id(obj))
        if inspect.isclass(obj):
            return self._class(obj)
        if isinstance(obj, (staticmethod, classmethod)):
            return self.of(obj.__func__)
        if isinstance(obj, property):
            return [p for f in (obj.fget, obj.fset, obj.fdel) for p in (self.of(f) if f else ["-"])]
        if inspect.isfunction(obj):
            return self._function(obj)
        return [self._value(obj)]

    def _class(self, cls: type) -> list[str]:
        parts = [f"class {cls.__qualname__}({', '.join(b.__qualname__ for b in cls.__bases__)})"]
        for base in cls.__bases__:
            if base.__module__ == cls.__module__:  # a user base class: its code counts too
                parts += self.of(base)
        for name, value in sorted(vars(cls).items()):
            if name not in _CLASS_NOISE:
                parts += [f"{name}="] + self.of(value)
        return parts

    def _function(self, fn: Any) -> list[str]:
        parts = [f"def {fn.__qualname__}", *self._code(fn.__code__)]
        parts.append(f"defaults={self._value(fn.__defaults__)} kwdefaults={self._value(fn.__kwdefaults__)}")
        for cell in fn.__closure__ or ():
            try:
                parts += self.of(cell.cell_contents)
            except ValueError:  # an empty cell
                parts.append("<empty cell>")
        for name in sorted(self._global_names(fn.__code__)):
            if name in fn.__globals__:
                value = fn.__globals__[name]
                same_module = getattr(value, "__module__", None) == fn.__module__
                if (inspect.isfunction(value) or inspect.isclass(value)) and same_module:
                    parts += [f"global {name}:"] + self.of(value)
                elif isinstance(value, (bool, int, float, str, bytes, tuple, frozenset, torch.dtype)):
                    parts.append(f"global {name}={self._value(value)}")
        return parts

    def _code(self, co: Any) -> list[str]:
        parts = [co.co_name, co.co_code.hex(), repr(co.co_names), repr(co.co_varnames), repr(co.co_freevars),
                 repr(co.co_cellvars), f"{co.co_argcount}/{co.co_posonlyargcount}/{co.co_kwonlyargcount}/{co.co_flags}"]
        for const in co.co_consts:
            parts += self._code(const) if inspect.iscode(const) else [self._value(const)]
        return parts

    def _global_names(self, co: Any) -> set[str]:
        names = set(co.co_names)
        for const in co.co_consts:
            if inspect.iscode(const):
                names |= self._global_names(const)
        return names

    def _value(self, value: Any) -> str:
        if isinstance(value, (frozenset, set)):
            return "{" + ", ".join(sorted(self._value(v) for v in value)) + "}"
        if isinstance(value, (tuple, list)):
            return f"{type(value).__name__}(" + ", ".join(self._value(v) for v in value) + ")"
        if inspect.isfunction(value) or inspect.isclass(value):
            return digest(self.of(value))
        if isinstance(value, dict):
            return "{" + ", ".join(sorted(f"{self._value(k)}: {self._value(v)}" for k, v in value.items())) + "}"
        if inspect.isbuiltin(value) or inspect.ismodule(value):
            return f"<{getattr(value, '__module__', None) or ''}.{getattr(value, '__qualname__', value.__name__)}>"
        try:
            return stable_repr(value, "a constant")
        except RewriteError:
            if self.strict:
                raise Uncacheable(f"{type(value).__qualname__} object") from None
            return f"<{type(value).__module__}.{type(value).__qualname__}>"


# -- keys from traced graphs -------------------------------------------------------------


def graph_key(gm: torch.fx.GraphModule) -> str:
    """A digest of what a traced graph computes: each node's op, target, arguments (other
    nodes by position) and output shape and dtype, and the values of tensor constants.

    The source rules above cover the rewrite's class and module; a pattern or replacement
    also runs code from elsewhere (a native implementation in another module, a helper
    that builds example inputs, a custom op's schema and defaults). Whatever that code is,
    the graphs it traces to are what a compile gets, so their digest belongs in the key.
    Node names and positions are deterministic for one trace; no addresses enter.

    Example:
        >>> gm = torch.fx.symbolic_trace(lambda x: x * 2)
        >>> len(graph_key(gm))
        64
    """
    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    parts = []
    for node in gm.graph.nodes:
        args = _graph_value(node.args, index, gm)
        kwargs = _graph_value(dict(node.kwargs), index, gm)
        target = _graph_value(getattr(gm, node.target), index, gm) if node.op == "get_attr" else _target(node.target)
        parts.append(f"{node.op} {target} {args} {kwargs} -> {_graph_value(node.meta.get('val'), index, gm)}")
    return digest(parts)


def _target(target: Any) -> str:
    if isinstance(target, str):
        return target
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return str(target)
    if module and name:
        return f"{module}.{name}"
    return type(target).__qualname__


def _graph_value(value: Any, index: dict, gm: torch.fx.GraphModule) -> str:
    if isinstance(value, torch.fx.Node):
        return f"%{index[value]}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_graph_value(v, index, gm) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_graph_value(v, index, gm)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, slice):
        return f"slice{_graph_value((value.start, value.stop, value.step), index, gm)}"
    if isinstance(value, torch.Tensor):
        if isinstance(value, torch._subclasses.FakeTensor) or value.device.type == "meta":
            return f"tensor({value.dtype}, {list(value.shape)})"  # a traced value: its metadata is its identity
        return stable_repr(value, "a tensor constant")
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str, bytes, enum.Enum)):
        return repr(value)
    if isinstance(value, torch.fx.GraphModule):  # a submodule a higher-order op calls
        return graph_key(value)
    if callable(value):
        return _target(value)
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text


def rewrite_key(rewrite: Rewrite) -> str:
    """Class, defining module's source, the class's code (closures and defaults included:
    two classes made by one factory differ there), and parameters of one rewrite."""
    cls = type(rewrite)
    where = f"rewrite {rewrite.name}"
    params = {k: stable_repr(v, f"parameter {k!r} of {where}") for k, v in rewrite.parameters().items()}
    return digest([cls.__module__, cls.__qualname__, rewrite.name, _module_source(cls, where), code_fingerprint(cls),
                   repr(sorted(params.items()))])


@functools.lru_cache(maxsize=None)
def class_key(cls: type) -> str:
    """A class's name, code and defining module's source (for subclassed passes)."""
    where = f"class {cls.__qualname__}"
    return digest([cls.__module__, cls.__qualname__, code_fingerprint(cls), _module_source(cls, where)])


def canonicalization_key(fns: Iterable[Any]) -> str:
    """The canonicalization functions of a pass, by name and code (source read once per function)."""
    return digest(_canonicalization(f) for f in fns)


@functools.lru_cache(maxsize=None)
def _canonicalization(f: Any) -> str:
    return f"{f.__module__}.{f.__qualname__}:{_source(f, 'canonicalization')}:{code_fingerprint(f)}"
