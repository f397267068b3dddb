"""Tests of virtualpatient.treatments: the three arms' courses (facts 8-10) and the registry."""

from __future__ import annotations

import pytest
import torch

from virtualpatient import KetamineLike, NeurosteroidLike, PatientBatch, Protocol, SSRILike
from virtualpatient.engine import batched
from virtualpatient.network import Modulation
from virtualpatient.treatments import TREATMENTS, Treatment, build_treatment, register, treatment_dataclass

#: Short courses of the paper's arms (every other parameter is the paper's).
COURSES = {
    "ketamine": KetamineLike(epochs=2, score_batches=2),
    "ssri": SSRILike(epochs=3),
    "neurosteroid": NeurosteroidLike(epochs=2),
}

#: The on-drug modulation each arm leaves (facts 8-10): only the neurosteroid arm damps and uses tanh.
ON_DRUG = {
    "ketamine": Modulation(gain=1.25),
    "ssri": Modulation(gain=1.6),
    "neurosteroid": Modulation(gain=0.85, damping=0.7, activation="tanh"),
}


@pytest.fixture
def pruned(tiny_protocol, make_patients) -> PatientBatch:
    """Two tiny patients, trained for the tiny baseline and pruned to 95 %."""
    batch = make_patients(tiny_protocol)
    batch.train_baseline()
    batch.prune()
    return batch


@pytest.fixture
def spy(monkeypatch):
    """Record every call of engine.batched.forward (its modulation) and of PatientBatch.train (args, masks, weights)."""
    record = {"mods": [], "train": []}
    real_forward, real_train = batched.forward, PatientBatch.train

    def forward(params, x, mod, stab, *args, **kwargs):
        record["mods"].append(mod)
        return real_forward(params, x, mod, stab, *args, **kwargs)

    def train(self, epochs, lr, stream, **kwargs):
        record["train"].append({
            "epochs": epochs, "lr": lr, "stream": stream, "masks": [m.clone() for m in self.params.masks],
            "weights": [w.clone() for w in self.params.weights], "n_mods": len(record["mods"]),
        })
        return real_train(self, epochs, lr, stream, **kwargs)

    monkeypatch.setattr(batched, "forward", forward)
    monkeypatch.setattr(PatientBatch, "train", train)
    return record


@pytest.mark.parametrize("arm", list(COURSES))
def test_masks_stay_locked_through_each_treatments_training(pruned, spy, arm):
    """During every arm's training no pruned weight revives: after PatientBatch.train the masks are the
    ones training started with and every masked weight is exactly 0, in every layer; unmasked weights moved."""
    lesion = [m.clone() for m in pruned.params.masks]
    COURSES[arm].apply(pruned, arm)
    assert len(spy["train"]) == 1
    start = spy["train"][0]
    for i, (m_start, m, w, w_start) in enumerate(zip(start["masks"], pruned.params.masks, pruned.params.weights,
                                                     start["weights"])):
        assert torch.equal(m, m_start), f"layer {i}: mask changed during training"
        assert torch.all(w[m == 0] == 0), f"layer {i}: a pruned weight is non-zero"
        assert not torch.equal(w[m == 1], w_start[m == 1]), f"layer {i}: did not train"
    if arm == "ketamine":  # regrowth happened before training: a superset of the lesion's survivors
        assert all(torch.all(m >= m0) for m, m0 in zip(start["masks"], lesion))
        assert sum(int(m.sum()) for m in start["masks"]) > sum(int(m.sum()) for m in lesion)
    else:  # the other arms keep the lesion's mask
        assert all(torch.equal(m, m0) for m, m0 in zip(start["masks"], lesion))


@pytest.mark.parametrize("arm", list(COURSES))
def test_each_arm_leaves_its_on_drug_modulation(pruned, spy, arm):
    """After the course: ketamine gain 1.25; SSRI gain 1.6, noise 0; neurosteroid damping 0.7, tanh, gain 0.85.

    tanh and damping appear in the neurosteroid arm only, in training as well as afterwards.
    """
    COURSES[arm].apply(pruned, arm)
    assert pruned.modulation == ON_DRUG[arm]
    training = spy["mods"][spy["train"][0]["n_mods"]:]
    assert training, "no training step recorded"
    uses_tanh = {m.activation == "tanh" for m in training}
    damped = {m.damping for m in training}
    if arm == "neurosteroid":
        assert uses_tanh == {True} and damped == {0.7} and {m.gain for m in training} == {0.85}
    else:
        assert uses_tanh == {False} and damped == {1.0}
    assert {m.protection for m in training} == {0.0}


def test_arm_learning_rates_epochs_and_streams(pruned, spy):
    """Each course trains once with its own epochs, Adam rate and a stream named after the arm."""
    for arm, course in COURSES.items():
        course.apply(pruned.clone(), arm)
    calls = [(c["epochs"], c["lr"], c["stream"]) for c in spy["train"]]
    assert calls == [(2, 5e-4, "ketamine/train"), (3, 1e-5, "ssri/train"), (2, 5e-4, "neurosteroid/train")]


