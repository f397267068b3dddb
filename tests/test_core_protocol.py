"""Tests of virtualpatient.protocol: the paper's defaults, study files and their validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtualpatient import KetamineLike, NeurosteroidLike, Protocol, ProtocolError, SSRILike, load_study

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def test_defaults_are_the_papers_numbers():
    """Every default of Protocol() is the published protocol (Methods and DESIGN facts 1-16)."""
    p = Protocol()
    assert p.n_patients == 10
    assert p.seed == 0
    assert p.network.layer_sizes == (2, 512, 512, 256, 4)
    assert p.network.n_hidden == 3
    # task (fact 2)
    assert p.task.centres == ((-3.0, -3.0), (3.0, 3.0), (-3.0, 3.0), (3.0, -3.0))
    assert (p.task.n_train, p.task.n_standard, p.task.n_clean) == (12_000, 4_000, 2_000)
    assert (p.task.train_sd, p.task.standard_sd, p.task.clean_sd) == (0.8, 0.8, 0.0)
    # baseline (fact 1)
    assert (p.baseline.epochs, p.baseline.lr, p.baseline.batch_size) == (20, 1e-3, 128)
    # lesion (fact 7) and acute relapse (fact 11)
    assert (p.pruning.fraction, p.pruning.layers) == (0.95, "all")
    assert (p.relapse.further_fraction, p.relapse.max_sparsity) == (0.4, 0.99)
    # assessments (facts 4-6, 12)
    a = p.assessment
    assert (a.combined_input_sd, a.combined_internal_sigma) == (1.0, 0.5)
    assert a.resilience_sigmas == (0.0, 0.5, 1.0, 1.5, 2.5)
    assert a.off_medication_sigmas == (2.5,)
    assert (a.biased_sigma, a.biased_shift) == (1.0, 1.0)
    # stabiliser (fact 13)
    s = p.stabiliser
    assert (s.inhibition, s.noise_shift_factor, s.gain_floor) == (0.15, 0.3, 1.05)
    # longitudinal (fact 14)
    lon = p.longitudinal
    assert lon.durations == (25, 50, 100, 150, 200, 300)
    assert (lon.lr, lon.protection, lon.washout_steps, lon.relapse_threshold) == (1e-6, 1.0, 50, 60.0)
    assert lon.nested is True
    # arms (facts 8-10, 14)
    assert list(p.arms) == ["ketamine", "ssri", "neurosteroid"]
    k, r, n = p.arms["ketamine"], p.arms["ssri"], p.arms["neurosteroid"]
    assert isinstance(k, KetamineLike) and isinstance(r, SSRILike) and isinstance(n, NeurosteroidLike)
    assert (k.gain, k.regrow_fraction, k.regrow_sd, k.score_batches, k.epochs, k.lr) == (1.25, 0.5, 0.03, 30, 15, 5e-4)
    assert (k.score, k.score_at_unit_gain, k.washout_decay) == ("gradient", True, 0.002)
    assert (r.epochs, r.lr, r.noise_start, r.noise_end, r.gain_start, r.gain_end) == (100, 1e-5, 0.5, 0.0, 1.0, 1.6)
    assert r.washout_decay == 0.015
    assert (n.damping, n.activation, n.gain, n.epochs, n.lr, n.washout_decay) == (0.7, "tanh", 0.85, 10, 5e-4, 0.008)
    assert NeurosteroidLike.state_dependent and not KetamineLike.state_dependent and not SSRILike.state_dependent
    # covariates default to "the protocol's value for everyone"
    assert (p.cohort.prune_fraction, p.cohort.regrowth_fraction, p.cohort.lr_scale) == (None, None, None)


def test_manic_switch_study_is_the_default_protocol():
    """studies/manic_switch.toml resolves to exactly Protocol(): equal dicts and hashes, and equal
    objects once its written-out schedule (which equals the default one) is dropped."""
    study = load_study(STUDIES / "manic_switch.toml")
    default = Protocol()
    assert study.to_dict() == default.to_dict()
    assert study.hash() == default.hash()
    assert study.schedule is not None and study.regimens is not None
    assert study.replace(schedule=None, regimens=None) == default


def test_hash_tracks_what_is_computed():
    """The hash changes with any protocol number, but not with the device (same computation)."""
    p = Protocol()
    assert p.replace(seed=1).hash() != p.hash()
    assert p.replace(longitudinal={"lr": 2e-6}).hash() != p.hash()
    assert p.replace(device="cuda").hash() == p.hash()
    assert Protocol.from_dict(p.to_dict()).hash() == p.hash()  # the resolved dict round-trips


def test_quick_study_and_overrides():
    """studies/quick.toml loads with its own numbers; keyword overrides replace top-level fields."""
    q = load_study(STUDIES / "quick.toml", n_patients=2)
    assert q.n_patients == 2 and q.name == "quick"
    assert (q.task.n_train, q.baseline.epochs, q.longitudinal.durations) == (3000, 10, (5, 10, 20))
    assert (q.arms["ketamine"].epochs, q.arms["ssri"].epochs, q.arms["neurosteroid"].epochs) == (5, 20, 5)
    assert q.arms["ketamine"].gain == 1.25  # unspecified parameters keep the paper's value


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("bogus = 1\n", ["bogus", "unknown key"]),
        ("[pruning]\nfraction = 1.5\n", ["pruning.fraction"]),
        ("[cohort]\nprune_fraction = 1.5\n", ["cohort", "prune_fraction"]),
        ("[relapse]\nfurther_fraction = -0.1\n", ["relapse.further_fraction"]),
        ("[baseline]\nepochs = -1\n", ["baseline.epochs"]),
        ("[arms.ketamine]\nepochs = -3\n", ["arms", "ketamine", "epochs"]),
        ("[arms.lithium]\ngain = 1.0\n", ["arms", "lithium", "unknown treatment"]),
        ("[arms.ketamine]\ntreatment = 'lithium'\n", ["arms", "ketamine", "unknown treatment", "lithium"]),
        ("[arms.ssri]\nbogus = 2\n", ["arms", "ssri", "bogus", "unknown key"]),
        ("[longitudinal]\ndurations = [50, 25]\n", ["longitudinal.durations"]),
        ("[task]\nn_train = 'many'\n", ["task.n_train"]),
        ("[pruning\nfraction = 0.9\n", ["not valid TOML"]),
    ],
)
def test_invalid_study_raises_protocol_error_naming_the_field(tmp_path, text, names):
    """Each kind of invalid study file raises ProtocolError whose message names the file and field."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProtocolError) as info:
        load_study(path)
    message = str(info.value)
    assert str(path) in message
    for name in names:
        assert name in message, f"{name!r} missing from {message!r}"


