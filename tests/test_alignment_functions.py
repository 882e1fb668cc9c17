"""The other alignment functions of docs/method.md section 2: scaled orthogonal, SPD,
elementwise inverse and additive coupling. Each must be an exact inverse pair,
work through the generic interchange, train, and save/load through ModelAlignment."""

from __future__ import annotations

import math

import pytest
import torch

from masalign import ModelAlignment, TorchModuleAdapter
from masalign.alignment import (
    AlignmentFunction,
    CouplingAlignment,
    ElementwiseInverseAlignment,
    OrthogonalAlignment,
    ScaledOrthogonalAlignment,
    SymmetricPositiveDefiniteAlignment,
    interchange,
    make_alignment,
)
from masalign.models import RecurrentConfig, RecurrentLM

# (kind, options): every new kind, and the interesting options of each.
CASES = [
    ("scaled_orthogonal", {}),
    ("scaled_orthogonal", {"per_feature": False}),
    ("spd", {}),
    ("coupling", {}),
    ("coupling", {"final_rotation": False, "n_blocks": 1, "hidden_size": 5}),
    ("elementwise_inverse", {}),
    ("elementwise_inverse", {"nonlinearity": "sigmoid", "inner": "spd"}),
    ("elementwise_inverse", {"inner": "orthogonal", "inner_options": {"full_rotation": True}}),
    ("orthogonal", {"parametrization": "householder"}),
    ("orthogonal", {"parametrization": "cayley"}),
]
IDS = [f"{kind}-{i}" for i, (kind, _) in enumerate(CASES)]


def perturbed(kind: str, width: int, n_aligned: int, options: dict, seed: int = 0, dtype=torch.float64) -> AlignmentFunction:
    """An alignment away from its initialisation (where coupling blocks are the identity)."""
    g = torch.Generator().manual_seed(seed)
    a = make_alignment(kind, width, n_aligned, generator=g, **options).to(dtype)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        a.set_standardization(torch.randn(width, generator=g, dtype=dtype) * 0.3, torch.rand(width, generator=g, dtype=dtype) + 0.5)
    return a


