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
    """The schema does not know strategies (a plugin strategy resolves where it runs); the experiment layer
    checks them before the first job."""
    from activelab.experiment.validate import check_strategies

    with pytest.raises(ConfigError, match="unknown strategy 'nope'; available: .*entropy"):
        check_strategies(parse_config(_with(strategies=[{"name": "nope"}])))
    with pytest.raises(ConfigError, match="Valid parameters"):
        check_strategies(parse_config(_with(strategies=[{"name": "entropy", "params": {"k": 1}}])))


def test_duplicate_strategy_variants_need_keys():
    with pytest.raises(ConfigError, match="appear twice"):
        parse_config(_with(strategies=[{"name": "random"}, {"name": "random"}]))
    cfg = parse_config(_with(strategies=[{"name": "random"}, {"name": "random", "key": "random2"}]))
    assert [s.label for s in cfg.strategies] == ["random", "random2"]


def test_fingerprint_ignores_name_and_run_count_but_not_settings():
    a = parse_config(_with())
    assert a.fingerprint() == parse_config({**_with(), "name": "other"}).fingerprint()
    assert a.fingerprint() == parse_config(_with(loop__runs=7)).fingerprint()  # runs are seeded by their index
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
    from activelab.experiment.validate import check_strategies

    cfg = load_config(path)
    assert cfg.strategies
    check_strategies(cfg)


def test_cli_help_and_datasets():
    from click.testing import CliRunner

    from activelab.cli import main

    runner = CliRunner()
    for cmd in ("run", "report", "plot", "datasets", "pretrain"):
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output
    res = runner.invoke(main, ["datasets"])
    assert res.exit_code == 0
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.strip()}
    assert set(lines) >= {"digits", "fashion_mnist", "mnist", "svhn", "cifar10", "imagenet"}
    assert " yes " in lines["digits"]


def test_cli_missing_config_is_clear(tmp_path):
    from click.testing import CliRunner

    from activelab.cli import main

    p = tmp_path / "c.yaml"
    p.write_text("name: x\ndataset: {name: digits}\nmodel: {name: lenet}\nloop: {budget: 1}\nstrategies: []\n")
    res = CliRunner().invoke(main, ["run", str(p)])
    assert res.exit_code == 2
    assert "loop.rounds: Field required" in res.output and "strategies" in res.output
    assert "Traceback" not in res.output
