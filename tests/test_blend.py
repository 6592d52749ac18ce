"""Blending the members' OOF predictions (tabular.blend): rank average, nested."""

from __future__ import annotations

import numpy as np
import pytest

from utils.metric import pauc
from utils.settings import GBDTConfig
from utils.tabular.blend import (
    fast_pauc,
    fit_blend_weights,
    member_floors,
    nested_blend,
    rank_average_blend,
)


def members(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three members (strong, weaker, pure noise), labels and 5 folds."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.05).astype(np.int8)
    x = np.column_stack(
        [y + rng.normal(0, 0.6, n), y + rng.normal(0, 1.0, n), rng.normal(0, 1.0, n)]
    )
    return x, y, rng.integers(0, 5, n)


def test_rank_average_by_hand():
    x = np.array([[0.1, 10.0], [0.3, 20.0], [0.2, 40.0]])
    # ranks (1, 3, 2) and (1, 2, 3): means 1, 2.5, 2.5 over 3 rows
    np.testing.assert_allclose(rank_average_blend(x), [1 / 3, 2.5 / 3, 2.5 / 3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_pauc_equals_the_metric(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(2000) < 0.03).astype(int)
    score = y + rng.normal(0, 1, 2000)
    assert fast_pauc(y, score) == pytest.approx(pauc(y, score), abs=1e-12)
    tied = np.round(score, 1)  # many ties: diagonal ROC segments and the cut inside one
    assert fast_pauc(y, tied) == pytest.approx(pauc(y, tied), abs=1e-12)
    assert fast_pauc(y, tied, 0.5) == pytest.approx(pauc(y, tied, 0.5), abs=1e-12)


def test_fit_weights_are_a_convex_combination_that_drops_noise():
    x, y, _ = members()
    weights = fit_blend_weights(x, y)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
    assert weights[2] < 1 / 3 and weights[0] > weights[2]
    assert pauc(y, x @ weights) >= pauc(y, x.mean(axis=1))


def test_one_member_gets_all_the_weight():
    x, y, _ = members()
    np.testing.assert_allclose(fit_blend_weights(x[:, :1], y), [1.0])


def test_nested_weights_of_a_fold_never_see_its_rows():
    x, y, folds = members()
    reference = nested_blend(x, y, folds)
    corrupted_x, corrupted_y = x.copy(), y.copy()
    valid = folds == 0
    corrupted_x[valid] = np.random.default_rng(9).random((valid.sum(), 3))
    corrupted_y[valid] = 1 - y[valid]
    corrupted = nested_blend(corrupted_x, corrupted_y, folds)
    np.testing.assert_array_equal(corrupted.fold_weights[0], reference.fold_weights[0])
    np.testing.assert_allclose(corrupted.oof[valid], corrupted_x[valid] @ reference.fold_weights[0])
    assert reference.pauc == pytest.approx(pauc(y, reference.oof))
    np.testing.assert_array_equal(reference.weights, fit_blend_weights(x, y))


def test_bad_input_is_named():
    x, y, folds = members(200)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rank_average_blend(x)
    with pytest.raises(ValueError, match="rows"):
        nested_blend(np.ones((5, 2)), np.zeros(4), np.zeros(5))


def test_a_floor_keeps_a_member_the_fit_would_drop():
    x, y, folds = members()
    free = fit_blend_weights(x, y)
    assert free[2] == 0.0  # pure noise: the free fit gives it nothing
    floored = fit_blend_weights(x, y, floors=np.array([0.0, 0.0, 0.15]))
    assert floored[2] == pytest.approx(0.15) and floored.sum() == pytest.approx(1.0)
    assert (floored >= 0).all() and floored[0] > floored[1]
    nested = nested_blend(x, y, folds, floors=member_floors(["a", "b", "m"], "m", 0.15))
    assert all(w[2] >= 0.15 - 1e-12 for w in nested.fold_weights.values())
    assert nested.weights[2] == pytest.approx(0.15)


def test_floor_above_equal_weight_starts_at_the_floor_and_bad_floors_raise():
    x, y, _ = members()
    weights = fit_blend_weights(x, y, floors=np.array([0.0, 0.0, 0.6]))
    assert weights[2] >= 0.6 - 1e-12 and weights.sum() == pytest.approx(1.0)
    assert member_floors(["a", "b"], "m", 0.2) is None  # member absent: no floor
    assert member_floors(["a", "m"], "m", 0.0) is None
    with pytest.raises(ValueError, match="floors"):
        fit_blend_weights(x, y, floors=np.array([0.6, 0.6, 0.0]))
    with pytest.raises(ValueError, match="floors"):
        fit_blend_weights(x, y, floors=np.array([0.1, 0.1]))
    with pytest.raises(ValueError, match="blend_floor"):
        GBDTConfig(blend_floor=1.0)
