"""Treatment arms: the interface, the paper's three mechanisms, and a registry.

A treatment is a small frozen dataclass whose fields are its parameters (validated when a study is
loaded) and whose :meth:`Treatment.apply` runs the acute course on a :class:`PatientBatch`, leaving
the batch in its on-drug state (weights, masks, modulation). Maintenance, discontinuation and
wash-out are the trial's business; a treatment only says how fast its protection washes out.

Register a new arm with :func:`register`, then name it in a study file::

    @register("my_arm")
    @treatment_dataclass
    class MyArm(Treatment):
        gain: float = 1.1
        washout_decay: float = 0.01

        def apply(self, batch, arm, on_epoch=None):
            batch.modulation = batch.modulation.replace(gain=self.gain)

Examples
--------
>>> t = build_treatment("ketamine", {})
>>> type(t).__name__, t.gain, t.regrow_fraction
('KetamineLike', 1.25, 0.5)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from virtualpatient import plasticity
from virtualpatient.limits import MAX_EPOCHS, MAX_GAIN, MAX_LR, MAX_NOISE, MAX_STEPS
from virtualpatient.network import Modulation

__all__ = [
    "KetamineLike",
    "NeurosteroidLike",
    "SSRILike",
    "TREATMENTS",
    "Treatment",
    "build_treatment",
    "default_arms",
    "register",
    "treatment_dataclass",
]

TREATMENTS: dict[str, type[Treatment]] = {}

#: Decorator that makes a treatment a frozen, validated dataclass refusing unknown parameters.
#: Floats refuse NaN and inf; every numeric field of a treatment also needs finite bounds.
treatment_dataclass = dataclass(frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))


def register(name: str) -> Callable[[type[Treatment]], type[Treatment]]:
    """Class decorator: make a treatment available to study files under ``name``.

    Examples
    --------
    >>> @register("gain_only_example")
    ... @treatment_dataclass
    ... class GainOnly(Treatment):
    ...     gain: float = 1.6
    ...     washout_decay: float = 0.015
    ...     def apply(self, batch, arm, on_epoch=None):
    ...         batch.modulation = batch.modulation.replace(gain=self.gain)
    >>> build_treatment("my_arm", {"treatment": "gain_only_example", "gain": 1.3}).gain
    1.3
    """

    def deco(cls: type[Treatment]) -> type[Treatment]:
        if not (isinstance(cls, type) and issubclass(cls, Treatment)):
            raise TypeError(f"{cls!r} is not a Treatment subclass")
        TREATMENTS[name] = cls
        cls.registry_name = name
        return cls

    return deco


class Treatment:
    """Base class of treatment arms.

    Subclasses are :func:`treatment_dataclass` dataclasses with at least the field
    ``washout_decay`` (protection lost per wash-out step after discontinuation, fact 14) and
    implement :meth:`apply`.

    Attributes
    ----------
    state_dependent
        Whether the trial also assesses the arm with its modulation switched off straight after the
        acute course (the paper does this for the neurosteroid-like arm only, fact 12).
    """

    registry_name: ClassVar[str] = ""
    state_dependent: ClassVar[bool] = False
    washout_decay: float

    def apply(self, batch, arm: str, on_epoch: Callable[[int], None] | None = None) -> None:
        """Run the acute course on ``batch`` in place.

        ``arm`` is the arm's name in the study; random streams are named after it
        (``"<arm>/<phase>"``), so two arms of the same treatment draw independently.
        """
        raise NotImplementedError

    def training_epochs(self) -> int:
        """Training epochs of the acute course (for progress accounting)."""
        return int(getattr(self, "epochs", 0))

    def interpretations(self) -> dict[str, Any]:
        """Fields whose default follows the published notebook where the text reads otherwise."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"treatment": self.registry_name, **dataclasses.asdict(self)}



