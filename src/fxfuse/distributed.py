"""Match tables across the ranks of a `torch.distributed` group.

An engine with one worker process per GPU compiles the same model in every worker, and
a fusion that silently stops matching on one rank (another shape, another backend) is
exactly what a per-process table hides. Each rank calls `gather_match_table` (it is a
collective) and gets the sum of all ranks' tables.

`spawn` starts such a set of processes on one machine, for the tensor-parallel reference
model (``fxfuse demo --tp N``) and for tests.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import tempfile
from typing import Any, Callable, Optional, Sequence

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
    return gather_tables(match_table(), group)


def gather_tables(table: dict[str, dict[str, int]], group: Any = None) -> dict[str, dict[str, int]]:
    """Every rank's ``table`` (pass -> rewrite -> count, e.g. `fxfuse.miss_table()`), summed,
    on every rank of ``group``. A collective.

    Example:
        >>> fxfuse.distributed.gather_tables(fxfuse.miss_table())
        {}
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fxfuse.distributed: torch.distributed is not initialized; call init_process_group first")
    # JSON bytes in a uint8 tensor rather than all_gather_object, which needs NumPy.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    payload = torch.tensor(list(json.dumps(table).encode()), dtype=torch.uint8, device=device)
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


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    device: str = "cpu",
    timeout: Optional[datetime.timedelta] = None,
) -> Any:
    """Run ``fn(*args)`` in ``world_size`` new processes, one rank each of a new default
    process group (gloo on the CPU, NCCL on CUDA with one GPU per rank); returns rank 0's
    return value.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function: the processes
    are started with ``spawn``), and so must rank 0's result. On the CPU each rank gets an
    equal share of the cores as its intra-op threads. A rank that raises makes this raise
    (``torch.multiprocessing.ProcessRaisedException``, with the rank's traceback), after
    the other ranks are stopped. ``timeout`` bounds every collective (the backend's
    default otherwise), so ranks that wait for each other forever fail instead.

    Example:
        >>> def world_size():
        ...     return torch.distributed.get_world_size()
        >>> fxfuse.distributed.spawn(world_size, 2)
        2
    """
    import torch
    import torch.multiprocessing as mp

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"fxfuse.distributed.spawn: world_size must be a positive int, got {world_size!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"fxfuse.distributed.spawn: device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"fxfuse.distributed.spawn: {world_size} ranks on CUDA need {world_size} GPUs, "
                         f"{torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory(prefix="fxfuse-spawn-") as tmp:
        mp.spawn(_rank_main, args=(world_size, device, timeout, tmp, fn, tuple(args)), nprocs=world_size, join=True)
        with open(os.path.join(tmp, "result.pkl"), "rb") as f:
            return pickle.load(f)


def _rank_main(
    rank: int, world_size: int, device: str, timeout: Optional[datetime.timedelta], tmp: str,
    fn: Callable[..., Any], args: tuple,
) -> None:
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(rank)
    else:  # ranks share the cores rather than each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    backend = "nccl" if device == "cuda" else "gloo"
    extra = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=world_size, **extra)
    try:
        result = fn(*args)
        if rank == 0:
            with open(os.path.join(tmp, "result.pkl"), "wb") as f:
                pickle.dump(result, f)
        # No rank tears the group down while another still has work in flight through it:
        # gloo aborts the process then ("terminate called without an active exception",
        # seen on a loaded 2-core machine). A rank that raised never gets here; spawn
        # stops the others.
        dist.barrier()
    finally:
        dist.destroy_process_group()
