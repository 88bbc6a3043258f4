"""Fisher information on the weights: diagonal Fisher, FISH mask, masked and closed-form Fisher embeddings.

Every batched quantity is checked against a per-sample, per-class autograd loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from activelab.errors import ActivelabError
from activelab.inference.fisher import (
    FisherMask,
    diagonal_fisher,
    fisher_mask,
    last_layer_fisher_embeddings,
    mask_size,
    masked_fisher_embeddings,
    masked_fisher_gram,
)
from activelab.inference.forward import forward_pass

from .conftest import AWKWARD_MODELS, TinyNet, make_pool, randomise_batchnorm


def _model() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # larger logits so that p is far from uniform and the sqrt(p) weighting matters
        model.fc2.weight.mul_(4.0)
    return model.eval()


def _loop_grads(model: nn.Module, pool, indices: np.ndarray):
    """Per-sample, per-class d log p(c|x) / d theta by autograd, one backward pass at a time.

    Returns ({name: (N, C, *shape)}, p (N, C)) as float64."""
    params = dict(model.named_parameters())
    out = {n: [] for n in params}
    probs = []
    for i in indices:
        x, _ = pool.batch(np.asarray([i]))
        lp = torch.log_softmax(model(x), dim=1)[0]
        probs.append(lp.exp().detach().double())
        per_class = {n: [] for n in params}
        for c in range(len(lp)):
            grads = torch.autograd.grad(
                lp[c], list(params.values()), retain_graph=True, allow_unused=True, materialize_grads=True
            )
            for n, g in zip(params, grads, strict=True):
                per_class[n].append(g.double())
        for n in params:
            out[n].append(torch.stack(per_class[n]))
    return {n: torch.stack(v) for n, v in out.items()}, torch.stack(probs)


def test_diagonal_fisher_matches_a_loop():
    model, pool = _model(), make_pool(n=12)
    idx = np.array([7, 2, 11, 0, 5])
    fisher = diagonal_fisher(model, pool, idx, chunk_size=2)
    grads, p = _loop_grads(model, pool, idx)
    for name, g in grads.items():
        expected = torch.einsum("nc,nc...->...", p, g * g)
        torch.testing.assert_close(fisher[name], expected, rtol=1e-5, atol=1e-9)
    assert list(fisher) == [n for n, _ in model.named_parameters()]


def _hand_mask(model: TinyNet) -> FisherMask:
    """A mask over three tensors, with unsorted picks in the middle of each."""
    return FisherMask(
        names=("conv1.weight", "fc1.bias", "fc2.weight"),
        indices=(torch.tensor([3, 17, 30]), torch.tensor([0, 5, 11]), torch.arange(model.fc2.weight.numel())),
        classifier_weight="fc2.weight",
        last_layer_only=False,
    )


@pytest.mark.parametrize("method", ["signals", "jacobian"])
@pytest.mark.parametrize("weighting", ["sqrt_p", "none"])
def test_masked_fisher_embeddings_match_a_loop(weighting, method):
    model, pool = _model(), make_pool(n=12)
    idx = np.array([4, 9, 1, 10])
    mask = _hand_mask(model)
    v = masked_fisher_embeddings(model, pool, idx, mask, weighting, chunk_size=3, method=method)
    grads, p = _loop_grads(model, pool, idx)
    cols = [grads[n].flatten(2)[:, :, i] for n, i in zip(mask.names, mask.indices, strict=True)]
    expected = torch.cat(cols, dim=2)
    if weighting == "sqrt_p":
        expected = expected * p.sqrt().unsqueeze(2)
    assert v.shape == (4, 4, mask.size) and v.dtype == np.float32
    np.testing.assert_allclose(v, expected.numpy(), rtol=1e-4, atol=1e-6)
    # V_x^T V_x summed over the set is the Gram that masked_fisher_gram streams
    gram = masked_fisher_gram(model, pool, idx, mask, weighting, chunk_size=3, method=method)
    rows = expected.reshape(-1, mask.size).numpy()
    np.testing.assert_allclose(gram, rows.T @ rows, rtol=1e-4, atol=1e-7)


class _Odd(nn.Module):
    """Every case the signal method must handle or hand over: a strided, dilated conv with BatchNorm (eval mode,
    non-trivial running statistics), a grouped conv and a conv called twice (both differentiated directly), a
    linear layer mapped over an extra dimension, and a BatchNorm1d."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.shared = nn.Conv2d(4, 4, 1)
        self.rows = nn.Linear(4, 3)
        self.bn1 = nn.BatchNorm1d(12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.shared(torch.relu(self.shared(self.grouped(x)))))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (B, 4 positions, 4)
        x = torch.tanh(self.rows(x)).flatten(1)  # (B, 12)
        return self.fc(self.bn1(x))