def test_all_errors_reported_at_once(tmp_path):
    """A study with several invalid fields gets one ProtocolError naming every one of them."""
    path = tmp_path / "bad.toml"
    path.write_text(
        "bogus = 1\n"
        "[pruning]\nfraction = 1.5\n"
        "[baseline]\nepochs = -1\n"
        "[arms.placebo]\ngain = 1.0\n"
        "[longitudinal]\nrelapse_threshold = 120\n"
    )
    with pytest.raises(ProtocolError) as info:
        load_study(path)
    lines = str(info.value).splitlines()
    for name in ("bogus", "pruning.fraction", "baseline.epochs", "placebo", "longitudinal.relapse_threshold"):
        assert sum(name in line for line in lines) == 1, (name, lines)
    assert len(lines) == 5


def test_missing_study_file(tmp_path):
    """A study path that does not exist raises ProtocolError naming the path, not OSError."""
    with pytest.raises(ProtocolError, match="cannot read"):
        load_study(tmp_path / "nope.toml")


def test_architecture_must_fit_the_task():
    """A network whose input is not 2 or whose output is not one unit per centre is refused."""
    with pytest.raises(ProtocolError, match="layer_sizes"):
        Protocol.from_dict({"network": {"layer_sizes": [2, 8, 3]}})
    with pytest.raises(ProtocolError, match="layer_sizes"):
        Protocol.from_dict({"network": {"layer_sizes": [2, 4]}})


def test_interpretations_report_the_text_readings():
    """Protocol.interpretations lists the fields where text and notebook differ, with their values."""
    interp = Protocol().interpretations
    assert interp["task.train_sd"] == 0.8
    assert interp["pruning.layers"] == "all"
    assert interp["arms.ketamine.score_at_unit_gain"] is True


def test_default_protocol_keeps_the_hash_older_run_folders_have():
    """Fields added since run folders were first written (schedules, state covariates, input-noise
    levels, regrow_min) leave the paper's protocol hash as it was at 4a63a13 while at their defaults,
    so those folders still resume; setting one changes the hash."""
    from virtualpatient import Protocol

    assert Protocol().hash() == "52b9e5ead150e750"
    assert Protocol.from_dict({"assessment": {"input_noise_sds": [1.0]}}).hash() != "52b9e5ead150e750"
    assert Protocol.from_dict({"arms": {"ketamine": {"regrow_min": 1}, "ssri": {}, "neurosteroid": {}}}).hash() \
        != "52b9e5ead150e750"