def activations_for(a: AlignmentFunction, *shape: int, seed: int = 1) -> torch.Tensor:
    """Random activations inside the alignment's domain ((-1, 1) for tanh, (0, 1) for sigmoid)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(*shape, a.width, generator=g, dtype=torch.float64)
    if isinstance(a, ElementwiseInverseAlignment):
        return a.activation(1.5 * u)
    return 3 * u


@pytest.mark.parametrize(("kind", "options"), CASES, ids=IDS)
def test_inverse_undoes_forward(kind, options) -> None:
    for width in (1, 6, 7) if kind != "coupling" else (2, 6, 7):
        a = perturbed(kind, width, min(3, width), options)
        h = activations_for(a, 4, 5)
        z = a(h)
        assert z.shape == h.shape
        assert torch.allclose(a.inverse(z), h, atol=1e-5)
        # and the other way round, for aligned vectors the map can reach
        assert torch.allclose(a(a.inverse(z)), z, atol=1e-5)


@pytest.mark.parametrize(("kind", "options"), CASES, ids=IDS)
def test_interchange_through_the_generic_path(kind, options) -> None:
    a = perturbed(kind, 6, 4, options, seed=0)
    b = perturbed(kind, 6, 4, options, seed=1)
    h_source, h_target = activations_for(a, 8, seed=2), activations_for(b, 8, seed=3)
    block = slice(1, 3)
    # the base class's definition, written out: A_t^{-1}(A_t(h_t) with block from A_s(h_s))
    z = b(h_target).clone()
    z[:, block] = a(h_source)[:, block]
    expected = b.inverse(z)
    assert torch.allclose(interchange(a, h_source, b, h_target, block), expected, atol=1e-6)
    assert torch.allclose(a.coordinates(h_source, block), a(h_source)[:, block], atol=1e-6)
    assert torch.allclose(AlignmentFunction.substitute(b, h_target, block, z[:, block]), expected, atol=1e-6)
    # a block carries exactly the source's coordinates into the target
    assert torch.allclose(b.coordinates(expected, block), a.coordinates(h_source, block), atol=1e-5)
    # same model, same input, or an empty block: the identity
    assert torch.allclose(interchange(b, h_target, b, h_target, block), h_target, atol=1e-6)
    assert torch.allclose(interchange(a, h_source, b, h_target, slice(2, 2)), h_target, atol=1e-6)
    # stitching: complement zeroed
    stitched = interchange(a, h_source, b, h_target, block, keep_complement=False)
    padded = torch.zeros_like(z)
    padded[:, block] = a(h_source)[:, block]
    assert torch.allclose(stitched, b.inverse(padded), atol=1e-6)


@pytest.mark.parametrize(("kind", "options"), CASES, ids=IDS)
def test_gradient_reaches_every_parameter(kind, options) -> None:
    a = perturbed(kind, 6, 4, options, dtype=torch.float32)
    b = perturbed(kind, 6, 4, options, seed=1, dtype=torch.float32)
    h_source, h_target = activations_for(a, 16, seed=2).float(), activations_for(b, 16, seed=3).float()
    # Both directions, and a block reaching into the second half: as a source a
    # map only needs its aligned block, and in a target the output bias of the
    # second coupling MLP cancels between forward and inverse.
    loss = interchange(a, h_source, b, h_target, slice(0, 4)).sin().sum()
    loss = loss + interchange(b, h_target, a, h_source, slice(0, 4)).sin().sum()
    loss.backward()
    for module in (a, b):
        for name, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("kind", "options"), CASES, ids=IDS)
def test_save_and_load_through_model_alignment(kind, options, tmp_path) -> None:
    if kind == "elementwise_inverse":
        options = {**options, "nonlinearity": "tanh"}  # a GRU state is tanh-bounded
    torch.manual_seed(0)
    models = {
        name: TorchModuleAdapter(RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8)), name=name)
        for name in ("A", "B")
    }
    alignment = ModelAlignment(models, "rnn.h_l0", 4, alignment=kind, alignment_options=options, seed=3)
    assert all(a.kind == kind for a in alignment.alignments.values())
    with torch.no_grad():
        for p in alignment.alignments.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for name in models:  # GRU states lie in (-1, 1): a valid domain for every kind
        alignment.alignments[name].set_standardization(torch.full((16,), 0.1), torch.full((16,), 0.5))
    alignment.save(tmp_path / "saved")
    loaded = ModelAlignment.load(tmp_path / "saved", models)
    tokens = torch.tensor([[1, 5, 6, 2, 4, 4, 3], [1, 7, 2, 4, 3, 0, 0]])
    positions = torch.tensor([[1], [1]])
    for name in models:
        assert type(loaded.alignments[name]) is type(alignment.alignments[name])
        assert loaded.alignments[name].config() == alignment.alignments[name].config()
        saved_state, loaded_state = alignment.alignments[name].state_dict(), loaded.alignments[name].state_dict()
        assert saved_state.keys() == loaded_state.keys()
        assert all(torch.equal(saved_state[k], loaded_state[k]) for k in saved_state)
    hidden = alignment.source_activations("A", tokens, positions)
    before = alignment.intervened_logits("A", "B", hidden, tokens, positions)
    after = loaded.intervened_logits("A", "B", hidden, tokens, positions)
    assert torch.equal(before, after)


def test_model_alignment_builds_every_kind_by_name() -> None:
    models = {"A": TorchModuleAdapter(RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8)))}
    for kind, cls in [
        ("spd", SymmetricPositiveDefiniteAlignment),
        ("scaled_orthogonal", ScaledOrthogonalAlignment),
        ("coupling", CouplingAlignment),
        ("elementwise_inverse", ElementwiseInverseAlignment),
    ]:
        assert isinstance(ModelAlignment(models, "rnn.h_l0", 2, alignment=kind).alignments["A"], cls)


def test_same_seed_same_map() -> None:
    for kind, options in CASES:
        first = make_alignment(kind, 7, 2, generator=torch.Generator().manual_seed(5), **options)
        second = make_alignment(kind, 7, 2, generator=torch.Generator().manual_seed(5), **options)
        for (key, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items()):
            assert torch.equal(x, y), (kind, key)


def test_scaled_orthogonal_is_a_scaled_rotation() -> None:
    a = perturbed("scaled_orthogonal", 5, 2, {})
    q = a.rotation
    assert torch.allclose(q.T @ q, torch.eye(5, dtype=q.dtype), atol=1e-6)
    h = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(a(h), (a.standardize(h) @ q) * a.scale, atol=1e-10)
    scalar = make_alignment("scaled_orthogonal", 5, 2, per_feature=False)
    assert scalar.scale.shape == (1,) and torch.all(scalar.scale == 1)


def test_spd_matrix_is_symmetric_positive_definite_and_well_conditioned() -> None:
    a = make_alignment("spd", 12, 3, generator=torch.Generator().manual_seed(0)).double()
    w = a.matrix
    assert torch.allclose(w, w.T)
    eigenvalues = torch.linalg.eigvalsh(w)
    assert eigenvalues.min() > 0
    assert eigenvalues.max() / eigenvalues.min() <= 4.0 + 1e-6  # init_condition
    with pytest.raises(ValueError, match="eps must be positive"):
        make_alignment("spd", 4, 1, eps=0.0)


def test_coupling_starts_as_a_rotation_of_permuted_features() -> None:
    a = make_alignment("coupling", 6, 2, generator=torch.Generator().manual_seed(0)).double()
    h = torch.randn(4, 6, dtype=torch.float64)
    x = h
    for permutation in a.permutations:
        x = x[:, permutation]
    assert torch.allclose(a(h), x @ a.rotation, atol=1e-12)


def test_coupling_errors_and_odd_widths() -> None:
    with pytest.raises(ValueError, match="need width >= 2; got width 1"):
        make_alignment("coupling", 1, 1)
    with pytest.raises(ValueError, match="n_blocks"):
        make_alignment("coupling", 4, 1, n_blocks=0)
    odd = make_alignment("coupling", 5, 2)
    assert [block.n_first for block in odd.blocks] == [3, 3, 3]


def test_elementwise_inverse_standardises_the_unbounded_values() -> None:
    a = make_alignment("elementwise_inverse", 4, 2, generator=torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(1)
    u = torch.randn(500, 4, generator=g, dtype=torch.float64) * torch.tensor([0.3, 0.6, 0.9, 1.2], dtype=torch.float64) + 0.5
    a.fit_standardization(torch.tanh(u))
    assert torch.allclose(a.mean, u.mean(0), atol=1e-6) and torch.allclose(a.std, u.std(0), atol=1e-6)
    # A(h) is the inner orthogonal map of the standardised atanh(h)
    assert torch.allclose(a(torch.tanh(u)), a.inner((u - u.mean(0)) / u.std(0)), atol=1e-6)
    assert isinstance(a.inner, OrthogonalAlignment)
    assert torch.equal(a.inner.mean, torch.zeros(4, dtype=torch.float64))


def test_elementwise_inverse_clamps_saturated_values_and_rejects_outside_ones() -> None:
    a = make_alignment("elementwise_inverse", 3, 1, eps=1e-6).double()
    saturated = torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64)
    round_trip = a.inverse(a(saturated))
    assert torch.isfinite(a(saturated)).all()
    assert torch.allclose(round_trip, saturated, atol=2e-6)
    # half precision: 1 - eps would round back to 1, so the clamp happens in float32
    assert torch.isfinite(a.preimage(saturated.to(torch.bfloat16))).all()
    with pytest.raises(ValueError, match=r"1 of 3 activation value\(s\) lie outside the range \(-1, 1\) of tanh.*1\.5 at \(0, 2\)"):
        a(torch.tensor([[0.0, 0.2, 1.5]], dtype=torch.float64))
    strict = make_alignment("elementwise_inverse", 3, 1, eps=0.0)
    with pytest.raises(ValueError, match="outside the range"):
        strict(torch.tensor([[1.0, 0.0, 0.0]]))
    sigmoid = make_alignment("elementwise_inverse", 2, 1, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match=r"range \(0, 1\) of sigmoid"):
        sigmoid(torch.tensor([[-0.5, 0.5]]))
    with pytest.raises(ValueError, match="outside the range"):
        a(torch.tensor([[math.nan, 0.0, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown nonlinearity 'relu'"):
        make_alignment("elementwise_inverse", 2, 1, nonlinearity="relu")
    with pytest.raises(ValueError, match="unknown alignment kind 'nope'"):
        make_alignment("elementwise_inverse", 2, 1, inner="nope")


def test_fit_standardization_checks_its_input() -> None:
    a = make_alignment("spd", 3, 1)
    with pytest.raises(ValueError, match="width 4; this alignment has width 3"):
        a.fit_standardization(torch.randn(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        a.fit_standardization(torch.randn(1, 3))
    h = torch.randn(10, 2, 3)
    a.fit_standardization(h)
    assert torch.allclose(a.mean, h.reshape(-1, 3).mean(0)) and torch.allclose(a.std, h.reshape(-1, 3).std(0))
    h[3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"mean is not finite at features \[2\]: the activations .* hold NaN"):
        a.fit_standardization(h)
    with pytest.raises(ValueError, match=r"std is negative at features \[0\]"):
        a.set_standardization(torch.zeros(3), torch.tensor([-1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"std is not finite at features \[1\]"):
        a.set_standardization(torch.zeros(3), torch.tensor([1.0, float("inf"), 1.0]))


def test_the_orthogonal_parametrizations_match_their_dense_definitions() -> None:
    """Householder and Cayley columns equal the dense products they stand for, and are orthonormal."""
    from masalign.alignment import _cayley_columns, _householder_columns

    g = torch.Generator().manual_seed(3)
    width, k = 12, 4
    generator = 0.7 * torch.randn(width, k, generator=g, dtype=torch.float64)
    eye_k = torch.eye(width, k, dtype=torch.float64)
    identity = torch.eye(width, dtype=torch.float64)

    skew = generator @ eye_k.T - eye_k @ generator.T
    dense_cayley = torch.linalg.solve(identity - skew / 2, identity + skew / 2)[:, :k]
    torch.testing.assert_close(_cayley_columns(generator), dense_cayley, rtol=0, atol=1e-12)

    product = identity.clone()
    for i in range(k):
        v = torch.zeros(width, dtype=torch.float64)
        v[i] = 1.0
        v[i + 1 :] = generator[i + 1 :, i]
        product = product @ (identity - 2.0 / (v @ v) * torch.outer(v, v))
    torch.testing.assert_close(_householder_columns(generator), product[:, :k], rtol=0, atol=1e-12)

    for parametrization in OrthogonalAlignment.PARAMETRIZATIONS:
        a = perturbed("orthogonal", width, k, {"parametrization": parametrization})
        q = a.basis  # the fixed rotation Q_0 was drawn in float32, hence 1e-6
        torch.testing.assert_close(q.T @ q, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("parametrization", OrthogonalAlignment.PARAMETRIZATIONS)
def test_a_basis_computed_once_gives_the_same_values_and_gradients(parametrization, monkeypatch) -> None:
    """DAS reads and writes with one map: inside ``computed_once`` its basis is built once,
    and the substitution and its gradient are those of building it at each use."""
    a = perturbed("orthogonal", 10, 3, {"parametrization": parametrization})
    source, base = activations_for(a, 4, seed=1), activations_for(a, 4, seed=2)

    def substituted() -> tuple[torch.Tensor, list[torch.Tensor]]:
        a.zero_grad()
        out = a.substitute(base, slice(0, 3), a.coordinates(source, slice(0, 3)))
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in a.parameters()]

    built = {"n": 0}
    real_basis = OrthogonalAlignment.basis.fget

    def counted(self):  # noqa: ANN001, ANN202
        if self.__dict__.get("_basis_once") is None:
            built["n"] += 1
        return real_basis(self)

    monkeypatch.setattr(OrthogonalAlignment, "basis", property(counted))
    each_use, each_grads = substituted()
    assert built["n"] == 2
    built["n"] = 0
    with a.computed_once():
        once, once_grads = substituted()
    assert built["n"] == 1 and a.__dict__["_basis_once"] is None  # nothing kept after the block
    torch.testing.assert_close(once, each_use, rtol=0, atol=0)
    for g_once, g_each in zip(once_grads, each_grads, strict=True):
        torch.testing.assert_close(g_once, g_each, rtol=1e-12, atol=1e-12)


def test_bad_parametrization_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown parametrization 'givens'.*'qr', 'householder', 'cayley'"):
        OrthogonalAlignment(8, 2, parametrization="givens")
    with pytest.raises(ValueError, match="full_rotation=True.*takes no parametrization"):
        OrthogonalAlignment(8, 2, full_rotation=True, parametrization="cayley")


@pytest.mark.parametrize(("kind", "options"), [("orthogonal", {}), ("elementwise_inverse", {"nonlinearity": "tanh"})])
def test_saves_from_when_qr_was_the_default_load_with_qr(kind, options, tmp_path, monkeypatch) -> None:
    """masalign 0.1 had only the QR retraction and did not record it; such saves must still load."""
    torch.manual_seed(0)
    models = {name: TorchModuleAdapter(RecurrentLM(RecurrentConfig(hidden_size=16, embedding_size=8)), name=name) for name in ("A", "B")}
    with monkeypatch.context() as patch:
        defaults = list(OrthogonalAlignment.__init__.__defaults__)
        defaults[-1] = "qr"  # the 0.1 default
        patch.setattr(OrthogonalAlignment.__init__, "__defaults__", tuple(defaults))
        alignment = ModelAlignment(models, "rnn.h_l0", 4, alignment=kind, alignment_options=options, seed=3)
        alignment.save(tmp_path / "saved")
    assert "parametrization" not in alignment.alignment_options
    loaded = ModelAlignment.load(tmp_path / "saved", models)
    for name in models:
        saved_state, loaded_state = alignment.alignments[name].state_dict(), loaded.alignments[name].state_dict()
        assert any(key.endswith("raw_columns") for key in loaded_state)
        assert saved_state.keys() == loaded_state.keys() and all(torch.equal(saved_state[k], loaded_state[k]) for k in saved_state)
    assert OrthogonalAlignment(16, 4).parametrization == "householder"  # new maps use the new default


def test_empty_slots_are_not_mapped_so_a_sigmoid_map_without_slack_takes_stepwise_pairs() -> None:
    # Stepwise pairs leave slots empty; their zero activations lie outside a sigmoid's (0, 1)
    # and must not reach its preimage (eps=0 refuses any value outside the range).
    from torch import Tensor, nn

    from masalign.evaluate import interchange_scores
    from masalign.tasks import get_task

    class SigmoidSite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embedding, self.proj, self.act = nn.Embedding(8, 16), nn.Linear(16, 16), nn.Sigmoid()
            self.rnn, self.readout = nn.GRU(16, 16, batch_first=True), nn.Linear(16, 8)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.readout(self.rnn(self.act(self.proj(self.embedding(tokens))))[0])

    task = get_task("multi_object")
    stepwise = task.counterfactual_pairs(32, seed=1, protocol="stepwise")
    assert bool((stepwise.base_positions == -1).any())
    models = {"A": TorchModuleAdapter(SigmoidSite().eval(), name="A")}
    alignment = ModelAlignment(models, "act", 4, alignment="elementwise_inverse", alignment_options={"nonlinearity": "sigmoid", "eps": 0.0})
    scores = interchange_scores(alignment, stepwise)[("A", "A")]
    assert math.isfinite(scores.loss)
    # Unchanged where every slot is filled: the filled slots' coordinates are those of all slots.
    hidden = torch.rand(3, 2, 16) * 0.8 + 0.1
    block = alignment.block(None)
    full = alignment.alignments["A"].coordinates(hidden, block)
    some_empty = ModelAlignment._source_coordinates(alignment.alignments["A"], hidden, torch.tensor([[1, 2], [3, -1], [4, 5]]), block)
    assert torch.equal(some_empty[[0, 1, 2, 2], [0, 0, 0, 1]], full[[0, 1, 2, 2], [0, 0, 0, 1]]) and (some_empty[1, 1] == 0).all()