@pytest.mark.parametrize("vectorise", [True, False], ids=["vectorised", "one class at a time"])
def test_signal_method_covers_batchnorm_grouped_shared_and_mapped_layers(vectorise, monkeypatch):
    """Both ways of the signal method (one backward pass vectorised over the classes, or one per class into
    kept tensors), with the fallback's Jacobian in the same output, against the loop."""
    import activelab.inference.fisher as fisher

    monkeypatch.setattr(fisher, "_vectorise_classes", lambda model, signal_bytes: vectorise)
    torch.manual_seed(0)
    model = _Odd()
    randomise_batchnorm(model.bn, model.bn1)
    model.eval()
    pool = make_pool(n=8)
    idx = np.array([5, 0, 7])
    params = dict(model.named_parameters())
    rng = np.random.default_rng(0)
    names = tuple(params)
    indices = tuple(
        torch.as_tensor(np.sort(rng.choice(params[n].numel(), min(5, params[n].numel()), replace=False))) for n in names
    )
    mask = FisherMask(names, indices, "fc.weight", False)
    signals = masked_fisher_embeddings(model, pool, idx, mask, method="signals")
    jacobian = masked_fisher_embeddings(model, pool, idx, mask, method="jacobian")
    grads, p = _loop_grads(model, pool, idx)
    cols = [grads[n].flatten(2)[:, :, i] for n, i in zip(names, indices, strict=True)]
    expected = (torch.cat(cols, dim=2) * p.sqrt().unsqueeze(2)).numpy()
    np.testing.assert_allclose(signals, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(jacobian, expected, rtol=1e-4, atol=1e-6)


def test_sqrt_p_weighted_embeddings_give_the_diagonal_fisher():
    """With the mask = every entry, the diagonal of sum_x V_x^T V_x is the diagonal Fisher."""
    model, pool = _model(), make_pool(n=12)
    idx = np.arange(6)
    fisher = diagonal_fisher(model, pool, idx)
    names = tuple(n for n, _ in model.named_parameters())
    params = dict(model.named_parameters())
    mask = FisherMask(names, tuple(torch.arange(params[n].numel()) for n in names), "fc2.weight", False)
    v = masked_fisher_embeddings(model, pool, idx, mask).astype(np.float64)
    diag = np.einsum("nck,nck->k", v, v)
    np.testing.assert_allclose(diag, torch.cat([fisher[n].flatten() for n in names]).numpy(), rtol=1e-4, atol=1e-9)


def test_mask_is_last_layer_plus_top_entries_by_index():
    fisher = {
        "a.weight": torch.tensor([[1.0, 9.0, 3.0], [9.0, 0.5, 7.0]]),  # flat: 1 9 3 9 0.5 7
        "a.bias": torch.tensor([7.0, 9.0]),
        "fc.weight": torch.tensor([[0.0, 0.0], [0.0, 0.0]]),  # last layer: always in, whatever its values
        "fc.bias": torch.tensor([100.0, 7.0]),
    }
    # P = 14; pct 0.5 -> K = 7 = 4 (fc.weight) + 3 others. Global ranking of the others, concatenated in order
    # [a.weight(6), a.bias(2), fc.bias(2)]: 100 (fc.bias 0), then the three 9s at concatenated 1, 3, 7:
    # only two slots remain, so ties go to the lower indices 1 and 3 (a.weight), not a.bias[1].
    mask = fisher_mask(fisher, "fc.weight", 0.5)
    assert mask.size == 7 and not mask.last_layer_only
    got = mask.counts()
    assert got == {"a.weight": 2, "fc.weight": 4, "fc.bias": 1}
    by_name = dict(zip(mask.names, [i.tolist() for i in mask.indices], strict=True))
    assert by_name == {"a.weight": [1, 3], "fc.weight": [0, 1, 2, 3], "fc.bias": [0]}
    assert mask.names == ("a.weight", "fc.weight", "fc.bias")  # model order, only tensors with picks

    # one more slot: the next 9 (a.bias[1]) comes before the 7s
    wider = fisher_mask(fisher, "fc.weight", 0.58)  # K = floor(8.12) = 8
    assert wider.size == 8 and wider.counts()["a.bias"] == 1
    assert wider.indices[wider.names.index("a.bias")].tolist() == [1]
    # K = floor(pct P)
    assert mask_size(14, 0.5) == 7 and mask_size(14, 0.49) == 6


def test_mask_smaller_than_the_last_layer_is_the_last_layer():
    fisher = {"a.weight": torch.arange(20.0), "fc.weight": torch.ones(3, 4), "fc.bias": torch.ones(3)}
    mask = fisher_mask(fisher, "fc.weight", 0.2)  # K = floor(0.2 * 35) = 7 < 12
    assert mask.last_layer_only and mask.names == ("fc.weight",) and mask.size == 12
    assert mask.indices[0].tolist() == list(range(12))


def test_mask_errors():
    fisher = {"a.weight": torch.ones(3), "fc.weight": torch.ones(2)}
    with pytest.raises(ActivelabError, match="classifier weight"):
        fisher_mask(fisher, "nope.weight", 0.5)
    with pytest.raises(ActivelabError, match="pct"):
        fisher_mask(fisher, "fc.weight", 0.0)
    with pytest.raises(ActivelabError, match="NaN"):
        fisher_mask({"a.weight": torch.tensor([1.0, float("nan"), 2.0]), "fc.weight": torch.ones(1)}, "fc.weight", 1.0)


@pytest.mark.parametrize("weighting", ["sqrt_p", "none"])
@pytest.mark.parametrize("include_bias", [False, True])
def test_closed_form_last_layer_embeddings_equal_autograd(weighting, include_bias):
    model, pool = _model(), make_pool(n=12)
    idx = np.array([3, 8, 0, 6, 11])
    out = forward_pass(model, pool, idx, embeddings=True)
    probs = torch.softmax(torch.as_tensor(out.logits, dtype=torch.float64), 1).numpy()
    v = last_layer_fisher_embeddings(probs, out.embeddings, weighting, include_bias, dtype=np.float64)
    names = ("fc2.weight", "fc2.bias") if include_bias else ("fc2.weight",)
    params = dict(model.named_parameters())
    mask = FisherMask(names, tuple(torch.arange(params[n].numel()) for n in names), "fc2.weight", True)
    expected = masked_fisher_embeddings(model, pool, idx, mask, weighting)
    assert v.shape == expected.shape == (5, 4, 4 * 12 + (4 if include_bias else 0))
    np.testing.assert_allclose(v, expected, rtol=1e-4, atol=1e-6)


def test_bad_weighting_is_an_error():
    with pytest.raises(ActivelabError, match="weighting"):
        last_layer_fisher_embeddings(np.full((2, 2), 0.5), np.ones((2, 3)), weighting="p")


_DIAGONAL = (torch.arange(6), torch.tensor([4, 0, 7, 1, 9, 3]))  # 6 pairs in 6 rows x 6 cols: the per-row path


@pytest.mark.parametrize("positions", [7, 1, 70])  # a convolution's output positions; 1: a linear layer
@pytest.mark.parametrize("pairs", ["diagonal", "block", "whole", "random", "skewed"])
def test_gathered_products_equal_an_einsum(pairs, positions):
    """Every path of gather_products (a dense block of the wanted rows and columns then a gather, the whole
    block in order, padded row-wise products, elementwise gathers, one product per distinct row) against an
    einsum over every (row, col) pair, with and without a plan made beforehand."""
    from activelab.inference.signals import gather_products, product_plan

    n_rows, n_cols = 8, 10
    g = torch.randn(2, 3, n_rows, positions, generator=torch.Generator().manual_seed(0))  # (B, C, rows, L)
    u = torch.randn(2, n_cols, positions, generator=torch.Generator().manual_seed(1))  # (B, cols, L)
    if pairs == "diagonal":
        rows, cols = _DIAGONAL
    elif pairs == "block":  # rows {1, 5} x cols {2, 3, 8}, unsorted, one pair missing
        rows, cols = torch.tensor([5, 1, 1, 5, 1]), torch.tensor([8, 2, 3, 2, 8])
    elif pairs == "whole":
        rows, cols = torch.arange(n_rows * n_cols) // n_cols, torch.arange(n_rows * n_cols) % n_cols
    elif pairs == "skewed":  # row 2 holds every column, rows 0 and 6 one each: padding would triple the pairs
        rows, cols = torch.tensor([2] * n_cols + [0, 6]), torch.tensor(list(range(n_cols)) + [4, 9])
    else:
        flat = torch.randperm(n_rows * n_cols, generator=torch.Generator().manual_seed(2))[:30]
        rows, cols = flat // n_cols, flat % n_cols
    expected = torch.einsum("bcrl,bql->bcrq", g, u)[:, :, rows, cols]
    plan = product_plan(rows, cols, n_rows, n_cols, positions)
    paths = {
        "diagonal": "rowwise" if positions > 1 else "block",  # padded rows beat the block
        "block": "block",
        "whole": "block",
        "random": "block",
        "skewed": "block",
    }
    assert plan.path == paths[pairs]
    if pairs == "diagonal" and positions == 70:  # signals without unit stride along 70 positions: the block
        assert product_plan(rows, cols, n_rows, n_cols, positions, unit_major=False).path == "block"
    torch.testing.assert_close(gather_products(g, u, rows, cols), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gather_products(g, u, rows, cols, plan), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", [7, 70])
def test_sparse_skewed_pairs_take_the_gather_and_per_row_paths(positions):
    """Pairs spread so thin that the block is more than 32x their number and padding every row to the longest
    would more than quadruple them: elementwise gathers (few positions) or one product per row (many)."""
    from activelab.inference.signals import gather_products, product_plan

    n_rows, n_cols = 200, 200
    g = torch.randn(2, 3, n_rows, positions, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = torch.randn(2, n_cols, positions, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # 51 pairs on 40 rows x 51 columns (a block of 2,040 > 32 x 51); row 5 holds 12: padded to 40 x 12 = 480
    rows = torch.tensor([5] * 12 + list(range(100, 139)))
    cols = torch.tensor(list(range(12)) + list(range(150, 189)))
    plan = product_plan(rows, cols, n_rows, n_cols, positions)
    assert plan.path == ("gather" if positions < 64 else "loop")
    expected = torch.einsum("bcrl,bql->bcrq", g, u)[:, :, rows, cols]
    torch.testing.assert_close(gather_products(g, u, rows, cols, plan), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fraction", [0.05, 0.3, 1.0])
def test_signal_embeddings_on_random_masks_equal_the_loop(fraction):
    """Random masks of several densities over every tensor of a conv net, so that layers keep the signals of
    some output units only and unfold some input channels only (sparse masks) or all of them (dense)."""
    torch.manual_seed(1)
    model = TinyNet().eval()  # conv2 reads 4 input channels: a sparse mask unfolds only some
    pool = make_pool(n=8)
    idx = np.array([6, 1, 4])
    rng = np.random.default_rng(3)
    params = dict(model.named_parameters())
    names = tuple(params)
    indices = [
        torch.as_tensor(np.sort(rng.choice(p.numel(), max(1, int(fraction * p.numel())), replace=False)))
        for p in params.values()
    ]
    if fraction < 1:  # conv2's entries read input channels 1 and 3 only: only those are unfolded
        flat = indices[names.index("conv2.weight")]
        indices[names.index("conv2.weight")] = flat[torch.isin((flat % 36) // 9, torch.tensor([1, 3]))]
        assert len(indices[names.index("conv2.weight")]) > 0
    mask = FisherMask(names, tuple(indices), "fc2.weight", False)
    got = masked_fisher_embeddings(model, pool, idx, mask, chunk_size=2, method="signals")
    grads, p = _loop_grads(model, pool, idx)
    cols = [grads[n].flatten(2)[:, :, i] for n, i in zip(names, mask.indices, strict=True)]
    expected = (torch.cat(cols, dim=2) * p.sqrt().unsqueeze(2)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(AWKWARD_MODELS))
def test_signal_embeddings_on_awkward_models_equal_the_loop(name):
    """Every tensor of a model with an unused head, tied weights or a sequence-first Linear, in the mask: the
    signal method equals the per-sample loop (zeros for the unused head)."""
    torch.manual_seed(0)
    model = AWKWARD_MODELS[name]().eval()
    pool = make_pool(n=8)
    idx = np.array([5, 0, 7, 2, 3])
    params = dict(model.named_parameters())
    names = tuple(params)
    indices = tuple(torch.arange(params[n].numel()) for n in names)
    mask = FisherMask(names, indices, "fc.weight", False)
    got = masked_fisher_embeddings(model, pool, idx, mask, chunk_size=2, method="signals")
    grads, p = _loop_grads(model, pool, idx)
    cols = [grads[n].flatten(2)[:, :, i] for n, i in zip(names, indices, strict=True)]
    expected = (torch.cat(cols, dim=2) * p.sqrt().unsqueeze(2)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("include_bias", [False, True])
def test_closed_form_embeddings_in_float32_equal_float64(include_bias):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=7)
    feats = rng.normal(size=(7, 6))
    v64 = last_layer_fisher_embeddings(probs, feats, include_bias=include_bias, dtype=np.float64)
    v32 = last_layer_fisher_embeddings(probs, feats, include_bias=include_bias, dtype=np.float32)
    assert v32.dtype == np.float32 and v64.shape == v32.shape == (7, 5, 5 * 6 + (5 if include_bias else 0))
    np.testing.assert_allclose(v32, v64, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pct", [0.001, 0.05, 0.3, 1.0])
def test_planned_mask_size_is_the_size_fisher_mask_gives(pct):
    from activelab.inference.fisher import planned_mask_size

    model, pool = _model(), make_pool(n=12)
    mask = fisher_mask(diagonal_fisher(model, pool, np.arange(6)), "fc2.weight", pct)
    assert planned_mask_size(model, "fc2.weight", pct) == mask.size
    with pytest.raises(ActivelabError, match="no parameter"):
        planned_mask_size(model, "head.weight", pct)


class _PReLUNet(nn.Module):
    """A PReLU between a conv and the classifier: nested vmaps (samples x classes) got its Jacobians wrong."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.act = nn.PReLU(3)
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


@pytest.mark.parametrize("method", ["signals", "jacobian"])
def test_prelu_model_in_chunks_of_c_samples_matches_the_loop(method):
    """Chunks of exactly C = 4 samples through a PReLU (a size at which vmap(jacrev) used to return wrong
    numbers without an error): the diagonal Fisher and the embeddings (PReLU's weight by the Jacobian
    fallback under ``signals``) equal the per-sample loop."""
    torch.manual_seed(0)
    model = _PReLUNet().eval()
    with torch.no_grad():
        model.act.weight.copy_(torch.tensor([0.1, -0.4, 0.7]))
    pool = make_pool(n=8)
    idx = np.array([1, 6, 3, 0, 7, 2, 5, 4])
    grads, p = _loop_grads(model, pool, idx)
    fisher = diagonal_fisher(model, pool, idx, chunk_size=4)
    for name, g in grads.items():
        torch.testing.assert_close(fisher[name], torch.einsum("nc,nc...->...", p, g * g), rtol=1e-5, atol=1e-9)
    names = tuple(grads)
    mask = FisherMask(names, tuple(torch.arange(g[0, 0].numel()) for g in grads.values()), "fc.weight", False)
    got = masked_fisher_embeddings(model, pool, idx, mask, chunk_size=4, method=method)
    expected = torch.cat([grads[n].flatten(2) for n in names], dim=2) * p.sqrt().unsqueeze(2)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-6)
