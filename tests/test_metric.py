import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from utils.metric import pauc


def test_perfect_ranking_scores_the_maximum():
    assert pauc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.2)


def test_inverted_ranking_scores_zero():
    assert pauc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.0)


def test_constant_scores_give_the_random_triangle():
    assert pauc([0, 1, 0, 1, 0], [0.5] * 5) == pytest.approx(0.02)


def test_hand_computed_example():
    assert pauc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_mcclish_form_of_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 700)
    s = rng.random(700) + 0.4 * y
    mcclish = roc_auc_score(1 - y, -s, max_fpr=0.2)
    min_area, max_area = 0.5 * 0.2**2, 0.2
    expected = min_area + (2 * mcclish - 1) * (max_area - min_area)
    assert pauc(y, s) == pytest.approx(expected, abs=1e-9)


def test_other_min_tpr_changes_the_range():
    assert pauc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], min_tpr=0.5) == pytest.approx(0.5)


def test_one_class_only_is_a_clear_error():
    with pytest.raises(ValueError, match="one class"):
        pauc([0, 0, 0], [0.1, 0.2, 0.3])


def test_nan_scores_and_bad_labels_are_errors():
    with pytest.raises(ValueError, match="NaN"):
        pauc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="0 or 1"):
        pauc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels but"):
        pauc([0, 1, 1], [0.1, 0.2])
