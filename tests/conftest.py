import os

import torch

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
