"""The training-integrity rules (harness/train/health.py) on hand-written curves: each fires on the
shape it names and not on a healthy curve; the significance guard keeps a small validation split
from flagging noise; thresholds come from trainer.flags and bad ones are refused."""
from __future__ import annotations

import pytest

from harness.train.health import FLAGS, Thresholds, diverged_details, training_flags
from leaderboard.health import EXPLANATIONS

T = Thresholds()


def curve(robust: list[float], train: list[float] | None = None, n: int = 500, clean: float = 0.9,
          share: float = 0.12, pgd: list[float] | None = None) -> list[dict]:
    """Probes at `robust` (validation PGD-10), `train` (the train-time attack's accuracy) and `pgd`
    (PGD-10 on trained images; default: as on the validation split)."""
    out = []
    for epoch, r in enumerate(robust):
        e = {"epoch": epoch, "loss": 1.0, "samples": 20000, "val_n": n, "val_robust_n": n,
             "val_clean_acc": clean, "val_robust_acc": r, "val_top_class": 3, "val_top_class_share": share}
        if train is not None:
            e["train_robust_acc"] = train[epoch]
            e["train_pgd_acc"], e["train_pgd_n"] = (r if pgd is None else pgd[epoch]), n
        out.append(e)
    return out


HEALTHY = curve([0.2, 0.3, 0.38, 0.42, 0.44, 0.45], [0.15, 0.28, 0.36, 0.41, 0.45, 0.47])


def test_a_healthy_curve_fires_nothing() -> None:
    fired, skipped = training_flags(HEALTHY, T, 10)
    assert fired == {} and skipped == {}


def test_catastrophic_overfitting_needs_the_drop_and_the_train_attack_rising() -> None:
    co = curve([0.3, 0.4, 0.45, 0.02, 0.0], [0.3, 0.4, 0.45, 0.7, 0.8])
    fired, _ = training_flags(co, T, 10)
    assert fired["catastrophic_overfitting"]["epoch"] == 3
    assert fired["catastrophic_overfitting"]["val_robust_before"] == 0.45
    # the same fall while the train-time attack's accuracy falls too: a bad epoch, not CO
    falling = curve([0.3, 0.4, 0.45, 0.02, 0.0], [0.3, 0.4, 0.45, 0.1, 0.05])
    assert "catastrophic_overfitting" not in training_flags(falling, T, 10)[0]


def test_robust_overfitting_compares_the_last_probe_with_the_best() -> None:
    ro = curve([0.3, 0.45, 0.52, 0.49, 0.46, 0.44], [0.3, 0.45, 0.55, 0.6, 0.66, 0.7])
    fired, _ = training_flags(ro, T, 10)
    assert fired["robust_overfitting"] == {**fired["robust_overfitting"], "epoch": 5, "best_epoch": 2}
    assert fired["robust_overfitting"]["gap"] == pytest.approx(0.08)
    # ... and only what the delivered model went through: selection at epoch 2 keeps the best
    assert "robust_overfitting" not in training_flags(ro, T, 10, until_epoch=2)[0]


def test_collapse_by_one_class_or_by_chance_accuracy() -> None:
    fired, _ = training_flags(curve([0.1] * 3, share=0.97, clean=0.11), T, 10)
    assert fired["collapsed"]["top_class_share"] == 0.97 and fired["collapsed"]["chance"] == 0.1
    assert "collapsed" not in training_flags(curve([0.1] * 3, share=0.2, clean=0.6), T, 10)[0]


def test_weak_train_attack_fires_when_the_gap_holds_at_most_probes() -> None:
    weak = curve([0.05, 0.08, 0.1, 0.1, 0.12], [0.5, 0.7, 0.8, 0.85, 0.9])
    fired, _ = training_flags(weak, T, 10)
    assert fired["weak_train_attack"]["probes_over"] == 5 and fired["weak_train_attack"]["epoch"] == 0
    late = curve([0.4, 0.45, 0.45, 0.4, 0.4], [0.4, 0.45, 0.5, 0.75, 0.8])  # a gap in 2 of 5 probes only
    assert "weak_train_attack" not in training_flags(late, T, 10)[0]
    # memorised, not weak: the train-time attack's accuracy is far above the validation split's, but
    # PGD-10 on trained images agrees with it (robust overfitting is not a weak attack)
    memorised = curve([0.5, 0.55, 0.55, 0.5, 0.48], [0.6, 0.8, 0.9, 0.95, 0.97], pgd=[0.6, 0.78, 0.88, 0.95, 0.96])
    assert "weak_train_attack" not in training_flags(memorised, T, 10)[0]


def test_a_small_validation_split_does_not_flag_noise() -> None:
    """29 images (2% of digits): a 20-point dip is 6 images, not significant at z >= 2."""
    noisy = curve([0.6, 0.65, 0.45, 0.62], [0.6, 0.62, 0.66, 0.7], n=29)
    assert training_flags(noisy, T, 10)[0] == {}
    crashed = curve([0.6, 0.7, 0.0, 0.0], [0.6, 0.7, 0.8, 0.9], n=29)  # the real thing still fires
    assert "catastrophic_overfitting" in training_flags(crashed, T, 10)[0]


def test_too_few_images_are_not_assessed_and_say_why() -> None:
    fired, skipped = training_flags(curve([0.6, 0.0], [0.6, 0.9], n=5), T, 10)
    assert fired == {} and "fewer than trainer.flags.min_images=10" in skipped["robust_overfitting"]
    fired, skipped = training_flags([{"epoch": 0, "loss": 1.0}], T, 10)
    assert fired == {} and "trainer.validation off" in skipped["collapsed"]
    no_attack = [{k: v for k, v in e.items() if k != "train_robust_acc"} for e in HEALTHY]
    assert "no train-time attack" in training_flags(no_attack, T, 10)[1]["catastrophic_overfitting"]


def test_thresholds_come_from_trainer_flags_and_bad_ones_are_refused() -> None:
    assert Thresholds.from_config({"flags": {"robust_overfit_gap": 0.1}}).robust_overfit_gap == 0.1
    with pytest.raises(ValueError, match="unknown trainer.flags key"):
        Thresholds.from_config({"flags": {"robust_gap": 0.1}})
    with pytest.raises(ValueError, match="collapse_share"):
        Thresholds.from_config({"flags": {"collapse_share": 1.5}})


def test_diverged_is_read_from_the_failed_cells_error() -> None:
    error = ("RuntimeError: upstream node train/abc failed: NonFiniteLossError: erm: loss is nan at epoch 3, "
             "step 7 or before; lower the learning rate or check the data")
    assert diverged_details(error) == {"epoch": 3, "step": 7, "loss": "nan"}
    assert diverged_details("ValueError: something else") is None


def test_every_flag_has_an_explanation_on_the_site() -> None:
    assert set(FLAGS) == set(EXPLANATIONS)
