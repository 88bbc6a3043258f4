"""The cold-start protocol configs parse, and express the protocol: four first-round strategies x four first
budgets, each continued with margin on the same embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest

from activelab.config import load_config, parse_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/coldstart_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_coldstart_config(path):
    cfg = load_config(path)
    assert cfg.init == "rotation" and cfg.loop.initial == 0 and cfg.loop.stop_set > 0
    firsts = {(s.first_round.name, s.first_round.budget) for s in cfg.strategies}
    assert firsts == {(x, b) for x in ("random", "typiclust", "probcover", "coreset") for b in (10, 20, 50, 100)}
    assert {s.name for s in cfg.strategies} == {"margin"}
    assert len({s.label for s in cfg.strategies}) == 16


def test_first_round_and_stop_options_leave_other_fingerprints_alone():
    base = {
        "name": "x",
        "dataset": {"name": "digits"},
        "model": {"name": "digits_cnn"},
        "loop": {"budget": 5, "rounds": 2},
        "strategies": [{"name": "margin"}],
    }
    a = parse_config(base)
    explicit = {**base, "loop": {**base["loop"], "stop_set": 0, "stop_when": None}}
    assert parse_config(explicit).fingerprint() == a.fingerprint()
    first = {**base, "strategies": [{"name": "margin", "first_round": {"name": "typiclust", "budget": 3}}]}
    assert parse_config(first).fingerprint() != a.fingerprint()
    assert parse_config(first).strategies[0].label == "typiclust@3>margin"
    with pytest.raises(Exception, match="stop_set"):
        parse_config({**base, "loop": {**base["loop"], "stop_when": {"stabilizing_kappa": 0.99}}})
    from activelab.experiment.validate import check_strategies

    with pytest.raises(Exception, match="unknown strategy"):
        check_strategies(parse_config({**base, "strategies": [{"name": "margin", "first_round": {"name": "nope"}}]}))