@register("ketamine")
@treatment_dataclass
class KetamineLike(Treatment):
    """Ketamine-like synaptogenesis: gradient-guided regrowth, then locked-mask consolidation.

    The gain is set to ``gain`` first. Pruned positions are scored by ``|dLoss/dw|`` summed over
    ``score_batches`` training mini-batches at gain 1 without noise (``score_at_unit_gain``; the
    text does not say, so ``False`` scores at ``gain``); in each layer the top
    ``floor(regrow_fraction x pruned)`` are reinstated with N(0, ``regrow_sd``^2) values; the mask
    is locked and ``epochs`` of Adam at ``lr`` follow (Methods; fact 8). ``score = "random"`` is the
    random-regrowth control. A patient's ``regrowth_fraction`` covariate overrides
    ``regrow_fraction`` (plasticity reserve). ``regrow_min`` regrows at least that many positions
    per layer while any is pruned (the family notebooks' gradient regrowth: 1; the paper's: 0).

    Examples
    --------
    >>> control = KetamineLike(score="random")      # the random-regrowth control
    >>> control.regrow_fraction, control.washout_decay
    (0.5, 0.002)
    """

    gain: float = Field(1.25, gt=0, le=MAX_GAIN)
    regrow_fraction: float = Field(0.5, ge=0, le=1)
    regrow_sd: float = Field(0.03, ge=0, le=MAX_NOISE)
    regrow_min: int = Field(0, ge=0, le=MAX_STEPS)
    score_batches: int = Field(30, ge=1, le=MAX_STEPS)
    score: Literal["gradient", "random"] = "gradient"
    score_at_unit_gain: bool = True
    epochs: int = Field(15, ge=0, le=MAX_EPOCHS)
    lr: float = Field(5e-4, gt=0, le=MAX_LR)
    washout_decay: float = Field(0.002, ge=0, le=1)

    def apply(self, batch, arm: str, on_epoch=None) -> None:
        batch.modulation = batch.modulation.replace(gain=self.gain, noise_sigma=0.0)
        if self.score == "gradient":
            score_gain = 1.0 if self.score_at_unit_gain else self.gain
            scores = plasticity.gradient_scores(
                batch.params, batch.data.train_x, batch.data.train_y,
                n_batches=self.score_batches, batch_size=batch.protocol.baseline.batch_size,
                mod=batch.modulation.replace(gain=score_gain), stab=batch.protocol.stabiliser,
                shuffle=batch.generators(f"{arm}/score"),
            )
        else:
            scores = plasticity.random_scores(batch.params, batch.generators(f"{arm}/score"))
        fractions = [f if not math.isnan(f) else self.regrow_fraction for f in batch.covariate("regrowth_fraction")]
        # a schedule's scars (virtualpatient.phases) are never regrown
        plasticity.regrow(batch.params, scores, fractions, self.regrow_sd, batch.generators(f"{arm}/regrow"),
                          blocked=getattr(batch, "scar", None), min_count=self.regrow_min)
        batch.train(self.epochs, self.lr, f"{arm}/train", on_epoch=on_epoch)

    def interpretations(self) -> dict[str, Any]:
        return {"score_at_unit_gain": self.score_at_unit_gain}


