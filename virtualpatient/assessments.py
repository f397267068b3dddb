"""Every measurement of the paper, callable on any :class:`PatientBatch` at any phase.

Each assessment is a function ``(batch, noise) -> list of rows`` registered in :data:`ASSESSMENTS`
under the name a schedule uses; a row is a dict with ``patient``, ``metric``, ``condition``,
``noise_sigma`` and ``value`` (units in ``docs/results-schema.md``). Test conditions come from
``protocol.assessment`` (Methods; facts 4-6).

Examples
--------
>>> from virtualpatient import Protocol, VirtualPatient
>>> patient = VirtualPatient(0, Protocol())
>>> rows = assess(patient, ["sparsity", "gain"], stream="demo")
>>> [(r["metric"], r["value"]) for r in rows]
[('sparsity', 0.0), ('gain', 1.0)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from virtualpatient.network import BiasedNoise, NoiseSource

if TYPE_CHECKING:
    from virtualpatient.patient import PatientBatch

__all__ = ["ACUTE", "ASSESSMENTS", "OFF_MEDICATION", "assess", "register_assessment"]

Row = dict[str, Any]
Assessment = Callable[..., list[Row]]

ASSESSMENTS: dict[str, Assessment] = {}

#: What is measured after the lesion and after each acute course (Tables 1-3).
ACUTE = ("sparsity", "clean", "standard", "combined", "resilience", "biased", "gain", "activation_magnitude")
#: What is measured with a state-dependent arm's module switched off (fact 12).
OFF_MEDICATION = ("combined", "off_medication_noise", "biased", "activation_magnitude")


def register_assessment(name: str) -> Callable[[Assessment], Assessment]:
    """Decorator: make an assessment available by name."""

    def deco(fn: Assessment) -> Assessment:
        ASSESSMENTS[name] = fn
        return fn

    return deco


def rows_for(batch: PatientBatch, metric: str, values: torch.Tensor | Sequence[float], condition: str = "",
             noise_sigma: float = math.nan) -> list[Row]:
    """One row per patient of ``batch``."""
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    return [
        {"patient": s.index, "metric": metric, "condition": condition, "noise_sigma": noise_sigma, "value": float(v)}
        for s, v in zip(batch.specs, values)
    ]


@register_assessment("sparsity")
def sparsity(batch: PatientBatch, noise: NoiseSource | None = None) -> list[Row]:
    """Share of pruned weights over all weight matrices, percent (fact 7)."""
    return rows_for(batch, "sparsity", batch.sparsity())


@register_assessment("clean")
def clean(batch: PatientBatch, noise: NoiseSource | None = None) -> list[Row]:
    """Accuracy on the noise-free set (points on the centres)."""
    mod = batch.modulation.replace(noise_sigma=0.0)
    return rows_for(batch, "accuracy", batch.accuracy("clean", mod=mod), "clean")


@register_assessment("standard")
def standard(batch: PatientBatch, noise: NoiseSource | None = None) -> list[Row]:
    """Accuracy on the standard set (training noise), no internal noise."""
    mod = batch.modulation.replace(noise_sigma=0.0)
    return rows_for(batch, "accuracy", batch.accuracy("standard", mod=mod), "standard")


@register_assessment("combined")
def combined(batch: PatientBatch, noise: NoiseSource) -> list[Row]:
    """Combined stress: input noise plus internal noise on the standard set (fact 4)."""
    cfg = batch.protocol.assessment
    mod = batch.modulation.replace(noise_sigma=cfg.combined_internal_sigma)
    acc = batch.accuracy("standard", mod=mod, input_sd=cfg.combined_input_sd, noise=noise)
    return rows_for(batch, "accuracy", acc, "combined")


def _internal_noise(batch: PatientBatch, noise: NoiseSource, sigmas: Sequence[float]) -> list[Row]:
    rows = []
    for sigma in sigmas:
        mod = batch.modulation.replace(noise_sigma=float(sigma))
        acc = batch.accuracy("standard", mod=mod, noise=noise)
        rows += rows_for(batch, "accuracy", acc, "internal_noise", float(sigma))
    return rows


@register_assessment("resilience")
def resilience(batch: PatientBatch, noise: NoiseSource) -> list[Row]:
    """The resilience curve: accuracy at each internal-noise level (Table 2; fact 4)."""
    return _internal_noise(batch, noise, batch.protocol.assessment.resilience_sigmas)


@register_assessment("off_medication_noise")
def off_medication_noise(batch: PatientBatch, noise: NoiseSource) -> list[Row]:
    """Accuracy at the off-medication noise levels (the paper: extreme, sigma 2.5; fact 12)."""
    return _internal_noise(batch, noise, batch.protocol.assessment.off_medication_sigmas)


@register_assessment("input_noise")
def input_noise(batch: PatientBatch, noise: NoiseSource) -> list[Row]:
    """Accuracy with N(0, sd^2) added to the inputs, at each ``assessment.input_noise_sds``, no internal
    noise (family Ch02 fact 6); rows have condition ``input_noise`` and the sd as ``noise_sigma``."""
    mod = batch.modulation.replace(noise_sigma=0.0)
    rows = []
    for sd in batch.protocol.assessment.input_noise_sds:
        acc = batch.accuracy("standard", mod=mod, input_sd=float(sd), noise=noise)
        rows += rows_for(batch, "accuracy", acc, "input_noise", float(sd))
    return rows


@register_assessment("sparsity_all")
def sparsity_all(batch: PatientBatch, noise: NoiseSource | None = None) -> list[Row]:
    """Share of exactly-zero values over **all** parameters, biases included, percent (family Ch02
    fact 6: the chapter's count, below the mask-based ``sparsity`` because biases are never pruned)."""
    p = batch.params
    tensors = [*p.weights, *p.biases]
    zeros = sum((t == 0).flatten(1).sum(1) for t in tensors).double()
    total = sum(t[0].numel() for t in tensors)
    return rows_for(batch, "sparsity_all", 100.0 * zeros / total)


@register_assessment("scar_fraction")
def scar_fraction(batch: PatientBatch, noise: NoiseSource | None = None) -> list[Row]:
    """Scarred entries over all weight-matrix entries, percent (family 068E fact 2); 0 with no scar."""
    scar = getattr(batch, "scar", None)
    if scar is None:
        return rows_for(batch, "scar_fraction", [0.0] * len(batch))
    total = sum(s[0].numel() for s in scar)
    return rows_for(batch, "scar_fraction", 100.0 * sum(s.flatten(1).sum(1) for s in scar).double() / total)


#: Episode severity from the patient's state (family 068E fact 8d): clip(1 + (g - 1) + 2 (A - 0.1),
#: 0.5, 2.0), g the effective gain, A the activation magnitude.
SEVERITY_ACTIVATION_WEIGHT = 2.0
SEVERITY_ACTIVATION_REFERENCE = 0.1
SEVERITY_RANGE = (0.5, 2.0)


def episode_severity(batch: PatientBatch, activation_weight: float = SEVERITY_ACTIVATION_WEIGHT,
                     activation_reference: float = SEVERITY_ACTIVATION_REFERENCE,
                     severity_range: tuple[float, float] = SEVERITY_RANGE) -> list[float]:
    """Per patient ``clip(1 + (g - 1) + activation_weight (A - activation_reference), *severity_range)``.

    ``g`` is the effective gain and ``A`` the activation magnitude in the current modulation
    (family 068E fact 8d); the ``stress`` phase sizes its episode damage with it.
    """
    g = batch.effective_modulation().values("gain", len(batch))
    a = batch.activation_magnitude()
    lo, hi = severity_range
    return [min(max(1.0 + (float(gi) - 1.0) + activation_weight * (float(ai) - activation_reference), lo), hi)
            for gi, ai in zip(g, a)]


@register_assessment("severity")
def severity(batch: PatientBatch, noise: NoiseSource | None = None) -> list[Row]:
    """The episode severity of every patient at the sheet's defaults (family 068E fact 8d: computed
    every kindling cycle, whether or not the patient relapses)."""
    return rows_for(batch, "severity", episode_severity(batch))


@register_assessment("biased")
def biased(batch: PatientBatch, noise: NoiseSource) -> list[Row]:
    """Accuracy under biased positive noise, the manic-switch proxy (fact 5)."""
    cfg = batch.protocol.assessment
    mod = batch.modulation.replace(noise_sigma=0.0)
    acc = batch.accuracy("standard", mod=mod, noise=noise, biased=BiasedNoise(cfg.biased_sigma, cfg.biased_shift))
    return rows_for(batch, "accuracy", acc, "biased")


@register_assessment("gain")
def gain(batch: PatientBatch, noise: NoiseSource | None = None) -> list[Row]:
    """The nominal gain multiplier (Table 3), per patient (its ``gain_sensitivity`` applied)."""
    return rows_for(batch, "gain", batch.effective_modulation().values("gain", len(batch)))


@register_assessment("activation_magnitude")
def activation_magnitude(batch: PatientBatch, noise: NoiseSource | None = None) -> list[Row]:
    """Mean absolute hidden activation, the latent-excitability proxy (fact 6)."""
    return rows_for(batch, "activation_magnitude", batch.activation_magnitude())


def assess(batch: PatientBatch, names: Sequence[str], stream: str) -> list[Row]:
    """Run the named assessments in order, drawing all noise from one per-patient stream.

    Raises
    ------
    ValueError
        For an unknown assessment name.
    """
    unknown = [n for n in names if n not in ASSESSMENTS]
    if unknown:
        raise ValueError(f"unknown assessment(s) {unknown} (known: {', '.join(sorted(ASSESSMENTS))})")
    noise = batch.noise(stream)
    rows: list[Row] = []
    for name in names:
        rows += ASSESSMENTS[name](batch, noise)
    return rows
