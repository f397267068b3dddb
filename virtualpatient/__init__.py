"""virtualpatient: virtual clinical trials of antidepressant mechanisms.

Each virtual patient is a small feed-forward network that learned a task, was over-pruned into a
fragile "depressed" state, and is then treated by arms acting through different plasticity routes.
See ``README.md`` for a tour and ``docs/protocol.md`` for every protocol fact.

Examples
--------
>>> from virtualpatient import ClinicalTrial, load_study
>>> results = ClinicalTrial(load_study("studies/quick.toml")).run()   # doctest: +SKIP
"""

from typing import TYPE_CHECKING, Any

#: Public name -> the module defining it. Importing the package imports none of them (no torch):
#: each loads on first use, so the command line can start, validate and refuse bad input at once.
_EXPORTS = {
    "ClinicalTrial": "trial",
    "Cohort": "cohort",
    "CohortConfig": "cohort",
    "Distribution": "cohort",
    "KetamineLike": "treatments",
    "Modulation": "network",
    "NeurosteroidLike": "treatments",
    "PatientBatch": "patient",
    "PatientSpec": "cohort",
    "Protocol": "protocol",
    "ProtocolError": "protocol",
    "SSRILike": "treatments",
    "Treatment": "treatments",
    "VirtualPatient": "patient",
    "VirtualPatientError": "errors",
    "load_study": "protocol",
    "register": "treatments",
    "treatment_dataclass": "treatments",
}

if TYPE_CHECKING:
    from virtualpatient.cohort import Cohort, CohortConfig, Distribution, PatientSpec
    from virtualpatient.errors import VirtualPatientError
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'virtualpatient' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"virtualpatient.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "ClinicalTrial",
    "VirtualPatientError",
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
