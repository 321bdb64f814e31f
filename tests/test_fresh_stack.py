"""Passes run on a thread of their own (`fusion_pass.on_fresh_stack`): off the caller's deep
interpreter stack, with the caller's context variables (Inductor's config overrides) and grad
mode, raising in the caller; chained passes stay on the caller's thread; inline on request.
And what the faster splice compares sizes by."""

import threading

import pytest
import torch

import fxfuse
from fxfuse import TensorSpec
from fxfuse.fusion_pass import on_fresh_stack
from conftest import trace_graph


class Seen(fxfuse.Rewrite):
    """(a * b).relu(), declined; its check() notes where and how it ran."""

    def __init__(self, seen):
        self.seen = seen

    def pattern(self, a, b):
        return (a * b).relu()

    def replacement(self, a, b):
        return torch.relu(a * b)

    def check(self, match):
        from torch._inductor import config

        self.seen.update(thread=threading.current_thread(), grad=torch.is_grad_enabled(),
                         autotune=config.max_autotune)
        return False

    def example_inputs(self):
        return [TensorSpec((3, 5)), TensorSpec((3, 5))]


def _graph():
    return trace_graph(lambda a, b: (a * b).relu(), torch.randn(3, 5), torch.randn(3, 5)).graph


def _manager(seen, chain=None):
    return fxfuse.PassManager([fxfuse.FusionPass("p", [Seen(seen)])], chain=chain)


def test_passes_run_off_the_callers_thread_with_its_context_and_grad_mode():
    from torch._inductor import config

    seen, chained = {}, {}
    manager = _manager(seen, chain=lambda g: chained.update(thread=threading.current_thread()))
    with torch.no_grad(), config.patch(max_autotune=True):
        manager(_graph())
    assert seen == {"thread": seen["thread"], "grad": False, "autotune": True}
    assert seen["thread"] is not threading.current_thread() and seen["thread"].name == "fxfuse-pass"
    assert chained["thread"] is threading.current_thread()  # a chained pass may read Inductor's thread state
    manager(_graph())
    assert seen["grad"] is True and seen["autotune"] is False


def test_a_failing_stage_raises_its_own_error_in_the_caller():
    def boom():
        raise ValueError("the pass broke")

    with pytest.raises(ValueError, match="the pass broke"):
        on_fresh_stack(boom)


def test_nested_calls_and_the_opt_out_run_inline(monkeypatch):
    inner = on_fresh_stack(lambda: on_fresh_stack(threading.current_thread))
    assert inner is not threading.current_thread() and inner.name == "fxfuse-pass"

    monkeypatch.setenv("FXFUSE_FRESH_STACK", "0")
    seen = {}
    _manager(seen)(_graph())
    assert seen["thread"] is threading.current_thread()


def test_a_symbolic_size_that_is_a_number_compares_as_that_number():
    """Replacement outputs are checked against the matched ones by size expressions
    (`splice._dims`): a SymInt whose expression folded to 4 is the static size 4."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fxfuse.splice import _dims

    env = ShapeEnv()
    s = env.create_symintnode(env.create_symbol(4, ConstantSource("a")), hint=4)
    folded = s - s + 4
    assert isinstance(folded, torch.SymInt)
    assert _dims((folded, 5)) == _dims((4, 5)) == (4, 5)
    assert _dims((s,)) == (("sym", s.node.expr),)
