"""Tests of virtualpatient.stabiliser: the guard rail's arithmetic (fact 13) and wash-out (fact 14)."""

from __future__ import annotations

import numpy as np
import pytest

from virtualpatient.protocol import StabiliserConfig
from virtualpatient.stabiliser import (
    biased_shift_scale,
    decay,
    effective_gain,
    inhibitory_shift,
    washout_schedule,
)

CFG = StabiliserConfig()


@pytest.mark.parametrize(
    ("gain", "p", "expected"),
    [
        # p = 0: the nominal gain, whatever it is
        (1.6, 0.0, 1.6),
        (1.25, 0.0, 1.25),
        (0.85, 0.0, 0.85),
        # full protection caps any gain above the floor at the floor
        (1.6, 1.0, 1.05),
        (1.25, 1.0, 1.05),
        # partial protection: 1.05 + (1 - p)(g - 1.05), computed by hand
        (1.6, 0.5, 1.325),
        (1.6, 0.25, 1.4625),
        (1.25, 0.9, 1.07),
        (1.25, 0.25, 1.2),
        (1.6, 0.6, 1.27),
        # gains at or below the floor are never raised
        (0.85, 1.0, 0.85),
        (0.85, 0.5, 0.85),
        (1.0, 0.6, 1.0),
        (1.05, 0.3, 1.05),
    ],
)
def test_effective_gain_table(gain, p, expected):
    """effective_gain = min(g, max(1.05, 1.05 + (1 - p)(g - 1.05))) if p > 0 else g (fact 13)."""
    assert effective_gain(gain, p, CFG) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.6, 0.9, 1.0])
def test_inhibitory_and_biased_shift(p):
    """The inhibitory shift is 0.15 p (0 without protection); the biased shift scale is 1 - 0.3 p."""
    assert inhibitory_shift(p, CFG) == pytest.approx(0.15 * p, abs=1e-15)
    assert biased_shift_scale(p, CFG) == pytest.approx(1.0 - 0.3 * p, abs=1e-15)


def test_stabiliser_uses_its_config():
    """The constants come from StabiliserConfig, not from code."""
    cfg = StabiliserConfig(inhibition=0.2, noise_shift_factor=0.5, gain_floor=1.1)
    assert effective_gain(1.5, 0.5, cfg) == pytest.approx(1.1 + 0.5 * 0.4)
    assert inhibitory_shift(0.5, cfg) == pytest.approx(0.1)
    assert biased_shift_scale(0.5, cfg) == pytest.approx(0.75)


@pytest.mark.parametrize(("rate", "final"), [(0.002, 0.90), (0.015, 0.25), (0.008, 0.60)])
def test_washout_leaves_the_papers_protection(rate, final):
    """50 linear decay steps from p = 1 leave 0.90 / 0.25 / 0.60 for the three arms' rates (fact 14)."""
    levels = washout_schedule(1.0, rate, 50)
    assert len(levels) == 51
    assert levels[0] == 1.0
    np.testing.assert_allclose(levels, 1.0 - rate * np.arange(51), atol=1e-12)
    assert levels[-1] == pytest.approx(final, abs=1e-12)


def test_washout_stops_at_zero():
    """Protection decays as max(0, p - rate): it reaches 0 and stays there, never negative."""
    levels = washout_schedule(1.0, 0.03, 50)
    expected = np.maximum(0.0, 1.0 - 0.03 * np.arange(51))
    np.testing.assert_allclose(levels, expected, atol=1e-12)
    assert min(levels) == 0.0 and levels[-1] == 0.0
    assert decay(0.01, 0.03) == 0.0
    assert washout_schedule(0.7, 0.1, 0) == [0.7]
