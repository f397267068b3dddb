"""The mood-stabiliser guard rail: protection, its effects on the hidden layers, and its decay.

Protection ``p`` in [0, 1] does three things while ``p > 0`` (Methods; fact 13): it caps the
effective gain towards ``gain_floor``, shifts every hidden layer by ``-inhibition * p``, and scales
the upward shift of biased (manic) noise by ``1 - noise_shift_factor * p``. After discontinuation
protection decays linearly by the arm's rate for a fixed number of steps (fact 14).

Examples
--------
>>> from virtualpatient.protocol import StabiliserConfig
>>> cfg = StabiliserConfig()
>>> effective_gain(1.6, 1.0, cfg), effective_gain(1.6, 0.0, cfg)
(1.05, 1.6)
>>> [round(p, 3) for p in washout_schedule(1.0, 0.015, 3)]
[1.0, 0.985, 0.97, 0.955]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from virtualpatient.protocol import StabiliserConfig

__all__ = ["biased_shift_scale", "decay", "effective_gain", "inhibitory_shift", "washout_schedule"]


def effective_gain(gain: float, protection: float, cfg: StabiliserConfig) -> float:
    """The gain the hidden layers see: ``gain`` capped by protection (``gain`` itself if p = 0)."""
    if protection <= 0:
        return gain
    floor = cfg.gain_floor
    return min(gain, max(floor, floor + (1.0 - protection) * (gain - floor)))


def inhibitory_shift(protection: float, cfg: StabiliserConfig) -> float:
    """The constant subtracted from every hidden unit: ``inhibition * p``."""
    return cfg.inhibition * protection if protection > 0 else 0.0


def biased_shift_scale(protection: float, cfg: StabiliserConfig) -> float:
    """The factor on the biased-noise shift: ``1 - noise_shift_factor * p``."""
    return 1.0 - cfg.noise_shift_factor * protection


def decay(protection: float, rate: float) -> float:
    """One wash-out step: ``max(0, p - rate)``."""
    return max(0.0, protection - rate)


def washout_schedule(protection: float, rate: float, steps: int) -> list[float]:
    """Protection at wash-out steps 0..steps (step 0 is the moment of discontinuation)."""
    levels = [protection]
    for _ in range(steps):
        levels.append(decay(levels[-1], rate))
    return levels
