"""The numeric equivalence tasks and their causal model (docs/method.md section 7).

A sequence is ``B, n demo tokens, T, n response tokens R, E`` with ``n`` in
``1..max_count``. Models must emit exactly ``n`` R tokens after ``T`` and then ``E``.

- Multi-Object: demo tokens drawn from ``D0, D1, D2``; response ``R``.
- Single-Object: one demo token ``D0``; response ``R``.
- Same-Object: ``R`` is both demo and response token.
- Multi-Object Mod / Round (the papers' other tasks): as Multi-Object, but the
  trigger maps the count to ``n mod 4`` / ``n`` rounded to the nearest multiple of
  3, and the response has that many R tokens (:meth:`NumericTask.at_trigger`).
- Void tokens (``void_p``, the reference's "_unk" variant its transformers were
  trained on): each demo-phase token is, with probability ``void_p``, a void token
  ``V`` that does not count. Position then no longer equals count, so a model cannot
  solve the task by reading positions. Models trained with voids still read plain
  sequences, and alignment data has none (as in the reference).

The causal model "count up, count down": ``count += 1`` per demo token, ``count -= 1``
per response token; the next token is ``R`` while ``count > 0``, then ``E``. The
state at a position is the state after reading that position's token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .data import IGNORE_INDEX, CounterfactualPairs, LabelledSequences, ModelInputs, prefix_positions

if TYPE_CHECKING:
    from .latents import LatentTargets

PAD, BOS, TRIGGER, EOS, RESPONSE, D0, D1, D2, VOID = range(9)
VOCAB = ("PAD", "B", "T", "E", "R", "D0", "D1", "D2", "V")
# Models trained without void tokens (the RNNs, as in the reference) read the first 8
# tokens only; keeping their size at 8 keeps the cached models and their seeds valid.
VOCAB_SIZE = 8
VOID_VOCAB_SIZE = len(VOCAB)
HELD_OUT_COUNTS = (4, 9, 14, 17)


@dataclass(frozen=True)
class CausalState:
    """The high-level state after a token: ``count`` and ``phase`` ("demo" or "response")."""

    count: int
    phase: str


@dataclass(frozen=True)
class NumericTask:
    """One of the numeric equivalence tasks; see the module docstring."""

    name: str
    demo_tokens: tuple[int, ...]
    response_token: int = RESPONSE
    max_count: int = 20
    held_out_counts: tuple[int, ...] = HELD_OUT_COUNTS
    # What the trigger does to the count (the papers' other tasks): ``modulus=4``
    # makes the response ``n mod 4`` tokens long (Multi-Object Mod), ``round_to=3``
    # ``n`` rounded to the nearest multiple of 3 (Multi-Object Round).
    modulus: int | None = None
    round_to: int | None = None
    void_p: float = 0.0  # probability that a demo-phase token is the non-counting void token V

    def __post_init__(self) -> None:
        if isinstance(self.max_count, bool) or not isinstance(self.max_count, int) or self.max_count < 1:
            raise ValueError(f"{self.name}: max_count must be a positive integer, got {self.max_count!r}")
        # B, T, E, PAD and V have their own roles in a sequence; a demo or response token must not be one.
        reserved = {PAD: "PAD", BOS: "B", TRIGGER: "T", EOS: "E", VOID: "V"}
        tokens = tuple(self.demo_tokens)
        if not tokens:
            raise ValueError(f"{self.name}: demo_tokens is empty; give at least one of D0, D1, D2 or R ({D0}, {D1}, {D2}, {RESPONSE})")
        for role, token in [*(("demo token", t) for t in tokens), ("response token", self.response_token)]:
            if isinstance(token, bool) or not isinstance(token, int) or token in reserved or not 0 <= token < len(VOCAB):
                raise ValueError(
                    f"{self.name}: {role} {token!r} is not allowed; use D0, D1, D2 or R ({D0}, {D1}, {D2}, {RESPONSE}), "
                    f"not {', '.join(f'{name} ({t})' for t, name in reserved.items())}"
                )
        outside = [n for n in self.held_out_counts if not (isinstance(n, int) and 1 <= n <= self.max_count)]
        if outside:
            raise ValueError(f"{self.name}: held_out_counts {outside} are outside 1..{self.max_count}")
        if not set(range(1, self.max_count + 1)) - set(self.held_out_counts):
            raise ValueError(f"{self.name}: held_out_counts {self.held_out_counts} leave no count 1..{self.max_count} to train on")
        if isinstance(self.void_p, bool) or not isinstance(self.void_p, (int, float)) or not 0 <= self.void_p < 1:
            raise ValueError(f"{self.name}: void_p must be a probability in [0, 1), got {self.void_p!r}")
        if self.modulus is not None and self.round_to is not None:
            raise ValueError(f"{self.name}: give modulus or round_to, not both")
        for name in ("modulus", "round_to"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{self.name}: {name} must be a positive integer, got {value!r}")

    def at_trigger(self, count: int) -> int:
        """The count the response phase starts from, given the demo phase's count."""
        if self.modulus is not None:
            return count % self.modulus
        if self.round_to is not None:
            return int(round(count / self.round_to)) * self.round_to
        return count

    def after_intervention(self, state: CausalState, count: int) -> int:
        """The count an interchange leaves at ``state``: a mod task's response phase holds counts mod ``modulus``
        (as the reference's causal model does after an intervention); otherwise ``count`` itself."""
        if self.modulus is not None and state.phase == "response":
            return count % self.modulus
        return count

    # -- sequences ---------------------------------------------------------------------

    def counts(self, split: str | Sequence[int]) -> list[int]:
        """The counts of a split: "train" (held-out counts removed), "held_out" or "all"."""
        every = list(range(1, self.max_count + 1))
        if not isinstance(split, str):
            counts = list(split)
            bad = [n for n in counts if not 1 <= n <= self.max_count]
            if bad or not counts:
                raise ValueError(f"counts must be a non-empty list within 1..{self.max_count}; got {counts}")
            return counts
        if split == "train":
            return [n for n in every if n not in self.held_out_counts]
        if split == "held_out":
            if not self.held_out_counts:
                raise ValueError(f"{self.name} has no held-out counts (held_out_counts=()); use split='train' or 'all'")
            return list(self.held_out_counts)
        if split == "all":
            return every
        raise ValueError(f"unknown split {split!r}; use 'train', 'held_out', 'all' or a list of counts")

    def sequence(self, n: int, rng: random.Random) -> list[int]:
        if self.void_p:
            # As the reference generates them: each demo-phase token is a void with probability
            # void_p, else T once n demo tokens are out, else a demo token.
            demo = []
            while True:
                if rng.random() < self.void_p:
                    demo.append(VOID)
                elif len(demo) - demo.count(VOID) >= n:
                    break
                else:
                    demo.append(rng.choice(self.demo_tokens))
        else:  # no extra draws: plain sequences stay what they were for a given seed
            demo = [rng.choice(self.demo_tokens) for _ in range(n)]
        return [BOS, *demo, TRIGGER, *([self.response_token] * self.at_trigger(n)), EOS]

    def states(self, tokens: Sequence[int]) -> list[CausalState | None]:
        """The causal model's state after each token (``None`` for B, T, E and padding)."""
        states: list[CausalState | None] = []
        count, phase = 0, "demo"
        for token in tokens:
            if token == TRIGGER:
                phase = "response"
                count = self.at_trigger(count)
                states.append(None)
            elif phase == "demo" and token in self.demo_tokens:
                count += 1
                states.append(CausalState(count, phase))
            elif phase == "response" and token == self.response_token:
                count -= 1
                states.append(CausalState(count, phase))
            else:
                states.append(None)
        return states

    def sample(self, n_sequences: int, seed: int = 0, split: str | Sequence[int] = "train") -> LabelledSequences:
        """``n_sequences`` task sequences, padded, with next-token labels on the response phase and E."""
        rng = random.Random(seed)
        counts = self.counts(split)
        sequences = [self.sequence(rng.choice(counts), rng) for _ in range(n_sequences)]
        labels = [self._natural_labels(seq) for seq in sequences]
        return LabelledSequences(_pad(sequences, PAD), _pad(labels, IGNORE_INDEX))

    def _natural_labels(self, tokens: list[int]) -> list[int]:
        trigger = tokens.index(TRIGGER)
        return [tokens[i + 1] if i >= trigger and i + 1 < len(tokens) else IGNORE_INDEX for i in range(len(tokens))]

    # -- interchange on `count` -----------------------------------------------------------

    def continuation(self, tokens: Sequence[int], position: int, count: int) -> list[int]:
        """Run the causal model on from ``position`` with ``count`` set there: the whole
        counterfactual sequence (the base up to ``position``, then what follows)."""
        state = self.states(tokens)[position]
        if state is None:
            raise ValueError(f"position {position} holds no count (token {VOCAB[tokens[position]]})")
        prefix = list(tokens[: position + 1])
        count = self.after_intervention(state, count)
        if state.phase == "demo":
            trigger = list(tokens).index(TRIGGER)
            remaining_demo = list(tokens[position + 1 : trigger])
            count += sum(token in self.demo_tokens for token in remaining_demo)  # voids do not count
            return prefix + remaining_demo + [TRIGGER] + [self.response_token] * self.at_trigger(count) + [EOS]
        return prefix + [self.response_token] * count + [EOS]

    def intervened_state(self, base_state: CausalState, source_state: CausalState) -> CausalState:
        """The state an interchange on ``count`` should produce: the source's count (mod ``modulus`` in a
        mod task's response phase), the base's phase."""
        return CausalState(self.after_intervention(base_state, source_state.count), base_state.phase)

    def latent_targets(
        self, pairs: CounterfactualPairs, pool_inputs: ModelInputs | None = None, seed: int = 0
    ) -> LatentTargets:
        """Where each pair's counterfactual latent lies (docs/method.md section 5), for the CL loss.

        :func:`masalign.latents.find_counterfactual_latents` with this task's causal
        states: the target state is ``(count = the source's count at its position,
        phase = the base's phase at its position)``. ``pool_inputs`` defaults to the
        pairs' own ``source_inputs`` (natural task sequences, whose activations are
        often read anyway), so ``pool_row`` then indexes ``pairs.source_inputs``.

        Some targets never occur naturally, e.g. count 0 in the demo phase, or the
        largest count in the response phase (the count drops to ``n - 1`` at the
        first ``R``); those pairs are always masked out.
        """
        from .latents import find_counterfactual_latents

        pool = pairs.source_inputs if pool_inputs is None else pool_inputs
        return find_counterfactual_latents(pairs, pool, self.states, self.intervened_state, seed)

    def counterfactual_pairs(
        self,
        n_pairs: int,
        seed: int = 0,
        split: str | Sequence[int] = "all",
        variable: str = "count",
        protocol: str = "single",
    ) -> CounterfactualPairs:
        """Interchange pairs for ``count`` (or ``null``: the same pairs, labelled with the base's own continuation).

        For each pair, a base and a source sequence are drawn, and a position in each
        (not padding, B, T or E). The source's count at its position is written into
        the base at its position, and the causal model runs on to E. Pairs whose
        counterfactual count at T would leave ``1..max_count`` (the range the models
        were trained on) are redrawn.

        ``protocol="single"`` (the reference's "indywise") intervenes at those two
        positions, one slot. ``protocol="stepwise"`` (the reference's protocol for
        transformers) intervenes on the whole prefix: the position ``t`` is drawn
        among those holding a count in both sequences, and base positions ``0..t``
        take the source's positions ``0..t`` in order (:func:`masalign.data.prefix_positions`;
        shorter prefixes leave their last slots empty). The labels are the same
        causal model's: the base's count at ``t`` becomes the source's.
        """
        if n_pairs <= 0:
            raise ValueError(f"n_pairs must be positive, got {n_pairs}")
        if variable not in ("count", "null"):
            raise ValueError(f"the numeric tasks define the variables 'count' and 'null', not {variable!r}")
        if protocol not in ("single", "stepwise"):
            raise ValueError(f"protocol must be 'single' (one position) or 'stepwise' (a prefix), not {protocol!r}")
        rng = random.Random(seed)
        counts = self.counts(split)
        bases, sources, base_pos, source_pos, labels = [], [], [], [], []
        while len(bases) < n_pairs:
            base = self.sequence(rng.choice(counts), rng)
            source = self.sequence(rng.choice(counts), rng)
            base_states, source_states = self.states(base), self.states(source)
            if protocol == "stepwise":
                both = [i for i, (b, s) in enumerate(zip(base_states, source_states)) if b is not None and s is not None]
                if not both:
                    continue
                p = q = rng.choice(both)
            else:
                p = rng.choice([i for i, s in enumerate(base_states) if s is not None])
                q = rng.choice([i for i, s in enumerate(source_states) if s is not None])
            # "null": the interchange must change nothing, so the labels are the base's own
            # continuation; training on it makes the interchanged block causally inert.
            new_count = source_states[q].count if variable == "count" else base_states[p].count  # type: ignore[union-attr]
            counterfactual = self.continuation(base, p, new_count)
            # The demo phase's final count must stay in the range the models were trained on.
            trigger = list(base).index(TRIGGER)
            final_count = new_count + sum(token in self.demo_tokens for token in base[p + 1 : trigger])
            if base_states[p].phase == "demo" and not 1 <= final_count <= self.max_count:  # type: ignore[union-attr]
                continue
            trigger = counterfactual.index(TRIGGER)
            first_label = max(p, trigger)
            labels.append(
                [counterfactual[i + 1] if first_label <= i < len(counterfactual) - 1 else IGNORE_INDEX for i in range(len(counterfactual))]
            )
            bases.append(counterfactual)
            sources.append(source)
            base_pos.append([p])
            source_pos.append([q])
        if protocol == "stepwise":
            base_positions = source_positions = prefix_positions([p for p, in base_pos])
        else:
            base_positions, source_positions = torch.tensor(base_pos), torch.tensor(source_pos)
        return CounterfactualPairs(
            base_inputs=_pad(bases, PAD),
            source_inputs=_pad(sources, PAD),
            base_positions=base_positions,
            source_positions=source_positions.clone(),
            labels=_pad(labels, IGNORE_INDEX),
            variable=variable,
        )


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


TASKS = {
    "multi_object": NumericTask("multi_object", (D0, D1, D2)),
    "single_object": NumericTask("single_object", (D0,)),
    "same_object": NumericTask("same_object", (RESPONSE,)),
    "multi_object_mod": NumericTask("multi_object_mod", (D0, D1, D2), modulus=4),
    "multi_object_round": NumericTask("multi_object_round", (D0, D1, D2), round_to=3),
}


def get_task(name: str) -> NumericTask:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]
