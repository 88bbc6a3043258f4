"""Edge cases of the query data plane: wrappers nested around strategies with their own subset, empty subsets,
unknown labels of labeled samples, subset names, wrapper order, and torch's lazily queued CUDA seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import activelab
from activelab.errors import ActivelabError
from activelab.query.context import QueryContext

from .conftest import TinyNet, make_pool


def _model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def test_subsample_around_a_strategy_with_its_own_subset_keeps_that_subset():
    """subsample(size=30) around gradnorm(subset=12): gradnorm scores 12 of the 30 (the wrappers nest; the
    base's own subset is not silently dropped), as class_balanced and stochastic already do."""
    pool = make_pool(n=60)
    _, scores = activelab.select(
        "gradnorm", _model(), pool, labeled=[59], budget=4, subset=12, seed=3, chunk_size=16,
        wrap=[("subsample", {"size": 30})], return_scores=True,
    )  # fmt: skip
    assert np.isfinite(scores).sum() == 12


def test_an_empty_labeled_set_has_rows_of_the_right_width_and_costs_no_pass():
    pool = make_pool()
    model = _model()
    ctx = QueryContext(model, pool, np.arange(10, 60), np.zeros(0, np.int64), outputs=("probs", "embeddings"))
    probs, emb, logits = ctx.probs("labeled"), ctx.embeddings("labeled"), ctx.logits("labeled")
    assert probs.shape == (0, 4) and logits.shape == (0, 4) and emb.shape == (0, 12)
    assert probs.dtype == np.float64 and emb.dtype == np.float32
    assert ctx.forward_passes == 1  # the candidates' pass (which the round needs anyway), not a pass over nothing
    ctx.probs("candidates")
    assert ctx.forward_passes == 1


def test_user_embeddings_and_pool_labels_refuse_an_unknown_subset():
    pool = make_pool()
    user = np.arange(60 * 3, dtype=np.float32).reshape(60, 3)
    ctx = QueryContext(_model(), pool, np.arange(10, 60), np.arange(10), user_embeddings=user)
    np.testing.assert_array_equal(ctx.user_embeddings("labeled"), user[:10])
    with pytest.raises(ActivelabError, match="candidates.*labeled"):
        ctx.user_embeddings("validation")
    with pytest.raises(ActivelabError, match="candidates.*labeled"):
        ctx.pool_labels("validation")


def test_unknown_labels_of_labeled_samples_are_a_clear_error():
    """The pool's y is ignored for unlabeled samples only: a labeled sample with y = -1 (unknown) is an error
    that says so, not a numpy ValueError from deep inside a strategy."""
    pool = make_pool()
    targets = pool.targets.copy()
    targets[:] = -1
    with pytest.raises(ActivelabError, match=r"labeled samples.*-1"):
        activelab.select(
            "margin", _model(), pool.with_labels(targets), labeled=[1, 2], budget=4, wrap=["class_balanced"]
        )
    targets[:] = 9  # beyond the model's 4 classes
    with pytest.raises(ActivelabError, match=r"labeled samples.*\[0, 4\)"):
        activelab.select(
            "margin", _model(), pool.with_labels(targets), labeled=[1, 2], budget=4, wrap=["class_balanced"]
        )


def test_stochastic_around_a_wrapper_says_which_order_works():
    pool = make_pool()
    with pytest.raises(ActivelabError, match=r"list 'stochastic' before"):
        activelab.select("margin", _model(), pool, labeled=[1], budget=4,
                         wrap=[("subsample", {"size": 30}), ("stochastic", {"mode": "rank"})])  # fmt: skip
    out = activelab.select("margin", _model(), pool, labeled=[1], budget=4,
                           wrap=[("stochastic", {"mode": "rank"}), ("subsample", {"size": 30})])  # fmt: skip
    assert len(set(out.tolist())) == 4


def test_a_too_small_subsample_names_the_wrappers_size():
    with pytest.raises(ActivelabError, match=r"subsample size=3 is smaller than the budget 4"):
        activelab.select("margin", _model(), make_pool(), labeled=[1], budget=4, wrap=[("subsample", {"size": 3})])
    with pytest.raises(ActivelabError, match=r"subset=3 is smaller than the budget 4"):
        activelab.select("gradnorm", _model(), make_pool(), labeled=[1], budget=4, subset=3)


def test_select_on_cpu_leaves_a_queued_cuda_seed_alone():
    """Before CUDA is initialised, torch.manual_seed queues the CUDA seed for later; select must not replace
    the user's queued seed with its round seed (the user's later CUDA work would silently change)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is already initialised: nothing is queued")
    tracker = torch.cuda._lazy_seed_tracker
    pool, models = make_pool(), [_model(), _model()]
    torch.manual_seed(7)
    before = list(tracker.get_calls())
    activelab.select("margin", models[0], pool, labeled=[0], budget=3)
    activelab.select("vaal", models[1], pool, labeled=[0], budget=3, iterations=2, batch_size=8, width=8, hidden=16)
    assert tracker.get_calls() == before


def test_class_balanced_scores_every_pick_even_of_a_class_taken_whole():
    """A predicted class whose quota takes all its candidates is picked whole; its scores are still recorded,
    so return_scores never shows NaN for a returned sample of a scoring strategy."""
    pool, labeled = make_pool(), np.arange(0, 60, 5)
    model = _model()
    unl = np.setdiff1d(np.arange(60), labeled)
    x, _ = pool.batch(unl)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1).numpy()
    counts = np.bincount(pred, minlength=4)
    budget = int(counts[counts > 0].min()) * int((counts > 0).sum())  # the smallest class is taken whole
    assert budget < len(unl)
    idx, scores = activelab.select(
        "margin", model, pool, labeled=labeled, budget=budget, wrap=["class_balanced"], return_scores=True
    )
    assert np.all(np.isfinite(scores[idx]))


@pytest.mark.parametrize("wrap", [["class_balanced"], [("subsample", {"size": 30}), "class_balanced"]])
def test_the_oracle_ledger_spans_wrappers(wrap):
    """galaxy asks inside each class's child context: the asked samples are exactly the returned ones, and
    the round notes count them once."""
    from activelab.query.engine import RoundSeed, run_query
    from activelab.strategies.wrappers import build_strategy

    pool, labeled, asked = make_pool(), np.arange(0, 60, 5), []

    def oracle(idx):
        asked.append(idx.copy())
        return pool.targets[idx]

    out = run_query(
        build_strategy("galaxy", {}, wrap), _model(), pool, labeled, 8, RoundSeed.from_int(0), oracle=oracle
    )
    assert sorted(np.concatenate(asked).tolist()) == sorted(out.indices.tolist())
    assert out.info["oracle_asked"] == 8 and sorted(out.asked.tolist()) == sorted(out.indices.tolist())
