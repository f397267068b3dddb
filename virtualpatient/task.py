"""The four-blob classification task and its test sets.

Points are drawn around four centres, one per class, with labels drawn uniformly (fact 2). Each
patient draws its own training, standard and clean sets from independent streams, so a patient's
data do not depend on who else is in the cohort.

Examples
--------
>>> from virtualpatient.cohort import PatientSpec
>>> from virtualpatient.protocol import TaskConfig
>>> data = make_task_data(PatientSpec(0, study_seed=1), TaskConfig(n_train=100))
>>> data.train_x.shape, data.train_y.shape
(torch.Size([100, 2]), torch.Size([100]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from virtualpatient.cohort import PatientSpec

__all__ = ["TaskData", "make_blobs", "make_task_data", "stack_task_data"]


def make_blobs(
    rng: np.random.Generator, centres: Sequence[Sequence[float]], n: int, sd: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` labelled points: a uniform label, then its centre plus N(0, sd^2) noise.

    ``sd = 0`` puts every point exactly on its centre (the "clean" set).
    """
    centres_arr = np.asarray(centres, dtype=np.float64)
    labels = rng.integers(0, len(centres_arr), size=n)
    points = centres_arr[labels] + sd * rng.standard_normal((n, centres_arr.shape[1]))
    return torch.from_numpy(points.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))


@dataclass(frozen=True)
class TaskData:
    """A patient's (or a stacked batch of patients') data sets.

    Tensors carry an optional leading patient axis: ``train_x`` is ``[N, 2]`` for one patient and
    ``[P, N, 2]`` when stacked.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    standard_x: torch.Tensor
    standard_y: torch.Tensor
    clean_x: torch.Tensor
    clean_y: torch.Tensor

    def to(self, device: str | torch.device) -> TaskData:
        return TaskData(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def make_task_data(spec: PatientSpec, task) -> TaskData:
    """Generate one patient's training, standard and clean sets from its own streams."""
    train = make_blobs(spec.rng("data/train"), task.centres, task.n_train, task.train_sd)
    standard = make_blobs(spec.rng("data/standard"), task.centres, task.n_standard, task.standard_sd)
    clean = make_blobs(spec.rng("data/clean"), task.centres, task.n_clean, task.clean_sd)
    return TaskData(*train, *standard, *clean)


def stack_task_data(items: Sequence[TaskData]) -> TaskData:
    """Stack per-patient data along a new leading patient axis."""
    return TaskData(*(torch.stack([getattr(d, f) for d in items]) for f in TaskData.__dataclass_fields__))
