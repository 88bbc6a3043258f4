"""Configs: unknown keys and values are errors that name the valid ones; shipped configs all load."""

from pathlib import Path

import pytest

from activelab.config import load_config, parse_config
from activelab.errors import ConfigError

BASE = {
    "name": "t",
    "dataset": {"name": "digits"},
    "model": {"name": "digits_cnn"},
    "loop": {"budget": 5, "rounds": 2},
    "strategies": [{"name": "random"}],
}


def _with(**changes):
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for path, value in changes.items():
        section, _, key = path.partition("__")
        if key:
            cfg[section][key] = value
        else:
            cfg[section] = value
    return cfg


def test_base_config_is_valid():
    cfg = parse_config(_with())
    assert cfg.train.optimizer == "sgd" and cfg.strategies[0].label == "random"


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key; valid keys here: .*\blr\b"):
        parse_config(_with(train={"lrr": 0.1}))
    with pytest.raises(ConfigError, match=r"bogus: unknown key; valid keys here: name, description"):
        parse_config({**_with(), "bogus": 1})


def test_bad_value_names_valid_values():
    with pytest.raises(ConfigError, match=r"model\.name.*'lenet'"):
        parse_config(_with(model={"name": "vgg"}))
    with pytest.raises(ConfigError, match=r"train\.optimizer.*'sgd' or 'adam'"):
        parse_config(_with(train={"optimizer": "rmsprop"}))


def test_unknown_strategy_and_parameter():
    with pytest.raises(ConfigError, match="unknown strategy 'nope'; available: .*entropy"):
        parse_config(_with(strategies=[{"name": "nope"}]))
    with pytest.raises(ConfigError, match="Valid parameters"):
        parse_config(_with(strategies=[{"name": "entropy", "params": {"k": 1}}]))


def test_duplicate_strategy_variants_need_keys():
    with pytest.raises(ConfigError, match="appear twice"):
        parse_config(_with(strategies=[{"name": "random"}, {"name": "random"}]))
    cfg = parse_config(_with(strategies=[{"name": "random"}, {"name": "random", "key": "random2"}]))
    assert [s.label for s in cfg.strategies] == ["random", "random2"]


def test_fingerprint_ignores_name_but_not_settings():
    a = parse_config(_with())
    assert a.fingerprint() == parse_config({**_with(), "name": "other"}).fingerprint()
    assert a.fingerprint() != parse_config(_with(loop={"budget": 6, "rounds": 2})).fingerprint()


def test_yaml_errors_are_config_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.strategies
