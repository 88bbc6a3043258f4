"""``activelab.select`` and the experiment runner share one engine: a round picked by the runner is picked
again, identically, by ``select`` from the same model, labeled set and round seed (wrappers, the first-round
rule and ensembles included)."""

from __future__ import annotations

import numpy as np
import torch
import yaml

import activelab
from activelab.experiment.job import checkpoint_path, round_seed
from activelab.experiment.runner import load_experiment, run_experiment
from activelab.experiment.setup import new_model, prepare_run
from activelab.strategies.wrappers import build_strategy

CFG = {
    "name": "parity",
    "dataset": {"name": "digits"},
    "bias": {"kind": "step", "ratio": 5},
    "validation": {"per_class": 5},
    "model": {"name": "digits_cnn"},
    "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 32, "epochs": 2},
    "loop": {"initial": 0, "budget": 12, "rounds": 2, "runs": 1, "seed": 3},
    "threads": 1,
    "strategies": [
        {"name": "margin", "wrap": [{"name": "class_balanced"}]},
        {"name": "badge", "wrap": [{"name": "subsample", "params": {"size": 300}}]},
        {"name": "var_ratio", "params": {"mc_samples": 3, "ensemble": 2}},
    ],
}


def test_a_runner_round_equals_the_same_round_through_select(tmp_path):
    path = tmp_path / "parity.yaml"
    path.write_text(yaml.safe_dump(CFG))
    outcome = run_experiment(path, tmp_path / "exp", progress=False)
    assert not outcome.failed, outcome.failed
    cfg, store = load_experiment(tmp_path / "exp")
    data = prepare_run(cfg, 0)
    for scfg in cfg.strategies:
        label = scfg.label
        recs = {r.round: r for r in store.rounds(run=0, strategy=label)}
        assert sorted(recs) == [1, 2]
        wrap = [w.model_dump() for w in scfg.wrap]
        # round 1: nothing labeled yet (initial 0) -> the first-round rule, the same through both
        members = []
        for j in range(scfg.params.get("ensemble", 1)):
            m = new_model(cfg, data)
            m.load_state_dict(torch.load(checkpoint_path(tmp_path / "exp", 0, label, 1, j), weights_only=True))
            members.append(m)
        first = activelab.select(
            scfg.name, members if len(members) > 1 else members[0], data.pool, labeled=[], budget=cfg.loop.budget,
            validation=data.validation, seed=round_seed(cfg.loop.seed, 0, label, 1), wrap=wrap, **scfg.params,
        )  # fmt: skip
        if build_strategy(scfg.name, scfg.params, wrap).first_round_random:  # random with the round's generator
            np.testing.assert_array_equal(first, recs[1].selected)
            assert recs[1].info["first_round"] == "random"
        # round 2 starts from round 1's model(s) and labeled set
        picked = activelab.select(
            scfg.name, members if len(members) > 1 else members[0], data.pool, labeled=recs[1].selected,
            budget=cfg.loop.budget, validation=data.validation, seed=round_seed(cfg.loop.seed, 0, label, 2),
            batch_size=cfg.loop.query_batch_size, wrap=wrap, **scfg.params,
        )  # fmt: skip
        np.testing.assert_array_equal(picked, recs[2].selected)
    store.close()
