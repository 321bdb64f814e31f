"""The trace cache makes registration fast and nothing else: keys, patterns and the match
and miss tables are those of a fresh trace, in this process and across processes, and an
edit of code a trace ran is never served an old trace."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxfuse
from fxfuse import TensorSpec, trace_cache

CHILD = textwrap.dedent(
    """
    import json, sys, torch, fxfuse
    from fxfuse import compat
    from fxfuse.models import LlamaForCausalLM, ModelConfig, ModelRunner, random_prompts
    passes = fxfuse.default_passes()
    cfg = ModelConfig.preset("tiny", num_layers=2)
    model = LlamaForCausalLM(cfg)
    prompts = random_prompts(cfg, lengths=[5, 3], seed=0)
    names, bufs = zip(*model.named_buffers())
    fn = lambda ids, pos, *b: torch.func.functional_call(model, dict(zip(names, b)), (ids, pos))
    with torch.no_grad(), ModelRunner(model).prefill_context(prompts) as (ids, pos):
        with compat.fake_mode() as mode:
            gm = compat.trace_functional(fn, [mode.from_tensor(t) for t in (ids, pos, *bufs)], v2=True)
    fxfuse.PassManager(passes)(gm.graph)
    print(json.dumps(dict(
        uuids=[p.uuid() for p in passes],
        cached=sum(t.cached for p in passes for t in p.traced),
        rewrites=sum(len(p.traced) for p in passes),
        patterns={t.name: t.patterns_digest() for p in passes for t in p.traced},
        matches=fxfuse.match_table(), misses=fxfuse.miss_table(),
        graph=[str(n.target) for n in gm.graph.nodes if n.op == "call_function"],
    )))
    """
)


def _child(env_extra):
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.compile  # three processes, one of them tracing every built-in rewrite
def test_cold_and_warm_processes_agree(tmp_path):
    cache = {"FXFUSE_CACHE_DIR": str(tmp_path / "fxfuse")}
    cold = _child(cache)  # traces everything (as with no cache at all), fills the cache
    warm = _child(cache)  # reads everything from it
    assert cold["cached"] == 0 and warm["cached"] == warm["rewrites"] == cold["rewrites"] > 30
    assert warm["uuids"] == cold["uuids"]
    assert warm["patterns"] == cold["patterns"]
    assert (warm["matches"], warm["misses"], warm["graph"]) == (cold["matches"], cold["misses"], cold["graph"])
    assert cold["matches"]["rms_quant_fusion"] and cold["misses"]


@pytest.mark.compile
def test_a_cached_pass_is_served_the_same_compiled_graph_with_the_same_tables(tmp_path, monkeypatch, fresh_inductor_cache):
    monkeypatch.setenv("FXFUSE_CACHE_DIR", str(tmp_path / "fxfuse"))

    class MulAddRelu(fxfuse.Rewrite):
        def pattern(self, x, y, z):
            return (x * y + z).relu()

        def replacement(self, x, y, z):
            return torch.addcmul(z, x, y).relu()

        def example_inputs(self):
            return [TensorSpec((8, 16))] * 3

    def f(a, b, c):
        shared = a * c
        return (a * b + c).relu() + (shared + b).relu() + shared.sum()

    args = [torch.randn(4, 8) for _ in range(3)]
    calls = []

    class Counting(fxfuse.PassManager):
        def __call__(self, graph):
            calls.append(1)
            super().__call__(graph)

    results = []
    for _ in range(2):
        trace_cache.clear_memory()  # the second registration reads the disk, as a new process would
        passes = [fxfuse.FusionPass("mar", [MulAddRelu()])]
        torch._dynamo.reset()
        fxfuse.reset_match_table()
        out = fxfuse.compile(f, passes=Counting(passes))(*args)
        results.append((passes[0].traced[0].cached, passes[0].uuid(), fxfuse.match_table(), fxfuse.miss_table(), out))
    (cold, warm) = results
    assert (cold[0], warm[0]) == (False, True)
    assert warm[1] == cold[1]
    assert len(calls) == 1, "the warm compile is an FX graph cache hit: its key is the cold one"
    assert warm[2:4] == cold[2:4] == ({"mar": {"MulAddRelu": 1}}, {"mar": {"MulAddRelu": 1}})
    torch.testing.assert_close(warm[4], cold[4])


HELPER = textwrap.dedent(
    """
    def triple(x):
        return x + x + x
    """
)
HELPED = textwrap.dedent(
    """
    import torch, fxfuse
    import fxfuse_cachehelp as helper

    class Helped(fxfuse.Rewrite):
        def pattern(self, x):
            return x * 3
        def replacement(self, x):
            return helper.triple(x)
        def example_inputs(self):
            return [fxfuse.TensorSpec((4, 4))]
    """
)


def test_an_edited_helper_a_trace_ran_is_traced_again(tmp_path, monkeypatch):
    import importlib

    monkeypatch.setenv("FXFUSE_CACHE_DIR", str(tmp_path / "fxfuse"))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fxfuse_cachehelped.py").write_text(HELPED)

    def register(helper_source):
        (tmp_path / "fxfuse_cachehelp.py").write_text(helper_source)
        for name in ("fxfuse_cachehelp", "fxfuse_cachehelped"):
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
        trace_cache.clear_memory()
        p = fxfuse.FusionPass("p", [importlib.import_module("fxfuse_cachehelped").Helped()])
        return p.traced[0].cached, p.uuid()

    first = register(HELPER)
    again = register(HELPER)
    edited = register(HELPER.replace("return x + x + x", "return x * 3"))
    assert (first[0], again[0], edited[0]) == (False, True, False)
    assert again[1] == first[1] and edited[1] != first[1]


def test_a_helper_of_the_same_name_imported_from_elsewhere_is_checked_as_imported(tmp_path, monkeypatch):
    """Two checkouts sharing one cache: each imports `fxfuse_cachehelp` from its own
    directory. The second must be checked against the helper *it* imports, not the file
    the entry was traced with (which still exists, unchanged): served the first's trace, it
    would compile the old helper's graph."""
    import importlib

    monkeypatch.setenv("FXFUSE_CACHE_DIR", str(tmp_path / "fxfuse"))

    def register(checkout, helper_source):
        root = tmp_path / checkout
        root.mkdir(exist_ok=True)
        (root / "fxfuse_cachehelped.py").write_text(HELPED)
        (root / "fxfuse_cachehelp.py").write_text(helper_source)
        monkeypatch.syspath_prepend(str(root))
        for name in ("fxfuse_cachehelp", "fxfuse_cachehelped"):
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
        p = fxfuse.FusionPass("p", [importlib.import_module("fxfuse_cachehelped").Helped()])
        return p.traced[0].cached, p.uuid()

    first = register("a", HELPER)
    other = register("b", HELPER.replace("return x + x + x", "return x * 3"))
    same = register("c", HELPER)
    assert other[0] is False and other[1] != first[1]
    assert same == (True, first[1]), "an identical helper elsewhere is the same trace"


