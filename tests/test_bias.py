"""Validation splits, class restriction and biased pools: exact documented counts, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from activelab.config import BiasConfig
from activelab.data.arrays import ArrayDataset
from activelab.data.bias import (
    biased_pool_indices,
    long_tail_counts,
    minority_classes,
    pool_class_counts,
)
from activelab.data.sources import load_split
from activelab.data.splits import ClassSubset, carve_validation, restrict_classes
from activelab.errors import ActivelabError


def make_labels(counts: list[int], seed: int = 0) -> np.ndarray:
    """Shuffled labels with ``counts[c]`` samples of class ``c``."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


def class_counts(labels: np.ndarray, idx: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels[idx], minlength=num_classes).tolist()


def draw(labels, seed=0, **cfg) -> np.ndarray:
    idx = biased_pool_indices(labels, BiasConfig(**cfg), np.random.default_rng(seed))
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0), "indices must be sorted and unique"
    assert idx.size == 0 or (idx[0] >= 0 and idx[-1] < len(labels))
    return idx


# --- carve_validation -----------------------------------------------------------------------------


def test_carve_validation_exact_per_class_disjoint_sorted():
    labels = make_labels([30, 12, 25, 40])
    val, rest = carve_validation(labels, 10, np.random.default_rng(0))
    assert class_counts(labels, val, 4) == [10, 10, 10, 10]
    assert class_counts(labels, rest, 4) == [20, 2, 15, 30]
    assert np.all(np.diff(val) > 0) and np.all(np.diff(rest) > 0)
    assert np.intersect1d(val, rest).size == 0 and len(val) + len(rest) == len(labels)
    val2, _ = carve_validation(labels, 10, np.random.default_rng(0))
    val3, _ = carve_validation(labels, 10, np.random.default_rng(1))
    assert np.array_equal(val, val2) and not np.array_equal(val, val3)
    empty, everything = carve_validation(labels, 0, np.random.default_rng(0))
    assert empty.size == 0 and np.array_equal(everything, np.arange(len(labels)))


def test_carve_validation_errors_name_the_class():
    labels = make_labels([30, 7, 25])
    with pytest.raises(ActivelabError, match="class 1 has 7.*at most 7"):
        carve_validation(labels, 10, np.random.default_rng(0))
    with pytest.raises(ActivelabError, match="1-d"):
        carve_validation(labels.reshape(2, -1), 1, np.random.default_rng(0))
    with pytest.raises(ActivelabError, match="non-negative integers"):
        carve_validation(labels.astype(float), 1, np.random.default_rng(0))


# --- bias kinds on synthetic labels ---------------------------------------------------------------


def test_none_keeps_all_or_subsamples():
    labels = make_labels([10, 20, 30])
    assert np.array_equal(draw(labels), np.arange(60))
    sub = draw(labels, pool_size=17)
    assert len(sub) == 17 and np.array_equal(sub, draw(labels, pool_size=17))
    assert not np.array_equal(sub, draw(labels, seed=1, pool_size=17))
    with pytest.raises(ActivelabError, match="pool_size 61 exceeds the 60"):
        draw(labels, pool_size=61)


def test_step_fk_fashion_mnist_example():
    # Fashion-MNIST train (6,000 per class) minus 1,000 per class for validation, r = 100: 25,000 + 250
    labels = make_labels([5000] * 10)
    idx = draw(labels, kind="step", ratio=100)
    counts = class_counts(labels, idx, 10)
    assert counts[:5] == [5000] * 5 and sum(counts[5:]) == 250 and len(idx) == 25250
    assert len(set(counts[5:])) > 1  # drawn jointly from the union, not 50 per class


def test_step_samples_the_minority_union_uniformly():
    # class 5 holds half of the minority images, so a joint uniform draw gives it half of the minority slots;
    # a per-class draw would give it a fifth
    labels = make_labels([400] * 5 + [1000, 250, 250, 250, 250])
    shares = []
    for seed in range(200):
        counts = class_counts(labels, draw(labels, seed=seed, kind="step", ratio=80), 10)
        assert counts[:5] == [400] * 5 and sum(counts[5:]) == 25  # int(2000 / 80)
        shares.append(counts[5] / 25)
    assert abs(np.mean(shares) - 0.5) < 0.05


