import itertools
import os

import torch

#: ``FXFUSE_FULL_TESTS=1`` runs every kernel test's whole parameter matrix (the slower tier:
#: every combination of shape, dtype, config, ...). CI runs `covering` sets: every value of
#: every axis at least once, each kind of test still there.
FULL_TESTS = os.environ.get("FXFUSE_FULL_TESTS") == "1"


def covering(*axes):
    """Parameter tuples over ``axes``: all combinations under ``FXFUSE_FULL_TESTS=1``, else
    as many tuples as the longest axis has values, each value of every axis in at least one
    (value ``i`` of each axis together, shorter axes cycled).

    >>> covering([1, 2, 3], ["a", "b"])   # without FXFUSE_FULL_TESTS
    [(1, 'a'), (2, 'b'), (3, 'a')]
    """
    axes = [list(a) for a in axes]
    if FULL_TESTS:
        return list(itertools.product(*axes))
    n = max(len(a) for a in axes)
    return [tuple(a[i % len(a)] for a in axes) for i in range(n)]


if not torch.cuda.is_available():
    # Triton kernels run in its CPU interpreter; it must be set before Triton is first
    # imported (Inductor imports it), so here, before fxfuse.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fxfuse  # noqa: E402
from fxfuse import compat  # noqa: E402


def trace_graph(fn, *args, v2=True):
    """The functionalized aten graph of ``fn`` with fake-tensor metadata, as post-grad passes see it."""
    with compat.fake_mode() as mode:
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return compat.trace_functional(fn, fakes, v2=v2)


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.fixture(autouse=True)
def _clean_table():
    fxfuse.reset_match_table()
    yield


@pytest.fixture
def fresh_inductor_cache(tmp_path, monkeypatch):
    """An empty on-disk Inductor cache, with the FX graph cache on."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    from torch._inductor import config

    with config.patch(fx_graph_cache=True, fx_graph_remote_cache=False):
        yield tmp_path
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
