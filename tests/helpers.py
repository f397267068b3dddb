"""Small helpers shared by test modules (not fixtures; import them by name)."""

from __future__ import annotations

from virtualpatient.phases import Group


def start_group(make_patients, protocol, n: int = 2, prune: bool = True) -> Group:
    """A schedule group of ``n`` fresh patients of ``protocol``, pruned by the protocol's lesion unless told not to."""
    batch = make_patients(protocol, indices=tuple(range(n)))
    if prune:
        batch.prune()
    return Group.start(batch)
