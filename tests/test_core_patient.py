"""Tests of virtualpatient.patient and task: persistence, per-patient randomness, assessments' inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from virtualpatient import PatientBatch, PatientSpec, VirtualPatient
from virtualpatient.engine.batched import forward
from virtualpatient.network import Modulation
from virtualpatient.protocol import TaskConfig
from virtualpatient.task import make_task_data
from virtualpatient.treatments import NeurosteroidLike


@pytest.fixture
def treated(tiny_protocol, make_patients) -> PatientBatch:
    """Two tiny patients: baseline, lesion, a neurosteroid course (non-trivial masks and modulation)."""
    batch = make_patients(tiny_protocol, covariates={0: {"lr_scale": 1.0}, 1: {"lr_scale": 0.5}})
    batch.train_baseline()
    batch.prune()
    NeurosteroidLike(epochs=1).apply(batch, "neurosteroid")
    batch.modulation = batch.modulation.replace(protection=0.4)
    return batch


def _assert_same_patient_batch(a: PatientBatch, b: PatientBatch) -> None:
    assert [s.to_dict() for s in a.specs] == [s.to_dict() for s in b.specs]
    assert a.modulation == b.modulation
    for group in ("weights", "biases", "masks"):
        for x, y in zip(getattr(a.params, group), getattr(b.params, group)):
            assert torch.equal(x, y), group
    stab = a.protocol.stabiliser
    la = forward(a.params, a.data.standard_x, a.modulation, stab)
    lb = forward(b.params, b.data.standard_x, b.modulation, stab)
    assert torch.equal(la, lb)
    assert torch.equal(a.accuracy("clean"), b.accuracy("clean"))


def test_state_dict_round_trip(treated, tiny_protocol):
    """state_dict -> from_state_dict rebuilds the batch: same specs, masks, modulation and logits."""
    again = PatientBatch.from_state_dict(treated.state_dict(), tiny_protocol)
    _assert_same_patient_batch(treated, again)
    assert again.covariate("lr_scale") == [1.0, 0.5]


def test_save_load_round_trip(treated, tiny_protocol, tmp_path):
    """save -> load through a file gives the identical batch (weights_only torch file)."""
    path = tmp_path / "batch.pt"
    treated.save(path)
    _assert_same_patient_batch(treated, PatientBatch.load(path, tiny_protocol))


def test_virtual_patient_round_trip_and_split(treated, tiny_protocol, tmp_path):
    """split() gives single patients equal to the batch's slices; each survives save/load as a VirtualPatient."""
    singles = treated.split()
    assert [p.spec.index for p in singles] == [0, 1]
    for pos, one in enumerate(singles):
        assert torch.equal(one.params.weights[1][0], treated.params.weights[1][pos])
        one.save(tmp_path / f"p{pos}.pt")
        again = VirtualPatient.from_state_dict(torch.load(tmp_path / f"p{pos}.pt", weights_only=True), tiny_protocol)
        assert isinstance(again, VirtualPatient)
        _assert_same_patient_batch(one, again)
    restacked = PatientBatch.stack(singles)
    _assert_same_patient_batch(treated, restacked)


def test_load_state_dict_refuses_other_patients(treated, tiny_protocol, make_patients):
    """load_state_dict into a batch of other patients raises; into the same patients restores the state."""
    other = make_patients(tiny_protocol, indices=(2, 3))
    with pytest.raises(ValueError, match="other patients"):
        other.load_state_dict(treated.state_dict())
    fresh = make_patients(tiny_protocol, indices=(0, 1), covariates={0: {"lr_scale": 1.0}, 1: {"lr_scale": 0.5}})
    fresh.load_state_dict(treated.state_dict())
    _assert_same_patient_batch(treated, fresh)


def test_clone_is_independent(treated):
    """clone() copies parameters: training the copy leaves the original untouched."""
    copy = treated.clone()
    before = treated.params.weights[1].clone()
    copy.train(1, 1e-2, "other")
    assert torch.equal(treated.params.weights[1], before)
    assert not torch.equal(copy.params.weights[1], before)


def test_patient_data_and_init_do_not_depend_on_the_cohort(tiny_protocol):
    """Patient 1's data sets and initial weights are the same alone and in a batch with others."""
    spec = PatientSpec(1, tiny_protocol.seed)
    alone = VirtualPatient(spec, tiny_protocol)
    batch = PatientBatch([PatientSpec(0, tiny_protocol.seed), spec, PatientSpec(2, tiny_protocol.seed)], tiny_protocol)
    for field in ("train_x", "train_y", "standard_x", "clean_x", "clean_y"):
        assert torch.equal(getattr(alone.data, field)[0], getattr(batch.data, field)[1]), field
    for a, b in zip(alone.params.weights, batch.params.weights):
        assert torch.equal(a[0], b[1])
    assert not torch.equal(batch.params.weights[1][0], batch.params.weights[1][1])


def test_task_data_follow_fact_2():
    """Clean points sit exactly on their class centre; standard/train points scatter with sd 0.8."""
    data = make_task_data(PatientSpec(0, 11), TaskConfig(n_train=4000, n_standard=4000, n_clean=400))
    centres = np.array([(-3, -3), (3, 3), (-3, 3), (3, -3)], dtype=np.float32)
    np.testing.assert_array_equal(data.clean_x.numpy(), centres[data.clean_y.numpy()])
    for x, y in ((data.train_x, data.train_y), (data.standard_x, data.standard_y)):
        resid = x.numpy() - centres[y.numpy()]
        assert resid.std() == pytest.approx(0.8, rel=0.03)
        assert abs(resid.mean()) < 0.03
        counts = np.bincount(y.numpy(), minlength=4)
        assert counts.min() > 0.2 * len(y)  # labels roughly uniform
    assert not torch.equal(data.train_x[:100], data.standard_x[:100])  # independent streams


def test_activation_magnitude_ignores_noise_and_protection(treated):
    """activation_magnitude uses the nominal modulation without noise or stabiliser terms (fact 6)."""
    base = treated.activation_magnitude()
    noisy = treated.activation_magnitude(treated.modulation.replace(noise_sigma=2.0, protection=1.0))
    torch.testing.assert_close(base, noisy, rtol=0, atol=0)
    off = treated.activation_magnitude(Modulation())
    assert not torch.allclose(base, off)


def test_accuracy_needs_a_noise_stream_when_noisy(treated):
    """A noisy test without a noise stream is refused; a named stream gives reproducible numbers."""
    mod = treated.modulation.replace(noise_sigma=0.5)
    with pytest.raises(ValueError, match="noise stream"):
        treated.accuracy("standard", mod=mod)
    a = treated.accuracy("standard", mod=mod, noise_stream="s")
    b = treated.accuracy("standard", mod=mod, noise_stream="s")
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        treated.accuracy("holdout")
