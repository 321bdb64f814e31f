"""gather_match_table across two gloo ranks on the CPU, each compiling its own graph."""

import json

import pytest
import torch.multiprocessing as mp

import fxfuse
from fxfuse.distributed import merge_tables


def test_merge_tables_sums_per_pass_and_rewrite():
    merged = merge_tables([{"p": {"A": 1}, "q": {"C": 2}}, {"p": {"A": 2, "B": 1}}, {}])
    assert merged == {"p": {"A": 3, "B": 1}, "q": {"C": 2}}


def test_gather_without_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not initialized"):
        fxfuse.distributed.gather_match_table()


@pytest.mark.compile
def test_two_gloo_ranks_sum_their_tables(tmp_path):
    import dist_worker

    mp.spawn(dist_worker.worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["local"] == {"p": {"TimesThree": 1}}
    assert results[1]["local"] == {"p": {"TimesThree": 2}}
    for r in results:
        assert r["gathered"] == {"p": {"TimesThree": 3}}


def test_spawn_checks_its_arguments_before_starting_processes():
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        fxfuse.distributed.spawn(dist_worker_rank, 0)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        fxfuse.distributed.spawn(dist_worker_rank, 2, device="tpu")


def dist_worker_rank():
    import torch.distributed as dist

    return dist.get_rank()


def test_a_rank_that_raises_makes_spawn_raise_instead_of_hanging():
    import tp_worker

    with pytest.raises(mp.ProcessRaisedException, match="rank 1 refuses"):
        fxfuse.distributed.spawn(tp_worker.raise_on_rank_1, 2)


def test_gather_tables_without_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not initialized"):
        fxfuse.distributed.gather_tables({"p": {"A": 1}})
