import math

import numpy as np
import pytest

from keel.proxy.sweep import cap_losses, lr_sensitivity

NAN, INF = float("nan"), float("inf")


def test_hand_computed_curve():
    # ℓ₀ = 5; capped curve [3.0, 2.5, 2.0, 2.05, 5.0 (6.0 capped), 5.0 (NaN)]; ℓ* = 2.0
    # LRS = mean(1.0, 0.5, 0, 0.05, 3.0, 3.0) = 7.55 / 6
    r = lr_sensitivity([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], [3.0, 2.5, 2.0, 2.05, 6.0, NAN], init_loss=5.0)
    assert r.lr_sensitivity == pytest.approx(7.55 / 6, abs=1e-12)
    assert r.best_lr == 1e-3 and r.best_loss == 2.0 and r.init_loss == 5.0
    assert r.lr_range == (1e-3, 3e-3)  # 2.05 is within 0.1 nats of 2.0, 2.5 is not
    assert r.losses == (3.0, 2.5, 2.0, 2.05, 5.0, 5.0)


def test_order_of_points_does_not_matter():
    lrs, losses = [1e-2, 1e-4, 1e-3], [4.0, 3.0, 2.0]
    r = lr_sensitivity(lrs, losses, init_loss=5.0)
    assert r.lrs == (1e-4, 1e-3, 1e-2) and r.losses == (3.0, 2.0, 4.0)
    assert r.lr_sensitivity == pytest.approx((1.0 + 0.0 + 2.0) / 3) and r.best_lr == 1e-3


def test_seeds_are_capped_then_averaged():
    # lr 1e-3: seeds (2.0, 2.2) → 2.1; lr 1e-2: seeds (2.0, NaN→4.0) → 3.0; ℓ* = 2.1
    r = lr_sensitivity([1e-3, 1e-2], [[2.0, 2.2], [2.0, NAN]], init_loss=4.0)
    assert r.losses == pytest.approx((2.1, 3.0))
    assert r.lr_sensitivity == pytest.approx((0.0 + 0.9) / 2)
    assert r.best_lr == 1e-3 and r.lr_range == (1e-3, 1e-3)


def test_a_flat_curve_has_zero_sensitivity_and_full_range():
    r = lr_sensitivity([1e-3, 1e-2, 1e-1], [2.0, 2.0, 2.0], init_loss=5.0)
    assert r.lr_sensitivity == 0.0 and r.lr_range == (1e-3, 1e-1) and r.best_lr == 1e-3  # ties: smallest LR


def test_every_run_diverged_is_zero_sensitivity_at_the_cap():
    r = lr_sensitivity([1e-2, 1e-1], [INF, NAN], init_loss=5.5)
    assert r.lr_sensitivity == 0.0 and r.best_loss == 5.5


def test_cap_losses_counts_non_finite_as_init_loss():
    np.testing.assert_array_equal(cap_losses([1.0, 9.0, NAN, INF, -INF], 5.0), [1.0, 5.0, 5.0, 5.0, 5.0])
    assert cap_losses([], 5.0).shape == (0,)


def test_matches_an_independent_float64_formula():
    rng = np.random.default_rng(0)
    lrs = np.logspace(-4, -0.5, 8)
    losses = rng.uniform(1.5, 7.0, size=8)
    init = 5.5
    capped = [min(x, init) for x in losses]
    expected = sum(c - min(capped) for c in capped) / len(capped)
    assert lr_sensitivity(list(lrs), list(losses), init).lr_sensitivity == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "lrs, losses, init, match",
    [
        ([], [], 5.0, "0 lrs and 0 losses"),
        ([1e-3], [1.0, 2.0], 5.0, "1 lrs and 2 losses"),
        ([1e-3, 1e-3], [1.0, 2.0], 5.0, "distinct"),
        ([0.0, 1e-3], [1.0, 2.0], 5.0, "distinct numbers > 0"),
        ([1e-3], [1.0], NAN, "init_loss=nan"),
        ([1e-3], [[]], 5.0, "an LR with no losses"),
    ],
)
def test_bad_inputs_name_the_problem(lrs, losses, init, match):
    with pytest.raises(ValueError, match=match):
        lr_sensitivity(lrs, losses, init)


def test_tolerance_widens_the_range():
    r = lr_sensitivity([1e-3, 1e-2, 1e-1], [2.0, 2.3, 2.6], init_loss=5.0, tolerance=0.35)
    assert r.lr_range == (1e-3, 1e-2) and r.tolerance == 0.35
    assert math.isclose(r.lr_sensitivity, 0.3)
