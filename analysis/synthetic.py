"""Synthetic results tables and run folders that follow ``docs/results-schema.md``.

The numbers are drawn around the paper's published means and SDs; they are
for exercising the analysis layer (tests, examples, demos) without running a
simulation, and say nothing about the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis._data import REQUIRED_COLUMNS

__all__ = ["PROFILES", "make_protocol", "make_results", "write_run"]

PAPER_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.5)
PAPER_DURATIONS = (25, 50, 100, 150, 200, 300)
PAPER_DECAY = {"ketamine": 0.002, "ssri": 0.015, "neurosteroid": 0.008}

#: (mean, sd) per arm and measure; ``sigma_<s>`` are Table 2's internal-noise
#: accuracies, ``washout_start``/``washout_end`` the biased accuracy at the
#: first and last wash-out step, ``off_*`` the damping-off numbers.
PROFILES: dict[str, dict[str, tuple[float, float]]] = {
    "untreated": {
        "sparsity": (95.0, 0.0),
        "clean": (34.7, 11.9),
        "standard": (36.8, 11.9),
        "combined": (29.7, 2.7),
        "sigma_0.5": (29.9, 2.5),
        "sigma_1.0": (29.6, 1.8),
        "sigma_1.5": (29.8, 1.4),
        "sigma_2.5": (29.6, 1.5),
        "biased": (25.0, 0.8),
        "gain": (1.0, 0.0),
        "activation_magnitude": (0.100, 0.013),
    },
    "ketamine": {
        "sparsity": (47.5, 0.0),
        "clean": (100.0, 0.0),
        "standard": (100.0, 0.0),
        "combined": (97.2, 0.2),
        "sigma_0.5": (99.9, 0.1),
        "sigma_1.0": (98.2, 1.1),
        "sigma_1.5": (92.9, 2.4),
        "sigma_2.5": (76.8, 3.6),
        "biased": (84.2, 8.5),
        "gain": (1.25, 0.0),
        "activation_magnitude": (0.649, 0.079),
        "relapse_drop": (-0.1, 0.3),
        "washout_start": (96.0, 1.0),
        "washout_end": (92.5, 1.0),
    },
    "ssri": {
        "sparsity": (95.0, 0.0),
        "clean": (100.0, 0.0),
        "standard": (99.9, 0.1),
        "combined": (90.5, 3.0),
        "sigma_0.5": (95.1, 3.2),
        "sigma_1.0": (78.4, 5.4),
        "sigma_1.5": (64.9, 5.3),
        "sigma_2.5": (49.9, 2.8),
        "biased": (47.2, 12.7),
        "gain": (1.6, 0.0),
        "activation_magnitude": (0.390, 0.079),
        "relapse_drop": (7.0, 2.4),
        "washout_start": (80.0, 4.0),
        "washout_end": (42.0, 9.0),
    },
    "neurosteroid": {
        "sparsity": (95.0, 0.0),
        "clean": (100.0, 0.0),
        "standard": (100.0, 0.0),
        "combined": (97.6, 0.3),
        "sigma_0.5": (99.9, 0.1),
        "sigma_1.0": (93.0, 2.6),
        "sigma_1.5": (70.6, 2.9),
        "sigma_2.5": (43.0, 1.0),
        "biased": (50.6, 7.9),
        "gain": (0.85, 0.0),
        "activation_magnitude": (0.196, 0.008),
        "relapse_drop": (5.1, 2.1),
        "washout_start": (85.0, 4.0),
        "washout_end": (45.0, 12.0),
        "off_combined": (78.5, 4.9),
        "off_biased": (36.9, 9.6),
        "off_sigma_2.5": (58.3, 4.1),
        "off_activation_magnitude": (0.30, 0.03),
    },
}

_COVARIATES = ("prune_fraction", "regrowth_fraction", "lr_scale")


def _profile(arm: str, profiles: Mapping[str, Mapping[str, tuple[float, float]]]) -> dict:
    base = dict(PROFILES.get(arm, PROFILES["ssri"]))
    if arm not in PROFILES:
        base.pop("off_combined", None)
    base.update(profiles.get(arm, {}))
    return base


def make_results(
    n_patients: int = 10,
    arms: Sequence[str] = ("ketamine", "ssri", "neurosteroid"),
    *,
    seed: int = 0,
    sigmas: Sequence[float] = PAPER_SIGMAS,
    durations: Sequence[int] = PAPER_DURATIONS,
    n_steps: int = 50,
    relapse_threshold: float = 60.0,
    decay: Mapping[str, float] | None = None,
    profiles: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
) -> pd.DataFrame:
    """A synthetic tidy results table in the schema of ``docs/results-schema.md``.

    Parameters
    ----------
    n_patients : int
        Number of virtual patients (each receives every arm).
    arms : sequence of str
        Treatment arms; ``untreated`` is always added.  Arms without a
        profile in :data:`PROFILES` use the SSRI-like one.
    seed : int
        Seed of the only random generator used.
    sigmas : sequence of float
        Internal-noise SDs of the resilience rows.
    durations : sequence of int
        Maintenance durations (epochs).
    n_steps : int
        Wash-out decay steps; steps ``0..n_steps`` are written.
    relapse_threshold : float
        Biased accuracy (percent) below which the last step counts as relapse.
    decay : dict, optional
        Protection decay per step and arm (default: the paper's rates).
    profiles : dict, optional
        Overrides of :data:`PROFILES`: ``{arm: {measure: (mean, sd)}}``.

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> df = make_results(n_patients=2, seed=0)
    >>> sorted(df["phase"].unique())[:3]
    ['acute', 'acute_relapse', 'baseline']
    """
    if not isinstance(n_patients, (int, np.integer)) or isinstance(n_patients, bool):
        raise TypeError(f"n_patients must be an int, got {type(n_patients).__name__}")
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    if isinstance(arms, str):
        raise TypeError("arms must be a sequence of arm names, not a single string")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    decay = dict(PAPER_DECAY if decay is None else decay)
    profiles = {} if profiles is None else profiles
    rng = np.random.default_rng(seed)
    records: list[tuple] = []
    nan = float("nan")

    def add(p, arm, phase, metric, condition="", sigma=nan, epochs=nan, step=nan, value=nan):
        records.append((p, arm, phase, metric, condition, sigma, epochs, step, float(value)))

    def draw(prof, key, lo=0.0, hi=100.0):
        mean, sd = prof[key]
        return float(np.clip(mean + sd * rng.standard_normal(), lo, hi))

    all_arms = ["untreated", *[a for a in arms if a != "untreated"]]
    for p in range(n_patients):
        add(
            p, "untreated", "baseline", "accuracy", "standard", value=draw({"a": (99.5, 0.3)}, "a")
        )
        add(p, "untreated", "baseline", "accuracy", "clean", value=100.0)
        for arm in all_arms:
            prof = _profile(arm, profiles)
            phase = "pruned" if arm == "untreated" else "acute"
            sparsity = draw(prof, "sparsity")
            add(p, arm, phase, "sparsity", value=sparsity)
            combined = draw(prof, "combined")
            for cond in ("clean", "standard"):
                add(p, arm, phase, "accuracy", cond, value=draw(prof, cond))
            add(p, arm, phase, "accuracy", "combined", value=combined)
            add(p, arm, phase, "accuracy", "biased", value=draw(prof, "biased"))
            for s in sigmas:
                key = "standard" if s == 0 else f"sigma_{float(s):.1f}"
                value = draw(prof, key) if key in prof else draw(prof, "sigma_2.5")
                add(p, arm, phase, "accuracy", "internal_noise", sigma=float(s), value=value)
            add(p, arm, phase, "gain", value=draw(prof, "gain", 0.0, np.inf))
            add(
                p,
                arm,
                phase,
                "activation_magnitude",
                value=draw(prof, "activation_magnitude", 0.0, np.inf),
            )
            if arm == "untreated":
                continue
            if "off_combined" in prof:
                add(
                    p,
                    arm,
                    "off_medication",
                    "accuracy",
                    "combined",
                    value=draw(prof, "off_combined"),
                )
                add(p, arm, "off_medication", "accuracy", "biased", value=draw(prof, "off_biased"))
                add(
                    p,
                    arm,
                    "off_medication",
                    "accuracy",
                    "internal_noise",
                    sigma=2.5,
                    value=draw(prof, "off_sigma_2.5"),
                )
                add(
                    p,
                    arm,
                    "off_medication",
                    "activation_magnitude",
                    value=draw(prof, "off_activation_magnitude", 0.0, np.inf),
                )
            drop = draw(prof, "relapse_drop", -100.0, 100.0)
            s_frac = sparsity / 100.0
            add(
                p,
                arm,
                "acute_relapse",
                "sparsity",
                value=100.0 * min(0.99, s_frac + 0.4 * (1.0 - s_frac)),
            )
            add(p, arm, "acute_relapse", "accuracy", "combined", value=combined - drop)
            add(p, arm, "acute_relapse", "relapse_drop", value=drop)
            rate = float(decay.get(arm, 0.01))
            end_patient = draw(prof, "washout_end")
            for epochs in durations:
                e = float(epochs)
                add(
                    p,
                    arm,
                    "maintenance",
                    "accuracy",
                    "standard",
                    epochs=e,
                    value=draw(prof, "standard"),
                )
                start = draw(prof, "washout_start")
                end = float(np.clip(end_patient + 2.0 * rng.standard_normal(), 0, 100))
                for step in range(n_steps + 1):
                    protection = max(0.0, 1.0 - rate * step)
                    frac = step / n_steps
                    acc = end + (start - end) * (1.0 - frac) ** 2
                    if 0 < step < n_steps:
                        acc += 0.5 * rng.standard_normal()
                    acc = float(np.clip(acc, 0.0, 100.0))
                    add(
                        p,
                        arm,
                        "washout",
                        "protection",
                        epochs=e,
                        step=float(step),
                        value=protection,
                    )
                    add(
                        p,
                        arm,
                        "washout",
                        "accuracy",
                        "biased",
                        epochs=e,
                        step=float(step),
                        value=acc,
                    )
                    if step == n_steps:
                        add(
                            p,
                            arm,
                            "washout",
                            "relapsed",
                            epochs=e,
                            step=float(step),
                            value=float(acc < relapse_threshold),
                        )
    df = pd.DataFrame.from_records(
        records,
        columns=list(REQUIRED_COLUMNS),
    )
    df["patient"] = df["patient"].astype(int)
    cov = pd.DataFrame(
        {
            "patient": np.arange(n_patients),
            "prune_fraction": 0.95,
            "regrowth_fraction": 0.5,
            "lr_scale": np.round(np.exp(0.1 * rng.standard_normal(n_patients)), 6),
        }
    )
    return df.merge(cov, on="patient", how="left")


def make_protocol(
    arms: Sequence[str] = ("ketamine", "ssri", "neurosteroid"),
    *,
    n_patients: int = 10,
    decay: Mapping[str, float] | None = None,
    relapse_threshold: float = 60.0,
    interpretations: Mapping[str, object] | None = None,
) -> dict:
    """A minimal resolved-protocol dict with the fields the analysis reads.

    Examples
    --------
    >>> from analysis.synthetic import make_protocol
    >>> make_protocol(["ketamine"])["arms"]["ketamine"]["washout_decay"]
    0.002
    """
    decay = dict(PAPER_DECAY if decay is None else decay)
    if interpretations is None:
        interpretations = {
            "pruning": "one-shot per layer, all four weight matrices (notebook)",
            "training_inputs": "sd 0.8 points, no internal noise (notebook)",
        }
    return {
        "name": "synthetic",
        "n_patients": int(n_patients),
        "arms": {a: {"washout_decay": float(decay.get(a, 0.01))} for a in arms},
        "longitudinal": {
            "relapse_threshold": float(relapse_threshold),
            "durations": list(PAPER_DURATIONS),
            "washout_steps": 50,
        },
        "interpretations": dict(interpretations),
    }


def write_run(
    run_dir: str | Path,
    results: pd.DataFrame,
    protocol: Mapping | None = None,
    manifest: Mapping | None = None,
    *,
    weights: bool = False,
    seed: int = 0,
) -> Path:
    """Write a run folder (``results.csv``, ``protocol.json``, ``manifest.json``).

    With ``weights=True`` it also writes ``weights/<arm>_p<patient>.npz`` with
    four random masked matrices ``W0..W3`` per patient and arm.

    Examples
    --------
    >>> import tempfile
    >>> from analysis.synthetic import make_results, write_run
    >>> run = write_run(tempfile.mkdtemp(), make_results(n_patients=2))
    >>> sorted(p.name for p in run.iterdir())
    ['manifest.json', 'protocol.json', 'results.csv']
    """
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"results must be a DataFrame, got {type(results).__name__}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    arms = [a for a in pd.unique(results["arm"]) if a != "untreated"]
    n_patients = int(results["patient"].nunique())
    if protocol is None:
        protocol = make_protocol(arms, n_patients=n_patients)
    if manifest is None:
        manifest = {
            "study": "synthetic",
            "seed": seed,
            "n_patients": n_patients,
            "generator": "analysis.synthetic",
        }
    results.to_csv(run / "results.csv", index=False)
    (run / "protocol.json").write_text(json.dumps(protocol, indent=2, sort_keys=True) + "\n")
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if weights:
        rng = np.random.default_rng(seed)
        wdir = run / "weights"
        wdir.mkdir(exist_ok=True)
        shapes = [(32, 2), (32, 32), (32, 32), (4, 32)]
        keep = {"untreated": 0.05, "ketamine": 0.525}
        for arm in ["untreated", *arms]:
            for p in range(n_patients):
                mats = {}
                for i, shape in enumerate(shapes):
                    w = rng.normal(0.0, 0.3 if arm == "untreated" else 0.4, size=shape)
                    mask = rng.random(shape) < keep.get(arm, 0.05)
                    mats[f"W{i}"] = (w * mask).astype(np.float32)
                np.savez(wdir / f"{arm}_p{p}.npz", **mats)
    return run
