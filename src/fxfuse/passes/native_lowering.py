"""``native_lowering``: replace an fxfuse op by its native PyTorch implementation where
Inductor's code for that is faster than the op's Triton kernel, so Inductor fuses it
with its neighbours.

Which is faster is measured, not guessed: ``fxfuse bench --write-choices PATH`` times
each op's kernel against ``torch.compile`` of its native implementation per (token
count, width) and writes the winners; the tables measured on our H100 and H200 ship as
``kernel_choices.json`` beside this module. A node is lowered when its device's entry
says Inductor wins for the node's width at its token count (nearest measured count), or,
for a symbolic token count, at every measured count: one compiled graph serves them all.
Devices without an entry keep the kernels. The table is a parameter of each rewrite, so
a new table changes the pass's cache key.
"""

from __future__ import annotations

import json
import math
import pathlib
import types
from typing import Any, Callable, Mapping, Optional

import torch

from ..fusion_pass import FusionPass
from ..ops import activation as act
from ..ops import fused as fu
from ..ops import group_quant as gq
from ..ops import norm as nm
from ..ops import nvfp4 as nv
from ..ops import quant as qu
from ..rewrite import Rewrite
from ._common import activation, scale, weight

fx = torch.ops.fxfuse
CHOICES_PATH = pathlib.Path(__file__).with_name("kernel_choices.json")

# op -> (pattern calling the op, its native implementation, example inputs).
# The first argument is the activation whose shape picks the table entry.
_ACT2 = activation(width=128)
# Read-only (the table is code, in the key through this module's source; a dict would
# be state that cache_state() has to report).
LOWERINGS: Mapping[str, tuple[Callable, Callable, Callable[[], list]]] = types.MappingProxyType({
    "rms_norm": (lambda x, w, eps: fx.rms_norm(x, w, eps), nm.rms_norm_native,
                 lambda: [activation(), weight(), 1e-6]),
    "fused_add_rms_norm": (lambda x, r, w, eps: fx.fused_add_rms_norm(x, r, w, eps), nm.fused_add_rms_norm_native,
                           lambda: [activation(), activation(), weight(), 1e-6]),
    "static_scaled_fp8_quant": (lambda x, s: fx.static_scaled_fp8_quant(x, s), qu.static_scaled_fp8_quant_native,
                                lambda: [activation(), scale()]),
    "dynamic_per_token_fp8_quant": (lambda x: fx.dynamic_per_token_fp8_quant(x),
                                    lambda x: qu.dynamic_per_token_fp8_quant_native(x),
                                    lambda: [activation()]),
    "nvfp4_quant": (lambda x, gs: fx.nvfp4_quant(x, gs), nv.nvfp4_quant_native, lambda: [activation(), scale()]),
    "silu_and_mul": (lambda x: fx.silu_and_mul(x), act.silu_and_mul_native, lambda: [_ACT2]),
    "rms_norm_static_fp8_quant": (lambda x, w, s, eps: fx.rms_norm_static_fp8_quant(x, w, s, eps),
                                  fu.rms_norm_static_fp8_quant_native, lambda: [activation(), weight(), scale(), 1e-6]),
    "fused_add_rms_norm_static_fp8_quant": (
        lambda x, r, w, s, eps: fx.fused_add_rms_norm_static_fp8_quant(x, r, w, s, eps),
        fu.fused_add_rms_norm_static_fp8_quant_native, lambda: [activation(), activation(), weight(), scale(), 1e-6]),
    "rms_norm_dynamic_per_token_fp8_quant": (
        lambda x, w, eps: fx.rms_norm_dynamic_per_token_fp8_quant(x, w, eps),
        lambda x, w, eps: fu.rms_norm_dynamic_per_token_fp8_quant_native(x, w, eps),
        lambda: [activation(), weight(), 1e-6]),
    "fused_add_rms_norm_dynamic_per_token_fp8_quant": (
        lambda x, r, w, eps: fx.fused_add_rms_norm_dynamic_per_token_fp8_quant(x, r, w, eps),
        lambda x, r, w, eps: fu.fused_add_rms_norm_dynamic_per_token_fp8_quant_native(x, r, w, eps),
        lambda: [activation(), activation(), weight(), 1e-6]),
    "silu_and_mul_static_fp8_quant": (lambda x, s: fx.silu_and_mul_static_fp8_quant(x, s),
                                      fu.silu_and_mul_static_fp8_quant_native, lambda: [_ACT2, scale()]),
    "silu_and_mul_nvfp4_quant": (lambda x, gs: fx.silu_and_mul_nvfp4_quant(x, gs), nv.silu_and_mul_nvfp4_quant_native,
                                 lambda: [activation(width=64), scale()]),
    # Block-scaled FP8: group size (int) and scale layout (bool) are wildcards, one rule each.
    "group_fp8_quant": (lambda x, g, cm: fx.group_fp8_quant(x, g, cm), gq.group_fp8_quant_native,
                        lambda: [activation(width=128), 64, True]),
    "rms_norm_group_fp8_quant": (
        lambda x, w, eps, g, cm: fx.rms_norm_group_fp8_quant(x, w, eps, g, cm), gq.rms_norm_group_fp8_quant_native,
        lambda: [activation(width=128), weight(width=128), 1e-6, 64, True]),
    "fused_add_rms_norm_group_fp8_quant": (
        lambda x, r, w, eps, g, cm: fx.fused_add_rms_norm_group_fp8_quant(x, r, w, eps, g, cm),
        gq.fused_add_rms_norm_group_fp8_quant_native,
        lambda: [activation(width=128), activation(width=128), weight(width=128), 1e-6, 64, True]),
    "silu_and_mul_group_fp8_quant": (
        lambda x, g, cm: fx.silu_and_mul_group_fp8_quant(x, g, cm), gq.silu_and_mul_group_fp8_quant_native,
        lambda: [activation(width=256), 64, True]),
})


