"""Typed config groups: a key no group defines is refused with a "did you mean", `+key=` only where
a group is open by design, and a plugin's settings come from its class (compose only: no training)."""
from __future__ import annotations

import re

import pytest

from harness.core.config import ConfigError, compose_config, finalize
from harness.core.plugin_config import accepted_keys, plugin_settings
from harness.core.registry import ATTACKS, METHODS, POISONS


@pytest.mark.parametrize("override", ["trainer.epoch=3", "+trainer.epoch=3", "++trainer.epoch=3"])
def test_a_typo_is_refused_naming_the_key_it_meant(override: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.epoch'.*Did you mean trainer\.epochs"):
        compose_config([override])


def test_nested_and_plugin_keys_get_a_hint_too() -> None:
    with pytest.raises(ConfigError, match=r"'attack.pgd.step'.*Did you mean attack\.pgd\.steps"):
        compose_config(["attack=[pgd]", "attack.pgd.step=3"])
    with pytest.raises(ConfigError, match=r"'method.bta'.*Did you mean method\.beta"):
        compose_config(["method=trades", "method.bta=1"])
    with pytest.raises(ConfigError, match=r"only under the groups that are open by design: .*arch\.kwargs"):
        compose_config(["+method.beta2=1"])


def test_plus_adds_only_under_an_open_group_and_lands_in_the_cell_key(tmp_path) -> None:
    base = ["arch=timm", "arch.model=resnet18", f"results_dir={tmp_path}"]
    plain = finalize(compose_config(base))
    dropped = finalize(compose_config(base + ["+arch.kwargs.drop_rate=0.1"]))
    assert dropped["arch"]["kwargs"] == {"drop_rate": 0.1} and plain["arch"]["kwargs"] == {}
    assert dropped["key"] != plain["key"] and dropped["train_key"] != plain["train_key"]


def test_a_plugin_group_may_hold_only_what_its_class_takes() -> None:
    from harness.core.config import _check_plugin_settings

    cfg = compose_config(["method=cbd"])  # a preset's keys are its class's parameters
    cfg["method"]["critic_lrr"] = 0.1     # as a typo in an edited YAML preset would put it
    with pytest.raises(ConfigError, match=r"'method.critic_lrr'.*Did you mean method\.critic_lr"):
        _check_plugin_settings(cfg)
    # ... and the class's parameters are the keys: followed through **kwargs to the base class
    assert {"value", "pattern", "patch_size", "margin", "target", "rate", "seed", "pattern_seed"} <= \
        accepted_keys("backdoor", POISONS.get("badnets"))
    assert accepted_keys("method", METHODS.get("trades")) == {"name", "attack", "beta", "label_smoothing"}
    assert accepted_keys("method", METHODS.get("adml_trades")) == {"name", "base", "attack", "finetune", "beta"}


@pytest.mark.parametrize("overrides,message", [
    (["method=trades", "method.beta=abc"], "method.beta must be float, got 'abc'"),
    (["attack=[pgd]", "attack.pgd.steps=2.5"], "attack.pgd.steps must be int, got 2.5"),
    (["method=cbd", "method.mi=3"], "method.mi must be bool, got 3"),
])
def test_a_setting_must_have_the_type_its_class_annotates(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)
    compose_config(["attack=[pgd]", "attack.pgd.eps=8/255"])  # `float | str`: a fraction stays allowed


@pytest.mark.parametrize("override,message", [
    ("seed=abc", "seed must be a number (its default is 0), got 'abc'"),
    ("trainer.optimizer.lr=fast", "trainer.optimizer.lr must be a number"),
    ("trainer.progress=3", "trainer.progress must be true or false"),
])
def test_elsewhere_a_value_keeps_its_defaults_kind(override, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(["trainer=tiny", override])
    compose_config(["resources.gpus=0.25", "eval.neuron_sensitivity.limit=null", "seed=3"])


def test_class_settings_follow_kwargs_to_the_base_and_mark_required_ones() -> None:
    from harness.backdoor.base import Poison

    class Stripe(Poison):  # not registered: plugin_settings only reads the class
        name = "stripe"

        def __init__(self, width: int, rows: tuple[int, ...] = (0, 1), **common) -> None:
            super().__init__(**common)

    settings = plugin_settings("backdoor", Stripe)
    assert settings == {"width": "???", "rows": [0, 1], "target": 0, "rate": 0.1, "seed": None, "pattern_seed": 0,
                        "poisoning": "static", "candidates": "all",
                        "label_mode": "all_to_one"}

    class Tuned(Stripe):
        default_config = {"width": 2}

    assert plugin_settings("backdoor", Tuned)["width"] == 2


def test_a_registered_plugin_without_a_yaml_is_selected_with_its_class_defaults() -> None:
    # TRADES' inner attack is registered but has no configs/attack/*.yaml preset
    assert plugin_settings("attack", ATTACKS.get("trades_kl")) == {
        "eps": "${data.eps}", "steps": 10, "step_size": None, "init_std": 0.001}
    cfg = compose_config(["attack=[pgd,trades_kl]", "attack.trades_kl.steps=2"])
    assert cfg["attack"]["trades_kl"] == {"name": "trades_kl", "eps": cfg["data"]["eps"], "steps": 2,
                                          "step_size": None, "init_std": 0.001}


def test_an_unknown_plugin_name_lists_presets_and_registered_plugins() -> None:
    with pytest.raises(ConfigError, match=r"unknown attack 'nosuch'.*trades_kl.*robustgrid\.attacks"):
        compose_config(["attack=[pgd,nosuch]"])
