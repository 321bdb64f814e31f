"""``fxfuse.ops._register.define_op``: one definition gives an op whose real and fake
implementations both validate, whatever way it is called."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fxfuse.ops._register import define_op

NS = "fxfuse_test_register"
calls: list[tuple] = []


def _validate(x, scale, bias, flag):
    calls.append(("validate", len((x, scale, bias, flag)), flag))
    if scale <= 0:
        raise ValueError(f"{NS}.scaled: `scale` must be positive, got {scale}")


@define_op("scaled", namespace=NS, fake=lambda x, scale, bias, flag: x.new_empty(x.shape), validate=_validate)
def scaled(x: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None, flag: bool = False) -> torch.Tensor:
    """``x * scale (+ bias)``: the op's documentation."""
    calls.append(("impl", flag))
    y = x * scale
    return y + bias if bias is not None else y.clone()


op = getattr(torch.ops, NS).scaled


def test_schema_comes_from_the_annotations_and_the_docstring_stays():
    # String annotations (this module uses `from __future__ import annotations`) resolve in
    # the implementation's module.
    assert str(op.default._schema) == f"{NS}::scaled(Tensor x, float scale, Tensor? bias=None, bool flag=False) -> Tensor"
    assert "the op's documentation" in scaled.__doc__


@pytest.mark.parametrize("call", [
    lambda x: op(x, 2.0),
    lambda x: op(x, 2.0, None),
    lambda x: op(x, scale=2.0, flag=True),
    lambda x: scaled(x, 2.0),
    lambda x: scaled(x, 2.0, flag=True),
])
def test_validator_and_impl_get_every_argument(call):
    calls.clear()
    x = torch.ones(3)
    assert torch.equal(call(x), 2 * x)
    (what, n, flag), impl = calls
    assert what == "validate" and n == 4 and impl == ("impl", flag)


def test_fake_validates_and_returns_the_fake_outputs():
    calls.clear()
    with FakeTensorMode() as mode:
        y = op(mode.from_tensor(torch.ones(2, 5)), 3.0)
        assert y.shape == (2, 5)
        with pytest.raises(ValueError, match=rf"{NS}\.scaled: `scale` must be positive, got -1.0"):
            op(mode.from_tensor(torch.ones(2)), -1.0)
    assert [c[0] for c in calls] == ["validate", "validate"]


def test_bad_input_fails_before_the_implementation_runs():
    calls.clear()
    with pytest.raises(ValueError, match="`scale` must be positive"):
        op(torch.ones(2), 0.0)
    assert [c[0] for c in calls] == ["validate"]


def test_opcheck():
    torch.library.opcheck(op.default, (torch.randn(4), 0.5, torch.randn(4), True))
