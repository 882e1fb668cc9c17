"""Align two GRU seeds on `count` with the Python API (the demo, step by step).

Run: .venv/bin/python examples/align_gru_seeds.py  (about 5 minutes on 2 CPU cores)
"""

import argparse

import torch

from masalign import ModelAlignment, TorchModuleAdapter, evaluate, fit
from masalign.models import train_lm
from masalign.tasks import get_task

argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help describes the run, not starts it
torch.set_num_threads(2)
task = get_task("multi_object")

# 1. Two models: any nn.Module mapping tokens (batch, seq) to logits (batch, seq, vocab).
gru_a, _ = train_lm(task, seed=0)
gru_b, _ = train_lm(task, seed=1)
models = {"A": TorchModuleAdapter(gru_a, name="A"), "B": TorchModuleAdapter(gru_b, name="B")}
print(models["A"].sites())  # {'rnn.h_l0': 128, 'embedding': ..., 'readout': ...}

# 2. Counterfactual pairs from the task's causal model (or your own CounterfactualPairs).
train = task.counterfactual_pairs(10_000, seed=1)
valid = task.counterfactual_pairs(500, seed=2)
test = task.counterfactual_pairs(2_000, seed=3)

# 3. One rotation per model, a 16-d subspace for `count`, trained in all four directions.
alignment = ModelAlignment(models, sites="rnn.h_l0", subspace_dim=16)
result = fit(alignment, train, valid, steps=1000, lr=5e-3)
print(result.stop_reason, result.best_valid_accuracy)

# 4. IIA matrix on held-out pairs, with ceiling (task accuracy) and floor (untrained alignment).
report = evaluate(alignment, test, ceiling_data=task.sample(2_000, seed=4, split="held_out"))
print(report)                      # report.iia["A"]["B"] is the trial IIA from A into B
report.plot("iia.png")
alignment.save("gru_alignment", overwrite=True)  # replaces the last run's; ModelAlignment.load("gru_alignment", models)
