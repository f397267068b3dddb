"""Each phase's effect on the patients' state, as a property that a wrong implementation would break.

All randomness comes from the tiny study's seed (per-patient named streams); nothing global.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import start_group as _group

from virtualpatient import ClinicalTrial
from virtualpatient.network import Modulation
from virtualpatient.phases import (
    Assess,
    Context,
    Discontinue,
    Lesion,
    Maintain,
    Probe,
    Repeat,
    Stress,
    Train,
    Treat,
    Washout,
    run_schedule,
)


def test_taper_moves_gain_damping_and_noise_linearly_to_off(make_protocol, make_patients):
    """A 4-step taper from gain 1.6, damping 0.7, tanh, noise 0.4 reports gain 1.45, 1.3, 1.15, 1.0 and
    damping 0.775, 0.85, 0.925, 1.0 at steps 1-4 (plus a biased test per step), keeps tanh until the last
    step, and leaves the off-drug state with the protection untouched."""
    protocol = make_protocol()
    group = _group(make_patients, protocol)
    on = Modulation(gain=1.6, damping=0.7, activation="tanh", noise_sigma=0.4, protection=0.5)
    group.batch.modulation = on
    _, rows = Discontinue(steps=4).run(group, Context(protocol, "arm"))
    df = pd.DataFrame(rows)
    for metric, want in (("gain", [1.45, 1.3, 1.15, 1.0]), ("damping", [0.775, 0.85, 0.925, 1.0])):
        got = df[(df.metric == metric) & (df.patient == 0)].sort_values("step")
        assert list(got.step) == [1, 2, 3, 4]
        np.testing.assert_allclose(got.value, want, atol=1e-12)
    assert len(df[df.condition == "biased"]) == 4 * 2
    assert [Discontinue.at(on, k, 4).activation for k in range(5)] == ["tanh"] * 4 + ["relu"]
    assert [round(Discontinue.at(on, k, 4).noise_sigma, 12) for k in range(5)] == [0.4, 0.3, 0.2, 0.1, 0.0]
    assert group.batch.modulation == Modulation(protection=0.5)
    abrupt = _group(make_patients, protocol)
    abrupt.batch.modulation = on
    assert Discontinue().run(abrupt, Context(protocol, "arm"))[1] == []
    assert abrupt.batch.modulation == Modulation(protection=0.5)


@pytest.mark.parametrize("scarred", [False, True])
def test_scar_blocks_regrowth(make_protocol, make_patients, scarred):
    """After a lesion to 50 % and a stress that prunes half of the rest (scarring it when ``scarred``),
    ketamine-like regrowth reinstates floor(0.5 x candidates) per layer, where the candidates are the
    pruned positions minus the scars: with scars no scarred position is alive afterwards; without,
    the same positions are regrown (so the check can fail)."""
    protocol = make_protocol()
    group = _group(make_patients, protocol, prune=False)
    ctx = Context(protocol, "arm")
    run_schedule([Lesion(fraction=0.5), Stress(further=0.5, scar=scarred)], [group], ctx)
    masks = [m.clone() for m in group.batch.params.masks]
    scar = group.scar if scarred else [(m == 0) & False for m in masks]
    if scarred:
        assert all(bool(((m == 0) >= s).all()) for m, s in zip(masks, scar))  # scars are pruned
        assert sum(int(s.sum()) for s in scar) > 0
    Treat(arm="ketamine").run(group, ctx)
    stressed_now = [(old == 0) & (new > 0) for old, new in zip(masks, group.batch.params.masks)]
    for layer, (grown, s, old) in enumerate(zip(stressed_now, scar, masks)):
        for p in range(2):
            candidates = int(((old[p] == 0) & ~s[p]).sum())
            assert int(grown[p].sum()) == math.floor(0.5 * candidates), (layer, p)
            assert not bool((grown[p] & s[p]).any())
    stress_pruned = any(bool((g & ((m == 0))).any()) for g, m in zip(stressed_now, masks))
    assert stress_pruned  # regrowth happened at all


def test_scars_are_left_out_of_the_pruning_quantile(make_protocol, make_patients):
    """With every pruned position scarred, a further prune to 50 % of the layer keeps the upper half of
    the live weights' magnitudes (the quantile is over non-scarred entries), so about half of the
    survivors remain; counting scars as zeros would keep all of them."""
    protocol = make_protocol()
    group = _group(make_patients, protocol, prune=False)
    ctx = Context(protocol, "arm")
    run_schedule([Lesion(fraction=0.5, scar=True)], [group], ctx)
    alive = [int(m[0].sum()) for m in group.batch.params.masks]
    from virtualpatient import plasticity

    plasticity.prune_per_layer(group.batch.params, [0.5, 0.5], exclude=group.scar)
    after = [int(m[0].sum()) for m in group.batch.params.masks]
    for a, b in zip(alive, after):
        assert abs(b - a / 2) <= 1, (a, b)


def test_repeat_numbers_its_cycles_and_draws_fresh_noise(make_protocol, make_patients):
    """Rows of a 3-times repeated block carry cycle 1, 2, 3 (0 outside), the label path of the block,
    and each cycle's combined-stress test draws new noise (values not all equal across cycles)."""
    protocol = make_protocol()
    group = _group(make_patients, protocol)
    ctx = Context(protocol, "arm")
    schedule = [Assess(label="before", tests=("combined",)),
                Repeat(label="episodes", times=3, phases=(Assess(label="cycle", tests=("sparsity", "combined")),))]
    _, rows = run_schedule(schedule, [group], ctx)
    df = pd.DataFrame(rows)
    assert list(df[df.phase == "before"].cycle) == [0, 0]
    cycles = df[df.phase == "cycle"]
    assert sorted(cycles.cycle.unique()) == [1, 2, 3] and set(cycles.label) == {"episodes/cycle"}
    assert (cycles.groupby("cycle").size() == 4).all()
    combined = cycles[cycles.condition == "combined"].pivot(index="patient", columns="cycle", values="value")
    assert (combined.nunique(axis=1) > 1).any()


