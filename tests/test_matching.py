"""What a rewrite binds: typed arguments, commuted operands, several instances of one class."""

import pytest
import torch

import fxfuse
from fxfuse import TensorSpec
from conftest import targets, trace_graph

aten = torch.ops.aten


@torch.library.custom_op("fxmatch::fma", mutates_args=())
def fma(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return x * y + z


@fma.register_fake
def _(x, y, z):
    return torch.empty_like(x)


@torch.library.custom_op("fxmatch::scaled_norm", mutates_args=())
def scaled_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


@scaled_norm.register_fake
def _(x, w):
    return torch.empty_like(x)


class MulAddToFma(fxfuse.Rewrite):
    def pattern(self, x, y, z):
        return x * y + z

    def replacement(self, x, y, z):
        return torch.ops.fxmatch.fma(x, y, z)

    def example_inputs(self):
        return [TensorSpec((8, 16), torch.float32)] * 3


class CommutingFma(MulAddToFma):
    commute = True


class NormTimesWeight(fxfuse.Rewrite):
    """A bf16 activation times a bf16 weight: a Gemma-style fp32 weight must not match."""

    def pattern(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w

    def replacement(self, x, w):
        return torch.ops.fxmatch.scaled_norm(x, w)

    def example_inputs(self):
        return [TensorSpec((4, 32), torch.bfloat16), TensorSpec((32,), torch.bfloat16)]


class NormTimesAnyWeight(NormTimesWeight):
    free_dtypes = ("w",)

    def replacement(self, x, w):
        ones = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        return torch.ops.fxmatch.scaled_norm(x, ones) * w  # promotes as the pattern does


def _norm(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


# ---------------------------------------------------------------- typed matches


def test_tensor_argument_never_binds_a_python_number(recwarn):
    a, c = torch.randn(4, 8), torch.randn(4, 8)
    gm = trace_graph(lambda a, c: a * 2.0 + c, a, c)
    p = fxfuse.FusionPass("fma", [MulAddToFma()])
    assert p(gm) == 0
    assert not p.failures and not [w for w in recwarn if issubclass(w.category, fxfuse.FusionWarning)]
    assert "argument y is bound to the Python float 2.0, not a tensor" in p.last_misses["MulAddToFma"].first_reason


def test_arguments_sharing_an_example_dtype_bind_one_dtype():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    gm = trace_graph(_norm, x, torch.randn(32, dtype=torch.float32))  # fp32 weight on a bf16 activation
    p = fxfuse.FusionPass("norm", [NormTimesWeight()])
    assert p(gm) == 0
    reason = p.last_misses["NormTimesWeight"].first_reason
    assert "argument w is float32 but x is bfloat16" in reason and "free_dtypes" in reason

    same = trace_graph(_norm, x, torch.randn(32, dtype=torch.bfloat16))
    assert fxfuse.FusionPass("norm", [NormTimesWeight()])(same) == 1


def test_dtypes_are_tied_within_the_group_not_to_the_example():
    bf16 = [torch.randn(4, 8, dtype=torch.bfloat16) for _ in range(3)]
    assert fxfuse.FusionPass("fma", [MulAddToFma()])(trace_graph(lambda a, b, c: a * b + c, *bf16)) == 1
    mixed = [bf16[0], bf16[1].float(), bf16[2].float()]
    p = fxfuse.FusionPass("fma", [MulAddToFma()])
    assert p(trace_graph(lambda a, b, c: a * b + c, *mixed)) == 0
    assert "argument y is float32 but x is bfloat16" in p.last_misses["MulAddToFma"].first_reason


def test_free_dtypes_opts_an_argument_out():
    x, w = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(32)
    gm = trace_graph(_norm, x, w)
    assert fxfuse.FusionPass("norm", [NormTimesAnyWeight()])(gm) == 1
    gm.recompile()
    torch.testing.assert_close(gm(x, w), _norm(x, w))


def test_free_dtypes_must_name_tensor_arguments():
    class Typo(NormTimesWeight):
        free_dtypes = ("weight",)

    with pytest.raises(fxfuse.RewriteError, match=r"Typo: free_dtypes names \['weight'\]"):
        fxfuse.FusionPass("p", [Typo()])


def test_explain_names_the_argument_that_did_not_fit():
    gm = trace_graph(lambda a, c: a * 2.0 + c, torch.randn(4, 8), torch.randn(4, 8))
    text = str(fxfuse.explain(gm, [fxfuse.FusionPass("fma", [MulAddToFma()])]))
    assert "argument y is bound to the Python float 2.0" in text


# ---------------------------------------------------------------- commute


def _swapped(a, b, c):
    return c + a * b


def test_commute_matches_swapped_operands():
    args = [torch.randn(5, 7) for _ in range(3)]
    assert fxfuse.FusionPass("p", [MulAddToFma()])(trace_graph(_swapped, *args)) == 0
    gm = trace_graph(_swapped, *args)
    p = fxfuse.FusionPass("p", [CommutingFma()])
    assert p(gm) == 1
    gm.recompile()
    assert torch.ops.fxmatch.fma.default in targets(gm)
    torch.testing.assert_close(gm(*args), _swapped(*args))
    # b * a + c: the mul's operands swapped, x and y bound the other way round.
    gm = trace_graph(lambda a, b, c: b * a + c, *args)
    assert fxfuse.FusionPass("p", [CommutingFma()])(gm) == 1


def test_commute_registers_a_pattern_per_operand_order():
    (traced,) = fxfuse.FusionPass("p", [CommutingFma()]).traced
    assert len(traced.variants) == 4  # add and mul: 2 x 2 orders
    (plain,) = fxfuse.FusionPass("p", [MulAddToFma()]).traced
    assert len(plain.variants) == 1


def test_commute_does_not_swap_a_scaled_add():
    # add(x, y, alpha=2) is x + 2y: swapping it would change the function.
    class AlphaAdd(fxfuse.Rewrite):
        commute = True

        def pattern(self, x, y):
            return torch.add(x.relu(), y, alpha=2)

        def replacement(self, x, y):
            return x.relu() + 2 * y

        def example_inputs(self):
            return [TensorSpec((4, 4))] * 2

    (traced,) = fxfuse.FusionPass("p", [AlphaAdd()]).traced
    assert len(traced.variants) == 1


def test_explain_says_a_site_would_match_with_commute():
    gm = trace_graph(_swapped, *[torch.randn(4, 4) for _ in range(3)])
    p = fxfuse.FusionPass("p", [MulAddToFma()])
    text = str(fxfuse.explain(gm, [p]))
    assert "would match with commute = True" in text
    assert p(gm) == 0 and "commute = True" in p.last_misses["MulAddToFma"].first_reason


# ---------------------------------------------------------------- several instances of one class


class Scale(fxfuse.Rewrite):
    def __init__(self, factor: float, dtype: torch.dtype = torch.float32):
        self.factor, self.dtype = factor, dtype

    def pattern(self, x):
        return x * self.factor

    def replacement(self, x):
        return x * (2 * self.factor) / 2

    def example_inputs(self):
        return [TensorSpec((4, 4), self.dtype)]


def test_second_instance_is_named_by_its_parameters():
    first, second = Scale(3.0), Scale(5.0)
    p = fxfuse.FusionPass("scales", [first, second])
    assert [r.name for r in p.rewrites] == ["Scale", "Scale(dtype=torch.float32, factor=5.0)"]
    assert second.name == "Scale", "the user's instance is not renamed"
    gm = trace_graph(lambda x: (x * 3.0).relu() + x * 5.0, torch.randn(4, 4))
    assert p(gm) == 2
    assert fxfuse.match_table() == {"scales": {"Scale": 1, "Scale(dtype=torch.float32, factor=5.0)": 1}}


def test_instances_with_equal_parameters_are_refused():
    with pytest.raises(fxfuse.RewriteError, match=r"registered already, with the same parameters \(Scale\(dtype=torch.float32, factor=3.0\)\)"):
        fxfuse.FusionPass("p", [Scale(3.0), Scale(3.0)])


def test_instances_change_the_key_in_order():
    a = fxfuse.FusionPass("p", [Scale(3.0), Scale(5.0)]).uuid()
    b = fxfuse.FusionPass("p", [Scale(5.0), Scale(3.0)]).uuid()
    assert a != b


# ---------------------------------------------------------------- registration errors name the rewrite


def test_pattern_returning_an_input_names_the_rewrite():
    class ReturnsInput(fxfuse.Rewrite):
        def pattern(self, x, y):
            return x.relu(), y

        def replacement(self, x, y):
            return x.relu(), y

        def example_inputs(self):
            return [TensorSpec((4, 4))] * 2

    with pytest.raises(fxfuse.RewriteError, match=r"rewrite ReturnsInput: output 1 of pattern\(\) is its argument y"):
        fxfuse.FusionPass("p", [ReturnsInput()])
