"""Traced rewrites kept across processes, so registering a pass traces nothing it traced before.

Tracing a rewrite (its patterns on symbolic sizes, its replacement, every functional
form) costs tens to hundreds of milliseconds; a process that builds the built-in passes
would pay seconds. The result is data (`fxfuse.pattern`), so it is kept in memory for
the process and on disk for the next ones, under a key that changes whenever a trace
could come out differently:

* the rewrite's identity: class, parameters, its module's source and its code read from
  the code objects (closure values and defaults included, so two classes one factory
  makes are two keys; a value with no stable identity makes the rewrite uncacheable);
* the canonicalizations of the pass, fxfuse's version and the source of every module
  of the fxfuse package (the ops' fake and native implementations are there), torch's
  version and build, Python's version.

Code a trace runs outside fxfuse and torch (a helper module, a custom op of another
library) is found while tracing: the source files of every function that ran, read
again before an entry is used. A file that is a module's is checked *as that module
resolves now*: another checkout or virtual environment importing a helper of the same
name from another path is checked against the helper it imports, not the one the entry
was traced with. An entry is also checked against the rewrite as it is
now (its arguments, the schemas of the ops it calls), and a traced rewrite is cached
only when all the code it ran has a file. Anything amiss, or any error reading the
cache, means a fresh trace: the cache can make registration fast, never wrong.

``FXFUSE_CACHE_DIR`` moves the cache (default ``~/.cache/fxfuse``); ``FXFUSE_TRACE_CACHE=0``
turns it off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
import os
import pathlib
import pickle
import sys
import sysconfig
import tempfile
from typing import Any, Iterator, Optional

import torch

from .cache_key import Uncacheable, code_fingerprint, digest, file_digest, rewrite_key, stable_repr

log = logging.getLogger("fxfuse")

#: Bumped whenever what an entry holds changes meaning.
FORMAT = 2

_MEMORY: dict[str, Any] = {}


def enabled() -> bool:
    return os.environ.get("FXFUSE_TRACE_CACHE", "1") != "0"


def cache_dir() -> pathlib.Path:
    """Where entries live: ``$FXFUSE_CACHE_DIR/traces``, default ``~/.cache/fxfuse/traces``."""
    base = os.environ.get("FXFUSE_CACHE_DIR")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fxfuse")
    return pathlib.Path(base) / "traces"


_PACKAGE: Optional[str] = None


def package_digest() -> str:
    """The digest of every Python source file of the fxfuse package (read once per process)."""
    global _PACKAGE
    if _PACKAGE is None:
        root = pathlib.Path(__file__).parent
        files = sorted(root.rglob("*.py"))
        _PACKAGE = digest([f"{p.relative_to(root)}:{file_digest(p)}" for p in files])
    return _PACKAGE


def environment() -> str:
    """What every trace depends on besides the rewrite: versions and fxfuse's own code."""
    from . import __version__

    return digest([f"format {FORMAT}", __version__, torch.__version__, str(getattr(torch.version, "git_version", "")),
                   sys.version, package_digest()])


def key(rewrite: Any, canonicalization_key: str) -> Optional[str]:
    """The entry key of ``rewrite`` traced under these canonicalizations; None when the
    rewrite has no stable identity (nothing is cached for it)."""
    try:
        strict = code_fingerprint(type(rewrite), strict=True)
        return digest([environment(), canonicalization_key, rewrite_key(rewrite), strict,
                       stable_repr(rewrite.parameters(), f"parameters of rewrite {rewrite.name}")])
    except (Uncacheable, ValueError, OSError) as e:
        log.debug("fxfuse: rewrite %s is not cached: %s", rewrite.name, e)
        return None


# --------------------------------------------------------------------------- what a trace ran


def _skipped_roots() -> tuple[str, ...]:
    """Directories whose code is covered by the environment key: torch, fxfuse, the stdlib."""
    roots = [os.path.dirname(torch.__file__), os.path.dirname(__file__)]
    for name in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(name)
        if path:
            roots.append(path)
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots)


