"""Sharded selection: the exact path picks what the single-process path picks (score strategies), shards given
as Datasets, files, or a Ray Dataset, scored in turn or by Ray tasks; the two-stage path for diverse strategies
reduces to the single process when every sample is a candidate, and otherwise picks among the prefiltered."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import activelab
from activelab.data.arrays import ArrayDataset
from activelab.distributed import load_shard, select_sharded
from activelab.distributed.sharded import shard_scores, top_k
from activelab.errors import ActivelabError

from .conftest import TinyNet, make_pool

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'activelab[ray]')"
)

N_LABELED, SIZES = 30, (200, 150, 250)


@pytest.fixture(scope="module")
def setup():
    """A pool = labeled (first 30) + three unlabeled shards; a briefly trained TinyNet."""
    pool = make_pool(N_LABELED + sum(SIZES), seed=3)
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        x, y = pool.batch(np.arange(N_LABELED))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    offsets = N_LABELED + np.concatenate([[0], np.cumsum(SIZES)[:-1]])
    shards = [pool.subset(np.arange(o, o + s)) for o, s in zip(offsets, SIZES)]
    return pool, model, shards, offsets


def _global(ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return offsets[ids[:, 0]] + ids[:, 1]


def _single(name, pool, model, budget, **params):
    picked, scores = activelab.select(
        name, model, pool, labeled=np.arange(N_LABELED), budget=budget, return_scores=True, **params
    )
    return picked, scores


@pytest.mark.parametrize(
    "name,params", [("entropy", {}), ("margin", {}), ("least_confidence", {}), ("gradnorm", {"subset": None})]
)
def test_exact_path_equals_single_process(setup, name, params):
    pool, model, shards, offsets = setup
    budget = 25
    expected, scores = _single(name, pool, model, budget, **params)
    got = select_sharded(name, model, shards, budget, executor="local", **params)
    assert got.info["path"] == "exact top-k"
    np.testing.assert_array_equal(np.sort(_global(got.ids, offsets)), np.sort(expected))
    # in decreasing score order, the scores the single process gave those samples
    np.testing.assert_allclose(got.scores, scores[_global(got.ids, offsets)], rtol=1e-12)
    assert np.all(np.diff(got.scores) <= 0)


def test_entropy_scores_of_a_shard_by_hand(setup):
    """Independent check of the per-shard scores: entropy of the softmax computed here."""
    _, model, shards, _ = setup
    with torch.no_grad():
        p = torch.softmax(model(shards[1].batch(np.arange(len(shards[1])))[0]).double(), 1).numpy()
    by_hand = -(p * np.log(p)).sum(1)
    np.testing.assert_allclose(shard_scores("entropy", {}, model, shards[1], seed=0), by_hand, rtol=1e-9)


def test_top_k_breaks_ties_by_shard_then_index():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0, np.nan])
    ids = np.array([[0, 0], [1, 4], [0, 7], [0, 1], [1, 2], [2, 0]])
    np.testing.assert_array_equal(top_k(scores, ids, 3), [2, 4, 1])
    np.testing.assert_array_equal(top_k(scores, ids, 5), [2, 4, 1, 3, 0])  # NaN never picked


def test_shard_files(setup, tmp_path):
    """Shards as .npz, .pt (dict and Dataset) files: the same picks as the Datasets themselves."""
    _, model, shards, _ = setup
    x0, _ = shards[0].batch(np.arange(len(shards[0])))
    np.savez(tmp_path / "s0.npz", x=x0.numpy())
    x1, _ = shards[1].batch(np.arange(len(shards[1])))
    torch.save({"x": x1}, tmp_path / "s1.pt")
    torch.save(shards[2], tmp_path / "s2.pt")
    files = [tmp_path / "s0.npz", str(tmp_path / "s1.pt"), tmp_path / "s2.pt"]
    assert len(load_shard(files[0])) == SIZES[0]
    a = select_sharded("margin", model, shards, 20, executor="local")
    b = select_sharded("margin", model, files, 20, executor="local")
    np.testing.assert_array_equal(a.ids, b.ids)
    with pytest.raises(ActivelabError, match="not found"):
        select_sharded("margin", model, [tmp_path / "missing.npz"], 5, executor="local")


def test_two_stage_with_every_sample_a_candidate_equals_single_process(setup):
    """With per_shard >= each shard, stage 2 sees the whole pool in order: core-set's picks are the single
    process's (labeled_data as the labeled set)."""
    pool, model, shards, offsets = setup
    labeled = pool.subset(np.arange(N_LABELED))
    expected = activelab.select("coreset", model, pool, labeled=np.arange(N_LABELED), budget=15, seed=4)
    got = select_sharded(
        "coreset",
        model,
        shards,
        15,
        executor="local",
        labeled_data=labeled,
        prefilter="random",
        per_shard=10**6,
        seed=4,
    )
    assert got.info["path"] == "two-stage" and got.info["candidates"] == sum(SIZES)
    np.testing.assert_array_equal(_global(got.ids, offsets), expected)


