"""Data-parallel fit under torchrun (masalign.distributed): two processes give one process's alignment.

The test runs this file itself under ``python -m torch.distributed.run --nproc-per-node 2``
(gloo on CPU) and compares rank 0's alignment and history with a fit in the test's
own process on the same data and seed. The global batch (37 rows) splits 19/18
and the rows have 1 to 9 label tokens each, so the shares of a batch hold
different numbers of label tokens: a per-process mean, averaged, would not match.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from masalign import ModelAlignment, TorchModuleAdapter, distributed, fit
from masalign.models import RecurrentConfig, RecurrentLM
from masalign.objectives import intervention_loss
from masalign.tasks import D0, D1, D2, NumericTask

TASK = NumericTask("multi_object_small", (D0, D1, D2), max_count=8, held_out_counts=(3, 6))
FIT_OPTIONS = {"steps": 12, "batch_size": 37, "lr": 1e-2, "eval_every": 4, "patience": 100, "target_accuracy": 1.01, "seed": 5}


def _fit() -> tuple[dict[str, torch.Tensor], object]:
    """Two tiny untrained GRUs, a fresh alignment, one short fit; the same in every process."""
    models = {}
    for name, seed in (("A", 0), ("B", 1)):
        torch.manual_seed(seed)
        models[name] = TorchModuleAdapter(RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8)), name=name)
    alignment = ModelAlignment(models, "rnn.h_l0", 4, seed=2)
    # 300 validation pairs: two validation batches (256 + 44), each split between the processes.
    result = fit(alignment, TASK.counterfactual_pairs(200, seed=1), TASK.counterfactual_pairs(300, seed=2), progress=False, **FIT_OPTIONS)
    return {k: v.detach().clone() for k, v in alignment.state_dict().items()}, result


def _main(output: str) -> None:
    """Run under torchrun: every rank fits, rank 0 saves what it got."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        assert distributed.world_size() == 2
        state, result = _fit()
        if distributed.is_main():
            torch.save({"state": state, "history": result.history, "steps": result.steps, "best_step": result.best_step}, output)
        print(f"rank {rank}: fit done", file=sys.stderr, flush=True)
        # No process tears its process group down while another may still use it
        # (a gloo peer closing early aborted the other process once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: process group destroyed", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Everything this worker checks is done and written: skip the interpreter's teardown,
    # where threads of torch's C++ runtime that outlive the group have aborted a process
    # ("terminate called without an active exception"). An error above still exits non-zero.
    os._exit(0)


def test_two_processes_fit_the_same_alignment_as_one(tmp_path: Path) -> None:
    output = tmp_path / "rank0.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(output)]
    run = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    seconds = time.perf_counter() - start
    two = torch.load(output)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each of the two processes
    try:
        state, result = _fit()
    finally:
        torch.set_num_threads(threads)

    assert two["steps"] == result.steps and two["best_step"] == result.best_step
    assert two["state"].keys() == state.keys()
    difference = max(float((two["state"][k] - state[k]).abs().max()) for k in state)
    print(f"max abs difference between 2 processes and 1: {difference:.3g} (torchrun run {seconds:.1f}s)")
    assert difference <= 1e-5
    # The alignment moved, so the comparison is not between two initial states.
    assert any(h["valid_loss"] != result.history[0]["valid_loss"] for h in result.history[1:])
    assert len(two["history"]) == len(result.history)
    for theirs, ours in zip(two["history"], result.history, strict=True):
        assert theirs["step"] == ours["step"]
        assert theirs["valid_accuracy"] == ours["valid_accuracy"]
        assert theirs["valid_loss"] == pytest.approx(ours["valid_loss"], rel=1e-6)


def test_shares_of_a_batch_sum_to_its_mean_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """loss_share on each rank's rows, summed, is the whole batch's mean over its label tokens."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, 11, generator=generator)
    labels = torch.randint(0, 11, (7, 5), generator=generator)
    labels[torch.rand(7, 5, generator=generator) < 0.5] = -100
    labels[:, 0] = 3  # every row has at least one label
    index = torch.arange(7)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    total = torch.zeros(())
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        rows = distributed.shard(index)
        total = total + distributed.loss_share(logits[rows], labels[rows], labels[index])
    torch.testing.assert_close(total, intervention_loss(logits, labels))


def test_cl_loss_refused_when_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    models = {n: TorchModuleAdapter(RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8)), name=n) for n in "AB"}
    pairs = TASK.counterfactual_pairs(20, seed=1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(NotImplementedError, match="latent_objective"):
        fit(ModelAlignment(models, "rnn.h_l0", 4), pairs, pairs, steps=1, progress=False, latent_objective=object())


if __name__ == "__main__":
    _main(sys.argv[1])
