"""Linear CKA from Gram matrices: hand computation, invariances, streaming Gram accumulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from losa.allocation.cka import GramAccumulator, cka_from_grams, cka_matrix, gram
from losa.errors import LosaError


def _cka_features(x: np.ndarray, y: np.ndarray) -> float:
    """Independent reference: feature-space linear CKA ‖YcᵀXc‖²_F / (‖XcᵀXc‖_F ‖YcᵀYc‖_F)."""
    xc = x - x.mean(0)
    yc = y - y.mean(0)
    return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


def test_cka_hand_computed_3_samples():
    # x = [0, 1, 2] (1 feature), y = [0, 1, 1]: centred x = [-1, 0, 1], centred y = [-2/3, 1/3, 1/3].
    # HSIC ∝ (Σ xc·yc)² = (2/3 + 1/3)² = 1; ‖xc‖⁴ = 4; ‖yc‖⁴ = (2/3)² = 4/9 -> CKA = 1/sqrt(16/9) = 0.75
    x = torch.tensor([[0.0], [1.0], [2.0]])
    y = torch.tensor([[0.0], [1.0], [1.0]])
    assert cka_from_grams(gram(x), gram(y)) == pytest.approx(0.75, abs=1e-12)


def test_cka_matches_feature_space_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 7))
    y = x @ rng.normal(size=(7, 5)) + 0.5 * rng.normal(size=(12, 5))
    got = cka_from_grams(gram(torch.from_numpy(x)), gram(torch.from_numpy(y)))
    assert got == pytest.approx(_cka_features(x, y), rel=1e-10)


def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 6))
    y = rng.normal(size=(10, 4))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    base = cka_from_grams(gram(torch.from_numpy(x)), gram(torch.from_numpy(y)))
    rotated = cka_from_grams(gram(torch.from_numpy(3.7 * x @ q)), gram(torch.from_numpy(y)))
    assert rotated == pytest.approx(base, rel=1e-10)
    assert cka_from_grams(gram(torch.from_numpy(x)), gram(torch.from_numpy(2.0 * x @ q))) == pytest.approx(1.0)
    # but not invariant to a generic (non-orthogonal) linear map
    a = rng.normal(size=(6, 6))
    other = cka_from_grams(gram(torch.from_numpy(x @ a)), gram(torch.from_numpy(y)))
    assert abs(other - base) > 1e-3


def test_streaming_accumulator_equals_full_gram_and_matrix():
    torch.manual_seed(0)
    feats = [torch.randn(5, 8, 6) for _ in range(3)]
    acc = GramAccumulator(3, 5)
    for i, f in enumerate(feats):
        for s in range(0, 8, 3):  # sequence-position chunks
            acc.update(i, f[:, s : s + 3])
    for g, f in zip(acc.result(), feats):
        ref = f.reshape(5, -1).double() @ f.reshape(5, -1).double().T
        torch.testing.assert_close(g, ref)
    m = acc.cka()
    for i in range(3):
        for j in range(3):
            ref = _cka_features(feats[i].reshape(5, -1).double().numpy(), feats[j].reshape(5, -1).double().numpy())
            assert float(m[i, j]) == pytest.approx(ref, rel=1e-9)
    torch.testing.assert_close(m, m.T)


def test_gram_chunking_exact():
    x = torch.randn(4, 1000)
    torch.testing.assert_close(gram(x, chunk_cols=40), x.double() @ x.double().T)


def test_bad_inputs():
    with pytest.raises(LosaError, match="n×n"):
        cka_from_grams(torch.eye(3), torch.eye(4))
    with pytest.raises(LosaError, match="nsamples"):
        GramAccumulator(2, 1)
    acc = GramAccumulator(2, 3)
    acc.update(0, torch.randn(3, 4))
    with pytest.raises(LosaError, match=r"missing for layers \[1\]"):
        acc.result()
    with pytest.raises(LosaError, match="at least one"):
        cka_matrix([])