@pytest.mark.parametrize(("when", "touched"), [("relapsed", [0]), ("remitted", [1]), ("always", [0, 1, 2])])
def test_conditional_phase_touches_only_patients_meeting_it(make_protocol, make_patients, when, touched):
    """A stress with ``when`` prunes only the patients whose last verdict matches (patient 2 has none
    yet); the others' weights and masks stay bit for bit."""
    protocol = make_protocol()
    group = _group(make_patients, protocol, n=3)
    group.relapsed = [1.0, 0.0, math.nan]
    before = group.batch.params.clone()
    groups, _ = run_schedule([Stress(further=0.5, when=when)], [group], Context(protocol, "arm"))
    after = {s.index: (g, i) for g in groups for i, s in enumerate(g.batch.specs)}
    for p in range(3):
        g, i = after[p]
        same = all(torch.equal(w[i], w0[p]) for w, w0 in zip(g.batch.params.masks, before.masks))
        assert same != (p in touched), p


def test_washout_tests_every_kth_step_and_its_verdict_steers_a_conditional_phase(make_protocol):
    """A washout with test_every = 2 over 5 steps tests steps 0, 2, 4 and 5; a later probe with
    when = "relapsed" runs exactly for the patients whose verdict was 1 (threshold 100: all below
    it relapse; threshold 0: none), and the results do not depend on batching (one patient per unit)."""
    results = {}
    for threshold in (0.0, 100.0):
        regimen = [Treat(arm="ssri"), Maintain(epochs=1), Discontinue(),
                   Washout(steps=5, test_every=2, threshold=threshold),
                   Probe(label="damage", when="relapsed",
                         phases=(Stress(further=0.3), Assess(label="after", tests=("sparsity", "combined"))))]
        protocol = make_protocol(n_patients=3)
        df = ClinicalTrial(protocol, regimens={"x": regimen}, progress=False).run()
        alone = ClinicalTrial(protocol, regimens={"x": regimen}, progress=False, patients_per_unit=1).run()
        pd.testing.assert_frame_equal(df, alone, check_exact=False, rtol=1e-7, atol=1e-9)
        wash = df[(df.phase == "washout") & (df.metric == "protection")]
        assert sorted(wash[wash.patient == 0].step) == [0, 2, 4, 5]
        verdict = df[df.metric == "relapsed"].set_index("patient").value
        damaged = sorted(df[df.label == "damage/after"].patient.unique())
        assert damaged == sorted(verdict[verdict == 1].index)
        results[threshold] = damaged
    assert results[0.0] == [] and results[100.0] == [0, 1, 2]


def test_trial_clock_counts_training_epochs_since_the_lesion(make_protocol):
    """time is minus the baseline epochs before the lesion's origin (0 at the untreated tests), then
    adds each course's and each maintenance's epochs; stress training counts too."""
    protocol = make_protocol()  # baseline 4 epochs, ssri 3 epochs
    regimen = [Treat(arm="ssri"), Assess(label="acute", tests=("sparsity",)), Maintain(epochs=2),
               Stress(epochs=1, lr=1e-3, noise_sigma=0.5), Assess(label="later", tests=("sparsity",))]
    df = ClinicalTrial(protocol, schedule=[Assess(label="start", tests=("sparsity",)), Train(), Lesion(),
                                           Assess(label="pruned", tests=("sparsity",))],
                       regimens={"x": regimen}, progress=False).run()
    times = df.groupby("phase").time.unique().map(list).to_dict()
    assert times == {"start": [-4.0], "pruned": [0.0], "acute": [3.0], "maintenance": [5.0], "later": [6.0]}


def test_stress_training_is_noisy_and_masked_and_restores_the_modulation(make_protocol, make_patients):
    """A stress period of noisy training changes live weights, never a pruned one, and leaves the
    modulation (noise included) as it found it."""
    protocol = make_protocol()
    group = _group(make_patients, protocol)
    mod = group.batch.modulation
    w0 = [w.clone() for w in group.batch.params.weights]
    Stress(epochs=1, lr=1e-2, noise_sigma=0.5).run(group, Context(protocol, "arm"))
    params = group.batch.params
    assert any(not torch.equal(w, v) for w, v in zip(params.weights, w0))
    assert all(bool((w[m == 0] == 0).all()) for w, m in zip(params.weights, params.masks))
    assert group.batch.modulation == mod and group.clock == [1.0, 1.0]


def test_lesion_by_a_further_share_prunes_that_share_of_what_remains(make_protocol, make_patients):
    """lesion(further = 0.5) after a 90 % lesion leaves each matrix at 0.9 + 0.5 x 0.1 = 95 % sparsity
    (within one entry per layer), and further together with fraction is refused."""
    protocol = make_protocol()
    group = _group(make_patients, protocol, prune=False)
    run_schedule([Lesion(fraction=0.9), Lesion(further=0.5)], [group], Context(protocol, "arm"))
    for m in group.batch.params.masks:
        zeros = (m == 0).flatten(1).double().mean(1).numpy()
        np.testing.assert_allclose(zeros, 0.95, atol=1.0 / m[0].numel() + 1e-9)
    with pytest.raises(ValueError, match="not both"):
        Lesion(fraction=0.9, further=0.5)
