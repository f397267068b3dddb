"""Small helpers shared by test modules (not fixtures; import them by name)."""

from __future__ import annotations

from virtualpatient.phases import Group


def start_group(make_patients, protocol, n: int = 2, prune: bool = True) -> Group:
    """A schedule group of ``n`` fresh patients of ``protocol``, pruned by the protocol's lesion unless told not to."""
    batch = make_patients(protocol, indices=tuple(range(n)))
    if prune:
        batch.prune()
    return Group.start(batch)


#: Results whose last float32 bit depends on the machine, with the relative tolerance they are held
#: to against a stored reference. The activation magnitude is a float32 mean of |h| over units and
#: samples; on an AMD EPYC Zen 5 two of the tiny study's 621 values differ from the reference (made
#: on Intel) by 6e-8 and 1.2e-7 relative, whatever the native kernels' target, so the difference lies
#: in the vendor's BLAS/oneDNN paths. Every accuracy, sparsity, gain and verdict stays exact.
CROSS_MACHINE_RTOL = {"activation_magnitude": 1e-6}


def assert_same_results(got, want) -> None:
    """``got`` holds every column of the reference ``want`` in the same order and rows, every value
    bit for bit, except the metrics of :data:`CROSS_MACHINE_RTOL`, held to that relative tolerance."""
    import numpy as np
    import pandas as pd

    assert list(got.columns[: len(want.columns)]) == list(want.columns), "existing columns renamed or reordered"
    assert len(got) == len(want), f"{len(got)} rows, the reference has {len(want)}"
    got = got[want.columns]
    loose = want["metric"].isin(list(CROSS_MACHINE_RTOL)).to_numpy()
    pd.testing.assert_frame_equal(got[~loose], want[~loose], check_exact=True)
    pd.testing.assert_frame_equal(got[loose].drop(columns="value"), want[loose].drop(columns="value"),
                                  check_exact=True)
    for metric, rtol in CROSS_MACHINE_RTOL.items():
        rows = (want["metric"] == metric).to_numpy()
        np.testing.assert_allclose(got["value"][rows], want["value"][rows], rtol=rtol, atol=0.0, err_msg=metric)
