"""Shared fixtures for the core-simulation tests: a tiny protocol and one tiny trial run.

Everything random in these tests comes from a study seed (the library's per-patient streams) or
from an explicitly seeded generator; nothing depends on torch's or numpy's global state.
"""

from __future__ import annotations

import copy
from typing import Any

import pandas as pd
import pytest
import torch

from virtualpatient import ClinicalTrial, PatientBatch, PatientSpec, Protocol

# One intra-op thread: these tensors are small, the 2 cores are shared with other work, and torch's
# thread pool then spends more time waiting than computing (measured: 6x slower with 2 threads).
torch.set_num_threads(1)

#: A small network with the paper's shape (2 inputs, three hidden layers, 4 outputs).
TINY_SIZES = (2, 32, 32, 16, 4)

#: The tiny study: every schedule is short, every set small; the structure is the paper's.
TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 3,
    "n_patients": 2,
    "network": {"layer_sizes": TINY_SIZES},
    "task": {"n_train": 256, "n_standard": 200, "n_clean": 100},
    "baseline": {"epochs": 4, "lr": 1e-2},
    "longitudinal": {"durations": (0, 1, 3), "washout_steps": 4},
    "arms": {
        "ketamine": {"epochs": 1, "score_batches": 2},
        "ssri": {"epochs": 3},
        "neurosteroid": {"epochs": 2},
    },
}


def _merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def make_tiny_protocol(**changes: Any) -> Protocol:
    """The tiny protocol with nested ``changes`` merged in (``task={"n_train": 512}`` keeps the rest)."""
    return Protocol.from_dict(_merge(TINY, changes), source="tiny")


@pytest.fixture
def make_protocol():
    """Factory: ``make_protocol(**nested_changes)`` -> a validated tiny :class:`Protocol`."""
    return make_tiny_protocol


@pytest.fixture
def tiny_protocol() -> Protocol:
    """The tiny protocol (2 patients, 2-32-32-16-4, 256 training points, short schedules)."""
    return make_tiny_protocol()


def make_batch(protocol: Protocol, indices=(0, 1), covariates: dict[int, dict] | None = None) -> PatientBatch:
    """A freshly initialised batch of the given patients (study seed from the protocol)."""
    covariates = covariates or {}
    specs = [PatientSpec(i, protocol.seed, covariates.get(i)) for i in indices]
    return PatientBatch(specs, protocol)


@pytest.fixture
def make_patients():
    """Factory: ``make_patients(protocol, indices=(0, 1), covariates=None)`` -> a fresh PatientBatch."""
    return make_batch


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[pd.DataFrame, Any]:
    """One end-to-end run of the tiny study into a run folder: ``(results, folder)``."""
    out = tmp_path_factory.mktemp("tiny_run")
    results = ClinicalTrial(make_tiny_protocol(), progress=False).run(out=out)
    return results, out
