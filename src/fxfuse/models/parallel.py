"""Tensor parallelism for the reference model: which slice of a weight a rank holds, and
the all-reduce after a row-parallel projection.

Megatron-style: QKV and gate/up are *column-parallel* (each rank computes its heads'
and its slice of the MLP's columns, no communication), ``o_proj`` and ``down_proj`` are
*row-parallel* (each rank multiplies its slice of the input by its slice of the weight's
columns, giving a partial sum, in fp32, that an all-reduce completes). The all-reduce is written
as the functional collective (``torch.ops._c10d_functional.all_reduce`` then
``wait_tensor``), which ``torch.compile`` traces into the graph with the group's name as
a string, where ``allreduce_rms_fusion`` finds it.

Every rank draws the *full* random weights from the seed, as at ``tp_size=1``, and keeps
its slice; quantization parameters that span a whole weight (a per-tensor FP8 scale, an
NVFP4 global scale) are computed from the full weight, so a rank's quantized slice is
exactly the slice of the ``tp_size=1`` model's quantized weight.

Example:
    >>> tp = TensorParallel(size=2, rank=1, group_name="0")     # rank 1 of 2
    >>> tp.column((64, 32, 32)).take(torch.randn(128, 64)).shape  # its q, k and v rows
    torch.Size([64, 64])
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Shard:
    """This rank's slice of a weight along ``dim``: the weight is the concatenation of
    ``segments`` (their sizes along ``dim``), each split evenly among ``size`` ranks, and
    rank ``rank`` holds its part of every segment, concatenated.

    Example:
        >>> Shard(dim=0, segments=(4, 2), rank=1, size=2).take(torch.arange(6)).tolist()
        [2, 3, 5]
    """

    dim: int
    segments: tuple[int, ...]
    rank: int
    size: int

    def take(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's slice of ``weight`` (contiguous)."""
        if weight.shape[self.dim] != sum(self.segments):
            raise ValueError(
                f"Shard: the weight has {weight.shape[self.dim]} entries along dim {self.dim}, "
                f"but the segments {list(self.segments)} add up to {sum(self.segments)}"
            )
        pieces, start = [], 0
        for seg in self.segments:
            part = seg // self.size
            pieces.append(weight.narrow(self.dim, start + self.rank * part, part))
            start += seg
        return torch.cat(pieces, dim=self.dim).contiguous()


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """The tensor-parallel group a model runs in: ``size`` ranks, this one ``rank``, the
    process group's name (None at ``size == 1``, where nothing is communicated).

    Example:
        >>> TensorParallel.resolve(1).all_reduce(torch.ones(2)).tolist()
        [1.0, 1.0]
    """

    size: int = 1
    rank: int = 0
    group_name: Optional[str] = None

    @staticmethod
    def resolve(size: int, group: Any = None) -> "TensorParallel":
        """The tensor-parallel group of ``size`` ranks: ``group`` (a ``ProcessGroup``), else
        the default (world) group, which must have exactly ``size`` ranks. ``size == 1``
        needs no process group.

        Example:
            >>> dist.init_process_group("gloo", ...)          # on each of 2 ranks
            >>> TensorParallel.resolve(2).group_name
            '0'
        """
        if size == 1 and group is None:
            return TensorParallel()
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"a tensor-parallel model of tp_size={size} runs one process per rank inside a "
                "torch.distributed process group; call init_process_group first (or use "
                "fxfuse.distributed.spawn, which starts the processes and the group)"
            )
        group = group if group is not None else dist.group.WORLD
        if group.size() != size:
            raise ValueError(f"tp_size is {size} but the process group {group.group_name!r} has {group.size()} ranks")
        return TensorParallel(size, dist.get_rank(group), group.group_name)

    def column(self, segments: Sequence[int]) -> Optional[Shard]:
        """The slice of a column-parallel weight ``[sum(segments), in]`` (rows split per segment);
        None at ``size == 1``."""
        return None if self.size == 1 else Shard(0, tuple(segments), self.rank, self.size)

    def row(self, in_features: int) -> Optional[Shard]:
        """The slice of a row-parallel weight ``[out, in_features]`` (columns split); None at ``size == 1``."""
        return None if self.size == 1 else Shard(1, (in_features,), self.rank, self.size)

    def partial_sum_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the row-parallel projections write their partial sums in: fp32 under
        tensor parallelism, the model dtype at ``size == 1`` (where there is no partial sum).

        fp32 on the wire doubles the all-reduce's bytes, but makes the sum rounded once to
        the model dtype, as ``tp_size=1``'s GEMM rounds its fp32 accumulator once: the
        logits then equal those of ``tp_size=1`` up to fp32 reassociation (bit for bit in
        the tests), a sharp check of the sharding. With partial sums in bf16 each rank's
        rounding shifts the residual stream by an ulp here and there, and the FP8 and NVFP4
        activation quants downstream amplify that into different greedy tokens on the tiny
        random models. Engines that reduce in bf16 get the same fusion (`allreduce_rms_fusion`
        matches both forms).

        >>> TensorParallel(size=2, rank=0, group_name="0").partial_sum_dtype(torch.bfloat16)
        torch.float32
        """
        return model_dtype if self.size == 1 else torch.float32

    def reduce_partial_sums(self, x: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
        """The sum over the ranks of the partial sums ``x`` (in `partial_sum_dtype`), rounded
        to ``model_dtype``; ``x`` itself at ``size == 1``."""
        if self.size == 1:
            return x
        return self.all_reduce(x).to(model_dtype)

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``x`` reduced over the group (``"sum"`` or ``"max"``); ``x`` itself at ``size == 1``.

        The functional collective, so that a compiled forward holds it as a graph node.
        """
        if self.size == 1:
            return x
        reduced = torch.ops._c10d_functional.all_reduce(x, op, self.group_name)
        return torch.ops._c10d_functional.wait_tensor(reduced)
