"""Match tables across the ranks of a `torch.distributed` group.

An engine with one worker process per GPU compiles the same model in every worker, and
a fusion that silently stops matching on one rank (another shape, another backend) is
exactly what a per-process table hides. Each rank calls `gather_match_table` (it is a
collective) and gets the sum of all ranks' tables.
"""

from __future__ import annotations

import json
from typing import Any

from .match_table import match_table


def merge_tables(tables: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """Sum match tables per pass and per rewrite.

    Example:
        >>> merge_tables([{"p": {"A": 1}}, {"p": {"A": 2, "B": 1}}])
        {'p': {'A': 3, 'B': 1}}
    """
    total: dict[str, dict[str, int]] = {}
    for table in tables:
        for pass_name, rewrites in table.items():
            row = total.setdefault(pass_name, {})
            for rewrite, n in rewrites.items():
                row[rewrite] = row.get(rewrite, 0) + n
    return {p: dict(sorted(r.items())) for p, r in sorted(total.items())}


def gather_match_table(group: Any = None) -> dict[str, dict[str, int]]:
    """The match tables of all ranks of ``group`` (default: the world), summed, on every rank.

    A collective: every rank of the group must call it.

    Example:
        >>> dist.init_process_group("gloo", ...)
        >>> compiled(x)                       # each rank compiles and runs
        >>> fxfuse.distributed.gather_match_table()
        {'rms_quant_fusion': {'FusedAddRmsNormStaticFp8Quant': 14, ...}}
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fxfuse.distributed.gather_match_table: torch.distributed is not initialized; call init_process_group first")
    # JSON bytes in a uint8 tensor rather than all_gather_object, which needs NumPy.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    payload = torch.tensor(list(json.dumps(match_table()).encode()), dtype=torch.uint8, device=device)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device), group=group)
    longest = max(int(n.item()) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    buffers = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(buffers, padded, group=group)
    tables = [json.loads(bytes(b[: int(n.item())].tolist()).decode()) for b, n in zip(buffers, sizes)]
    return merge_tables(tables)