@contextlib.contextmanager
def recording() -> Iterator[Optional[set[str]]]:
    """Collect the source files of the Python functions that run inside the block, outside
    torch, fxfuse and the standard library. Yields None (nothing recorded, so nothing will
    be cached) where a profiler already holds the hook: it is not taken from it."""
    if sys.getprofile() is not None or not enabled():
        yield None
        return
    files: set[str] = set()
    seen: set[str] = set()
    skip = _skipped_roots()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        name = frame.f_code.co_filename
        if name in seen:
            return
        seen.add(name)
        real = os.path.realpath(name) if not name.startswith("<") else name
        if not real.startswith(skip):
            files.add(real)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield files
    finally:
        sys.setprofile(previous)


def _dependencies(files: set[str]) -> Optional[tuple[dict[str, str], dict[str, str]]]:
    """The digest of each file, by module name where the file is a loaded module's (so a
    later process checks the module it would import: a file path alone would let it be
    served a trace of a helper that another checkout imports from elsewhere), else by
    path. Code without a file ("<string>": what dataclasses and FX generate while
    tracing; code typed at a prompt) is not one: a rewrite's own code is in its key
    through its code objects, and generated code follows from what generated it."""
    real = [f for f in sorted(files) if not f.startswith("<")]
    if not real:
        return {}, {}
    owners: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and name != "__main__":
            owners.setdefault(os.path.realpath(path), name)
    deps, modules = {}, {}
    for f in real:
        if not os.path.isfile(f):
            return None  # a file that went away: nothing would tell a changed one apart
        if f in owners:
            modules[owners[f]] = file_digest(f)
        else:
            deps[f] = file_digest(f)
    return deps, modules


# --------------------------------------------------------------------------- pickling ops


class _Pickler(pickle.Pickler):
    """Pickles ops by name (OpOverloads and higher-order ops do not pickle) and notes
    each op's schema, checked again before an entry is used."""

    def __init__(self, f: Any) -> None:
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.schemas: dict[str, str] = {}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch._ops.OpOverload):
            packet = obj.overloadpacket
            self.schemas[str(obj)] = str(obj._schema)
            return _op, (obj.namespace, packet.__name__.split(".")[-1], obj._overloadname)
        if isinstance(obj, torch._ops.HigherOrderOperator):
            return _hop, (obj.name(),)
        sympy = sys.modules.get("sympy")
        if sympy is not None and isinstance(obj, sympy.Basic) and obj.args and not isinstance(obj, sympy.Symbol):
            return _expr, (type(obj), obj.args)
        return NotImplemented


def _expr(cls: type, args: tuple) -> Any:
    # Rebuilt from its canonical arguments without evaluating again: a size expression or
    # condition stored evaluated comes back structurally equal (same class, same args),
    # where a plain unpickle re-ran sympy's simplification of every relation (most of
    # what reading a pattern cost).
    try:
        return cls(*args, evaluate=False)
    except TypeError:
        return cls(*args)


def _op(namespace: str, name: str, overload: str) -> Any:
    return getattr(getattr(getattr(torch.ops, namespace), name), overload)


def _hop(name: str) -> Any:
    return getattr(torch.ops.higher_order, name)


def dumps(obj: Any) -> tuple[bytes, dict[str, str]]:
    """``obj`` pickled with its ops by name, and the schema of each op it holds."""
    buf = io.BytesIO()
    p = _Pickler(buf)
    p.dump(obj)
    return buf.getvalue(), p.schemas


def loads(blob: bytes) -> Any:
    """The inverse of `dumps` (the ops must be registered by now)."""
    return pickle.loads(blob)


# --------------------------------------------------------------------------- entries


