"""Property tests of the alignment algebra (docs/method.md sections 2-3)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from masalign.alignment import OrthogonalAlignment, interchange

dims = st.integers(min_value=1, max_value=24)


@st.composite
def alignment_case(draw):
    width = draw(dims)
    k = draw(st.integers(min_value=0, max_value=width))
    full = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    standardize = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    a = OrthogonalAlignment(width, k, full_rotation=full, generator=g)
    if draw(st.booleans()):
        # A trained map, not only a fresh one: move every parameter far from its initial value.
        with torch.no_grad():
            for parameter in a.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=g) * 2.0)
    if standardize:
        a.set_standardization(torch.randn(width, generator=g), torch.rand(width, generator=g) + 0.5)
    h = torch.randn(7, width, generator=g, dtype=torch.float32) * 3
    return a, h, k


@settings(max_examples=60, deadline=None)
@given(alignment_case())
def test_forward_then_inverse_returns_the_input(case) -> None:
    a, h, _ = case
    assert torch.allclose(a.inverse(a(h)), h, atol=1e-4, rtol=1e-4)
    assert torch.allclose(a(a.inverse(h)), h, atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(alignment_case())
def test_columns_are_orthonormal(case) -> None:
    a, _, _ = case
    q = a.basis
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(alignment_case(), st.data())
def test_empty_block_is_the_identity(case, data) -> None:
    a, h, k = case
    start = data.draw(st.integers(0, k))
    source = torch.randn_like(h)
    assert torch.allclose(interchange(a, source, a, h, slice(start, start)), h, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(alignment_case(), st.data())
def test_same_model_same_input_is_the_identity(case, data) -> None:
    a, h, k = case
    start = data.draw(st.integers(0, k))
    stop = data.draw(st.integers(start, k))
    assert torch.allclose(interchange(a, h, a, h, slice(start, stop)), h, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(alignment_case(), st.data())
def test_low_rank_closed_form_equals_the_full_map(case, data) -> None:
    """docs/method.md section 3: the d x k form is exact, not an approximation."""
    a, h, k = case
    start = data.draw(st.integers(0, k))
    stop = data.draw(st.integers(start, k))
    values = torch.randn(h.shape[0], stop - start)
    z = a(h)
    z_new = torch.cat([z[:, :start], values, z[:, stop:]], -1)
    assert torch.allclose(a.substitute(h, slice(start, stop), values), a.inverse(z_new), atol=1e-4)
    # stitching: the complement is zeroed
    z_zero = torch.zeros_like(z)
    z_zero[:, start:stop] = values
    assert torch.allclose(a.substitute(h, slice(start, stop), values, keep_complement=False), a.inverse(z_zero), atol=1e-4)


def test_interchange_between_widths_moves_the_aligned_coordinates() -> None:
    g = torch.Generator().manual_seed(0)
    source, target = OrthogonalAlignment(12, 4, generator=g), OrthogonalAlignment(7, 4, generator=g)
    hs, ht = torch.randn(5, 12, generator=g), torch.randn(5, 7, generator=g)
    new = interchange(source, hs, target, ht, slice(0, 3))
    assert torch.allclose(target.coordinates(new, slice(0, 3)), source.coordinates(hs, slice(0, 3)), atol=1e-5)
    assert torch.allclose(target.coordinates(new, slice(3, 4)), target.coordinates(ht, slice(3, 4)), atol=1e-5)
