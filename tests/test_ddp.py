"""The trainer under torch.distributed (gloo on CPU), two processes started here, without Ray.

What a data-parallel group must agree on: an OOM on one rank ends every rank at once (none is left waiting in
a collective), the memory peaks a frontier reads are the worst rank's, and an epoch is one pass over the training
split whatever the number of ranks.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.conftest import TINY

pytestmark = pytest.mark.slow


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, per_rank: dict) -> None:
    import datetime

    import torch.distributed as dist

    from lmtune import config as config_lib
    from lmtune.train import Trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cfg = config_lib.load(overrides=[*TINY, "train.steps=12", *per_rank[rank]], locked=False)
        summary = Trainer(cfg).fit()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(summary, default=str))
        dist.barrier()  # no rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: under a loaded machine, C++ destructors run at exit have aborted
    # a rank after its results were written ("terminate called without an active exception", exit -6: seen twice
    # in full-suite runs, never alone). An error above still ends the process with a non-zero code.
    os._exit(0)


def run_group(tmp_path: Path, per_rank: dict[int, list[str]], timeout_s: float = 90) -> tuple[list[dict], float]:
    ctx = mp.get_context("spawn")
    t0 = time.monotonic()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, str(tmp_path / "init"), str(tmp_path), per_rank))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s - (time.monotonic() - t0))
    took = time.monotonic() - t0
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"a rank was still running after {timeout_s} s (left waiting in a collective?)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)], took


def test_one_rank_crossing_the_emulated_limit_ends_every_rank_as_oom(tmp_path):
    """Rank 1 trains micro-batches of 16, rank 0 of 2; only rank 1's peak crosses the limit. Both end as oom at
    the same step, promptly, and both report rank 1's peak (the maximum over ranks)."""
    alone = {}
    for mb in (2, 16):
        from lmtune import config as config_lib
        from lmtune.train import Trainer

        cfg = config_lib.load(overrides=[*TINY, "train.steps=4", f"train.micro_batch_size={mb}"], locked=False)
        alone[mb] = Trainer(cfg).fit()["peak_allocated_gib"]
    limit = (alone[2] + alone[16]) / 2  # rank 0 alone fits, rank 1 alone does not
    summaries, took = run_group(tmp_path, {0: ["train.micro_batch_size=2", f"system.memory_limit_gib={limit}"],
                                           1: ["train.micro_batch_size=16", f"system.memory_limit_gib={limit}"]})
    assert [s["status"] for s in summaries] == ["oom", "oom"]
    assert summaries[0]["step"] == summaries[1]["step"] == 3  # the first step after warmup, on both
    assert summaries[0]["peak_allocated_gib"] == summaries[1]["peak_allocated_gib"] > limit
    assert took < 60


def test_peaks_are_the_maximum_over_ranks(tmp_path):
    summaries, _ = run_group(tmp_path, {0: ["train.micro_batch_size=2"], 1: ["train.micro_batch_size=8"]})
    assert [s["status"] for s in summaries] == ["ok", "ok"]
    assert summaries[0]["peak_allocated_gib"] == summaries[1]["peak_allocated_gib"]
    assert summaries[0]["loss"] == summaries[1]["loss"]  # one all-reduced loss


def test_an_epoch_is_one_pass_over_the_split_on_two_ranks(tmp_path):
    """train.epochs=1 on one rank and on two: an optimizer step of two ranks takes twice the windows, so the run has
    half the steps (rounded up) and both see the whole training split once (at most one step's windows more)."""
    from lmtune import config as config_lib
    from lmtune.data import load_tokens
    from lmtune.train import Trainer

    epoch = ["train.epochs=1", "data.fraction=0.01", "train.micro_batch_size=4", "train.eval_interval=100"]
    cfg = config_lib.load(overrides=[*TINY, *epoch], locked=False)
    windows = (len(load_tokens(cfg.data).train) - 1) // 32  # data.seq_len=32; a window's targets need a token past it
    one = Trainer(cfg).fit()
    two, _ = run_group(tmp_path, {0: epoch, 1: epoch})
    for world, summaries in ((1, [one]), (2, two)):
        steps = math.ceil(windows / (4 * world))
        assert [(s["status"], s["step"]) for s in summaries] == [("ok", steps)] * world, (world, windows)
        seen = summaries[0]["tokens"] // 32  # windows trained on, over every rank
        assert windows <= seen < windows + 4 * world, (world, seen, windows)