def load_choices(path: Optional[str | pathlib.Path] = None) -> dict[str, Any]:
    """The measured table: ``{device name: {op: {width: {tokens: "kernel" | "inductor"}}}}``
    (JSON keys are strings). Default: the table shipped beside this module.

    >>> load_choices()["devices"].keys()  # doctest: +SKIP
    dict_keys(['NVIDIA H100 80GB HBM3'])
    """
    path = pathlib.Path(path) if path is not None else CHOICES_PATH
    table = json.loads(path.read_text())
    if not isinstance(table.get("devices"), dict):
        raise ValueError(f"{path}: a kernel-choices table needs a 'devices' mapping")
    return table


def device_name(device: torch.device) -> str:
    """The name a table is keyed by: the CUDA device's name, else the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def present_devices() -> tuple[str, ...]:
    """The table names of the devices this process has: ``cpu`` and each CUDA device.

    >>> present_devices()[0]
    'cpu'
    """
    return ("cpu", *(device_name(torch.device("cuda", i)) for i in range(torch.cuda.device_count())))


def prefers_inductor(entry: dict[str, dict[str, str]], width: int, tokens: Any) -> bool:
    """Whether a table ``entry`` (``{width: {tokens: winner}}``) lowers an op of this shape.

    The nearest measured width (log scale); the nearest measured token count, or every
    count when ``tokens`` is symbolic.

    >>> prefers_inductor({"4096": {"1": "inductor", "4096": "kernel"}}, 4096, 2)
    True
    """
    if not entry:
        return False
    w = min(entry, key=lambda k: abs(math.log(int(k)) - math.log(max(width, 1))))
    by_tokens = entry[w]
    if not by_tokens:
        return False
    if not isinstance(tokens, int):
        return all(v == "inductor" for v in by_tokens.values())
    t = min(by_tokens, key=lambda k: abs(math.log(int(k)) - math.log(max(tokens, 1))))
    return by_tokens[t] == "inductor"


class LowerToNative(Rewrite):
    """op(args)  ->  op's native implementation, where the table says Inductor wins."""

    def __init__(self, op: str, table: dict[str, dict[str, dict[str, str]]]) -> None:
        if op not in LOWERINGS:
            raise ValueError(f"native_lowering: no lowering for op {op!r}; known: {sorted(LOWERINGS)}")
        self.op = op
        self.table = table  # {device name: {width: {tokens: winner}}} for this op

    @property
    def name(self) -> str:
        return f"{self.op}_to_native"

    # Properties, so the framework sees the rule's own functions and their argument names.
    @property
    def pattern(self):
        return LOWERINGS[self.op][0]

    @property
    def replacement(self):
        return LOWERINGS[self.op][1]

    def example_inputs(self):
        return LOWERINGS[self.op][2]()

    # Declining a site is this pass's decision (the kernel is faster there), not a fusion that failed.
    report_misses = False

    def cache_state(self):
        """The devices present: ``check`` looks the graph's device up by name in the table."""
        return present_devices()

    def check(self, match) -> bool:
        x = next(iter(match.kwargs.values())).meta["val"]
        entry = self.table.get(device_name(x.device))
        if entry is None:
            return False
        width = int(x.shape[-1])
        tokens = math.prod(x.shape[:-1]) if x.dim() > 1 else 1
        hint = tokens if isinstance(tokens, int) else None
        return prefers_inductor(entry, width, hint)


def native_lowering(choices: Optional[dict[str, Any]] = None) -> FusionPass:
    """The lowering pass for a kernel-choices table (default: the shipped one); it holds a
    rewrite for each op that the table lowers somewhere.

    >>> p = native_lowering({"devices": {"cpu": {"rms_norm": {"64": {"5": "inductor"}}}}})
    >>> [r.name for r in p.rewrites]
    ['rms_norm_to_native']
    """
    choices = load_choices() if choices is None else choices
    # Only devices this process has: entries for other GPUs cannot match here, and each
    # rewrite costs ~30 ms to register (a CPU-only process registers none).
    present = set(present_devices())
    per_op: dict[str, dict[str, Any]] = {}
    for dev, ops in sorted(choices["devices"].items()):
        if dev not in present:
            continue
        for op, entry in sorted(ops.items()):
            if any(v == "inductor" for by_tokens in entry.values() for v in by_tokens.values()):
                per_op.setdefault(op, {})[dev] = entry
    return FusionPass("native_lowering", [LowerToNative(op, per_op[op]) for op in LOWERINGS if op in per_op])