@dataclasses.dataclass
class Entry:
    """A traced rewrite as stored: its data (pickled, ops by name), and what must be
    unchanged to use it. Checked before the data is unpickled."""

    payload: bytes
    deps: dict[str, str]  # source file of no module -> sha256, outside torch/fxfuse/stdlib
    schemas: dict[str, str]  # op -> schema
    modules: dict[str, str] = dataclasses.field(default_factory=dict)  # module name -> sha256 of its file


def _path(key: str) -> pathlib.Path:
    return cache_dir() / key[:2] / f"{key}.pkl"


def load(key: Optional[str]) -> Any:
    """The data stored under ``key`` if there is an entry and it is still right, else None."""
    if key is None or not enabled():
        return None
    if key in _MEMORY:
        # Checked again in memory too: a helper file edited while the process runs (and
        # re-imported) is a new trace here as well. A check is one stat per file.
        entry, data = _MEMORY[key]
        if _still_right(entry):
            return data
        del _MEMORY[key]  # the disk may hold the entry of the helper imported now
    try:
        entry = next((e for e in _entries(key) if _still_right(e)), None)
        if entry is None:
            return None
        data = pickle.loads(entry.payload)
    except OSError:
        return None
    except Exception as e:  # noqa: BLE001 - an unreadable entry is a miss (an op not registered yet, a torn file)
        log.debug("fxfuse: trace cache entry %s unreadable: %s", key[:12], e)
        return None
    _MEMORY[key] = (entry, data)
    return data


#: Entries kept per key: one per set of helper files (two checkouts sharing a cache, each
#: with its own helper, would otherwise trace again at every switch).
_PER_KEY = 4


def _entries(key: str) -> list[Entry]:
    """The entries on disk under ``key``, newest first."""
    entries = pickle.loads(_path(key).read_bytes())
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, Entry)]


def _module_file(name: str) -> Optional[str]:
    """The file module ``name`` is (or would be) imported from in this process now."""
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None) if module is not None else None
    if path is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        path = spec.origin if spec is not None and spec.has_location else None
    return path


def _still_right(entry: Entry) -> bool:
    for path, sha in entry.deps.items():
        try:
            if file_digest(path) != sha:
                return False
        except OSError:
            return False
    for name, sha in entry.modules.items():
        path = _module_file(name)
        try:
            if path is None or file_digest(path) != sha:
                return False
        except OSError:
            return False
    for name, schema in entry.schemas.items():
        ns, rest = name.split(".", 1)
        packet, overload = rest.rsplit(".", 1)
        try:
            if str(_op(ns, packet, overload)._schema) != schema:
                return False
        except (AttributeError, RuntimeError):
            return False
    return True


def store(key: Optional[str], data: Any, files: Optional[set[str]], schemas: Optional[dict[str, str]] = None) -> None:
    """Keep ``data`` under ``key``, in memory and on disk (atomically; errors are logged,
    never raised: a cache that cannot be written only makes the next process slower).
    ``schemas``: ops that ``data`` holds only inside blobs of `dumps`."""
    if key is None or not enabled() or files is None:
        return
    found_deps = _dependencies(files)
    if found_deps is None:
        return
    deps, modules = found_deps
    try:
        payload, found = dumps(data)
        schemas = {**(schemas or {}), **found}
        entry = Entry(payload, deps, schemas, modules)
    except Exception as e:  # noqa: BLE001 - data that does not pickle is simply not cached
        log.debug("fxfuse: trace of %s not cached: %s", key[:12], e)
        return
    _MEMORY[key] = (entry, data)
    path = _path(key)
    try:
        others = [e for e in _entries(key) if (e.deps, e.modules) != (deps, modules)]
    except Exception:  # noqa: BLE001 - no file yet, or one that does not read: start afresh
        others = []
    blob = pickle.dumps([entry, *others][:_PER_KEY], protocol=pickle.HIGHEST_PROTOCOL)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("fxfuse: could not write the trace cache at %s: %s", path, e)


def clear_memory() -> None:
    """Forget the entries held in this process (the disk keeps them)."""
    _MEMORY.clear()
