"""virtualpatient: virtual clinical trials of antidepressant mechanisms.

Each virtual patient is a small feed-forward network that learned a task, was over-pruned into a
fragile "depressed" state, and is then treated by arms acting through different plasticity routes.
See ``README.md`` for a tour and ``docs/protocol.md`` for every protocol fact.

Examples
--------
>>> from virtualpatient import ClinicalTrial, load_study
>>> results = ClinicalTrial(load_study("studies/quick.toml")).run()   # doctest: +SKIP
"""

from virtualpatient.cohort import Cohort, CohortConfig, Distribution, PatientSpec
from virtualpatient.network import Modulation
from virtualpatient.patient import PatientBatch, VirtualPatient
from virtualpatient.protocol import Protocol, ProtocolError, load_study
from virtualpatient.treatments import (
    KetamineLike,
    NeurosteroidLike,
    SSRILike,
    Treatment,
    register,
    treatment_dataclass,
)
from virtualpatient.trial import ClinicalTrial

__version__ = "0.1.0"

__all__ = [
    "ClinicalTrial",
    "Cohort",
    "CohortConfig",
    "Distribution",
    "KetamineLike",
    "Modulation",
    "NeurosteroidLike",
    "PatientBatch",
    "PatientSpec",
    "Protocol",
    "ProtocolError",
    "SSRILike",
    "Treatment",
    "VirtualPatient",
    "load_study",
    "register",
    "treatment_dataclass",
]
