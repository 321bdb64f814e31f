"""Stages (DESIGN section 11): a pass runs after Inductor's own rewrites (``post``, the
default) or before them (``pre``); a chain Inductor rewrote before a post pass ran is a
counted, explained near miss, never silence."""

import logging

import pytest
import torch

import fxfuse
from fxfuse import TensorSpec


@torch.library.custom_op("fxstage::mm_bias", mutates_args=())
def mm_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ w + b


@mm_bias.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("fxstage::scaled_softmax", mutates_args=())
def scaled_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(x * scale, -1)


@scaled_softmax.register_fake
def _(x, scale):
    return torch.empty_like(x)


class MmBias(fxfuse.Rewrite):
    def pattern(self, x, w, b):
        return torch.mm(x, w) + b

    def replacement(self, x, w, b):
        return torch.ops.fxstage.mm_bias(x, w, b)

    def example_inputs(self):
        return [TensorSpec((4, 8)), TensorSpec((8, 6)), TensorSpec((6,))]


class ScaledSoftmax(fxfuse.Rewrite):
    def pattern(self, x, scale):
        return torch.softmax(x * scale, -1)

    def replacement(self, x, scale):
        return torch.ops.fxstage.scaled_softmax(x, scale)

    def example_inputs(self):
        return [TensorSpec((4, 8)), 0.5]


def _mm_bias(x, w, b):
    return torch.mm(x, w) + b


def _softmax(x):
    return torch.softmax(x * 0.3, -1)


def _args():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 8, generator=g), torch.randn(8, 6, generator=g), torch.randn(6, generator=g)


def test_the_stage_is_part_of_the_key():
    assert fxfuse.FusionPass("p", [MmBias()]).uuid() != fxfuse.FusionPass("p", [MmBias()], stage="pre").uuid()
    with pytest.raises(fxfuse.RewriteError, match="stage must be 'pre' or 'post', got 'early'"):
        fxfuse.FusionPass("p", [MmBias()], stage="early")


pytestmark = pytest.mark.compile


@pytest.mark.parametrize("fn, rewrite, args", [
    (_mm_bias, MmBias, _args()),
    (_softmax, ScaledSoftmax, (torch.randn(5, 8),)),
], ids=["mm+bias->addmm", "softmax(x*s)"])
def test_a_pre_pass_sees_what_inductor_rewrites_and_a_post_pass_says_so(fn, rewrite, args, caplog):
    torch._dynamo.reset()
    pre = fxfuse.FusionPass("early", [rewrite()], stage="pre")
    torch.testing.assert_close(fxfuse.compile(fn, passes=[pre])(*args), fn(*args))
    assert fxfuse.match_table() == {"early": {rewrite.__name__: 1}} and fxfuse.miss_table() == {}

    fxfuse.reset_match_table()
    torch._dynamo.reset()
    late = fxfuse.FusionPass("late", [rewrite()])
    with caplog.at_level(logging.INFO, logger="fxfuse"):
        torch.testing.assert_close(fxfuse.compile(fn, passes=[late])(*args), fn(*args))
    assert fxfuse.match_table() == {}
    assert fxfuse.miss_table() == {"late": {rewrite.__name__: 1}}
    (line,) = [r.getMessage() for r in caplog.records if "late/" in r.getMessage()]
    assert "rewritten by Inductor before this pass ran" in line and "stage='pre' would see it" in line

    report = fxfuse.explain(fn, [late], *args)
    (site,) = report.for_rewrite(rewrite.__name__)
    assert site.status == "miss" and "rewritten by Inductor before this pass ran" in site.reason
    (site,) = fxfuse.explain(fn, [pre], *args).for_rewrite(rewrite.__name__)
    assert site.status == "match"
