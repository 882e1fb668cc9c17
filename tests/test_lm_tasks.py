"""Text run tasks for pretrained language models, with tiny local tokenizers (no model is loaded).

Two tokenizers stand in for the real ones: ``digits`` splits numbers into single
digits, makes the space its own token and adds a BOS, as Gemma-3's does (SmolLM2's
is the same without the BOS); ``words`` keeps a number with its leading space as
one token (`` 15``), GPT-2 style, and knows only the numbers 0..30.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from masalign.data import IGNORE_INDEX, CounterfactualPairs, LabelledSequences, check_views
from masalign.lm_tasks import MONTHS, WEEKDAYS, Run, RunTask, counting, encode, letters, months, weekdays

WORDS = [*WEEKDAYS, *MONTHS, *"abcdefghijklmnopqrstuvwxyz"]


def _fast(tokenizer: Tokenizer, **special: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def digit_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, " ": 3, ",": 4}
    for piece in [*"0123456789", *WORDS]:
        vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d| |,|[A-Za-z]+"), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return _fast(tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")


def word_tokenizer(top: int = 30, pattern: str = r" ?\d+| ?[A-Za-z]+|,") -> PreTrainedTokenizerFast:
    # ids in another order than the digit tokenizer's, so a mixed-up view would show
    vocab = {"<unk>": 0, ",": 1, ", ": 2}
    for n in reversed(range(top + 1)):
        vocab[f" {n}"] = len(vocab)
        vocab[str(n)] = len(vocab)
    for word in WORDS:
        vocab[f" {word}"] = len(vocab)
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return _fast(tokenizer, unk_token="<unk>", pad_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    return {"digits": digit_tokenizer(), "words": word_tokenizer()}


def text_of(tokenizer: PreTrainedTokenizerFast, ids: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    """The text a row spells (word-level tokens are the text itself); BOS and padding dropped."""
    tokens = tokenizer.convert_ids_to_tokens(ids[mask.bool()].tolist() if mask is not None else ids.tolist())
    return "".join(t for t in tokens if t != "[BOS]")


def token_at(tokenizer: PreTrainedTokenizerFast, inputs: dict, row: int, position: int) -> str:
    assert int(inputs["attention_mask"][row, position]) == 1
    return tokenizer.convert_ids_to_tokens(int(inputs["input_ids"][row, position]))


# -- the causal model ----------------------------------------------------------------------------


def test_causal_model_answers_the_successor_of_the_current_item() -> None:
    task = counting(1, 20)
    assert task.items(Run(2, 4)) == ["3", "4", "5", "6"]
    assert task.values[task.current(Run(2, 4))] == "6"
    assert task.values[task.run(Run(2, 4))] == "7"
    # the interchange: the base's current number becomes the source's
    assert task.values[task.counterfactual(Run(2, 4), Run(10, 3))] == "14"
    assert task.values[task.run(Run(2, 4), {"number": 16})] == "18"
    with pytest.raises(ValueError, match="no successor"):
        task.successor(len(task.values) - 1)
    with pytest.raises(ValueError, match="variable 'number'"):
        task.run(Run(2, 4), {"day": 1})


def test_cyclic_tasks_wrap_around() -> None:
    task = weekdays()
    run = Run(WEEKDAYS.index("Saturday"), 3)
    assert task.items(run) == ["Saturday", "Sunday", "Monday"]
    assert task.values[task.run(run)] == "Tuesday"
    assert task.values[task.run(Run(WEEKDAYS.index("Friday"), 3))] == "Monday"
    assert months().render(Run(10, 2), 0).prompt == "November, December,"
    # single-token words need no closing separator; numbers do (" 1" begins " 12")
    assert task.render(run, task.run(run)).answer == " Tuesday"
    assert counting().render(Run(0, 3), 3).answer == " 4,"


def test_render_marks_the_anchors() -> None:
    text = counting(1, 20).render(Run(11, 3), 15)
    assert text.prompt == "12, 13, 14," and text.answer == " 16,"
    assert [text.prompt[text.anchors[a]] for a in ("separator", "item_last", "item_first")] == [",", "4", "1"]
    assert counting(1, 20, prefix="Count: ").render(Run(0, 3), 3).prompt == "Count: 1, 2, 3,"


def test_sampling_covers_the_range_and_keeps_answers_apart() -> None:
    task = counting(1, 20, 3, 6)
    runs = task.sample_runs(2000, __import__("random").Random(0))
    currents = {task.values[task.current(r)] for r in runs}
    assert currents == {str(n) for n in range(3, 20)}  # a run of 3 ends at 3 or later; 20 has no successor
    assert {r.length for r in runs} == {3, 4, 5, 6}
    assert all(r.start >= 0 for r in runs)
    bases, sources = task.sample_interchange(300, seed=1)
    assert all(task.counterfactual(b, s) != task.run(b) for b, s in zip(bases, sources))
    assert task.sample_interchange(5, seed=3) == task.sample_interchange(5, seed=3)


# -- tokenised views -------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_views_correspond_row_for_row(tokenizers, padding_side) -> None:
    task = counting(1, 30, 3, 6)
    views = task.counterfactual_views(tokenizers, 60, seed=2, position=("item_last", "separator"), padding_side=padding_side)
    assert check_views(views) == 60 and all(isinstance(v, CounterfactualPairs) for v in views.values())
    bases, sources = task.sample_interchange(60, seed=2)
    for name, view in views.items():
        tok = tokenizers[name]
        assert view.variable == "number"
        for i, (base, source) in enumerate(zip(bases, sources)):
            answer = task.counterfactual(base, source)
            expected = task.render(base, answer)
            # the base holds the prompt and the counterfactual answer but its last token
            base_text = text_of(tok, view.base_inputs["input_ids"][i], view.base_inputs["attention_mask"][i])
            assert base_text == expected.prompt + expected.answer[: len(expected.answer) - 1]
            assert text_of(tok, view.source_inputs["input_ids"][i], view.source_inputs["attention_mask"][i]) == (
                task.render(source, 0).prompt
            )
            # labels: the counterfactual answer, tokenised, from the prompt's last token on
            label_row = view.labels[i]
            at = (label_row != IGNORE_INDEX).nonzero().flatten()
            assert at.tolist() == list(range(int(at[0]), int(at[-1]) + 1))
            assert "".join(tok.convert_ids_to_tokens(label_row[at].tolist())) == " " + task.values[answer] + ","
            assert token_at(tok, view.base_inputs, i, int(at[0])) == ","  # the prompt's last token
            assert (label_row[at[:-1]] == view.base_inputs["input_ids"][i, at[:-1] + 1]).all()  # teacher forcing
            # the anchors: the current number's last token, then the separator after it
            last, sep = view.base_positions[i].tolist()
            assert token_at(tok, view.base_inputs, i, sep) == "," and sep == int(at[0])
            assert token_at(tok, view.base_inputs, i, last) in {str(task.values[task.current(base)])[-1], " " + task.values[task.current(base)]}
            last, sep = view.source_positions[i].tolist()
            assert token_at(tok, view.source_inputs, i, sep) == ","
            mask = view.source_inputs["attention_mask"][i]
            assert sep == (int(mask.nonzero().max()) if padding_side == "right" else mask.shape[0] - 1)


def test_positions_name_the_intended_tokens_in_each_tokenisation(tokenizers) -> None:
    task = counting(1, 30)
    text = task.render(Run(12, 3), 16)  # "13, 14, 15," -> " 17,"
    digits = encode(tokenizers["digits"], [text], ("item_first", "item_last", "separator"))
    # [BOS] 1 3 , _ 1 4 , _ 1 5 , | _ 1 7
    assert digits.positions.tolist() == [[9, 10, 11]]
    assert digits.prompt_lengths.tolist() == [12]
    assert digits.labels[0, 11:].tolist() == [tokenizers["digits"].convert_tokens_to_ids(t) for t in [" ", "1", "7", ","]]
    words = encode(tokenizers["words"], [text], ("item_last", "separator"))
    # 13 , _14 , _15 , | _17 ,
    assert words.positions.tolist() == [[4, 5]]
    assert words.inputs["input_ids"].shape == (1, 7)
    # one token holds the whole number: its first and last character are the same token
    with pytest.raises(ValueError, match="same token"):
        encode(tokenizers["words"], [text], ("item_first", "item_last"))


def test_answer_anchor_is_stepwise_over_the_answer(tokenizers) -> None:
    task = counting(10, 30, 3, 4)  # every answer has two digits
    views = task.counterfactual_views(tokenizers, 20, seed=4, position=("item_last", "answer"))
    for name, n_answer in (("digits", 4), ("words", 2)):  # " ", "1", "5", ","  /  " 15", ","
        view, tok = views[name], tokenizers[name]
        assert view.base_positions.shape == view.source_positions.shape == (20, 1 + n_answer)
        for i in range(20):
            base_slots, source_slots = view.base_positions[i, 1:], view.source_positions[i, 1:]
            labelled = (view.labels[i] != IGNORE_INDEX).nonzero().flatten()
            assert base_slots.tolist() == labelled.tolist()  # every position that predicts an answer token
            assert token_at(tok, view.base_inputs, i, int(base_slots[0])) == ","
            # the source carries its own answer: the same tokens as the base's counterfactual one
            base_ids = view.base_inputs["input_ids"][i, base_slots[1:]]
            assert (view.source_inputs["input_ids"][i, source_slots[1:]] == base_ids).all()
            assert int(view.source_inputs["attention_mask"][i, source_slots[-1]]) == 1
    with pytest.raises(ValueError, match="answers differ in length"):
        counting(1, 30).counterfactual_views(tokenizers, 40, position="answer")
    with pytest.raises(ValueError, match="same token"):
        task.counterfactual_views(tokenizers, 3, position=("separator", "answer"))


def test_evaluation_views_label_the_natural_answer(tokenizers) -> None:
    task = letters()  # single-token items: the answer is " f", without a closing ","
    views = task.evaluation_views(tokenizers, 40, seed=5, padding_side="left")
    assert set(views) == {"digits", "words"}
    for name, data in views.items():
        assert isinstance(data, LabelledSequences) and len(data) == 40
        tok = tokenizers[name]
        for i in range(40):
            mask = data.inputs["attention_mask"][i]
            # the prompt and the answer's tokens but the last: "q, r, s," then " " (digits) or nothing (words)
            text = text_of(tok, data.inputs["input_ids"][i], mask)
            assert text.endswith(", " if name == "digits" else ",")
            current = text.rstrip(", ").split(", ")[-1]
            labelled = data.labels[i][data.labels[i] != IGNORE_INDEX]
            assert "".join(tok.convert_ids_to_tokens(labelled.tolist())) == f" {chr(ord(current) + 1)}"
            assert len(labelled) == (2 if name == "digits" else 1)
            assert int(mask[-1]) == 1  # left padding: every row ends at the last column


def test_null_variable_labels_the_bases_own_answer(tokenizers) -> None:
    task = weekdays()
    views = task.counterfactual_views(tokenizers, 30, seed=7, variable="null")
    bases, _ = task.sample_interchange(30, seed=7)
    tok = tokenizers["digits"]
    for i, base in enumerate(bases):
        labelled = views["digits"].labels[i][views["digits"].labels[i] != IGNORE_INDEX]
        assert "".join(tok.convert_ids_to_tokens(labelled.tolist())) == " " + task.values[task.run(base)]
    assert views["words"].variable == "null"
    with pytest.raises(ValueError, match="'day' and 'null'"):
        task.counterfactual_views(tokenizers, 3, variable="number")


# -- errors ---------------------------------------------------------------------------------------------


def test_splits_hold_distinct_pairs(tokenizers) -> None:
    """Independent draws of a small task repeat most test pairs in training; splits never repeat one."""
    task = weekdays(2, 4)
    brute = {(b, s) for b in task._all_runs() for s in task._all_runs() if task.current(b) != task.current(s)}
    assert task.distinct_pairs() == len(brute) == 378
    train, test = (set(zip(*task.sample_interchange(n, seed=seed))) for n, seed in ((256, 1), (96, 3)))
    assert len(train & test) > 40  # what separate counterfactual_views calls give
    for sizes in ({"train": 256, "test": 96}, {"train": 300, "valid": 30, "test": 48}):  # drawn, or sampled from all
        splits = task.counterfactual_splits(tokenizers, sizes, seed=2, position="separator")
        assert {name: len(views["digits"]) for name, views in splits.items()} == sizes
        seen = set()
        for views in splits.values():
            check_views(views)
            texts = {
                (text_of(tokenizers["words"], views["words"].base_inputs["input_ids"][i], views["words"].base_inputs["attention_mask"][i]),
                 text_of(tokenizers["words"], views["words"].source_inputs["input_ids"][i], views["words"].source_inputs["attention_mask"][i]))
                for i in range(len(views["words"]))
            }
            assert len(texts) == len(views["words"]) and not texts & seen
            seen |= texts
    with pytest.raises(ValueError, match="weekdays has 378 distinct pairs with different answers; the splits ask for 400"):
        task.counterfactual_splits(tokenizers, {"train": 300, "test": 100})
    with pytest.raises(ValueError, match="positive number of pairs"):
        task.counterfactual_splits(tokenizers, {"train": 0})


def test_a_range_the_tokenizer_cannot_express_is_refused(tokenizers) -> None:
    with pytest.raises(ValueError, match="words cannot express"):
        counting(1, 99).counterfactual_views(tokenizers, 50, seed=0)
    counting(1, 99).counterfactual_views({"digits": tokenizers["digits"]}, 50, seed=0)  # digits express anything


def test_rows_longer_than_max_tokens_are_refused(tokenizers) -> None:
    task = counting(1, 30, 6, 6)
    with pytest.raises(ValueError, match="longer than max_tokens=10"):
        task.counterfactual_views(tokenizers, 5, max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens"):
        task.evaluation_views(tokenizers, 5, max_tokens=10)
    views = task.counterfactual_views(tokenizers, 5, max_tokens=30)
    assert all(v.base_inputs["input_ids"].shape[1] <= 30 for v in views.values())


def test_a_token_across_the_answer_boundary_is_refused() -> None:
    # ", " is one token: the prompt's final "," and the answer's " " cannot be split
    merged = word_tokenizer(pattern=r", | ?\d+| ?[A-Za-z]+|,")
    with pytest.raises(ValueError, match="spans the end of the prompt"):
        counting(1, 20).counterfactual_views({"merged": merged}, 3)


def byte_level_tokenizer(trim_offsets: bool) -> PreTrainedTokenizerFast:
    """Digits and bytes one token each; with ``trim_offsets`` a space token's span is empty."""
    vocab = {piece: i for i, piece in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    return _fast(tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_a_space_token_with_an_empty_span_stays_in_the_answer() -> None:
    """Trimmed offsets give the space before the answer's digits an empty span; it is still the
    answer's first token, labelled at the prompt's last token, as with untrimmed offsets."""
    tokenizers = {f"trim_{trim}": byte_level_tokenizer(trim) for trim in (False, True)}
    assert tokenizers["trim_True"]("3, 4", return_offsets_mapping=True)["offset_mapping"][2] == (3, 3)
    views = counting(1, 9, 3, 3).counterfactual_views(tokenizers, 6, seed=0, position="answer")
    untrimmed, trimmed = views["trim_False"], views["trim_True"]
    assert torch.equal(trimmed.base_positions, untrimmed.base_positions) and trimmed.base_positions.shape[1] == 3
    assert torch.equal(trimmed.labels, untrimmed.labels) and torch.equal(trimmed.source_positions, untrimmed.source_positions)
    tok = tokenizers["trim_True"]
    for i in range(6):
        first = int(trimmed.base_positions[i, 0])
        assert token_at(tok, trimmed.base_inputs, i, first) == ","
        assert tok.convert_ids_to_tokens(int(trimmed.labels[i, first])) == "Ġ"


def test_bad_arguments(tokenizers) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        counting(1, 5, 3, 6)
    with pytest.raises(ValueError, match="low < high"):
        counting(5, 5)
    with pytest.raises(ValueError, match="repeat"):
        RunTask("x", "v", ("a", "a", "b"))
    with pytest.raises(ValueError, match="separator"):
        RunTask("x", "v", ("a,b", "c", "d"), min_length=1, max_length=2)
    with pytest.raises(ValueError, match="anchors"):
        counting().counterfactual_views(tokenizers, 3, position="comma")
    with pytest.raises(ValueError, match="padding_side"):
        counting().counterfactual_views(tokenizers, 3, padding_side="middle")
    with pytest.raises(ValueError, match="positive"):
        counting().counterfactual_views(tokenizers, 0)
    with pytest.raises(TypeError, match="mapping"):
        counting().counterfactual_views(tokenizers["digits"], 3)


# -- the views in masalign's pipeline, on tiny random Llama models (no pretrained weights) ---------


def tiny_llama(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def test_views_fit_and_evaluate_through_nnsight_adapters(tokenizers) -> None:
    from masalign import ModelAlignment, evaluate, fit
    from masalign.adapters import NNsightAdapter
    from masalign.evaluate import task_accuracy

    adapters = {
        name: NNsightAdapter(tiny_llama(len(tok.get_vocab()), seed), name=name)
        for seed, (name, tok) in enumerate(tokenizers.items())
    }
    task = counting(1, 30, 3, 4)
    train = task.counterfactual_views(tokenizers, 24, seed=1, max_tokens=24)
    test = task.counterfactual_views(tokenizers, 12, seed=3, max_tokens=24)
    alignment = ModelAlignment(adapters, {name: "model.layers.0.output" for name in adapters}, subspace_dims={"number": 4})
    result = fit(alignment, train, test, steps=2, batch_size=8, eval_every=2, progress=False)
    assert result.steps == 2
    report = evaluate(alignment, test, ceiling_data=task.evaluation_views(tokenizers, 12, seed=4), batch_size=8)
    assert set(report.iia) == {"digits", "words"} and all(0.0 <= report.iia[s][t] <= 1.0 for s in report.iia for t in report.iia)
    # left and right padding give the same answers: positions are absolute, padding is masked
    # and the adapter gives left-padded rows their unpadded position ids
    right = task.evaluation_views(tokenizers, 12, seed=4, padding_side="right")
    left = task.evaluation_views(tokenizers, 12, seed=4, padding_side="left")
    for name, adapter in adapters.items():
        with torch.no_grad():
            logits_right = adapter.logits(right[name].inputs)[right[name].labels != IGNORE_INDEX]
            logits_left = adapter.logits(left[name].inputs)[left[name].labels != IGNORE_INDEX]
        torch.testing.assert_close(logits_left, logits_right, atol=1e-4, rtol=1e-4)
        assert task_accuracy(adapter, right[name]) == task_accuracy(adapter, left[name])
