"""Data-parallel MAS fit under torchrun: every process fits its share of each batch.

Run: torchrun --nproc-per-node 2 examples/fit_distributed.py
     (.venv/bin/python -m torch.distributed.run --nproc-per-node 2 examples/fit_distributed.py)

Each process holds the models, the pairs and the alignment; `fit` sees the
initialised process group, runs the models on every second row of each global
batch and sums the gradients and validation counts over the processes
(`masalign.distributed`), so the alignment is the one a single process would
train on the same global batches. gloo on CPU, nccl with one GPU per process.
Only rank 0 shows the progress bar, evaluates, prints and saves.
"""

import argparse
import os

import torch
import torch.distributed as dist

from masalign import ModelAlignment, TorchModuleAdapter, distributed, evaluate, fit
from masalign.models import RecurrentConfig, train_lm
from masalign.tasks import D0, D1, D2, NumericTask

# A short version of Multi-Object (counts 1..8), as in the tests, so that the GRUs train in seconds.
TASK = NumericTask("multi_object_small", (D0, D1, D2), max_count=8, held_out_counts=(3, 6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-steps", type=int, default=1500, help="training steps of each GRU")
    parser.add_argument("--steps", type=int, default=300, help="MAS fit steps")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split between the processes")
    parser.add_argument("--out", default="fit_distributed_alignment", help="folder for rank 0's save")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(1)  # one core per process
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    try:
        # Same seeds, so every process trains the same two GRUs; rank 0's weights are
        # broadcast anyway, since GPU kernels need not be deterministic.
        models = {}
        for name, seed in (("A", 0), ("B", 1)):
            model, _ = train_lm(TASK, RecurrentConfig("gru", hidden_size=48, embedding_size=32), seed=seed, steps=args.model_steps, lr=5e-3, check_every=50)
            model.to(device)
            distributed.broadcast_state(model)
            models[name] = TorchModuleAdapter(model, name=name)

        alignment = ModelAlignment(models, sites="rnn.h_l0", subspace_dim=8, seed=0)
        train = TASK.counterfactual_pairs(3000, seed=1)
        valid = TASK.counterfactual_pairs(300, seed=2)
        # Every process must call fit: it exchanges gradients and validation counts every step.
        result = fit(alignment, train, valid, steps=args.steps, batch_size=args.batch_size, lr=5e-3, eval_every=25)

        if distributed.is_main():
            print(f"{distributed.world_size()} processes ({dist.get_backend()})")
            print(result)
            # evaluate() runs unsharded, so rank 0 can call it alone.
            print(evaluate(alignment, TASK.counterfactual_pairs(600, seed=3)))
            alignment.save(args.out, overwrite=True)
            print(f"saved to {args.out}")
        # Every process waits for rank 0's evaluation and save: none tears the
        # process group down while another may still use it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