def test_step_custom_minority_odd_classes_and_cap():
    labels = make_labels([100, 200, 300, 400])
    counts = class_counts(labels, draw(labels, kind="step", ratio=10, minority=[1, 3]), 4)
    assert counts[0] == 100 and counts[2] == 300 and counts[1] + counts[3] == 40
    odd = make_labels([90, 90, 90])  # default minority is the upper half: class 2 of 0..2
    counts = class_counts(odd, draw(odd, kind="step", ratio=9), 3)
    assert counts == [90, 90, 20]
    # r = 1 asks for as many minority images as majority ones: capped at what exists, i.e. everything
    assert len(draw(make_labels([50] * 4), kind="step", ratio=1)) == 200
    capped = make_labels([100, 100, 30, 30])
    assert class_counts(capped, draw(capped, kind="step", ratio=2), 4) == [100, 100, 30, 30]


def test_step_errors():
    labels = make_labels([10, 10, 10, 10])
    with pytest.raises(ActivelabError, match=r"minority classes \[7\] have no training images"):
        draw(labels, kind="step", ratio=2, minority=[1, 7])
    with pytest.raises(ActivelabError, match="both majority and minority"):
        draw(labels, kind="step", ratio=2, minority=[0, 1, 2, 3])


def test_random_classes_each_class_separately():
    sizes = [100, 110, 120, 130, 140, 150, 160, 170, 180, 190]
    labels = make_labels(sizes)
    reduced_sets = set()
    for seed in range(6):
        counts = class_counts(labels, draw(labels, seed=seed, kind="random_classes", ratio=7), 10)
        reduced = [c for c in range(10) if counts[c] < sizes[c]]
        assert len(reduced) == 5
        for c in range(10):
            assert counts[c] == (int(sizes[c] / 7) if c in reduced else sizes[c])
        reduced_sets.add(tuple(reduced))
    assert len(reduced_sets) > 1  # the reduced half is drawn from the seed


def test_long_tail_profile():
    assert long_tail_counts(3, 100, 10) == [100, 31, 10]  # 100 / sqrt(10) = 31.6
    assert long_tail_counts(1, 7, 10) == [7]
    labels = make_labels([1200, 1000, 1100, 1300, 1050, 1000, 1000, 1400, 1000, 1000])
    counts = class_counts(labels, draw(labels, kind="long_tail", ratio=100), 10)
    expected = [int(1000 * 100 ** (-k / 9)) for k in range(10)]
    assert counts == expected and counts[0] == 1000 and counts[-1] == 10
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


def test_counts_exact_and_unlisted_dropped():
    labels = make_labels([6000] * 6)
    idx = draw(labels, kind="counts", counts={0: 250, 1: 5000, 2: 250, 3: 250})
    assert class_counts(labels, idx, 6) == [250, 5000, 250, 250, 0, 0]
    with pytest.raises(ActivelabError, match="7000 images of class 1 but only 6000"):
        draw(labels, kind="counts", counts={0: 1, 1: 7000})
    with pytest.raises(ActivelabError, match="class 9 but only 0"):
        draw(labels, kind="counts", counts={9: 1})


def test_unread_fields_are_errors():
    labels = make_labels([10, 10])
    with pytest.raises(ActivelabError, match="pool_size is only read by bias kind 'none'"):
        draw(labels, kind="step", ratio=2, pool_size=5)
    with pytest.raises(ActivelabError, match="minority is only read by bias kind 'step'"):
        draw(labels, kind="long_tail", ratio=2, minority=[1])
    with pytest.raises(ActivelabError, match="ratio is not read by bias kind 'none'"):
        draw(labels, ratio=3)


@pytest.mark.parametrize(
    "cfg",
    [
        {"pool_size": 300},
        {"kind": "step", "ratio": 10},
        {"kind": "random_classes", "ratio": 3},
        {"kind": "long_tail", "ratio": 5},
        {"kind": "counts", "counts": {0: 40, 2: 60}},
    ],
)
def test_seeded_determinism_and_disjoint_from_validation(cfg):
    labels = make_labels([150, 160, 170, 180, 190, 200])
    runs = []
    for seed in (0, 0, 1):
        rng = np.random.default_rng(seed)
        val, rest = carve_validation(labels, 20, rng)
        pool = rest[biased_pool_indices(labels[rest], BiasConfig(**cfg), rng)]
        assert np.intersect1d(val, pool).size == 0
        runs.append((val, pool))
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][1], runs[2][1])


