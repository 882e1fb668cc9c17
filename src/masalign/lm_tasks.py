"""Text tasks with a causal model, for pretrained language models with their own tokenizers.

A *run task* shows a run of consecutive items of an ordered list and asks for the
next one::

    counting (variable "number"):   "3, 4, 5, 6,"          -> " 7,"
    weekdays (variable "day"):      "Friday, Saturday,"     -> " Sunday"
    months   (variable "month"):    "March, April, May,"    -> " June"
    letters  (variable "letter"):   "c, d, e,"              -> " f"

The causal model has one variable, the *current item* (the last item of the run),
and one output, its successor: ``answer = successor(current)``. An interchange on
the variable sets the base's current item to the source's; the causal model then
answers with the successor of the source's current item (:meth:`RunTask.run`).
Pairs are drawn so that the base's and the source's answers differ, so agreeing
with the base by chance cannot pass for interchange accuracy.

The same high-level pairs are tokenised by every model's tokenizer
(:meth:`RunTask.counterfactual_views`): a mapping ``{model_name: CounterfactualPairs}``
whose rows correspond, which is how :mod:`masalign` takes models with different
tokenisations. In each view:

- ``base_inputs`` are ``{"input_ids", "attention_mask"}``: the base prompt followed
  by the counterfactual answer's tokens (teacher forcing) except the last, padded
  to the view's longest row (``padding_side="right"`` by default; ``"left"`` puts the
  padding first). Positions are absolute indices into the padded sequence.
- ``labels`` are next-token labels: at the prompt's last token the answer's first
  token, at each answer token the next one, ``IGNORE_INDEX`` (-100) elsewhere. The
  answer text is ``" " + successor``, closed by ``","`` for counting
  (``close_answer``): the separator marks where a multi-token number ends (``" 1"``
  is not ``" 12"``). With Gemma-3's and SmolLM2's tokenizers (one token per digit,
  the space its own token) ``" 15,"`` is the four tokens ``" ", "1", "5", ","``; the
  weekday, month and letter answers (``" Sunday"``) are one token, so their base
  inputs are the prompt alone and the label sits at its last token.
- ``base_positions``/``source_positions`` ``(N, n_slots)``: the token(s) named by
  ``position``, in each tokenisation (see :data:`ANCHORS`). ``"separator"``
  (default) is the token holding the separator after the last item, the prompt's
  last token; ``"item_last"`` the token holding the last item's last character
  (for ``"14"`` split into ``"1", "4"``: the ``"4"``); ``"item_first"`` its first.
  ``"answer"`` is one slot per position that predicts an answer token (the prompt's
  last token and every answer token but the last), the reference code's "stepwise"
  protocol on the response: the sources then carry their own answer too (teacher
  forced, the same tokens as the base's counterfactual answer), and every answer
  must have the same number of tokens (``counting(10, 98)``: two digits). A tuple
  of anchors gives one slot each (``"answer"`` its several).

The prompt and the answer are tokenised together, as one text, and split at the
token that starts the answer; a tokenizer whose token spans the boundary (the
prompt's last character and the answer's first in one token) is refused, as is
one that maps an item to its unknown token (a range it cannot express) and a row
longer than ``max_tokens``.

:meth:`RunTask.evaluation_views` gives the plain prompts with their natural
answers (:class:`LabelledSequences`, same layout) for the ceiling:
``evaluate.task_accuracy(adapter, data)`` is then the model's greedy accuracy,
every answer token right.

Where the variable can be found (measured on SmolLM2-135M-Instruct, 30 layers,
and Gemma-3-270M, 18 layers, residual stream ``model.layers.<i>.output``): a run
states its current item many times over (every earlier item implies it), so the
models read it from the whole run and gather it at the positions that predict
the answer only in their last third. Replacing the *whole* residual vector at the
separator, or at the answer positions, changes nothing before SmolLM2's layer ~21
and Gemma's ~12, and transfers the answer from there on; at the last item's own
tokens it transfers a part (0.5-0.9) in early and middle layers. For counting use
``position="answer"`` with answers of one length (``counting(10, 98)``) at a late
layer, or ``("item_last", "separator")`` early; for single-token answers
(weekdays) the separator at a late layer.
"""

from __future__ import annotations

import calendar
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .data import IGNORE_INDEX, CounterfactualPairs, LabelledSequences

ANCHORS = ("separator", "item_last", "item_first", "answer")


