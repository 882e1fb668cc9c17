"""What the user did wrong, said by the adapters: each error names the problem and the fix.

Bad positions in a dataset (the dataset's row), token ids outside the vocabulary
(every row, up front), attention masks that disagree with the tokens, a
``replace`` that returns the wrong thing, prompts longer than the context, sites
of a fresh adapter, and weights made under ``torch.inference_mode()``.
"""

from __future__ import annotations

import pytest
import torch
from adapter_cases import CASES, POSITIONS, TOKENS, VOCAB, ToyRecurrent, identity, make_case
from torch import Tensor, nn

from masalign import CounterfactualPairs, ModelAlignment, TorchModuleAdapter, fit
from masalign.data import IGNORE_INDEX
from masalign.models import RecurrentConfig, RecurrentLM

# One case per adapter class; the six cases where every kind of site matters.
ADAPTER_CLASSES = ["gru", "transformer_lens", "nnsight"]


def pairs(n: int, seed: int) -> CounterfactualPairs:
    """``n`` random pairs over ``VOCAB`` tokens, one slot, a label at the last position."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.full((n, 8), IGNORE_INDEX)
    labels[:, -1] = torch.randint(0, VOCAB, (n,), generator=generator)
    return CounterfactualPairs(
        base_inputs=torch.randint(0, VOCAB, (n, 8), generator=generator),
        source_inputs=torch.randint(0, VOCAB, (n, 8), generator=generator),
        base_positions=torch.randint(0, 8, (n, 1), generator=generator),
        source_positions=torch.randint(0, 8, (n, 1), generator=generator),
        labels=labels,
    )


def gru_alignment(b_under_inference_mode: bool = False) -> ModelAlignment:
    """Two toy GRUs (train mode, parameters requiring grad) aligned at ``rnn.h_l1`` with k = 2."""
    model_a = ToyRecurrent("gru")
    if b_under_inference_mode:
        with torch.inference_mode():
            model_b = ToyRecurrent("gru")
    else:
        model_b = ToyRecurrent("gru")
    models = {"A": TorchModuleAdapter(model_a, name="A"), "B": TorchModuleAdapter(model_b, name="B")}
    return ModelAlignment(models, "rnn.h_l1", 2)  # site, k


def fit_briefly(alignment: ModelAlignment, train: CounterfactualPairs, valid: CounterfactualPairs) -> None:
    fit(alignment, train, valid, steps=2, batch_size=8, eval_every=1, progress=False)


# -- positions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ADAPTER_CLASSES)
def test_a_bad_position_in_a_dataset_names_the_dataset_row(name):
    case = make_case(name)
    tokens = torch.randint(0, VOCAB, (40, 8), generator=torch.Generator().manual_seed(0))
    positions = torch.randint(0, 8, (40, 1), generator=torch.Generator().manual_seed(1))
    positions[37] = 8
    with pytest.raises(IndexError, match=r"position 8 \(slot 0\) of example 37 is outside its sequence of length 8; valid positions are 0\.\.7"):
        case.adapter.check_inputs(tokens, positions)


@pytest.mark.parametrize("side", ["base", "source"])
def test_fit_names_the_dataset_row_of_a_bad_position_not_its_batch_row(side):
    train = pairs(40, seed=0)
    getattr(train, f"{side}_positions")[37] = 8
    with pytest.raises(IndexError, match=rf"train pairs of 'count', {side}_inputs / {side}_positions for model 'A': position 8 \(slot 0\) of example 37 is outside"):
        fit_briefly(gru_alignment(), train, pairs(8, seed=1))


# -- token ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("bad_id", [VOCAB + 5, -1])
def test_token_ids_outside_the_vocabulary_name_the_row_and_the_vocabulary(name, bad_id):
    case = make_case(name)
    tokens = TOKENS.clone()
    tokens[2, 3] = bad_id  # row 0 is fine: every row is checked
    message = rf"token id {bad_id} at row 2, position 3 is outside the model's vocabulary of {VOCAB} token ids \(0\.\.{VOCAB - 1}\).*model's own tokenizer"
    with pytest.raises(ValueError, match=message):
        case.adapter.logits(tokens)
    with pytest.raises(ValueError, match=message):
        case.adapter.activations(tokens, case.site, POSITIONS)
    with pytest.raises(ValueError, match=message):
        case.adapter.run_with_replacement(tokens, case.site, POSITIONS, identity)


def test_fit_checks_every_row_for_token_ids_outside_the_vocabulary_before_training():
    valid = pairs(24, seed=1)
    valid.source_inputs[21, 5] = VOCAB
    with pytest.raises(ValueError, match=rf"valid pairs of 'count', source_inputs / source_positions for model 'A': .*token id {VOCAB} at row 21, position 5 .*vocabulary of {VOCAB} token ids"):
        fit_briefly(gru_alignment(), pairs(16, seed=0), valid)


# -- attention masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ADAPTER_CLASSES)
def test_an_attention_mask_that_disagrees_with_the_tokens_is_refused_by_a_plain_run(name):
    # nnsight ran the model on a (3, 9) mask for (3, 8) tokens without complaint.
    case = make_case(name)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 9\) but the tokens have shape \(3, 8\); the mask needs one entry per token"):
        case.adapter.logits(case.inputs(TOKENS, torch.ones(3, 9, dtype=torch.long)))


# -- what replace returns ----------------------------------------------------------------------


BAD_RESULTS = [
    ("NoneType", lambda hidden: None),
    ("list", lambda hidden: hidden.tolist()),
    (r"\(\d+, 3\)", lambda hidden: hidden[:, :3]),
    (r"\(\d+,\)", lambda hidden: hidden[0]),  # one row for all rows: broadcasting it would hide the mistake
]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize(("got", "bad_result"), BAD_RESULTS, ids=["None", "list", "narrow", "one_row"])
def test_replace_must_return_a_tensor_of_the_rows_shape(name, got, bad_result):
    case = make_case(name)
    width = case.adapter.sites()[case.site]
    message = rf"replace\(\) must return a tensor of shape \(n_rows, width\) = \(\d+, {width}\) at '{case.site}', got {got}; return the new rows"
    with pytest.raises(ValueError, match=message):
        case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, lambda h, e, s: bad_result(h))


# -- context length ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["transformer_lens", "nnsight"])
def test_a_prompt_longer_than_the_context_is_refused(name):
    case = make_case(name)
    long_tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    message = r"the inputs are 20 positions long \(row 0 has 20 tokens\) but the model's context holds 16 positions; shorten the prompts to at most 16 tokens"
    with pytest.raises(ValueError, match=message):
        case.adapter.logits(long_tokens)
    with pytest.raises(ValueError, match=message):
        case.adapter.activations(long_tokens, case.site, torch.tensor([[1], [2]]))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :15] = 0  # row 0 fits once its padding goes; row 1 does not
    with pytest.raises(ValueError, match=r"\(row 1 has 20 tokens\).*remove padding beyond that"):
        case.adapter.run_with_replacement(case.inputs(long_tokens, mask), case.site, torch.tensor([[16], [2]]), identity)


# -- sites of a fresh adapter ------------------------------------------------------------------


def test_a_fresh_adapter_lists_the_sites_that_only_a_run_shows_as_the_readme_says():
    model = RecurrentLM(RecurrentConfig())
    adapter = TorchModuleAdapter(model)
    assert adapter.sites() == {"rnn.h_l0": 128, "embedding": 128, "readout": 8}
    assert model.training  # the dry run put the model back as it was


def test_a_model_that_takes_no_token_ids_shows_its_module_sites_once_it_has_seen_inputs():
    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.project = nn.Linear(3, 4)
            self.rnn = nn.GRU(4, 5, batch_first=True)
            self.readout = nn.Linear(5, 6)

        def forward(self, features: Tensor) -> Tensor:
            return self.readout(self.rnn(self.project(features))[0])

    features = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    assert TorchModuleAdapter(Features(), example_inputs=features).sites() == {"rnn.h_l0": 5, "project": 4, "readout": 6}
    adapter = TorchModuleAdapter(Features())
    assert adapter.sites() == {"rnn.h_l0": 5}  # no token embedding: no dry run on token ids
    adapter.activations(features, "project", torch.tensor([[1], [2]]))
    assert adapter.sites() == {"rnn.h_l0": 5, "project": 4, "readout": 6}


# -- weights made under inference mode ---------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_training_through_inference_mode_weights_is_a_clear_error_at_every_site(name):
    with torch.inference_mode():  # weights that still require grad: every forward under autograd fails
        case = make_case(name)
    scale = nn.Parameter(torch.ones(case.adapter.sites()[case.site]))
    with pytest.raises(RuntimeError, match=r"its weights are inference tensors .* load the model outside inference_mode"):
        case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, lambda h, e, s: h * scale)
    with torch.no_grad():  # reading and evaluating through them is fine
        case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, lambda h, e, s: h * scale)


@pytest.mark.parametrize("name", CASES)
def test_weights_swapped_for_inference_tensors_after_a_step_are_still_a_clear_error(name):
    # The check runs once per model; a later swap is caught where the forward fails.
    case = make_case(name)
    scale = nn.Parameter(torch.ones(case.adapter.sites()[case.site]))
    case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, lambda h, e, s: h * scale)
    # The last matrix (the output layer in these models): after every site, so on the gradient's path.
    parameter_name, parameter = [(n, p) for n, p in case.adapter.model.named_parameters() if p.dim() == 2][-1]
    owner = case.adapter.model.get_submodule(parameter_name.rpartition(".")[0])
    with torch.inference_mode():
        swapped = nn.Parameter(parameter.detach().clone())
    setattr(owner, parameter_name.rpartition(".")[2], swapped)
    with pytest.raises(RuntimeError, match=r"its weights are inference tensors .* load the model outside inference_mode"):
        case.adapter.run_with_replacement(TOKENS, case.site, POSITIONS, lambda h, e, s: h * scale)


def test_fit_through_inference_mode_weights_is_a_clear_error_and_leaves_every_flag_as_it_was():
    alignment = gru_alignment(b_under_inference_mode=True)
    models = [adapter.model for adapter in alignment.models.values()]
    assert all(m.training for model in models for m in model.modules())
    assert all(p.requires_grad for model in models for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"B: its weights are inference tensors .* load the model outside inference_mode"):
        fit_briefly(alignment, pairs(16, seed=0), pairs(8, seed=1))
    assert all(m.training for model in models for m in model.modules())
    assert all(p.requires_grad for model in models for p in model.parameters())