# --- on the real digits labels --------------------------------------------------------------------


def test_on_digits_labels():
    train = load_split("digits", "train")
    labels = train.targets
    rng = np.random.default_rng(0)
    val, rest = carve_validation(labels, 20, rng)
    assert class_counts(labels, val, 10) == [20] * 10
    rest_counts = np.bincount(labels[rest], minlength=10)
    pool = rest[biased_pool_indices(labels[rest], BiasConfig(kind="step", ratio=10), rng)]
    counts = class_counts(labels, pool, 10)
    majority = int(rest_counts[:5].sum())
    assert counts[:5] == rest_counts[:5].tolist() and sum(counts[5:]) == int(majority / 10)
    assert minority_classes(pool_class_counts(labels, pool)) == [5, 6, 7, 8, 9]
    # FisherMask-style: restrict to classes 0-3, then exact counts
    four = restrict_classes(train, [0, 1, 2, 3])
    idx = biased_pool_indices(four.targets, BiasConfig(kind="counts", counts={0: 10, 1: 100, 2: 10, 3: 10}), rng)
    assert class_counts(four.targets, idx, 4) == [10, 100, 10, 10]
    assert minority_classes(pool_class_counts(four.targets, idx)) == [0, 2, 3]
    tail = biased_pool_indices(labels[rest], BiasConfig(kind="long_tail", ratio=10), rng)
    n_min = int(rest_counts.min())
    assert class_counts(labels[rest], tail, 10) == [int(n_min * 10 ** (-k / 9)) for k in range(10)]


# --- counts helpers -------------------------------------------------------------------------------


def test_pool_class_counts_and_minority_classes():
    labels = np.array([0, 0, 1, 2, 2, 2, 3])
    assert pool_class_counts(labels, np.array([0, 1, 3, 4])) == {0: 2, 1: 0, 2: 2, 3: 0}
    assert pool_class_counts(labels, np.array([6]), num_classes=5) == {0: 0, 1: 0, 2: 0, 3: 1, 4: 0}
    assert minority_classes({0: 100, 1: 49, 2: 50, 3: 80}) == [1]  # 50 is exactly half: not minority
    assert minority_classes({0: 10, 1: 10, 2: 9}) == []
    assert minority_classes({}) == []
    assert minority_classes({0: 5, 1: 0}) == [1]


# --- restrict_classes -----------------------------------------------------------------------------


def test_restrict_classes_array_dataset():
    x = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    ds = ArrayDataset(x, [0, 1, 2, 3, 1, 3], mean=[0.5], std=[0.2], classes=list("abcd"), name="toy")
    sub = restrict_classes(ds, [3, 1])
    assert isinstance(sub, ArrayDataset) and sub.name == "toy" and sub.classes == ["d", "b"]
    assert sub.targets.tolist() == [1, 0, 1, 0]  # samples 1, 3, 4, 5 in order; 3 -> 0, 1 -> 1
    assert sub.x[:, 0, 0, 0].tolist() == [1, 3, 4, 5]
    assert sub.mean.tolist() == pytest.approx([0.5]) and sub.std.tolist() == pytest.approx([0.2])
    with pytest.raises(ActivelabError, match=r"\[4\] do not exist.*classes 0..3"):
        restrict_classes(ds, [1, 4])
    with pytest.raises(ActivelabError, match="twice"):
        restrict_classes(ds, [1, 1])
    with pytest.raises(ActivelabError, match="empty"):
        restrict_classes(ds, [])


class FolderLike(Dataset):
    """A dataset that is not an ArrayDataset (like an ImageFolder): items loaded one by one."""

    def __init__(self) -> None:
        self.targets = [2, 0, 1, 2, 0]
        self.classes = ["x", "y", "z"]
        self.mean = [0.1]

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i):
        return torch.full((1, 2, 2), float(i)), self.targets[i]


def test_restrict_classes_generic_dataset():
    sub = restrict_classes(FolderLike(), [2, 0])
    assert isinstance(sub, ClassSubset) and len(sub) == 4
    assert sub.classes == ["z", "x"] and sub.targets.tolist() == [0, 1, 0, 1]
    x, y = sub[2]
    assert float(x[0, 0, 0]) == 3.0 and y == 0  # parent sample 3 (class 2 -> 0)
    assert sub.mean == [0.1] and sub.num_classes == 2