@dataclass(frozen=True)
class Run:
    """One prompt: the items ``start, start + 1, ..., start + length - 1`` (indices into
    the task's values, modulo their number for a cyclic task)."""

    start: int
    length: int


@dataclass(frozen=True)
class Rendered:
    """A prompt and its answer as text, with the character spans the anchors point at."""

    prompt: str
    answer: str
    anchors: dict[str, int] = field(default_factory=dict)  # anchor -> character index in prompt


@dataclass(frozen=True)
class RunTask:
    """Continue a run of consecutive items; see the module docstring.

    Args:
        name: the task's name.
        variable: the causal variable's name (the current item).
        values: the ordered items as text, e.g. ``("1", ..., "20")``.
        cyclic: whether the last item's successor is the first (weekdays, months).
            A non-cyclic run never ends on the last item, which has no successor.
        min_length, max_length: how many items a prompt shows (uniform).
        separator: what follows each item (``","``); ``space`` goes between a
            separator and the next item, and starts the answer.
        prefix: text before the run (an instruction or an example).
        close_answer: end the answer with the separator (``" 7,"``, not ``" 7"``), so that
            it is right only when the item is complete: needed where one item's tokens
            begin another's (``" 1"`` and ``" 12"``). Without it a model that ends a
            list after its last item (``" December"`` then a newline) is not wrong.
    """

    name: str
    variable: str
    values: tuple[str, ...]
    cyclic: bool = False
    min_length: int = 3
    max_length: int = 6
    separator: str = ","
    space: str = " "
    prefix: str = ""
    close_answer: bool = True

    def __post_init__(self) -> None:
        if len(self.values) < 2:
            raise ValueError(f"{self.name}: a run task needs at least two values, got {list(self.values)}")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"{self.name}: the values repeat: {list(self.values)}")
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"{self.name}: need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        longest = len(self.values) if self.cyclic else len(self.values) - 1
        if self.max_length > longest:
            raise ValueError(
                f"{self.name}: a run of {self.max_length} items does not fit {len(self.values)} values "
                f"(at most {longest}{'' if self.cyclic else ', the last value has no successor'})"
            )
        if self.separator and any(self.separator in value for value in self.values):
            raise ValueError(f"{self.name}: the separator {self.separator!r} occurs inside a value")

    # -- the causal model ------------------------------------------------------------------

    def current(self, run: Run) -> int:
        """The variable: the index of the run's last item."""
        return self._wrap(run.start + run.length - 1)

    def successor(self, index: int) -> int:
        """The index of the item after ``index``."""
        if not self.cyclic and index >= len(self.values) - 1:
            raise ValueError(f"{self.name}: {self.values[index]!r} is the last value and has no successor")
        return self._wrap(index + 1)

    def run(self, prompt: Run, interventions: Mapping[str, int] | None = None) -> int:
        """Run the causal model on ``prompt``, with the variable set where ``interventions``
        says (``{variable: index}``); returns the answer's index."""
        interventions = dict(interventions or {})
        unknown = set(interventions) - {self.variable}
        if unknown:
            raise ValueError(f"{self.name} has the variable {self.variable!r}, not {sorted(unknown)}")
        return self.successor(interventions.get(self.variable, self.current(prompt)))

    def counterfactual(self, base: Run, source: Run) -> int:
        """The answer when the base's variable takes its value in the source."""
        return self.run(base, {self.variable: self.current(source)})

    def _wrap(self, index: int) -> int:
        return index % len(self.values) if self.cyclic else index

    # -- prompts ---------------------------------------------------------------------------

    def items(self, run: Run) -> list[str]:
        return [self.values[self._wrap(run.start + offset)] for offset in range(run.length)]

    def render(self, run: Run, answer: int) -> Rendered:
        """The prompt text, the answer text (``space + values[answer]``, then ``separator``
        with ``close_answer``) and the character index each anchor points at."""
        items = self.items(run)
        prompt = self.prefix + (self.separator + self.space).join(items) + self.separator
        last_item_end = len(prompt) - len(self.separator)
        last_item_start = last_item_end - len(items[-1])
        anchors = {
            "separator": len(prompt) - 1 if self.separator else last_item_end - 1,
            "item_last": last_item_end - 1,
            "item_first": last_item_start,
        }
        answer_text = self.space + self.values[answer] + (self.separator if self.close_answer else "")
        return Rendered(prompt, answer_text, anchors)

    def sample_runs(self, n: int, rng: random.Random) -> list[Run]:
        """``n`` runs: the current item uniform over those with a successor, the length
        uniform in ``min_length..max_length`` (redrawn where the run would start before the
        first value of a non-cyclic task)."""
        last_current = len(self.values) - 1 if self.cyclic else len(self.values) - 2
        runs: list[Run] = []
        while len(runs) < n:
            current = rng.randint(0, last_current)
            length = rng.randint(self.min_length, self.max_length)
            start = current - length + 1
            if start < 0 and not self.cyclic:
                continue
            runs.append(Run(start % len(self.values) if self.cyclic else start, length))
        return runs

    def sample_interchange(self, n: int, seed: int = 0) -> tuple[list[Run], list[Run]]:
        """``n`` (base, source) pairs whose answers differ."""
        if n <= 0:
            raise ValueError(f"the number of pairs must be positive, got {n}")
        rng = random.Random(seed)
        bases: list[Run] = []
        sources: list[Run] = []
        while len(bases) < n:
            base, source = self.sample_runs(2, rng)
            if self.current(base) != self.current(source):
                bases.append(base)
                sources.append(source)
        return bases, sources

    # -- tokenised data --------------------------------------------------------------------

    def counterfactual_views(
        self,
        tokenizers: Mapping[str, Any],
        n_pairs: int,
        seed: int = 0,
        position: str | Sequence[str] = "separator",
        variable: str | None = None,
        padding_side: str = "right",
        max_tokens: int | None = None,
    ) -> dict[str, CounterfactualPairs]:
        """The same ``n_pairs`` interchange pairs in every tokenizer's tokens, row for row.

        ``variable`` is the task's variable (default) or ``"null"``: the same pairs
        labelled with the base's own answer (an interchange that must change nothing).
        Pairs are drawn independently of other calls' (and may repeat): for a held-out test
        split use :meth:`counterfactual_splits`.
        """
        bases, sources = self.sample_interchange(n_pairs, seed)
        return self._views(tokenizers, bases, sources, position, variable, padding_side, max_tokens)

    def distinct_pairs(self) -> int:
        """How many distinct (base, source) pairs with different answers the task has."""
        per_current: dict[int, int] = {}
        for run in self._all_runs():
            per_current[self.current(run)] = per_current.get(self.current(run), 0) + 1
        total = sum(per_current.values())
        return total * total - sum(n * n for n in per_current.values())

    def counterfactual_splits(
        self,
        tokenizers: Mapping[str, Any],
        sizes: Mapping[str, int],
        seed: int = 0,
        position: str | Sequence[str] = "separator",
        variable: str | None = None,
        padding_side: str = "right",
        max_tokens: int | None = None,
    ) -> dict[str, dict[str, CounterfactualPairs]]:
        """Splits of distinct pairs, ``{split: {model_name: CounterfactualPairs}}``: no (base,
        source) pair occurs twice, within a split or across them, so a test split is held out.

        Separate calls of :meth:`counterfactual_views` draw independently: a small task
        (weekdays: 378 distinct pairs) then repeats most test pairs in training.
        ``sizes`` is ``{"train": 512, "valid": 48, "test": 160}``, say; more pairs than
        :meth:`distinct_pairs` is an error.
        """
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes.values()):
            raise ValueError(f"sizes must map each split's name to a positive number of pairs, got {dict(sizes)}")
        wanted, available = sum(sizes.values()), self.distinct_pairs()
        if wanted > available:
            raise ValueError(
                f"{self.name} has {available} distinct pairs with different answers; the splits ask for {wanted}: "
                "ask for fewer, or widen the task (more values or run lengths)"
            )
        rng = random.Random(seed)
        if 2 * wanted > available:  # most pairs are wanted: draw from all of them
            runs = self._all_runs()
            every = [(b, s) for b in runs for s in runs if self.current(b) != self.current(s)]
            chosen = rng.sample(every, wanted)
        else:
            chosen, seen = [], set()
            while len(chosen) < wanted:
                base, source = self.sample_runs(2, rng)
                if self.current(base) != self.current(source) and (base, source) not in seen:
                    seen.add((base, source))
                    chosen.append((base, source))
        splits, start = {}, 0
        for name, n in sizes.items():
            bases, sources = (list(side) for side in zip(*chosen[start : start + n]))
            splits[name] = self._views(tokenizers, bases, sources, position, variable, padding_side, max_tokens)
            start += n
        return splits

    def _all_runs(self) -> list[Run]:
        """Every run :meth:`sample_runs` can draw."""
        last_current = len(self.values) - 1 if self.cyclic else len(self.values) - 2
        runs = []
        for current in range(last_current + 1):
            for length in range(self.min_length, self.max_length + 1):
                start = current - length + 1
                if start >= 0 or self.cyclic:
                    runs.append(Run(start % len(self.values) if self.cyclic else start, length))
        return runs

    def _views(
        self,
        tokenizers: Mapping[str, Any],
        bases: list[Run],
        sources: list[Run],
        position: str | Sequence[str],
        variable: str | None,
        padding_side: str,
        max_tokens: int | None,
    ) -> dict[str, CounterfactualPairs]:
        variable = self.variable if variable is None else variable
        if variable not in (self.variable, "null"):
            raise ValueError(f"{self.name} defines the variables {self.variable!r} and 'null', not {variable!r}")
        anchors = _anchor_names(position)
        answers = [self.counterfactual(b, s) if variable == self.variable else self.run(b) for b, s in zip(bases, sources)]
        base_text = [self.render(b, a) for b, a in zip(bases, answers)]
        source_text = [self.render(s, self.run(s)) for s in sources]
        views = {}
        for model_name, tokenizer in _checked_tokenizers(tokenizers).items():
            base = encode(tokenizer, base_text, anchors, padding_side, max_tokens, model_name)
            source = encode(
                tokenizer, source_text, anchors, padding_side, max_tokens, model_name, prompt_only="answer" not in anchors
            )
            if source.positions.shape[1] != base.positions.shape[1]:
                raise ValueError(
                    f"{model_name}: the bases' answers have {base.positions.shape[1]} slots but the sources' "
                    f"{source.positions.shape[1]}; 'answer' positions need answers of one length in tokens"
                )
            views[model_name] = CounterfactualPairs(
                base_inputs=base.inputs,
                source_inputs=source.inputs,
                base_positions=base.positions,
                source_positions=source.positions,
                labels=base.labels,
                variable=variable,
            )
        return views

    def evaluation_views(
        self,
        tokenizers: Mapping[str, Any],
        n: int,
        seed: int = 0,
        padding_side: str = "right",
        max_tokens: int | None = None,
    ) -> dict[str, LabelledSequences]:
        """``n`` plain prompts with their natural answers, per tokenizer (the ceiling)."""
        if n <= 0:
            raise ValueError(f"the number of prompts must be positive, got {n}")
        runs = self.sample_runs(n, random.Random(seed))
        texts = [self.render(r, self.run(r)) for r in runs]
        views = {}
        for model_name, tokenizer in _checked_tokenizers(tokenizers).items():
            encoded = encode(tokenizer, texts, ("separator",), padding_side, max_tokens, model_name)
            views[model_name] = LabelledSequences(encoded.inputs, encoded.labels)
        return views


