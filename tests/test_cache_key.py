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


HELPED = textwrap.dedent(
    '''
    import torch, fxfuse
    import fxfuse_keyhelp as helper

    class Helped(fxfuse.Rewrite):
        def pattern(self, x):
            return x * 3
        def replacement(self, x):
            return helper.triple(x)
        def example_inputs(self):
            return [helper.example()]
    '''
)
HELPER = textwrap.dedent(
    '''
    import torch, fxfuse

    def triple(x):
        return x + x + x

    def example():
        return fxfuse.TensorSpec((4, 4), torch.bfloat16)
    '''
)


@pytest.fixture
def helped(tmp_path, monkeypatch):
    """A rewrite whose replacement and example inputs come from a helper module of its own
    file: the rewrite's class and module are unchanged when only the helper is edited."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fxfuse_keyhelped.py").write_text(HELPED)

    def uuid(helper_source=HELPER):
        (tmp_path / "fxfuse_keyhelp.py").write_text(helper_source)
        for name in ("fxfuse_keyhelp", "fxfuse_keyhelped"):
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
        return fxfuse.FusionPass("p", [importlib.import_module("fxfuse_keyhelped").Helped()]).uuid()

    yield uuid
    for name in ("fxfuse_keyhelp", "fxfuse_keyhelped"):
        sys.modules.pop(name, None)


def test_code_a_rewrite_calls_from_another_module_is_in_the_key(helped):
    """A replacement that calls a function of another module (as native_lowering calls the
    ops' native implementations) gives another graph when that function changes: the
    compile must not be served the graph of the old code."""
    base = helped()
    assert helped() == base
    assert helped(HELPER.replace("return x + x + x", "return x * 3")) != base  # another graph
    assert helped(HELPER.replace("torch.bfloat16", "torch.float16")) != base  # patterns of another dtype
    # An edit of the helper module that traces to the same graphs keeps the key (and the cache).
    assert helped(HELPER.replace("def triple(x):", "def triple(x):  # x three times")) == base


def test_graph_key_sees_ops_arguments_shapes_and_constants():
    def key(fn, *shapes):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.proxy_tensor import make_fx

        with FakeTensorMode() as mode:
            args = [mode.from_tensor(torch.empty(s)) for s in shapes]
            return cache_key.graph_key(make_fx(fn)(*args))

    base = key(lambda x: x * 2, (4, 4))
    assert key(lambda x: x * 2, (4, 4)) == base
    assert key(lambda x: x * 3, (4, 4)) != base
    assert key(lambda x: x + 2, (4, 4)) != base
    assert key(lambda x: x * 2, (4, 8)) != base
    assert key(lambda x: x.sum(0), (4, 4)) != key(lambda x: x.sum(1), (4, 4))


def test_chained_pass_without_uuid_disables_caching(rewrite_module):
    mod = rewrite_module()
    p = fxfuse.FusionPass("p", [mod.Scale()])
    assert fxfuse.PassManager([p], chain=lambda g: None).uuid() is None


def test_stable_repr_rejects_objects_with_addresses():
    with pytest.raises(fxfuse.RewriteError, match="no stable representation"):
        cache_key.stable_repr(object(), "parameter 'x'")
    assert cache_key.stable_repr({"b": torch.float16, "a": (1, 2.5)}, "p") == cache_key.stable_repr({"a": (1, 2.5), "b": torch.float16}, "p")


# ---------------------------------------------------------------- rewrites without source

UNSOURCED = textwrap.dedent(
    '''
    import torch, fxfuse

    def helper(x):
        return x * 5

    class Unsourced(fxfuse.Rewrite):
        def pattern(self, x):
            return x * 3
        def replacement(self, x):
            return helper(x) - x * 2
        def example_inputs(self):
            return [fxfuse.TensorSpec((4, 4), {{"keys": torch.float32}}["keys"])]

    print(fxfuse.FusionPass("p", [Unsourced()]).uuid())
    '''
)


def _key_in_subprocess(how: str, source: str, seed: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONHASHSEED": seed}
    args = [sys.executable, "-c", source] if how == "-c" else [sys.executable, "-"]
    out = subprocess.run(args, input=source if how == "stdin" else None, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-1]


def _key_in_exec(source: str) -> str:
    ns = {"__name__": "generated"}  # no module, no file: as in a notebook kernel or exec
    exec(compile(source.replace("print(", "KEY = ("), "<generated>", "exec"), ns)
    return ns["KEY"]


def test_rewrite_without_source_has_one_key_across_processes():
    source = UNSOURCED.format()
    keys = {_key_in_subprocess("-c", source, "1"), _key_in_subprocess("-c", source, "7"),
            _key_in_subprocess("stdin", source, "3")}
    assert len(keys) == 1 and len(keys.pop()) == 64


@pytest.mark.parametrize(
    "edit",
    [("return x * 3", "return x * 4"), ("return x * 5", "return x * 6"), ("x * 2", "x + x"), ("float32", "float16")],
    ids=["pattern", "module-level helper", "replacement", "example dtype"],
)
def test_key_from_code_objects_sees_every_code_change(edit):
    source = UNSOURCED.format()
    assert _key_in_exec(source) == _key_in_exec(source)
    assert _key_in_exec(source) != _key_in_exec(source.replace(*edit))


def test_code_fingerprint_ignores_line_numbers_not_constants():
    ns1, ns2, ns3 = {}, {}, {}
    exec("def f(x):\n    return x * 2", ns1)
    exec("\n\n\ndef f(x):\n    return x * 2", ns2)
    exec("def f(x):\n    return x * 3", ns3)
    fp = cache_key.code_fingerprint
    assert fp(ns1["f"]) == fp(ns2["f"]) != fp(ns3["f"])


# ---------------------------------------------------------------- cache_state


class Flagged(fxfuse.Rewrite):
    """A rewrite whose check reads state outside the graph, and says so."""

    FLAGS = {"on": True}

    def pattern(self, x):
        return x * 3

    def replacement(self, x):
        return x * 4

    def example_inputs(self):
        return [fxfuse.TensorSpec((4, 4))]

    def check(self, match):
        return self.FLAGS["on"]

    def cache_state(self):
        return self.FLAGS["on"]


def test_cache_state_is_read_at_every_uuid(monkeypatch):
    p = fxfuse.FusionPass("p", [Flagged()])
    on = p.uuid()
    monkeypatch.setitem(Flagged.FLAGS, "on", False)
    assert p.uuid() != on, "the key must follow the state without re-registering"
    monkeypatch.setitem(Flagged.FLAGS, "on", True)
    assert p.uuid() == on


def test_unrepresentable_cache_state_fails_at_register():
    class Bad(Flagged):
        def cache_state(self):
            return object()

    with pytest.raises(fxfuse.RewriteError, match="cache_state\\(\\) of rewrite Bad in pass p is a object"):
        fxfuse.FusionPass("p", [Bad()])


def test_attention_key_follows_each_layers_backend():
    from fxfuse.attention import AttentionLayer, NativeAttentionBackend, NoQuantNativeBackend, temporary_layers
    from fxfuse.passes import attn_quant_fusion

    p = attn_quant_fusion()
    mk = lambda backend: AttentionLayer("keytest.attn", num_heads=4, num_kv_heads=2, head_size=32, backend=backend)  # noqa: E731
    with temporary_layers(mk(NativeAttentionBackend())):
        native = p.uuid()
    with temporary_layers(mk(NoQuantNativeBackend())):
        noquant = p.uuid()
    with temporary_layers(mk(NativeAttentionBackend())):
        assert p.uuid() == native
    assert native != noquant


def test_native_lowering_key_holds_the_devices_present(monkeypatch):
    nl = sys.modules["fxfuse.passes.native_lowering"]

    table = {"devices": {"cpu": {"rms_norm": {"64": {"5": "inductor"}}}}}
    p = nl.native_lowering(table)
    here, here_devices = p.uuid(), nl.present_devices()
    monkeypatch.setattr(nl, "present_devices", lambda: (*here_devices, "An Imaginary GPU"))
    assert p.uuid() != here