def test_ssri_schedule_first_and_last_epoch():
    """SSRI-like (fact 9): epoch 0 noise 0.5 gain 1.0; epoch 99 noise 0.0 gain 1.6; linear in e / 99 between."""
    ssri = SSRILike()
    base = Modulation()
    first, middle, last = (ssri.modulation_at(base, e) for e in (0, 33, 99))
    assert (first.noise_sigma, first.gain) == (pytest.approx(0.5, abs=1e-12), pytest.approx(1.0, abs=1e-12))
    assert (last.noise_sigma, last.gain) == (pytest.approx(0.0, abs=1e-12), pytest.approx(1.6, abs=1e-12))
    assert middle.noise_sigma == pytest.approx(0.5 * (1 - 33 / 99), abs=1e-12)
    assert middle.gain == pytest.approx(1 + 0.6 * 33 / 99, abs=1e-12)
    assert (last.damping, last.activation) == (1.0, "relu")


def test_ssri_training_follows_the_schedule(pruned, spy):
    """The SSRI course's training steps see the schedule (3 epochs: noise .5/.25/0, gain 1/1.3/1.6);
    afterwards the modulation is noise 0, gain 1.6."""
    SSRILike(epochs=3).apply(pruned, "ssri")
    per_epoch = 2  # 256 training points in mini-batches of 128
    mods = spy["mods"]
    assert len(mods) == 3 * per_epoch
    for epoch, (noise, gain) in enumerate([(0.5, 1.0), (0.25, 1.3), (0.0, 1.6)]):
        for m in mods[epoch * per_epoch:(epoch + 1) * per_epoch]:
            assert m.noise_sigma == pytest.approx(noise, abs=1e-12)
            assert m.gain == pytest.approx(gain, abs=1e-12)
    assert pruned.modulation.noise_sigma == 0.0
    assert pruned.modulation.gain == pytest.approx(1.6, abs=1e-12)


def test_ketamine_scores_at_unit_gain_then_trains_at_1_25(pruned, spy):
    """Ketamine-like (fact 8): the score_batches scoring passes run at gain 1, noise 0; training at gain 1.25."""
    KetamineLike(epochs=1, score_batches=2).apply(pruned, "ketamine")
    mods = spy["mods"]
    n_score = spy["train"][0]["n_mods"]
    assert n_score == 2
    assert all(m.gain == 1.0 and m.noise_sigma == 0.0 for m in mods[:n_score])
    assert len(mods) > n_score and all(m.gain == 1.25 and m.noise_sigma == 0.0 for m in mods[n_score:])


def test_ketamine_can_score_at_its_gain(pruned, spy):
    """score_at_unit_gain = False (the text's other reading) scores at gain 1.25."""
    KetamineLike(epochs=0, score_batches=2, score_at_unit_gain=False).apply(pruned, "ketamine")
    assert [m.gain for m in spy["mods"][:2]] == [1.25, 1.25]


def test_neurosteroid_trains_damped(pruned, spy):
    """Neurosteroid-like (fact 10): modulation set before training, 10 epochs by default at Adam 5e-4."""
    NeurosteroidLike(epochs=1).apply(pruned, "neurosteroid")
    assert all(m == ON_DRUG["neurosteroid"] for m in spy["mods"])
    assert NeurosteroidLike().training_epochs() == 10


def test_build_treatment_and_registry():
    """Study tables build registered treatments; unknown names, bad types and bad values raise ValueError."""
    assert build_treatment("ssri", {}) == SSRILike()
    assert build_treatment("fast", {"treatment": "ssri", "epochs": 4}) == SSRILike(epochs=4)
    assert build_treatment("ketamine", None) == KetamineLike()
    with pytest.raises(ValueError, match="unknown treatment"):
        build_treatment("placebo", {})
    with pytest.raises(ValueError, match="table"):
        build_treatment("ssri", 3)
    with pytest.raises(ValueError, match="lr"):
        build_treatment("ssri", {"lr": -1.0})
    assert set(TREATMENTS) >= {"ketamine", "ssri", "neurosteroid"}


def test_a_registered_treatment_is_usable_from_a_study(pruned):
    """A new arm registered with @register is built from a study table and runs on a batch."""

    @register("test_gain_only")
    @treatment_dataclass
    class GainOnly(Treatment):
        gain: float = 1.1
        washout_decay: float = 0.01

        def apply(self, batch, arm, on_epoch=None):
            batch.modulation = batch.modulation.replace(gain=self.gain)

    protocol = Protocol.from_dict({"arms": {"boost": {"treatment": "test_gain_only", "gain": 1.3}}})
    arm = protocol.arms["boost"]
    assert isinstance(arm, GainOnly) and arm.gain == 1.3
    assert arm.to_dict() == {"treatment": "test_gain_only", "gain": 1.3, "washout_decay": 0.01}
    arm.apply(pruned, "boost")
    assert pruned.modulation.gain == 1.3
    with pytest.raises(TypeError):
        register("not_a_treatment")(int)