# -- tokenisation ------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Padded ``inputs`` ``{"input_ids", "attention_mask"}``, next-token ``labels`` on the
    answer, anchor ``positions`` ``(N, n_slots)`` and each row's prompt length in tokens."""

    inputs: dict[str, Tensor]
    labels: Tensor
    positions: Tensor
    prompt_lengths: Tensor


def encode(
    tokenizer: Any,
    texts: Sequence[Rendered],
    anchors: Sequence[str] = ("separator",),
    padding_side: str = "right",
    max_tokens: int | None = None,
    model_name: str = "tokenizer",
    prompt_only: bool = False,
) -> Encoded:
    """Tokenise prompts with their answers (teacher forcing) and pad them.

    Each row is ``prompt + answer`` tokenised as one text (special tokens such as a
    BOS as the tokenizer adds them), split at the first token of the answer. The
    inputs keep every token but the answer's last; the label at position ``i`` is the
    token at ``i + 1`` for the prompt's last token and the answer's tokens. With
    ``prompt_only`` the inputs are the prompt alone and the labels empty (sources).
    The ``"answer"`` anchor stands for the positions that predict the answer's tokens.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    anchors = _anchor_names(anchors)
    rows, label_rows, anchor_rows, prompt_lengths = [], [], [], []
    for text in texts:
        ids, prompt_length, answer_length, offsets = _split_tokens(tokenizer, text, model_name)
        tokens = ids[:prompt_length] if prompt_only else ids[: prompt_length + answer_length - 1]
        if max_tokens is not None and len(tokens) > max_tokens:
            raise ValueError(
                f"{model_name}: {text.prompt + ('' if prompt_only else text.answer)!r} is {len(tokens)} tokens, "
                f"longer than max_tokens={max_tokens}"
            )
        labels = [IGNORE_INDEX] * len(tokens)
        if not prompt_only:
            for i in range(prompt_length - 1, len(tokens)):
                labels[i] = ids[i + 1]
        positions = []
        for anchor in anchors:
            if anchor == "answer":
                if prompt_only:
                    raise ValueError("the 'answer' anchor needs the answer's tokens: encode with prompt_only=False")
                positions += range(prompt_length - 1, prompt_length + answer_length - 1)
            else:
                positions.append(_token_at(offsets, text.anchors[anchor], prompt_length, text, anchor, model_name))
        if len(set(positions)) != len(positions):
            raise ValueError(
                f"{model_name}: the anchors {list(anchors)} fall on the same token ({positions}) in {text.prompt!r}; "
                "each slot needs its own token"
            )
        rows.append(tokens)
        label_rows.append(labels)
        anchor_rows.append(positions)
        prompt_lengths.append(prompt_length)
    width = max(len(r) for r in rows)
    pad_id = _pad_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    slots = sorted({len(row) for row in anchor_rows})
    if len(slots) > 1:
        raise ValueError(
            f"{model_name}: the 'answer' anchor gives {slots[0]} slots in some rows and {slots[-1]} in others: the "
            "answers differ in length in tokens; choose values whose answers have one length (e.g. counting(10, 98))"
        )
    positions = torch.tensor(anchor_rows, dtype=torch.long)
    for i, (tokens, row_labels) in enumerate(zip(rows, label_rows)):
        shift = width - len(tokens) if padding_side == "left" else 0
        input_ids[i, shift : shift + len(tokens)] = torch.tensor(tokens)
        attention_mask[i, shift : shift + len(tokens)] = 1
        labels[i, shift : shift + len(tokens)] = torch.tensor(row_labels)
        positions[i] += shift
    return Encoded({"input_ids": input_ids, "attention_mask": attention_mask}, labels, positions, torch.tensor(prompt_lengths))


def _split_tokens(tokenizer: Any, text: Rendered, model_name: str) -> tuple[list[int], int, int, list[tuple[int, int] | None]]:
    """Token ids of ``prompt + answer``, the prompt's and the answer's lengths in tokens, and
    each token's character span (``None`` for special tokens)."""
    full = text.prompt + text.answer
    encoding = tokenizer(full, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids = list(encoding["input_ids"])
    special = list(encoding["special_tokens_mask"])
    offsets: list[tuple[int, int] | None] = [
        None if is_special else (int(start), int(end)) for (start, end), is_special in zip(encoding["offset_mapping"], special)
    ]
    boundary = len(text.prompt)
    first_answer = None
    for index, span in enumerate(offsets):
        if span is None:
            continue
        start, end = span
        if start < boundary < end:
            raise ValueError(
                f"{model_name}: a token spans the end of the prompt {text.prompt!r} and the start of the answer "
                f"{text.answer!r} ({full[start:end]!r}); teacher forcing needs the answer to start a token"
            )
        if first_answer is None and start >= boundary and end > start:
            first_answer = index
    first_answer = _whitespace_tokens_placed(tokenizer, text.prompt, ids, offsets, first_answer)
    if first_answer is None:
        raise ValueError(f"{model_name}: the answer {text.answer!r} of {text.prompt!r} has no tokens")
    answer_end = max(i for i, span in enumerate(offsets) if span is not None) + 1  # trailing specials (EOS) dropped
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids[:answer_end]:
        pieces = [full[s:e] for (s, e), i in zip((o or (0, 0) for o in offsets), ids) if i == unk]
        raise ValueError(
            f"{model_name} cannot express {full!r}: {pieces} become its unknown token {unk}; "
            "choose values its vocabulary holds"
        )
    return ids, first_answer, answer_end - first_answer, offsets


def _whitespace_tokens_placed(
    tokenizer: Any, prompt: str, ids: Sequence[int], offsets: Sequence[tuple[int, int] | None], first_answer: int | None
) -> int | None:
    """The answer's first token, where tokens with an empty span lie before the one found by span.

    A tokenizer that trims whitespace out of its offsets (a byte-level one with ``trim_offsets``)
    gives a token that is only a space an empty span, so spans cannot say whether the space
    before the answer's first word is the prompt's or the answer's. The prompt tokenized alone
    says: its tokens are the prompt's."""
    before = first_answer if first_answer is not None else len(ids)
    empty = before
    while empty > 0 and offsets[empty - 1] is not None and offsets[empty - 1][0] == offsets[empty - 1][1]:  # type: ignore[index]
        empty -= 1
    if empty == before:
        return first_answer
    encoding = tokenizer(prompt, return_special_tokens_mask=True)
    prompt_ids, special = list(encoding["input_ids"]), list(encoding["special_tokens_mask"])
    while prompt_ids and special[-1]:  # an end-of-sequence token the tokenizer appends
        prompt_ids, special = prompt_ids[:-1], special[:-1]
    if empty <= len(prompt_ids) <= before and list(ids[: len(prompt_ids)]) == prompt_ids:
        return len(prompt_ids) if len(prompt_ids) < len(ids) else first_answer
    return first_answer


def _token_at(
    offsets: Sequence[tuple[int, int] | None], char: int, prompt_length: int, text: Rendered, anchor: str, model_name: str
) -> int:
    for index, span in enumerate(offsets[:prompt_length]):
        if span is not None and span[0] <= char < span[1]:
            return index
    raise ValueError(f"{model_name}: no token holds character {char} ({anchor!r}) of {text.prompt!r}")


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _anchor_names(position: str | Sequence[str]) -> tuple[str, ...]:
    anchors = (position,) if isinstance(position, str) else tuple(position)
    bad = [a for a in anchors if a not in ANCHORS]
    if bad or not anchors:
        raise ValueError(f"positions are named by anchors {ANCHORS}; got {position!r}")
    return anchors


def _checked_tokenizers(tokenizers: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(tokenizers, Mapping) or not tokenizers:
        raise TypeError("tokenizers must be a non-empty mapping {model_name: tokenizer}")
    for model_name, tokenizer in tokenizers.items():
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"{model_name}: a fast tokenizer (PreTrainedTokenizerFast / tokenizers backend) is needed for "
                "character offsets"
            )
    return tokenizers


# -- the tasks -----------------------------------------------------------------------------------


def counting(
    low: int = 1, high: int = 20, min_length: int = 3, max_length: int = 6, prefix: str = "", space: str = " "
) -> RunTask:
    """Counting on: ``"3, 4, 5, 6,"`` -> ``" 7,"``, every number in ``low..high``; variable ``"number"``.

    ``space=""`` writes ``"3,4,5,6,"`` -> ``"7,"``: with tokenizers that make the space
    its own token, the prompt's last token then predicts the answer's first digit.
    """
    if low < 0 or high <= low:
        raise ValueError(f"counting needs 0 <= low < high, got low={low}, high={high}")
    return RunTask(
        "counting", "number", tuple(str(n) for n in range(low, high + 1)), False, min_length, max_length,
        space=space, prefix=prefix,
    )


WEEKDAYS = tuple(calendar.day_name)  # Monday .. Sunday
MONTHS = tuple(calendar.month_name[1:])  # January .. December


def weekdays(min_length: int = 2, max_length: int = 4, prefix: str = "") -> RunTask:
    """``"Friday, Saturday,"`` -> ``" Sunday,"`` (cyclic); variable ``"day"``."""
    return RunTask("weekdays", "day", WEEKDAYS, True, min_length, max_length, prefix=prefix, close_answer=False)


def months(min_length: int = 2, max_length: int = 4, prefix: str = "") -> RunTask:
    """``"March, April,"`` -> ``" May,"`` (cyclic); variable ``"month"``."""
    return RunTask("months", "month", MONTHS, True, min_length, max_length, prefix=prefix, close_answer=False)


def letters(min_length: int = 3, max_length: int = 5, uppercase: bool = False, prefix: str = "") -> RunTask:
    """``"c, d, e,"`` -> ``" f,"`` (a..z, not cyclic); variable ``"letter"``."""
    alphabet = string.ascii_uppercase if uppercase else string.ascii_lowercase
    return RunTask("letters", "letter", tuple(alphabet), False, min_length, max_length, prefix=prefix, close_answer=False)


__all__ = [
    "ANCHORS",
    "MONTHS",
    "WEEKDAYS",
    "Encoded",
    "Rendered",
    "Run",
    "RunTask",
    "counting",
    "encode",
    "letters",
    "months",
    "weekdays",
]
