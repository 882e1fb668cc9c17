"""Left-padded token rows and interchange pairs over them, for the tests of resumed runs.

Imports no TransformerLens, so that the checks run under TransformerLens 3.9
(``hooked_transformer_checks.py``) share them with the main suite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from masalign import CounterfactualPairs

VOCAB, SEQ = 40, 11
POSITIONS = torch.tensor([[3, 10], [4, 9], [6, 8]])  # per row, on real tokens


def padded_inputs(key: str) -> dict[str, Tensor]:
    """Three rows, left-padded by 0, 2 and 5 tokens; the tokens under ``key``."""
    tokens = torch.randint(1, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, SEQ, dtype=torch.long)
    for row, pad in enumerate((0, 2, 5)):
        mask[row, :pad] = 0
        tokens[row, :pad] = 0
    return {key: tokens, "attention_mask": mask}


def pairs(n: int, seed: int, key: str = "input_ids") -> CounterfactualPairs:
    """``n`` pairs of those rows (base and source drawn apart), intervened at each row's second
    position and labelled at the last."""
    generator = torch.Generator().manual_seed(seed)
    base = padded_inputs(key)
    rows = torch.randint(0, 3, (n,), generator=generator)
    labels = torch.full((n, SEQ), -100)
    labels[:, -1] = torch.randint(1, VOCAB, (n,), generator=generator)
    return CounterfactualPairs(
        base_inputs={name: value[rows] for name, value in base.items()},
        source_inputs={name: value[rows.flip(0)] for name, value in base.items()},
        base_positions=POSITIONS[rows][:, 1:],
        source_positions=POSITIONS[rows.flip(0)][:, 1:],
        labels=labels,
    )