def _factory(op):
    class Made(fxfuse.Rewrite):
        def pattern(self, x):
            return op(x).neg()

        def replacement(self, x):
            return op(x).neg()

        def example_inputs(self):
            return [TensorSpec((4, 4))]

    return Made


def test_classes_one_factory_makes_are_cached_apart(tmp_path, monkeypatch):
    from conftest import trace_graph

    monkeypatch.setenv("FXFUSE_CACHE_DIR", str(tmp_path / "fxfuse"))
    trace_cache.clear_memory()
    relu, sigmoid = _factory(torch.relu), _factory(torch.sigmoid)
    a, b = fxfuse.FusionPass("p", [relu()]), fxfuse.FusionPass("p", [sigmoid()])
    assert a.uuid() != b.uuid()
    assert [str(x) for x in a.traced[0].anchors] != [str(x) for x in b.traced[0].anchors]
    x = torch.randn(3, 3)
    assert a(trace_graph(lambda x: torch.relu(x).neg(), x)) == 1
    assert fxfuse.FusionPass("p", [sigmoid()])(trace_graph(lambda x: torch.relu(x).neg(), x)) == 0


def test_patterns_that_do_not_read_are_traced_again_with_the_same_key(tmp_path, monkeypatch):
    """An entry's patterns are read when a graph first holds an anchor op; a blob that
    does not read then (torn, or written by another fxfuse mid-run) is a fresh trace with
    the key the entry had, never an error in the compile."""
    from conftest import trace_graph

    monkeypatch.setenv("FXFUSE_CACHE_DIR", str(tmp_path / "fxfuse"))
    trace_cache.clear_memory()
    made = _factory(torch.relu)
    cold = fxfuse.FusionPass("p", [made()])
    trace_cache.clear_memory()
    warm = fxfuse.FusionPass("p", [made()])
    assert warm.traced[0].cached
    warm.traced[0]._blob = b"not a pickle"
    assert warm.uuid() == cold.uuid()
    assert warm(trace_graph(lambda x: torch.relu(x).neg(), torch.randn(3, 3))) == 1
    assert warm.uuid() == cold.uuid()
