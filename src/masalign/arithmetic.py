"""The papers' Arithmetic task: a running value changed by a chain of operations.

A sequence (the reference code's format)::

    B  n  v0  op1 a1 = v1 ,  op2 a2 = v2 ,  ...  opn an = vn  E

``n`` (1..``max_ops``) is the number of operations, ``v0`` the starting value, each
``op`` is ``+`` or ``-`` and each operand ``a`` is drawn so that every value stays in
``min_value..max_value`` (0..20); the models must produce each ``=``, result and
``,`` (or ``E`` after the last result); operations and operands are the task's
inputs, not predicted.

The causal model has one variable, the cumulative value ``value``: set by ``v0``,
and by each ``=`` to ``previous op operand``. An interchange on ``value`` sets the
base's value at one of its positions to the source's value at one of its
positions, and the base's own remaining operations then run on from it
(:meth:`ArithmeticTask.continuation`). Pairs whose counterfactual values would
leave ``min_value..max_value`` are redrawn, as are pairs whose counterfactual
equals the base's own continuation.

The vocabulary is the task's own (:data:`ARITHMETIC_VOCAB`), not the counting
tasks'; build models with ``vocab_size=task.vocab_size``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX, CounterfactualPairs, LabelledSequences

A_PAD, A_BOS, A_EOS, PLUS, MINUS, EQUALS, COMMA = range(7)
_FIRST_NUMBER = 7


@dataclass(frozen=True)
class ArithmeticTask:
    """See the module docstring."""

    name: str = "arithmetic"
    min_value: int = 0
    max_value: int = 20
    max_ops: int = 20

    def __post_init__(self) -> None:
        if not 0 <= self.min_value < self.max_value:
            raise ValueError(f"need 0 <= min_value < max_value, got {self.min_value}, {self.max_value}")
        if self.max_ops < 1:
            raise ValueError(f"max_ops must be at least 1, got {self.max_ops}")

    @property
    def largest_number(self) -> int:
        return max(self.max_value, self.max_ops)

    @property
    def vocab_size(self) -> int:
        return _FIRST_NUMBER + self.largest_number + 1

    def number(self, value: int) -> int:
        """The token id of a number."""
        return _FIRST_NUMBER + value

    def value_of(self, token: int) -> int | None:
        return token - _FIRST_NUMBER if token >= _FIRST_NUMBER else None

    def vocabulary(self) -> list[str]:
        return ["PAD", "B", "E", "+", "-", "=", ","] + [str(v) for v in range(self.largest_number + 1)]

    # -- sequences -------------------------------------------------------------------------

    def sequence(self, rng: random.Random, n_ops: int | None = None) -> list[int]:
        n_ops = rng.randint(1, self.max_ops) if n_ops is None else n_ops
        value = rng.randint(self.min_value, self.max_value)
        tokens = [A_BOS, self.number(n_ops), self.number(value)]
        for index in range(n_ops):
            if value == self.max_value:
                op = MINUS
            elif value == self.min_value:
                op = PLUS
            else:
                op = rng.choice((PLUS, MINUS))
            operand = rng.randint(0, value - self.min_value) if op == MINUS else rng.randint(0, self.max_value - value)
            value = value + operand if op == PLUS else value - operand
            tokens += [op, self.number(operand), EQUALS, self.number(value), COMMA if index < n_ops - 1 else A_EOS]
        return tokens

    def states(self, tokens: list[int]) -> list[int | None]:
        """The cumulative value after each token (``None`` before ``v0`` and at B, E, padding)."""
        states: list[int | None] = []
        value: int | None = None
        op = operand = None
        for index, token in enumerate(tokens):
            if index == 2:
                value = self.value_of(token)
            elif index > 2 and token in (PLUS, MINUS):
                op = token
            elif index > 2 and token == EQUALS and value is not None and op is not None and operand is not None:
                value = value + operand if op == PLUS else value - operand
            elif index > 2 and self.value_of(token) is not None and tokens[index - 1] in (PLUS, MINUS):
                operand = self.value_of(token)
            states.append(value if index >= 2 and token not in (A_EOS, A_PAD) else None)
        return states

    def _label_mask(self, tokens: list[int]) -> list[bool]:
        """Which next tokens the models must produce: ``=``, each result and ``,`` / ``E``."""
        mask = []
        for i in range(len(tokens)):
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            previous_is_result = i >= 1 and tokens[i - 1] == EQUALS
            mask.append(following is not None and (following == EQUALS or tokens[i] == EQUALS or previous_is_result))
        return mask

    def sample(self, n_sequences: int, seed: int = 0) -> LabelledSequences:
        """``n_sequences`` sequences, padded, with next-token labels where the models must produce them."""
        rng = random.Random(seed)
        rows = [self.sequence(rng) for _ in range(n_sequences)]
        labels = [[t if m else IGNORE_INDEX for t, m in zip(r[1:] + [A_PAD], self._label_mask(r))] for r in rows]
        return LabelledSequences(_pad(rows, A_PAD), _pad(labels, IGNORE_INDEX))

    # -- interchange on `value` ---------------------------------------------------------------

    def continuation(self, tokens: list[int], position: int, value: int) -> list[int] | None:
        """The base up to ``position`` with ``value`` set there, its own operations run on from it;
        ``None`` when a value would leave ``min_value..max_value``."""
        if self.states(tokens)[position] is None:
            raise ValueError(f"position {position} holds no value")
        out = list(tokens[: position + 1])
        op = operand = None
        # An operation whose "=" comes after the position uses the new value.
        for index in range(position + 1, len(tokens)):
            token = tokens[index]
            if token in (PLUS, MINUS):
                op = token
            elif self.value_of(token) is not None and tokens[index - 1] in (PLUS, MINUS):
                operand = self.value_of(token)
            elif token == EQUALS:
                if op is None:  # the operation began before the position: read it from the base
                    op = tokens[index - 2]
                    operand = self.value_of(tokens[index - 1])
                value = value + operand if op == PLUS else value - operand
                if not self.min_value <= value <= self.max_value:
                    return None
                op = operand = None
            elif tokens[index - 1] == EQUALS:  # the result token
                token = self.number(value)
            out.append(token)
        return out

    def counterfactual_pairs(self, n_pairs: int, seed: int = 0, variable: str = "value") -> CounterfactualPairs:
        """Interchange pairs for ``value`` (or ``null``), one position per pair; see the module docstring."""
        if n_pairs <= 0:
            raise ValueError(f"n_pairs must be positive, got {n_pairs}")
        if variable not in ("value", "null"):
            raise ValueError(f"the arithmetic task defines the variables 'value' and 'null', not {variable!r}")
        rng = random.Random(seed)
        bases, sources, base_pos, source_pos, labels = [], [], [], [], []
        while len(bases) < n_pairs:
            base, source = self.sequence(rng), self.sequence(rng)
            base_states, source_states = self.states(base), self.states(source)
            # A position from which a result is still to come, so that the value matters.
            last_equals = max(i for i, t in enumerate(base) if t == EQUALS)
            p = rng.choice([i for i, s in enumerate(base_states) if s is not None and i <= last_equals])
            q = rng.choice([i for i, s in enumerate(source_states) if s is not None])
            new_value = source_states[q] if variable == "value" else base_states[p]
            counterfactual = self.continuation(base, p, new_value)  # type: ignore[arg-type]
            if counterfactual is None or (variable == "value" and counterfactual == base):
                continue
            mask = self._label_mask(counterfactual)
            labels.append([counterfactual[i + 1] if mask[i] and i >= p else IGNORE_INDEX for i in range(len(counterfactual))])
            bases.append(counterfactual)
            sources.append(source)
            base_pos.append([p])
            source_pos.append([q])
        return CounterfactualPairs(
            _pad(bases, A_PAD), _pad(sources, A_PAD), torch.tensor(base_pos), torch.tensor(source_pos),
            _pad(labels, IGNORE_INDEX), variable,
        )


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


__all__ = ["ArithmeticTask"]
