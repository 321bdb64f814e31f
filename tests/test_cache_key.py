"""The cache key changes with each ingredient of DESIGN §4, and only with them."""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxfuse
from fxfuse import cache_key

MODULE = textwrap.dedent(
    '''
    import torch, fxfuse

    class Scale(fxfuse.Rewrite):
        def __init__(self, factor=2.0):
            self.factor = factor
        def pattern(self, x):
            return x * 3
        def replacement(self, x):
            return x * self.factor
        def example_inputs(self):
            return [fxfuse.TensorSpec((4, 4))]

    HELPER = 1
    '''
)


@pytest.fixture
def rewrite_module(tmp_path, monkeypatch):
    """A rewrite defined in a module file the test can edit."""
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "fxfuse_keymod.py"

    def load(source=MODULE):
        path.write_text(source)
        sys.modules.pop("fxfuse_keymod", None)
        importlib.invalidate_caches()
        return importlib.import_module("fxfuse_keymod")

    yield load
    sys.modules.pop("fxfuse_keymod", None)


def _uuid(mod, **params):
    return fxfuse.FusionPass("p", [mod.Scale(**params)]).uuid()


def test_same_passes_same_key_in_this_process(rewrite_module):
    mod = rewrite_module()
    assert _uuid(mod) == _uuid(mod)


def test_key_is_identical_across_processes(rewrite_module, tmp_path):
    rewrite_module()
    code = "import fxfuse, fxfuse_keymod as m; print(fxfuse.PassManager([fxfuse.FusionPass('p', [m.Scale()]), *fxfuse.default_passes()]).uuid())"
    path = os.pathsep.join([str(tmp_path), *sys.path])  # fxfuse may be on sys.path, not installed
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONPATH": path, "PYTHONHASHSEED": seed},
        ).stdout.split()[-1]
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 64


def test_rewrite_parameter_changes_key(rewrite_module):
    mod = rewrite_module()
    assert _uuid(mod, factor=2.0) != _uuid(mod, factor=2.5)


def test_rewrite_class_source_changes_key(rewrite_module):
    before = _uuid(rewrite_module())
    after = _uuid(rewrite_module(MODULE.replace("return x * 3", "return x * 3  # reworded")))
    assert before != after


def test_defining_module_source_changes_key(rewrite_module):
    before = _uuid(rewrite_module())
    after = _uuid(rewrite_module(MODULE.replace("HELPER = 1", "HELPER = 2")))
    assert before != after


def test_canonicalizations_change_key(rewrite_module):
    mod = rewrite_module()
    default = fxfuse.FusionPass("p", [mod.Scale()]).uuid()
    none = fxfuse.FusionPass("p", [mod.Scale()], canonicalize=()).uuid()
    assert default != none


def test_pass_name_and_order_in_manager_change_key(rewrite_module):
    mod = rewrite_module()
    a, b = fxfuse.FusionPass("a", [mod.Scale()]), fxfuse.FusionPass("b", [mod.Scale(3.0)])
    assert fxfuse.PassManager([a, b]).uuid() != fxfuse.PassManager([b, a]).uuid()
    assert fxfuse.PassManager([a]).uuid() != fxfuse.PassManager([a], cleanup=False).uuid()


@pytest.mark.parametrize("module, attr", [(fxfuse, "__version__"), (torch, "__version__")], ids=["fxfuse", "torch"])
def test_fxfuse_and_torch_versions_change_key(rewrite_module, monkeypatch, module, attr):
    mod = rewrite_module()
    base = _uuid(mod)
    monkeypatch.setattr(module, attr, "99.0.0")
    cache_key.framework_digest.cache_clear()
    try:
        assert _uuid(mod) != base
    finally:
        monkeypatch.undo()
        cache_key.framework_digest.cache_clear()
    assert _uuid(mod) == base


def test_chained_pass_without_uuid_disables_caching(rewrite_module):
    mod = rewrite_module()
    p = fxfuse.FusionPass("p", [mod.Scale()])
    assert fxfuse.PassManager([p], chain=lambda g: None).uuid() is None


def test_stable_repr_rejects_objects_with_addresses():
    with pytest.raises(fxfuse.RewriteError, match="no stable representation"):
        cache_key.stable_repr(object(), "parameter 'x'")
    assert cache_key.stable_repr({"b": torch.float16, "a": (1, 2.5)}, "p") == cache_key.stable_repr({"a": (1, 2.5), "b": torch.float16}, "p")