def test_two_stage_picks_among_each_shards_prefiltered(setup):
    pool, model, shards, offsets = setup
    got = select_sharded("badge", model, shards, 12, executor="local", prefilter="margin", per_shard=20)
    assert got.info["candidates"] == 60 and len(np.unique(got.ids, axis=0)) == 12
    for s, shard in enumerate(shards):
        margin = shard_scores("margin", {}, model, shard, seed=0)
        top20 = set(np.argsort(-margin, kind="stable")[:20].tolist())
        assert set(got.ids[got.ids[:, 0] == s, 1].tolist()) <= top20


def test_bad_inputs_are_clear_errors(setup):
    _, model, shards, _ = setup
    with pytest.raises(ActivelabError, match="larger than"):
        select_sharded("entropy", model, shards, 10**6, executor="local")
    with pytest.raises(ActivelabError, match="prefilter must be a score strategy"):
        select_sharded("coreset", model, shards, 5, executor="local", prefilter="kcenter")
    with pytest.raises(ActivelabError, match="executor"):
        select_sharded("entropy", model, shards, 5, executor="dask")


def test_without_ray_the_ray_executor_says_how_to_install(setup, monkeypatch):
    import sys

    _, model, shards, _ = setup
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ActivelabError, match=r"pip install 'activelab\[ray\]'"):
        select_sharded("entropy", model, shards, 5, executor="ray")


@needs_ray
def test_ray_tasks_give_the_single_process_picks(setup, ray_cluster):
    pool, model, shards, offsets = setup
    expected, _ = _single("entropy", pool, model, 25)
    got = select_sharded("entropy", model, shards, 25, executor="ray")
    np.testing.assert_array_equal(np.sort(_global(got.ids, offsets)), np.sort(expected))
    two = select_sharded("coreset", model, shards, 10, executor="ray", per_shard=30)
    local = select_sharded("coreset", model, shards, 10, executor="local", per_shard=30)
    np.testing.assert_array_equal(two.ids, local.ids)


def _ray_data_missing() -> bool:
    return any(importlib.util.find_spec(m) is None for m in ("pandas", "pyarrow"))


@needs_ray
@pytest.mark.skipif(_ray_data_missing(), reason="Ray Data needs pandas and pyarrow (pip install 'ray[data]')")
def test_ray_dataset_pool(setup, ray_cluster):
    """A Ray Dataset with an x column, split into shards by Ray: the picked scores are the single process's
    top scores (ids are (split, row within the split))."""
    import ray

    pool, model, shards, _ = setup
    unlabeled = np.arange(N_LABELED, len(pool))
    x = pool.batch(unlabeled)[0].numpy()
    ds = ray.data.from_items([{"x": row} for row in x])
    got = select_sharded("entropy", model, ds, 25, executor="ray", num_shards=2)
    _, scores = _single("entropy", pool, model, 25)
    np.testing.assert_allclose(got.scores, np.sort(scores[unlabeled])[::-1][:25], rtol=1e-9)
    assert got.info["shards"] == 2
    assert isinstance(load_shard(ArrayDataset(torch.zeros(2, 1, 2, 2), [0, 1])), ArrayDataset)
