"""The package's layering rules (DESIGN §8), read from the source with ``ast``.

Every import counts: module level, inside functions, and under ``if TYPE_CHECKING:``
(a type-only import is still a dependency a reader has to follow).

- The framework (``fxfuse/*.py`` but the package facade ``__init__``, ``cli`` and
  ``__main__``) imports no built-in op, pass or model, nor the attention runtime.
- ``fxfuse.attention`` sits below the ops built on it: it imports no ``ops``, ``passes``
  or ``models``.
- The modules of ``fxfuse.attention`` import each other in one direction only.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).parent.parent / "src"
PKG = SRC / "fxfuse"

FRAMEWORK_EXEMPT = {"__init__", "__main__", "cli"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: pathlib.Path) -> set[str]:
    """The fxfuse modules ``path`` imports (a ``from X import y`` names ``X.y`` when that
    is a module, else ``X``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m == "fxfuse" or m.startswith("fxfuse.")}


def _under(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_scan_sees_relative_and_function_level_imports():
    # A guard against a scan that finds nothing and so passes every rule.
    ops_attention = _imports(MODULES["fxfuse.ops.attention"])
    assert "fxfuse.ops._validate" in ops_attention
    assert any(_under(m, ["fxfuse.attention"]) for m in ops_attention)
    assert "fxfuse.attention" in _imports(MODULES["fxfuse.cli"])  # inside a function


FRAMEWORK = sorted(_module_name(p) for p in PKG.glob("*.py") if p.stem not in FRAMEWORK_EXEMPT)


@pytest.mark.parametrize("module", FRAMEWORK)
def test_framework_imports_no_ops_passes_models_or_attention(module):
    banned = ("fxfuse.ops", "fxfuse.passes", "fxfuse.models", "fxfuse.attention")
    bad = sorted(m for m in _imports(MODULES[module]) if _under(m, banned))
    assert not bad, f"{module} (framework) imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _under(m, ["fxfuse.attention"])))
def test_attention_imports_no_ops_passes_or_models(module):
    banned = ("fxfuse.ops", "fxfuse.passes", "fxfuse.models")
    bad = sorted(m for m in _imports(MODULES[module]) if _under(m, banned))
    assert not bad, f"{module} imports {bad}: the ops are built on fxfuse.attention, not under it"


def test_attention_modules_import_each_other_without_a_cycle():
    nodes = sorted(m for m in MODULES if _under(m, ["fxfuse.attention"]))
    edges = {m: sorted(d for d in _imports(MODULES[m]) if d in nodes and d != m) for m in nodes}
    # Depth-first search; a module met again while still on the path closes a cycle.
    state: dict[str, str] = {}

    def visit(m, path):
        state[m] = "open"
        for d in edges[m]:
            if state.get(d) == "open":
                cycle = path[path.index(d):] + [d]
                pytest.fail("import cycle in fxfuse.attention: " + " -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in nodes:
        if m not in state:
            visit(m, [m])


def test_the_native_epilogue_finds_its_quant_ops_with_only_fxfuse_attention_imported():
    # native.py reaches the quant ops through torch.ops, not by importing fxfuse.ops; this
    # is the promise that makes that safe: any fxfuse import registers them first.
    code = """
import torch
from fxfuse.attention.native import write_output_native
out = torch.randn(3, 2, 16, dtype=torch.bfloat16)
fp8 = torch.empty(3, 2, 16, dtype=torch.float8_e4m3fn)
write_output_native(out, fp8, torch.tensor([0.05]), None)
packed, scales = torch.ops.fxfuse.nvfp4_quant(out.reshape(3, 32), torch.tensor([2.0]))
nv, nv_scales = torch.empty_like(packed), torch.empty_like(scales)
write_output_native(out, nv, torch.tensor([2.0]), nv_scales)
assert torch.equal(nv, packed) and torch.equal(nv_scales.view(torch.uint8), scales.view(torch.uint8))
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=SRC)
