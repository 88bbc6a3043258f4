"""Property-based tests (hypothesis): the config loader and the biased-pool builders, for any input."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activelab.config import ConfigError, ExperimentConfig, parse_config, parse_yaml
from activelab.data.bias import Bias, biased_pool_indices, long_tail_counts
from activelab.data.splits import carve_validation

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STRATEGY_NAMES = ["random", "entropy", "margin", "least_confidence", "coreset", "badge"]

configs = st.fixed_dictionaries(
    {
        "name": st.text("abcxyz_-", min_size=1, max_size=8),
        "dataset": st.fixed_dictionaries({"name": st.sampled_from(["digits", "mnist", "cifar10"])}),
        "model": st.fixed_dictionaries({"name": st.sampled_from(["digits_cnn", "lenet", "resnet18"])}),
        "train": st.fixed_dictionaries(
            {
                "optimizer": st.sampled_from(["sgd", "adam"]),
                "lr": st.floats(1e-5, 1.0),
                "epochs": st.integers(1, 200),
                "batch_size": st.integers(1, 512),
            }
        ),
        "loop": st.fixed_dictionaries(
            {
                "budget": st.integers(1, 10_000),
                "rounds": st.integers(1, 50),
                "runs": st.integers(1, 10),
                "seed": st.integers(0, 2**31),
                "initial": st.integers(0, 1000),
            }
        ),
        "strategies": st.lists(st.sampled_from(STRATEGY_NAMES), min_size=1, max_size=4, unique=True).map(
            lambda names: [{"name": n} for n in names]
        ),
    }
)


@SETTINGS
@given(configs)
def test_config_round_trips_through_yaml(data):
    cfg = parse_config(data)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    again = parse_config(parse_yaml(text))
    assert again == cfg and again.fingerprint() == cfg.fingerprint()


SECTIONS = ["", "train", "loop", "model", "dataset"]


@SETTINGS
@given(configs, st.sampled_from(SECTIONS), st.text("qwjkv", min_size=3, max_size=8))
def test_unknown_keys_are_rejected_anywhere(data, section, key):
    target = data if not section else data[section]
    model = ExperimentConfig if not section else ExperimentConfig.model_fields[section].annotation
    if key in getattr(model, "model_fields", {}):
        return
    target[key] = 1
    with pytest.raises(ConfigError, match=rf"{key}: unknown key; valid keys here"):
        parse_config(data)


@SETTINGS
@given(configs, st.sampled_from(["train", "loop", "model"]), st.data())
def test_duplicate_keys_are_rejected_with_their_lines(data, section, draw):
    lines = yaml.safe_dump(data, sort_keys=False).splitlines()
    if draw.draw(st.booleans()):  # a repeated section
        extra = yaml.safe_dump({section: data[section]}, sort_keys=False).splitlines()
        key = section
    else:  # a repeated key inside a section
        key = draw.draw(st.sampled_from(sorted(data[section])))
        start = lines.index(f"{section}:")
        extra = []
        lines.insert(start + 1, f"  {key}: {yaml.safe_dump(data[section][key]).splitlines()[0]}")
    text = "\n".join(lines + extra) + "\n"
    with pytest.raises(ConfigError, match=rf"key '{key}' appears twice in one mapping \(line \d+ and line \d+\)"):
        parse_yaml(text)


# --- bias builders -------------------------------------------------------------------------------------------

class_counts = st.lists(st.integers(8, 60), min_size=2, max_size=7)


def _labels(counts: list[int], seed: int) -> np.ndarray:
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


@SETTINGS
@given(class_counts, st.floats(1.0, 40.0), st.integers(0, 2**32 - 1), st.integers(0, 4))
def test_step_random_classes_long_tail_counts_are_exact_and_disjoint_from_validation(counts, ratio, seed, per_class):
    labels = _labels(counts, seed)
    val, rest = carve_validation(labels, per_class, np.random.default_rng(seed))
    avail = np.bincount(labels[rest], minlength=len(counts))
    classes = np.arange(len(counts))
    for kind in ("step", "random_classes", "long_tail"):
        chosen = biased_pool_indices(labels[rest], Bias(kind=kind, ratio=ratio), np.random.default_rng(seed))
        pool = rest[chosen]
        assert len(np.unique(pool)) == len(pool) and not np.intersect1d(pool, val).size
        got = np.bincount(labels[pool], minlength=len(counts))
        if kind == "step":
            minority = classes[(len(classes) + 1) // 2 :]
            major = np.setdiff1d(classes, minority)
            assert np.array_equal(got[major], avail[major])
            assert got[minority].sum() == min(int(avail[major].sum() / ratio), avail[minority].sum())
        elif kind == "random_classes":
            reduced = got != avail
            assert reduced.sum() <= len(classes) // 2
            for c in classes:
                assert got[c] in (avail[c], int(avail[c] / ratio))
        else:
            assert got.tolist() == long_tail_counts(len(classes), int(avail.min()), ratio)


@SETTINGS
@given(class_counts, st.integers(0, 2**32 - 1), st.data())
def test_counts_kind_is_exact(counts, seed, draw):
    labels = _labels(counts, seed)
    wanted = {c: draw.draw(st.integers(0, n)) for c, n in enumerate(counts) if draw.draw(st.booleans())}
    if not wanted:
        wanted = {0: counts[0]}
    chosen = biased_pool_indices(labels, Bias(kind="counts", counts=wanted), np.random.default_rng(seed))
    got = np.bincount(labels[chosen], minlength=len(counts))
    assert {c: int(got[c]) for c in wanted} == wanted and got.sum() == sum(wanted.values())
