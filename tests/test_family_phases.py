"""The phase options the model family's study sheets need (``/work/shared/family``), each as a property
that a wrong implementation would break: weakest-live pruning, state-sized episode scars, random scars
at the patient level, per-cycle parameters, full regrowth, dose metrics, input-noise tests and the
all-parameter sparsity count.

All randomness comes from the tiny study's seed (per-patient named streams); nothing global.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import start_group as _group

from virtualpatient.network import BiasedNoise, Modulation
from virtualpatient.phases import (
    Assess,
    Context,
    Dose,
    Group,
    Repeat,
    Scar,
    Snapshot,
    Stress,
    Treat,
    Washout,
    build_phase,
    run_schedule,
)


def _live(group, layer, p):
    m = group.batch.params.masks[layer][p] > 0
    return m if group.scar is None else m & ~group.scar[layer][p]


def test_live_prune_removes_exactly_a_share_of_what_remains_weakest_first(make_protocol, make_patients):
    """Three episodes of ``stress live = 0.1`` each prune exactly floor(0.1 x live) weights per layer
    and patient (untrained weights have distinct magnitudes, so there are no ties), and every pruned
    weight was no larger in magnitude than every survivor of its layer (068A fact 6)."""
    protocol = make_protocol()
    group = _group(make_patients, protocol)
    ctx = Context(protocol, "arm")
    for _ in range(3):
        live = [[int(_live(group, i, p).sum()) for p in range(2)] for i in range(4)]
        w = [x.clone() for x in group.batch.params.weights]
        masks = [m.clone() for m in group.batch.params.masks]
        run_schedule([Stress(live=0.1)], [group], ctx)
        for i in range(4):
            for p in range(2):
                now = group.batch.params.masks[i][p] > 0
                assert int(now.sum()) == live[i][p] - math.floor(0.1 * live[i][p]), (i, p)
                gone = (masks[i][p] > 0) & ~now
                if gone.any():
                    assert w[i][p][gone].abs().max() <= w[i][p][now].abs().min()


def test_episode_scar_touches_only_relapsed_and_survives_full_regrowth(make_protocol, make_patients):
    """A state-sized episode scar with ``when = "relapsed"`` changes only the relapsed patient's masks;
    it scars floor(share x live) weights per layer with share = clip(0.05 x severity, 0.02, 0.2) and
    severity = clip(1 + (g - 1) + 2 (A - 0.1), 0.5, 2) computed by hand (068E fact 8d-e); then a full
    regrowth (fraction 1.0, Ch03 fact 8) revives every pruned position except the scars."""
    protocol = make_protocol(arms={"ketamine": {"regrow_fraction": 1.0, "epochs": 0, "score_batches": 1}})
    group = _group(make_patients, protocol)
    group.batch.modulation = Modulation(gain=1.25)
    group.relapsed = [1.0, 0.0]
    a = group.batch.activation_magnitude()
    sev = [min(max(1 + 0.25 + 2 * (float(x) - 0.1), 0.5), 2.0) for x in a]
    share = min(max(0.05 * sev[0], 0.02), 0.2)
    live = [int(_live(group, i, 0).sum()) for i in range(4)]
    before = group.batch.params.clone()
    ctx = Context(protocol, "arm")
    episode = Stress(live=0.05, sized_by="severity", scar=True, when="relapsed")
    groups, rows = run_schedule([episode], [group], ctx)
    relapsed, remitted = (groups[0], groups[1]) if groups[0].batch.specs[0].index == 0 else (groups[1], groups[0])
    assert all(torch.equal(m[0], m0[1]) for m, m0 in zip(remitted.batch.params.masks, before.masks))
    row = [r for r in rows if r["metric"] == "severity"]
    assert len(row) == 1 and row[0]["patient"] == 0 and row[0]["value"] == pytest.approx(sev[0])
    for i in range(4):
        assert int(relapsed.scar[i][0].sum()) == math.floor(share * live[i]), i
    Treat(arm="ketamine").run(relapsed, ctx)
    for m, s in zip(relapsed.batch.params.masks, relapsed.scar):
        assert bool((m[0][s[0]] == 0).all()) and bool((m[0][~s[0]] == 1).all())


def test_random_scar_is_per_patient_and_sized_by_its_draw(make_protocol, make_patients):
    """``scar max_share = 0.06`` draws f in [0, 0.06) per patient (reported as scar_draw), scars
    floor(f x entries) positions per matrix among all unscarred ones (so some already-pruned
    positions are scarred, the notebook's reading, 068E fact 3), leaves every scar pruned with
    weight 0, and patient 1's scars are the same whether it runs with patient 0 or alone."""
    protocol = make_protocol()
    pair = _group(make_patients, protocol)
    pruned = [m.clone() == 0 for m in pair.batch.params.masks]
    _, rows = run_schedule([Scar(max_share=0.06)], [pair], Context(protocol, "arm"))
    draws = {r["patient"]: r["value"] for r in rows}
    assert all(0 <= f < 0.06 for f in draws.values()) and draws[0] != draws[1]
    for s, m, w in zip(pair.scar, pair.batch.params.masks, pair.batch.params.weights):
        for p in range(2):
            assert int(s[p].sum()) == math.floor(draws[p] * s[p].numel())
            assert bool((m[p][s[p]] == 0).all()) and bool((w[p][s[p]] == 0).all())
    assert any(bool((s & pr).any()) for s, pr in zip(pair.scar, pruned))
    alone = Group.start(make_patients(protocol, indices=(1,)))
    alone.batch.prune()
    run_schedule([Scar(max_share=0.06)], [alone], Context(protocol, "arm"))
    assert all(torch.equal(s[1], t[0]) for s, t in zip(pair.scar, alone.scar))


def test_scar_fraction_assessment_counts_scars(make_protocol, make_patients):
    """The ``scar_fraction`` assessment is 0 before any scar and 100 x scars / entries after a fixed
    ``share = 0.1`` scar among live weights."""
    protocol = make_protocol()
    group = _group(make_patients, protocol)
    ctx = Context(protocol, "arm")
    _, rows = run_schedule([Assess(label="a", tests=("scar_fraction",)), Scar(share=0.1, among="live"),
                            Assess(label="b", tests=("scar_fraction",))], [group], ctx)
    df = pd.DataFrame(rows)
    assert set(df[df.phase == "a"].value) == {0.0}
    total = sum(s[0].numel() for s in group.scar)
    want = [100 * sum(int(s[p].sum()) for s in group.scar) / total for p in range(2)]
    np.testing.assert_allclose(df[df.phase == "b"].sort_values("patient").value, want)
    assert all(x > 0 for x in want)


def test_trigger_bias_changes_per_cycle(make_protocol, make_patients):
    """A one-off trigger test (washout steps 0, decay 0) inside a 3-cycle repeat with ``bias = [1.5,
    1.0, 0.5]`` measures, at cycle k, the accuracy of the biased test at the k-th bias (sigma 0, so
    it is deterministic and can be computed directly), and gives a verdict at each cycle."""
    protocol = make_protocol(assessment={"biased_sigma": 0.0})
    group = _group(make_patients, protocol)
    biases = (1.5, 1.0, 0.5)
    _, rows = run_schedule([Repeat(times=3, phases=(Washout(steps=0, decay=0.0, bias=biases),))],
                           [group], Context(protocol, "arm"))
    df = pd.DataFrame(rows)
    acc = df[df.condition == "biased"].sort_values(["cycle", "patient"])
    b = group.batch
    for k, bias in enumerate(biases, start=1):
        want = b.accuracy("standard", mod=b.modulation, noise=group.noise("x"), biased=BiasedNoise(0.0, bias))
        np.testing.assert_allclose(acc[acc.cycle == k].value, want.numpy())
    assert len(df[df.metric == "relapsed"]) == 3 * 2
    with pytest.raises(ValueError, match="bias"):
        run_schedule([Washout(steps=0, decay=0.0, bias=biases)], [group], Context(protocol, "arm"))


def test_dose_metrics_equal_hand_computed_values(make_protocol, make_patients):
    """With every weight 1 at the snapshot, then one entry +0.2, one -0.05 and one set to 0 (in
    different matrices), dose gives L1 = 1.25 / N, L2 = sqrt(1.0425) / N, turnover = 2 / N (the
    -0.05 change is under the 10 % threshold) and sparsity change = 1 / N (068A fact 7)."""
    protocol = make_protocol()
    group = _group(make_patients, protocol, n=1, prune=False)
    w = group.batch.params.weights
    with torch.no_grad():
        for x in w:
            x.fill_(1.0)
    n = sum(x[0].numel() for x in w)
    ctx = Context(protocol, "arm")
    run_schedule([Snapshot(name="pre")], [group], ctx)
    with torch.no_grad():
        w[0][0, 0, 0] += 0.2
        w[1][0, 0, 0] -= 0.05
        w[2][0, 1, 1] = 0.0
    _, rows = run_schedule([Dose(since="pre")], [group], ctx)
    got = {r["metric"]: r["value"] for r in rows}
    assert got["dose_l1"] == pytest.approx(1.25 / n, rel=1e-6)
    assert got["dose_l2"] == pytest.approx(math.sqrt(0.04 + 0.0025 + 1.0) / n, rel=1e-6)
    assert got["turnover"] == pytest.approx(2 / n)
    assert got["sparsity_change"] == pytest.approx(1 / n)
    with pytest.raises(ValueError, match="since"):
        run_schedule([Dose(since="post")], [group], ctx)


def test_input_noise_and_all_parameter_sparsity(make_protocol, make_patients):
    """``input_noise`` at sd 0 equals the standard accuracy, one row per sd; ``sparsity_all`` is the
    share of exact zeros over weights and biases (counted by hand) and reads below the mask-based
    ``sparsity`` after a lesion because biases are never pruned (Ch02 fact 6)."""
    protocol = make_protocol(assessment={"input_noise_sds": (0.0, 2.0)})
    group = _group(make_patients, protocol)
    _, rows = run_schedule([Assess(label="a", tests=("standard", "input_noise", "sparsity", "sparsity_all"))],
                           [group], Context(protocol, "arm"))
    df = pd.DataFrame(rows)
    std = df[df.condition == "standard"].sort_values("patient").value.to_numpy()
    inp = df[df.condition == "input_noise"]
    assert len(inp) == 2 * 2
    np.testing.assert_allclose(inp[inp.noise_sigma == 0.0].sort_values("patient").value, std)
    p = group.batch.params
    for i in range(2):
        tensors = [t[i] for t in (*p.weights, *p.biases)]
        want = 100 * sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)
        got = df[(df.metric == "sparsity_all") & (df.patient == i)].value.item()
        assert got == pytest.approx(want)
        assert got < df[(df.metric == "sparsity") & (df.patient == i)].value.item()


