"""What share of the copy bandwidth a plain device-to-device copy reaches at a given size.

Usage: python benchmarks/copy_floor.py [--mib 24 48 96 384 3072] [--json out.json]

`fxfuse bench` states every op's speed as a share of the copy bandwidth measured on
buffers of 256 MiB and 1 GiB. A kernel that moves tens of MiB pays the launch's ramp
and tail on top of the bytes, and so does a copy. This times ``dst.copy_(src)`` moving
the given MiB in all (read plus written), as the ops are timed (median of CUDA-graph
replays, copies rotated past twice the L2), so an op's share can be read against what
a copy of its own size achieves: 4096 tokens x 4096 of RMSNorm + FP8 moves 48 MiB.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, nargs="+", default=[6, 24, 48, 96, 192, 384, 3072],
                   help="bytes moved per copy (read + written), MiB")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("copy_floor: needs a CUDA device", file=sys.stderr)
        return 1
    from fxfuse.bench.timing import cold_copies, copy_bandwidth, graph_us

    bw = copy_bandwidth()
    rows = []
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (256 MiB / 1 GiB copies)")
    for mib in args.mib:
        half = int(mib * 2**20 / 2)
        pairs = cold_copies(lambda: (torch.empty(half, dtype=torch.uint8, device="cuda").random_(),
                                     torch.empty(half, dtype=torch.uint8, device="cuda")), 2 * half)
        us = graph_us([lambda s=s, d=d: d.copy_(s) for s, d in pairs])
        floor = 2 * half / bw * 1e6
        rows.append(dict(mib=mib, us=us, floor_us=floor, pct_bw=100 * floor / us, cold_copies=len(pairs)))
        print(f"  {mib:8.1f} MiB  {us:9.1f} us  floor {floor:9.1f} us  {100 * floor / us:5.1f}% of copy bandwidth")
        del pairs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bandwidth=bw, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