@register("ssri")
@treatment_dataclass
class SSRILike(Treatment):
    """SSRI-like slow refinement: a long low-rate course with tapering noise and rising gain.

    For epoch ``e`` of ``epochs``, progress ``t = e / (epochs - 1)``; training runs with internal
    noise ``noise_start + (noise_end - noise_start) t`` and gain ``gain_start + (gain_end -
    gain_start) t`` at Adam ``lr``; afterwards noise is off and the gain stays at ``gain_end``
    (Methods; fact 9). Sparsity is unchanged.

    Examples
    --------
    >>> from virtualpatient.network import Modulation
    >>> first, last = SSRILike().modulation_at(Modulation(), 0), SSRILike().modulation_at(Modulation(), 99)
    >>> (first.noise_sigma, first.gain), (last.noise_sigma, round(last.gain, 2))
    ((0.5, 1.0), (0.0, 1.6))
    """

    epochs: int = Field(100, ge=0, le=MAX_EPOCHS)
    lr: float = Field(1e-5, gt=0, le=MAX_LR)
    noise_start: float = Field(0.5, ge=0, le=MAX_NOISE)
    noise_end: float = Field(0.0, ge=0, le=MAX_NOISE)
    gain_start: float = Field(1.0, gt=0, le=MAX_GAIN)
    gain_end: float = Field(1.6, gt=0, le=MAX_GAIN)
    washout_decay: float = Field(0.015, ge=0, le=1)

    def modulation_at(self, base: Modulation, epoch: int) -> Modulation:
        """The training modulation of epoch ``epoch`` (0-based)."""
        t = epoch / (self.epochs - 1) if self.epochs > 1 else 1.0
        return base.replace(
            noise_sigma=self.noise_start + (self.noise_end - self.noise_start) * t,
            gain=self.gain_start + (self.gain_end - self.gain_start) * t,
        )

    def apply(self, batch, arm: str, on_epoch=None) -> None:
        base = batch.modulation
        batch.train(self.epochs, self.lr, f"{arm}/train",
                    schedule=lambda e: self.modulation_at(base, e), on_epoch=on_epoch)
        batch.modulation = base.replace(noise_sigma=0.0, gain=self.gain_end)


@register("neurosteroid")
@treatment_dataclass
class NeurosteroidLike(Treatment):
    """Neurosteroid-like tonic inhibition: damping, a saturating activation, lower gain.

    Post-activation values are multiplied by ``damping``, ReLU becomes ``activation`` (tanh) and
    the gain is set to ``gain`` (effective ~0.59); ``epochs`` of Adam at ``lr`` consolidate with the
    mask kept (Methods; fact 10). State-dependent: the trial also tests it with the module off.

    Examples
    --------
    >>> t = NeurosteroidLike()
    >>> t.damping * t.gain, NeurosteroidLike.state_dependent
    (0.595, True)
    """

    state_dependent: ClassVar[bool] = True

    damping: float = Field(0.7, gt=0, le=MAX_GAIN)
    activation: Literal["relu", "tanh"] = "tanh"
    gain: float = Field(0.85, gt=0, le=MAX_GAIN)
    epochs: int = Field(10, ge=0, le=MAX_EPOCHS)
    lr: float = Field(5e-4, gt=0, le=MAX_LR)
    washout_decay: float = Field(0.008, ge=0, le=1)

    def apply(self, batch, arm: str, on_epoch=None) -> None:
        batch.modulation = batch.modulation.replace(
            damping=self.damping, activation=self.activation, gain=self.gain, noise_sigma=0.0
        )
        batch.train(self.epochs, self.lr, f"{arm}/train", on_epoch=on_epoch)


def build_treatment(arm: str, spec: Any) -> Treatment:
    """Build an arm's treatment from a study-file table (or return a ready :class:`Treatment`).

    The table's ``treatment`` key names a registered treatment (default: the arm's name); the other
    keys are its parameters.

    Raises
    ------
    ValueError
        For an unknown treatment or invalid parameters, naming each one.
    """
    if isinstance(spec, Treatment):
        return spec
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ValueError(f"an arm must be a table of treatment parameters, got {type(spec).__name__}")
    params = dict(spec)
    kind = params.pop("treatment", arm)
    if kind not in TREATMENTS:
        raise ValueError(f"unknown treatment {kind!r} (registered: {', '.join(sorted(TREATMENTS))})")
    try:
        return TREATMENTS[kind](**params)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] in ("unexpected_keyword_argument", "extra_forbidden") else err["msg"]
            problems.append(f"{field}: {msg}")
        raise ValueError("; ".join(problems)) from None


def default_arms() -> dict[str, Treatment]:
    """The paper's three arms with their published parameters."""
    return {"ketamine": KetamineLike(), "ssri": SSRILike(), "neurosteroid": NeurosteroidLike()}