@pytest.mark.parametrize(("spec", "field"), [
    ({"phase": "stress", "live": 0.4, "further": 0.2}, "live"),
    ({"phase": "stress", "further": 0.2, "sized_by": "severity"}, "sized_by"),
    ({"phase": "stress", "live": 0.05, "share_range": [0.3, 0.1]}, "share_range"),
    ({"phase": "scar"}, "max_share"),
    ({"phase": "scar", "max_share": 1.5}, "max_share"),
    ({"phase": "washout", "bias": []}, "bias"),
    ({"phase": "dose", "turnover_threshold": -1}, "turnover_threshold"),
])
def test_bad_family_options_are_refused_naming_the_field(spec, field):
    """Each bad option is refused with a one-line ValueError that names the field."""
    with pytest.raises(ValueError, match=field) as info:
        build_phase(spec)
    assert "\n" not in str(info.value)


def test_live_prune_min_count_prunes_at_least_one(make_protocol, make_patients):
    """With a share too small to prune anything (floor(0.001 x live) = 0), ``min_count = 1`` prunes
    exactly one live weight per matrix and patient (068E fact 8e: k = max(1, floor(e n))), and
    without it nothing changes."""
    protocol = make_protocol()
    group = _group(make_patients, protocol)
    live = [[int(_live(group, i, p).sum()) for p in range(2)] for i in range(4)]
    ctx = Context(protocol, "arm")
    run_schedule([Stress(live=0.001)], [group], ctx)
    assert [[int(_live(group, i, p).sum()) for p in range(2)] for i in range(4)] == live
    run_schedule([Stress(live=0.001, min_count=1)], [group], ctx)
    assert [[int(_live(group, i, p).sum()) for p in range(2)] for i in range(4)] == [[x - 1 for x in r] for r in live]


