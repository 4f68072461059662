"""The best-single-layer baseline fitted in the span of the training rows equals the fit in all dimensions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rbrm.errors import ConfigError
from rbrm.probe_train import SpanLogistic, logistic_baseline, span_coordinates

ROWS, LAYERS, HIDDEN = 80, 3, 300


def planted(seed: int = 0):
    """80 rows (40 prompts x a safe and an unsafe answer) x 3 layers x 300 dims; the signal is strongest in
    layer 1, weak in layer 0, absent in layer 2; dimensions of different scale, a shared prompt part."""
    g = torch.Generator().manual_seed(seed)
    safe = (torch.arange(ROWS) % 2 == 0).long()
    scale = torch.exp(torch.randn(HIDDEN, generator=g))
    direction = torch.nn.functional.normalize(torch.randn(HIDDEN, generator=g), dim=0)
    prompt = torch.randn(ROWS // 2, 1, HIDDEN, generator=g).repeat_interleave(2, 0)
    noise = torch.randn(ROWS, LAYERS, HIDDEN, generator=g)
    strength = torch.tensor([1.5, 4.0, 0.0])[None, :, None]
    sign = (2 * safe - 1).float()[:, None, None]
    features = (prompt + noise + sign * strength * direction) * scale
    pairs = torch.stack([torch.arange(0, ROWS, 2), torch.arange(1, ROWS, 2)], 1)  # (safe, unsafe)
    train = torch.zeros(ROWS, dtype=torch.bool)
    train[torch.randperm(ROWS // 2, generator=g)[:30] * 2] = True
    train |= train.roll(1)  # whole prompts on one side
    return features, safe, pairs, train


@pytest.mark.parametrize("paired", [True, False])
def test_the_span_fit_gives_the_full_fits_accuracies_and_layer(paired):
    features, safe, pairs, train = planted()
    args = (features, pairs, torch.full((ROWS,), -1)) if paired else (features, None, safe)
    span = logistic_baseline(*args, train, fit="span")
    full = logistic_baseline(*args, train, fit="full")
    assert span["baseline_layer_index"] == full["baseline_layer_index"] == 1  # the planted layer
    # Equal here; scikit-learn fits float32 rows in float32, so on another CPU's BLAS one borderline prediction
    # of the full fit may flip: at most one held-out row's worth.
    one_row = 1 / ((~train).sum().item() if not paired else (~train[pairs[:, 0]]).sum().item() * 2)
    for key in ("baseline_val_accuracy", "baseline_train_cv_accuracy"):
        assert abs(span[key] - full[key]) <= one_row + 1e-12, key
    assert span["baseline_val_accuracy"] >= 0.8


@pytest.mark.parametrize("paired", [True, False])
def test_the_span_fit_has_the_full_fits_weights(paired):
    """Solved tightly in float64, both reach the same optimum: the margins agree far beyond what decides a
    prediction. (scikit-learn fits float32 rows in float32, to ~1e-4 of the margins: the full baseline's own
    rounding, which `test_the_span_fit_gives_the_full_fits_accuracies_and_layer` covers.)"""
    features, safe, pairs, train = planted(seed=1)
    x = features[:, 1].double().numpy()
    if paired:
        diff = x[pairs[:, 0]] - x[pairs[:, 1]]
        x, y = np.concatenate([diff, -diff]), np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    else:
        y = safe.numpy()
    full = make_pipeline(StandardScaler(with_mean=not paired),
                         LogisticRegression(C=0.1, max_iter=5000, tol=1e-10, fit_intercept=not paired)).fit(x, y)
    span = SpanLogistic(paired, tol=1e-10).fit(x, y)
    margin_full = full.decision_function(x)
    margin_span = x @ span.weights_ + span.intercept_
    assert np.abs(margin_span - margin_full).max() <= 1e-6 * np.abs(margin_full).max()
    assert (span.predict(x) == full.predict(x)).all()


def test_pair_differences_given_once_fit_as_the_whole_design():
    """[d; -d] given as d with row indices and signs is the same problem as the stacked rows."""
    features, _, pairs, _ = planted(seed=2)
    x = features[:, 1].numpy()
    diff = x[pairs[:, 0]] - x[pairs[:, 1]]
    stacked, y = np.concatenate([diff, -diff]), np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    pick = np.array([0, 3, 5, 7, 9, 40 + 1, 40 + 3, 40 + 8, 40 + 9, 40 + 12])
    pick = np.concatenate([pick, np.arange(12, 30), np.arange(60, 75)])
    pick = pick[pick < len(stacked)]
    whole = SpanLogistic(True, tol=1e-10).fit(stacked[pick], y[pick])
    once = SpanLogistic(True, tol=1e-10).fit(diff, y[pick], pick % len(diff),
                                            np.where(pick < len(diff), 1.0, -1.0))
    assert np.allclose(once.weights_, whole.weights_, rtol=1e-5, atol=1e-7 * np.abs(whole.weights_).max())


def test_span_coordinates_reproduce_the_gram_matrix_of_rank_deficient_rows():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((12, 40)) * np.exp(rng.standard_normal(40))
    signed = np.concatenate([base, -base[:5], base[:3] + base[3:6]])  # 20 rows of rank 12
    centred = base[:10] - base[:10].mean(0)  # 10 centred rows (fewer than dims): rank 9
    for rows, rank in ((signed, 12), (centred, 9)):
        gram = rows @ rows.T
        coords = span_coordinates(gram)
        assert coords.shape == (len(rows), rank)
        assert np.allclose(coords @ coords.T, gram, rtol=0, atol=1e-9 * np.abs(gram).max())


def test_an_unknown_baseline_fit_is_refused():
    features, safe, _, train = planted()
    with pytest.raises(ConfigError, match="baseline fit"):
        logistic_baseline(features, None, safe, train, fit="dual")
