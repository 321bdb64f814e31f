"""Runs in each rank of tests/test_distributed.py (a module, so spawn can import it)."""

import json
import os

import torch
import torch.distributed as dist

import fxfuse


class TimesThree(fxfuse.Rewrite):
    def pattern(self, x):
        return x * 3

    def replacement(self, x):
        return x + x + x

    def example_inputs(self):
        return [fxfuse.TensorSpec((4, 4))]


def rank_fn(x):
    return (x * 3).sin()


def rank_fn_twice(x):
    return (x * 3).sin() + (x.cos() * 3)


def worker(rank, world, init_file, out_dir):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(out_dir, f"inductor{rank}"))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fn = rank_fn if rank == 0 else rank_fn_twice  # rank 0 matches once, rank 1 twice
        compiled = fxfuse.compile(fn, passes=[fxfuse.FusionPass("p", [TimesThree()])])
        compiled(torch.randn(4, 4))
        result = {"local": fxfuse.match_table(), "gathered": fxfuse.distributed.gather_match_table()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