@pytest.mark.parametrize("minimum", [0, 1])
def test_regrowth_minimum(make_protocol, make_patients, minimum):
    """A ketamine-like course with a fraction too small to regrow anything (floor(0.001 x pruned) = 0
    in every layer) regrows exactly ``regrow_min`` positions per layer and patient (the family
    notebooks' gradient regrowth: at least 1)."""
    protocol = make_protocol(arms={"ketamine": {"regrow_fraction": 0.001, "regrow_min": minimum,
                                                "epochs": 0, "score_batches": 1}})
    group = _group(make_patients, protocol)
    before = [(m == 0).flatten(1).sum(1) for m in group.batch.params.masks]
    Treat(arm="ketamine").run(group, Context(protocol, "arm"))
    for b, m in zip(before, group.batch.params.masks):
        assert ((b - (m == 0).flatten(1).sum(1)) == minimum).all()


def test_severity_assessment_matches_the_episode(make_protocol, make_patients):
    """The ``severity`` assessment (reported every cycle) equals the severity the state-sized
    episode computes, and changes with the gain (1.25 vs 1.6: +0.35 unless clipped)."""
    protocol = make_protocol()
    group = _group(make_patients, protocol)
    group.batch.modulation = Modulation(gain=1.25)
    ctx = Context(protocol, "arm")
    _, rows = run_schedule([Assess(label="a", tests=("severity",)),
                            Stress(live=0.05, sized_by="severity")], [group], ctx)
    a = [r["value"] for r in rows if r["phase"] == "a"]
    b = [r["value"] for r in rows if r["phase"] == "stress"]
    assert a == pytest.approx(b) and len(a) == 2
    fresh = _group(make_patients, protocol)
    fresh.batch.modulation = Modulation(gain=1.25)
    low = [r["value"] for r in Assess(tests=("severity",)).run(fresh, ctx)[1]]
    fresh.batch.modulation = Modulation(gain=1.6)
    high = [r["value"] for r in Assess(tests=("severity",)).run(fresh, ctx)[1]]
    assert all(h > lo or h == 2.0 for h, lo in zip(high, low))
