"""Timing on CUDA: medians of CUDA-graph replays, and the copy-bandwidth floor."""

from __future__ import annotations

from typing import Any, Callable

import torch


def copy_bandwidth(sizes: tuple[int, ...] = (1 << 28, 1 << 30)) -> float:
    """Bytes per second of large device-to-device copies, reads plus writes (the floor's
    divisor): the best over buffer sizes far larger than L2."""
    best = 0.0
    for nbytes in sizes:
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        best = max(best, 2 * nbytes / (graph_us(lambda: dst.copy_(src)) * 1e-6))
        del src, dst
    return best


def l2_bytes() -> int:
    """The current CUDA device's L2 cache size in bytes (50 MiB on an H100)."""
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)


def cold_copies(make_inputs: Callable[[], object], nbytes: int, most: int = 64) -> list[object]:
    """Input sets to rotate through so no call finds its inputs in L2: enough copies that
    their bytes exceed twice the L2 (at least 2, at most ``most``: below ~1/32 of L2 per
    set a shape is latency-bound and a cold cache changes little)."""
    n = min(max(2, -(-2 * l2_bytes() // max(nbytes, 1)) + 1), most)
    return [make_inputs() for _ in range(n)]


def graph_us(
    fn: Callable[[], object] | list[Callable[[], object]],
    warmup: int = 3,
    reps: int | None = None,
    group: Any = None,
) -> float:
    """Median microseconds of one call of ``fn``, captured in a CUDA graph and replayed.

    The graph holds ``k`` calls, sized so one replay takes about a millisecond, so launch
    overhead is neither in the number nor hidden; the median is over ``reps`` replays,
    each timed with CUDA events. Given a list of functions (one per input copy, see
    `cold_copies`), the graph's calls cycle through them: a cold-L2 measurement.

    With a process ``group`` (``fn`` runs collectives; every rank calls this at the same
    point), the ranks agree on ``k`` and ``reps`` so their graphs hold the same
    collectives, meet before each replay, and each replay counts at the fastest rank's
    time: the last rank to start waits for no peer, so its time holds no launch skew.

    Example:
        >>> x = torch.randn(4096, 4096, device="cuda")
        >>> graph_us(lambda: x.mul_(1.0))  # doctest: +SKIP
        21.3
    """
    fns = fn if isinstance(fn, list) else [fn]
    calls = len(fns)
    fn = lambda: [f() for f in fns]  # noqa: E731 - one "call" visits every copy once
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    # Estimate one call to size the graph.
    g1 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1):
        fn()
    g1.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(5):
        g1.replay()
    t1.record()
    torch.cuda.synchronize()
    one_ms = _largest(max(t0.elapsed_time(t1) / 5, 1e-4), group)  # the same k on every rank
    k = int(min(max(1.0 / one_ms, 1), 200))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(k):
            fn()
    reps = reps or int(min(max(200 / max(one_ms * k, 1e-3), 10), 200))
    times = []
    for _ in range(reps):
        if group is not None:
            _meet(group)
        t0.record()
        g.replay()
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) * 1e3 / (k * calls))
    del g, g1
    if group is not None:
        times = _fastest_rank(times, group)
    times.sort()
    return times[len(times) // 2]


def _largest(value: float, group: Any) -> float:
    if group is None:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _meet(group: Any) -> None:
    import torch.distributed as dist

    torch.cuda.synchronize()
    dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    torch.cuda.synchronize()


def _fastest_rank(times: list[float], group: Any) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(times, dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return t.tolist()
