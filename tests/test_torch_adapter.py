"""Exactness of the plain nn.Module adapter: identity write-back, step-wise
interventions against a hand-unrolled reference, gradients, and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from masalign.adapters import SiteError, TorchModuleAdapter


class TokenRNN(nn.Module):
    def __init__(self, cell: str = "gru", layers: int = 2, batch_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(8, 6)
        cls = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[cell]
        self.rnn = cls(6, 5, num_layers=layers, batch_first=batch_first)
        self.readout = nn.Linear(5, 8)
        self.batch_first = batch_first

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        if not self.batch_first:
            return self.readout(self.rnn(x.transpose(0, 1))[0].transpose(0, 1))
        return self.readout(self.rnn(x)[0])


class CellLoop(nn.Module):
    """A model that runs its own loop over a GRUCell: one call per step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embedding = nn.Embedding(8, 6)
        self.cell = nn.GRUCell(6, 5)
        self.readout = nn.Linear(5, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        h = x.new_zeros(x.shape[0], 5)
        outputs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outputs.append(h)
        return self.readout(torch.stack(outputs, 1))


TOKENS = torch.randint(0, 8, (4, 9), generator=torch.Generator().manual_seed(0))
POSITIONS = torch.tensor([[2, 5], [0, 8], [7, 3], [4, 1]])


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_writing_back_unchanged_state_leaves_outputs_equal(cell: str, batch_first: bool) -> None:
    model = TokenRNN(cell, batch_first=batch_first).eval()
    adapter = TorchModuleAdapter(model, example_inputs=TOKENS)
    expected = model(TOKENS)
    for site in adapter.sites():
        logits = adapter.run_with_replacement(TOKENS, site, POSITIONS, lambda h, b, j: h)
        assert torch.allclose(logits, expected, atol=1e-6), site


def unrolled_reference(model: TokenRNN, tokens: torch.Tensor, layer: int, state: str, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Step-by-step cells with the same weights, replacing the state by hand."""
    rnn = model.rnn
    is_lstm = isinstance(rnn, nn.LSTM)
    x = model.embedding(tokens)
    batch, steps, _ = x.shape
    for k in range(rnn.num_layers):
        if is_lstm:
            cell = nn.LSTMCell(rnn.input_size if k == 0 else rnn.hidden_size, rnn.hidden_size)
        else:
            cell = nn.GRUCell(rnn.input_size if k == 0 else rnn.hidden_size, rnn.hidden_size)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(rnn, f"{name}_l{k}"))
        h = x.new_zeros(batch, rnn.hidden_size)
        c = x.new_zeros(batch, rnn.hidden_size)
        outputs = []
        for t in range(steps):
            if is_lstm:
                h, c = cell(x[:, t], (h, c))
            else:
                h = cell(x[:, t], h)
            if k == layer:
                for b in range(batch):
                    for j in range(positions.shape[1]):
                        if positions[b, j] == t:
                            if state == "h":
                                h = torch.cat([h[:b], values[b, j][None], h[b + 1 :]])
                            elif state == "c":
                                c = torch.cat([c[:b], values[b, j][None], c[b + 1 :]])
                            else:
                                h = torch.cat([h[:b], values[b, j][None, :5], h[b + 1 :]])
                                c = torch.cat([c[:b], values[b, j][None, 5:], c[b + 1 :]])
            outputs.append(h)
        x = torch.stack(outputs, 1)
    return model.readout(x)


@pytest.mark.parametrize(
    "cell,site,layer,state",
    [("gru", "rnn.h_l0", 0, "h"), ("gru", "rnn.h_l1", 1, "h"), ("lstm", "rnn.h_l0", 0, "h"), ("lstm", "rnn.c_l1", 1, "c"), ("lstm", "rnn.hc_l0", 0, "hc")],
)
def test_intervention_at_step_equals_hand_unrolled_reference(cell: str, site: str, layer: int, state: str) -> None:
    model = TokenRNN(cell).eval()
    adapter = TorchModuleAdapter(model)
    width = adapter.sites()[site]
    values = torch.randn(4, 2, width, generator=torch.Generator().manual_seed(3))
    logits = adapter.run_with_replacement(TOKENS, site, POSITIONS, lambda h, b, j: values[b, j])
    reference = unrolled_reference(model, TOKENS, layer, state, POSITIONS, values)
    assert torch.allclose(logits, reference, atol=1e-5)
    # and it really changed something downstream of the intervention
    assert not torch.allclose(logits, model(TOKENS), atol=1e-3)


def test_cell_site_call_t_is_position_t() -> None:
    model = CellLoop().eval()
    adapter = TorchModuleAdapter(model, example_inputs=TOKENS)
    assert adapter.sites()["cell"] == 5 and adapter.sites()["embedding"] == 6
    assert torch.allclose(adapter.run_with_replacement(TOKENS, "cell", POSITIONS, lambda h, b, j: h), model(TOKENS), atol=1e-6)
    positions = torch.tensor([[3], [3], [5], [0]])
    values = torch.zeros(4, 1, 5)
    logits = adapter.run_with_replacement(TOKENS, "cell", positions, lambda h, b, j: values[b, j])
    # before the intervention nothing changes; at and after it the outputs differ
    plain = model(TOKENS)
    assert torch.allclose(logits[0, :3], plain[0, :3], atol=1e-6)
    assert not torch.allclose(logits[0, 3:], plain[0, 3:], atol=1e-4)
    reading = adapter.activations(TOKENS, "cell", positions)
    hidden = []
    h = torch.zeros(4, 5)
    for t in range(TOKENS.shape[1]):
        h = model.cell(model.embedding(TOKENS[:, t]), h)
        hidden.append(h)
    expected = torch.stack(hidden, 1)[torch.arange(4)[:, None], positions]
    assert torch.allclose(reading, expected, atol=1e-6)


def test_sequence_site_replaces_only_chosen_positions() -> None:
    model = TokenRNN("gru").eval()
    adapter = TorchModuleAdapter(model, example_inputs=TOKENS)
    positions = torch.tensor([[6], [6], [6], [6]])
    logits = adapter.run_with_replacement(TOKENS, "embedding", positions, lambda h, b, j: torch.zeros_like(h))
    plain = model(TOKENS)
    assert torch.allclose(logits[:, :6], plain[:, :6], atol=1e-6)
    assert not torch.allclose(logits[:, 6:], plain[:, 6:], atol=1e-4)


def test_lstm_activations_are_the_states_after_each_step() -> None:
    model = TokenRNN("lstm").eval()
    adapter = TorchModuleAdapter(model)
    x = model.embedding(TOKENS)
    for b in range(4):
        for j in range(2):
            t = int(POSITIONS[b, j])
            _, (h_n, c_n) = model.rnn(x[b : b + 1, : t + 1])  # the state after step t, per layer
            assert torch.allclose(adapter.activations(TOKENS, "rnn.c_l0", POSITIONS)[b, j], c_n[0, 0], atol=1e-6)
            hc = adapter.activations(TOKENS, "rnn.hc_l1", POSITIONS)[b, j]
            assert torch.allclose(hc, torch.cat([h_n[1, 0], c_n[1, 0]]), atol=1e-6)


def test_gradients_reach_the_replacement_not_the_frozen_model() -> None:
    model = TokenRNN("gru").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = TorchModuleAdapter(model)
    shift = nn.Parameter(torch.zeros(5))
    logits = adapter.run_with_replacement(TOKENS, "rnn.h_l0", POSITIONS, lambda h, b, j: h + shift)
    logits.sum().backward()
    assert shift.grad is not None and shift.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_unknown_site_lists_valid_sites() -> None:
    adapter = TorchModuleAdapter(TokenRNN("gru"), example_inputs=TOKENS)
    with pytest.raises(SiteError, match=r"rnn\.h_l0.*Valid sites: .*embedding"):
        adapter.activations(TOKENS, "rnn.h0", POSITIONS)


def test_position_outside_sequence_is_an_error() -> None:
    adapter = TorchModuleAdapter(TokenRNN("gru"))
    with pytest.raises(IndexError, match="outside its sequence of length 9"):
        adapter.activations(TOKENS, "rnn.h_l0", torch.tensor([[1], [9], [0], [0]]))
    with pytest.raises(ValueError, match=r"\(batch, n_slots\)"):
        adapter.activations(TOKENS, "rnn.h_l0", torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="repeats a position"):
        adapter.activations(TOKENS, "rnn.h_l0", torch.tensor([[1, 1]] * 4))


def test_bidirectional_rnn_is_refused() -> None:
    model = nn.Sequential()
    model.rnn = nn.GRU(3, 4, bidirectional=True, batch_first=True)
    adapter = TorchModuleAdapter(model, logits_fn=lambda out: out[0])
    with pytest.raises(SiteError, match="bidirectional"):
        adapter.activations(torch.randn(2, 5, 3), "rnn.h_l0", torch.tensor([[1], [2]]))
