"""Closed-form per-sample gradients of the layer-signal method on the layers real models use (BatchNorm,
GroupNorm, LayerNorm, RMSNorm, grouped and depthwise Conv2d, Conv1d, Embedding), against per-sample autograd
loops written here: entropy-gradient norms and masked Fisher embeddings, in float64 (1e-10) and float32 (1e-4).

Every model is first checked to be covered by the signal method (no tensor handed to the vmap / Jacobian
fallback), so the closed forms themselves are what the loops check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from activelab.inference.fisher import FisherMask, _iter_signal_embeddings, masked_fisher_embeddings
from activelab.inference.gradients import entropy_gradient_norms, entropy_gradient_norms_loop
from activelab.inference.signals import plan_signal_layers


def _randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics, so that no normalisation layer is an identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)):
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if p is not None:
                        p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if p is m.weight else torch.randn(p.shape) / 5)


class BNConvNet(nn.Module):
    """A conv net at 28x28: conv (no bias) + BatchNorm2d, a grouped conv (2 channels per group) + BatchNorm2d
    without affine parameters, a depthwise conv with reflect padding and no bias, a conv with an even kernel and
    padding="same" (asymmetric) + GroupNorm, a strided conv, then Linear + BatchNorm1d and the classifier."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.bn2 = nn.BatchNorm2d(6, affine=False)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="reflect", bias=False)
        self.same = nn.Conv2d(6, 8, 4, padding="same")
        self.gn = nn.GroupNorm(2, 8)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, dilation=2)
        self.fc1 = nn.Linear(8, 10)
        self.bn3 = nn.BatchNorm1d(10)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.max_pool2d(torch.relu(self.bn2(self.grouped(x))), 2)  # 14x14
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.gn(self.same(x)))
        x = torch.relu(self.strided(x)).mean(dim=(2, 3))
        return self.fc(torch.relu(self.bn3(self.fc1(x))))


class TokenNet(nn.Module):
    """Tokens read off the image (many repeats, some equal to padding_idx 0) -> Embedding -> LayerNorm -> Conv1d
    -> grouped, dilated Conv1d with circular padding="same" -> RMSNorm -> a LayerNorm over two dimensions without
    bias -> mean over tokens -> classifier."""

    classifier_name = "fc"

    def __init__(self, vocab: int = 20, scale_grad_by_freq: bool = False) -> None:
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(vocab, 6, padding_idx=0, scale_grad_by_freq=scale_grad_by_freq)
        self.ln1 = nn.LayerNorm(6)
        self.c1 = nn.Conv1d(6, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 8, 3, groups=4, dilation=2, padding="same", padding_mode="circular")
        self.rms = nn.RMSNorm(8)
        self.ln2 = nn.LayerNorm((14, 8), bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = ((x[:, 0, 0, :14] + 1.5) * self.vocab / 3).long().clamp(0, self.vocab - 1)  # (B, 14)
        h = self.ln1(self.emb(tokens)).transpose(1, 2)  # (B, 6, 14)
        h = torch.relu(self.c2(torch.relu(self.c1(h)))).transpose(1, 2)  # (B, 14, 8)
        return self.fc(self.ln2(self.rms(h)).mean(dim=1))


def _model(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = {"bn_conv": BNConvNet, "tokens": TokenNet, "tokens_freq": lambda: TokenNet(12, True)}[kind]()
    _randomise_norms(model, gen)
    with torch.no_grad():
        model.fc.weight.mul_(3)  # confident, non-uniform predictions
    return model.to(dtype).eval()


def _pool(kind: str, n: int, dtype: torch.dtype):
    size = 28 if kind == "bn_conv" else 16
    x = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(2), dtype=dtype)
    return torch.utils.data.TensorDataset(x, torch.zeros(n, dtype=torch.long))


def _assert_covered(model: nn.Module, pool) -> None:
    """Every parameter tensor goes to the closed forms, none to the fallback."""
    params = dict(model.named_parameters())
    wanted = {n: torch.arange(p.numel()) for n, p in params.items()}
    probe = torch.stack([pool[0][0], pool[1][0]])
    layers, fallback = plan_signal_layers(model, wanted, probe)
    assert fallback == []
    assert sum((layer.weight is not None) + (layer.bias is not None) for layer in layers) == len(params)


KINDS = ["bn_conv", "tokens", "tokens_freq"]
# PyTorch warns that padding="same" with an even kernel pads a copy of the input: that is the case under test
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_norms_equal_the_per_sample_loop(kind, dtype):
    model, pool = _model(kind, dtype), _pool(kind, 7, dtype)
    _assert_covered(model, pool)
    idx = np.array([6, 0, 3, 2, 5, 1, 4])
    for norm in ("per_tensor_sum", "global"):
        got = entropy_gradient_norms(model, pool, idx, norm=norm, chunk_size=3, method="signals")
        expected = entropy_gradient_norms_loop(model, pool, idx, norm=norm)
        assert np.all(expected > 0)
        np.testing.assert_allclose(got, expected, rtol=TOLERANCE[dtype])


def _loop_log_prob_grads(model: nn.Module, pool, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: d log p(c|x) / d theta, (N, C, numel)}, p (N, C)) by autograd, one sample and class at a time."""
    params = dict(model.named_parameters())
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    probs = []
    for i in indices:
        lp = torch.log_softmax(model(pool[int(i)][0].unsqueeze(0)), dim=1)[0]
        probs.append(lp.exp().detach())
        per_class = [
            torch.autograd.grad(lp[c], list(params.values()), retain_graph=True, materialize_grads=True)
            for c in range(len(lp))
        ]
        for j, n in enumerate(params):
            grads[n].append(torch.stack([g[j].reshape(-1) for g in per_class]))
    return {n: torch.stack(v) for n, v in grads.items()}, torch.stack(probs)


@pytest.mark.parametrize("fraction", [0.04, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", KINDS)
def test_fisher_embeddings_equal_the_per_sample_loop(kind, dtype, fraction):
    """Masks of several densities over every tensor: sparse masks keep some units' signals only and take the
    per-row products (convolutions: the unfolded input, on the input channels read), dense ones the
    weight-gradient convolution's blocks; the whole mask forms every entry."""
    model, pool = _model(kind, dtype), _pool(kind, 5, dtype)
    _assert_covered(model, pool)
    idx = np.array([4, 1, 3, 0, 2])
    params = dict(model.named_parameters())
    rng = np.random.default_rng(3)
    names = tuple(params)
    indices = tuple(
        torch.as_tensor(np.sort(rng.choice(p.numel(), max(1, int(fraction * p.numel())), replace=False)))
        for p in params.values()
    )
    mask = FisherMask(names, indices, "fc.weight", False)
    if dtype == torch.float64:  # the public function returns float32: read the float64 chunks it is built from
        got = torch.cat([v for v, _ in _iter_signal_embeddings(model, pool, idx, mask, 2)]).numpy()
    else:
        got = masked_fisher_embeddings(model, pool, idx, mask, weighting="none", chunk_size=2, method="signals")
    grads, _ = _loop_log_prob_grads(model, pool, idx)
    expected = torch.cat([grads[n][:, :, i] for n, i in zip(names, indices, strict=True)], dim=2).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


def test_embedding_padding_row_and_frequency_scaling():
    """The padding row's entries are zero (PyTorch leaves its gradient zero), and with scale_grad_by_freq a
    token's row is divided by its count in the sample: hand-worked on one sample."""
    torch.manual_seed(0)
    emb = nn.Embedding(5, 2, padding_idx=0, scale_grad_by_freq=True).double()
    head = nn.Linear(2, 3).double()

    class Net(nn.Module):
        classifier_name = "head"

        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = emb, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(x[:, :4].long()).sum(1))

    model = Net().eval()
    x = torch.tensor([[0.0, 2.0, 2.0, 3.0]], dtype=torch.float64)  # tokens 0 (padding), 2 twice, 3: without the
    # scaling row 2 would be twice the signal, without the padding rule row 0 would be the signal
    pool = torch.utils.data.TensorDataset(torch.cat([x, x]), torch.zeros(2, dtype=torch.long))
    mask = FisherMask(("emb.weight",), (torch.arange(10),), "head.weight", False)
    got = masked_fisher_embeddings(model, pool, np.array([0]), mask, weighting="none", chunk_size=1)[0]
    lp = torch.log_softmax(model(x), dim=1)[0].detach()
    g_out = (torch.eye(3, dtype=torch.float64) - lp.exp()) @ head.weight.detach()  # (C, D) d log p_c / d h
    expected = torch.zeros(3, 5, 2, dtype=torch.float64)
    expected[:, 2] = 2 * g_out / 2  # two occurrences, scaled by 1/2
    expected[:, 3] = g_out
    np.testing.assert_allclose(got, expected.reshape(3, 10).numpy(), rtol=1e-6, atol=1e-7)  # float32 output


class SparseNet(nn.Module):
    """Layers big enough that very sparse masks take the per-entry paths: a conv over 64 positions (per-row
    products), a grouped conv (columns of the whole unfolded input) and a Linear mapped over 8 positions
    (elementwise gathers)."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 80, 3, padding=1)
        self.grouped = nn.Conv2d(80, 16, 3, padding=1, groups=2)
        self.rows = nn.Linear(128, 128)
        self.fc = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.grouped(torch.tanh(self.conv(torch.tanh(self.stem(x))))))  # (B, 16, 8, 8)
        h = torch.tanh(self.rows(h.permute(0, 2, 1, 3).reshape(len(x), 8, 128)))  # (B, 8 positions, 128)
        return self.fc(h.mean(dim=1))


def test_sparse_masks_take_the_per_entry_paths_and_equal_the_loop(monkeypatch):
    """40 entries on distinct rows and columns of the conv and the mapped Linear, 4 of the grouped conv: each
    layer's block of rows x columns is more than 32x its entries, so the per-row products (conv), the columns
    of the whole unfolded input (grouped conv) and elementwise gathers (Linear) run instead of the
    weight-gradient convolution (checked by counting), and equal the loop in float64."""
    import activelab.inference.signals as signals

    torch.manual_seed(0)
    model = SparseNet().double().eval()
    pool = torch.utils.data.TensorDataset(
        torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
        torch.zeros(4, dtype=torch.long),
    )
    i = torch.arange(40)
    indices = {
        "conv.weight": i * 72 + (i % 8) * 9 + i // 8,  # rows 0-39, distinct (input channel, kernel entry)
        "grouped.weight": torch.arange(4) * 4 * 360 + 7,  # rows 0, 4, 8, 12 (both groups)
        "rows.weight": i * 128 + 3 * i,  # rows 0-39, columns 0, 3, ..., 117
        "fc.weight": torch.arange(512),
    }
    mask = FisherMask(tuple(indices), tuple(indices.values()), "fc.weight", False)
    calls = {"unfold": 0, "weight_grads": 0}
    real_unfold, real_grads = nn.functional.unfold, signals.conv_weight_grads

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(nn.functional, "unfold", counting("unfold", real_unfold))
    monkeypatch.setattr(signals, "conv_weight_grads", counting("weight_grads", real_grads))
    got = torch.cat([v for v, _ in _iter_signal_embeddings(model, pool, np.arange(4), mask, 2)]).numpy()
    assert calls == {"unfold": 4, "weight_grads": 0}  # two sparse conv layers, two chunks
    grads, _ = _loop_log_prob_grads(model, pool, np.arange(4))
    expected = torch.cat([grads[n][:, :, idx] for n, idx in indices.items()], dim=2).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("fraction", [0.04, 1.0])
@pytest.mark.parametrize("kind", KINDS)
def test_fisher_embeddings_one_class_at_a_time_equal_the_loop(kind, fraction, monkeypatch):
    """The signal method with one backward pass per class (each pass's signals copied into tensors kept and
    reused across chunks), forced on every model, equals the loop in float64 and the vectorised method."""
    import activelab.inference.fisher as fisher

    model, pool = _model(kind, torch.float64), _pool(kind, 5, torch.float64)
    idx = np.array([4, 1, 3, 0, 2])
    params = dict(model.named_parameters())
    rng = np.random.default_rng(5)
    indices = tuple(
        torch.as_tensor(np.sort(rng.choice(p.numel(), max(1, int(fraction * p.numel())), replace=False)))
        for p in params.values()
    )
    mask = FisherMask(tuple(params), indices, "fc.weight", False)
    modes = []
    real = fisher.layer_signals
    monkeypatch.setattr(fisher, "layer_signals", lambda *a: modes.append(a[4]) or real(*a))
    results = {}
    for vectorise in (True, False):
        monkeypatch.setattr(fisher, "_vectorise_classes", lambda model, signal_bytes, v=vectorise: v)
        results[vectorise] = torch.cat([v for v, _ in _iter_signal_embeddings(model, pool, idx, mask, 2)]).numpy()
    assert modes == [True] * 3 + [False] * 3  # one call per chunk, each way
    grads, _ = _loop_log_prob_grads(model, pool, idx)
    expected = torch.cat([grads[n][:, :, i] for n, i in zip(params, indices, strict=True)], dim=2).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(results[False], expected, rtol=1e-10, atol=1e-10 * scale)
    np.testing.assert_allclose(results[False], results[True], rtol=1e-12, atol=1e-12 * scale)


class RowsNet(nn.Module):
    """Image rows as 16 channels over 16 steps: Conv1d 5 (few positions), a strided, dilated Conv1d, a grouped
    Conv1d with reflect padding, then a 1x1 Conv2d and the classifier."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(16, 24, 5, padding=2)
        self.c2 = nn.Conv1d(24, 48, 3, stride=2, dilation=2, padding=2)  # 16 -> 8 positions
        self.c3 = nn.Conv1d(48, 48, 3, padding=1, groups=4, padding_mode="reflect")
        self.pw = nn.Conv2d(48, 32, 1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x[:, 0]))))))  # (B, 48, 8)
        return self.fc(torch.tanh(self.pw(h.unsqueeze(3))).mean(dim=(2, 3)))


def _rows_model_and_pool() -> tuple[nn.Module, torch.utils.data.TensorDataset]:
    torch.manual_seed(0)
    model = RowsNet().double().eval()
    with torch.no_grad():
        model.fc.weight.mul_(3)
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    return model, torch.utils.data.TensorDataset(x, torch.zeros(6, dtype=torch.long))


def _counting(monkeypatch, module, name: str, calls: dict) -> None:
    real = getattr(module, name)
    calls[name] = 0

    def wrapped(*args, **kwargs):
        calls[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_conv1d_gradient_norms_through_the_input_gram_equal_the_loop(monkeypatch):
    """The Conv1d layers with few positions take the shifted input Gram (no unfold; stride, dilation and zero
    padding on c2), the grouped one (reflect padding) the weight-gradient convolution: float64, 1e-10."""
    import activelab.inference.signals as signals

    model, pool = _rows_model_and_pool()
    calls: dict[str, int] = {}
    _counting(monkeypatch, signals, "_shifted_gram", calls)
    idx = np.array([5, 0, 2, 4, 1, 3])
    got = entropy_gradient_norms(model, pool, idx, norm="per_tensor_sum", chunk_size=3)
    assert calls["_shifted_gram"] == 4  # c1 and c2, two chunks
    np.testing.assert_allclose(got, entropy_gradient_norms_loop(model, pool, idx), rtol=1e-10)


def test_conv1d_and_pointwise_fisher_entries_take_the_row_wise_products(monkeypatch):
    """A 5% mask: the Conv1d layers (16 and 8 positions; each block more than 6x its padded rows) and the 1x1
    convolution form their entries by padded row-wise products, not the weight-gradient convolution; float64
    against the loop."""
    import activelab.inference.signals as signals

    model, pool = _rows_model_and_pool()
    params = dict(model.named_parameters())
    rng = np.random.default_rng(7)
    indices = tuple(
        torch.as_tensor(np.sort(rng.choice(p.numel(), max(1, int(0.05 * p.numel())), replace=False)))
        if n != "fc.weight"
        else torch.arange(p.numel())
        for n, p in params.items()
    )
    mask = FisherMask(tuple(params), indices, "fc.weight", False)
    calls: dict[str, int] = {}
    _counting(monkeypatch, signals, "rowwise_products", calls)
    idx = np.arange(6)
    got = torch.cat([v for v, _ in _iter_signal_embeddings(model, pool, idx, mask, 3)]).numpy()
    assert calls["rowwise_products"] == 8  # c1, c2, c3 and pw, two chunks
    grads, _ = _loop_log_prob_grads(model, pool, idx)
    expected = torch.cat([grads[n][:, :, i] for n, i in zip(params, indices, strict=True)], dim=2).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("vectorise", [True, False], ids=["vectorised", "one class at a time"])
def test_fisher_embeddings_take_one_backward_pass_fewer_than_classes(vectorise, monkeypatch):
    """C - 1 backward passes per chunk (one per class but each sample's most probable one, whose row follows
    from sum_c p_c d log p_c = 0), and every class's row equal to the loop's, the reconstructed one included."""
    import activelab.inference.fisher as fisher

    model, pool = _model("tokens", torch.float64), _pool("tokens", 5, torch.float64)
    idx = np.array([4, 1, 3, 0, 2])
    params = dict(model.named_parameters())
    mask = FisherMask(tuple(params), tuple(torch.arange(p.numel()) for p in params.values()), "fc.weight", False)
    monkeypatch.setattr(fisher, "_vectorise_classes", lambda model, signal_bytes: vectorise)
    passes = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: passes.append(1) or real(*a, **k))
    got = torch.cat([v for v, _ in _iter_signal_embeddings(model, pool, idx, mask, 2)]).numpy()
    monkeypatch.setattr(torch.autograd, "grad", real)
    assert len(passes) == 3 * (1 if vectorise else 4 - 1)  # 3 chunks; C = 4
    grads, probs = _loop_log_prob_grads(model, pool, idx)
    expected = torch.cat([grads[n] for n in params], dim=2).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * scale)
    top = probs.argmax(dim=1).numpy()  # the rows no pass computed are right too, and not all zero
    assert all(np.abs(got[i, top[i]]).max() > 1e-3 * scale for i in range(len(idx)))


@pytest.mark.parametrize("path", ["products", "pairs"])
@pytest.mark.parametrize("vectorise", [True, False], ids=["vectorised", "one class at a time"])
@pytest.mark.parametrize("kind", ["tokens", "tokens_freq"])
def test_embedding_entries_by_one_hot_products_or_token_pairs_equal_the_loop(kind, vectorise, path, monkeypatch):
    """An Embedding's entries by one-hot products (forced: every multiply-add allowed) and by the gather and
    scatter over token pairs (forced: none allowed), with padding_idx 0 among the tokens and with the
    within-sample frequency scaling, on a dense mask of a few rows (the padding row among them) and a sparse
    one: both equal the loop in float64, in the vectorised pass and pass by pass."""
    import activelab.inference.fisher as fisher
    import activelab.inference.signals as signals

    model, pool = _model(kind, torch.float64), _pool(kind, 5, torch.float64)
    idx = np.array([4, 1, 3, 0, 2])
    monkeypatch.setattr(fisher, "_vectorise_classes", lambda model, signal_bytes: vectorise)
    monkeypatch.setattr(signals, "_EMBEDDING_BLOCK_MACS", 10**12 if path == "products" else 0)
    taken = []
    real = signals._embedding_block
    monkeypatch.setattr(signals, "_embedding_block", lambda *a: taken.append(b := real(*a)) or b)
    grads, _ = _loop_log_prob_grads(model, pool, idx)
    vocab = model.emb.num_embeddings
    dense = torch.tensor([r * 6 + c for r in (0, 2, 3, vocab - 1) for c in range(6)])
    sparse = torch.tensor([1, 6 * 2 + 5, 6 * 5 + 2, 6 * 7])
    for emb_idx in (dense, sparse):
        indices = {"emb.weight": emb_idx, "fc.weight": torch.arange(32)}
        mask = FisherMask(tuple(indices), tuple(indices.values()), "fc.weight", False)
        taken.clear()
        got = torch.cat([v for v, _ in _iter_signal_embeddings(model, pool, idx, mask, 2)]).numpy()
        products = sum(b is not None for b in taken)  # a chunk without a token in a wanted row takes no products
        assert len(taken) == 3 and (products >= (3 if emb_idx is dense else 1) if path == "products" else not products)
        expected = torch.cat([grads[n][:, :, i] for n, i in indices.items()], dim=2).numpy()
        assert np.abs(expected[:, :, : len(emb_idx)]).max() > 0
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


class PositionNet(nn.Module):
    """Pixel tokens plus a position embedding (the same tokens 0..T-1 in every chunk), a Linear per token."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(8, 4)
        self.pos = nn.Embedding(6, 4)
        self.h = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = ((x[:, 0, 0, :6] + 1.5) * 8 / 3).long().clamp(0, 7)
        h = self.tok(tokens) + self.pos(torch.arange(6).expand_as(tokens))
        return self.fc(torch.relu(self.h(h)).mean(dim=1))


@pytest.mark.parametrize("vectorise", [True, False], ids=["vectorised", "one class at a time"])
def test_position_embedding_entries_over_chunks_with_the_same_tokens(vectorise, monkeypatch):
    """A position embedding sees the same tokens in every chunk (its token pairs are kept from chunk to chunk
    while they are), the last chunk smaller: every entry equal to the loop's."""
    import activelab.inference.fisher as fisher

    torch.manual_seed(0)
    model = PositionNet().double().eval()
    pool = _pool("tokens", 7, torch.float64)
    idx = np.array([6, 0, 5, 1, 4, 2, 3])
    params = dict(model.named_parameters())
    rng = np.random.default_rng(0)
    indices = tuple(
        torch.as_tensor(np.sort(rng.choice(p.numel(), max(1, p.numel() // 2), replace=False))) for p in params.values()
    )
    mask = FisherMask(tuple(params), indices, "fc.weight", False)
    monkeypatch.setattr(fisher, "_vectorise_classes", lambda model, signal_bytes: vectorise)
    got = torch.cat([v for v, _ in _iter_signal_embeddings(model, pool, idx, mask, 3)]).numpy()
    grads, _ = _loop_log_prob_grads(model, pool, idx)
    expected = torch.cat([grads[n][:, :, i] for n, i in zip(params, indices, strict=True)], dim=2).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_a_single_output_has_zero_fisher_embeddings():
    """log p(c|x) = 0 for a model with one output: every embedding is zero, without a backward pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 4), nn.ReLU(), nn.Linear(4, 1)).eval()
    pool = _pool("tokens", 3, torch.float32)
    params = dict(model.named_parameters())
    mask = FisherMask(tuple(params), tuple(torch.arange(p.numel()) for p in params.values()), "3.weight", False)
    got = masked_fisher_embeddings(model, pool, np.arange(3), mask)
    assert got.shape == (3, 1, mask.size) and not got.any()


class TwiceNet(nn.Module):
    """A Linear called twice (its tensors go to the Jacobian fallback) between signal layers."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 6)
        self.twice = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x.flatten(1)))
        return self.fc(torch.tanh(self.twice(torch.tanh(self.twice(h)))))


@pytest.mark.parametrize("model_kind", ["root", "fallback", "fallback only"])
def test_fisher_embeddings_of_a_bare_module_and_of_fallback_tensors_stay_float64(model_kind):
    """A bare nn.Linear as the model (its parameters are named "weight" and "bias"), and tensors differentiated
    by the Jacobian fallback next to signal layers: float64 chunks equal the loop to 1e-10 (the fallback's
    log-softmax used to run in float32)."""
    torch.manual_seed(0)
    if model_kind == "root":
        model = nn.Linear(5, 3).double().eval()
        pool = torch.utils.data.TensorDataset(torch.randn(4, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    else:
        model = TwiceNet().double().eval()
        pool = _pool("tokens", 4, torch.float64)
    idx = np.array([3, 0, 2, 1])
    params = dict(model.named_parameters())
    if model_kind == "fallback only":  # no signal layer at all: the probabilities come from the Jacobian pass
        params = {n: p for n, p in params.items() if n.startswith("twice.")}
    mask = FisherMask(tuple(params), tuple(torch.arange(p.numel()) for p in params.values()), "fc.weight", False)
    chunks = list(_iter_signal_embeddings(model, pool, idx, mask, 3))
    grads, probs = _loop_log_prob_grads(model, pool, idx)
    expected = torch.cat([grads[n] for n in params], dim=2).numpy()
    got = torch.cat([v for v, _ in chunks]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())
    np.testing.assert_allclose(torch.cat([p for _, p in chunks]).numpy(), probs.numpy(), rtol=1e-12)


def test_per_objective_embedding_signals_give_squared_norms_too():
    """With several objectives one pass each, an Embedding's entries are formed in each pass; its squared norms
    from them equal those from the stacked (vectorised) signals, and entries formed for part of the weight are
    refused (not a whole norm)."""
    from activelab.inference.signals import FormedEntries, layer_signals, layer_squared_norms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).double().eval()
    x = torch.randint(0, 10, (5, 3))
    layers, _ = plan_signal_layers(model, {"0.weight": torch.arange(40)}, x[:2])

    def objectives(out):
        return list(torch.log_softmax(out, -1)[:, :2].sum(0))

    norms = {}
    for vectorise in (True, False):
        _, sig, saved = layer_signals(model, layers, x, objectives, vectorise)
        assert isinstance(sig["0"], FormedEntries) == (not vectorise)
        norms[vectorise] = layer_squared_norms(layers[0], saved["0"], sig["0"])["weight"]
    torch.testing.assert_close(norms[False], norms[True], rtol=1e-12, atol=0)
    part, _ = plan_signal_layers(model, {"0.weight": torch.arange(20)}, x[:2])
    _, sig, saved = layer_signals(model, part, x, objectives, False)
    with pytest.raises(ValueError, match="only some entries"):
        layer_squared_norms(part[0], saved["0"], sig["0"])


class LinearTokensNet(nn.Module):
    """Linear layers mapped over 6 tokens between LayerNorms (so the Fisher passes run one class at a time), with
    an auxiliary Linear over the tokens whose output the classifier never reads."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.bias_only = nn.Linear(12, 16)
        self.diagonal = nn.Linear(16, 16)
        self.sparse = nn.Linear(16, 40)
        self.aux = nn.Linear(40, 3)
        self.fc = nn.Linear(40, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.ln(self.a(x[:, 0, :6, :8])))  # (B, 6 tokens, 12)
        h = torch.tanh(self.diagonal(torch.tanh(self.bias_only(h))))
        h = torch.tanh(self.sparse(h))
        self.aux(h)  # runs, never reaches the output: its entries are zero
        return self.fc(h.mean(dim=1))


def test_linear_over_tokens_forms_its_entries_pass_by_pass(monkeypatch):
    """With one backward pass per class, a Linear over tokens forms its wanted entries in each pass from that
    pass's signals (no copy of every class's signals), when its block of kept units x wanted columns is at most
    12x its padded row-wise products: a dense mask (a), a bias alone (bias_only), three entries on units and
    columns that are gathered first (sparse), a layer no objective reaches (aux: zeros); a diagonal mask (block
    16x its padded rows) keeps the copied signals. Every entry equals the loop's in float64 and the vectorised
    method's."""
    import activelab.inference.fisher as fisher
    from activelab.inference.signals import FormedEntries

    torch.manual_seed(0)
    model = LinearTokensNet().double().eval()
    with torch.no_grad():
        model.fc.weight.mul_(3)
    pool = _pool("tokens", 5, torch.float64)
    _assert_covered(model, pool)
    i16 = torch.arange(16)
    indices = {
        "a.weight": torch.arange(96),
        "a.bias": torch.tensor([0, 7]),
        "bias_only.bias": torch.tensor([2, 3, 11]),
        "diagonal.weight": i16 * 16 + i16,
        "sparse.weight": torch.tensor([0 * 16 + 1, 5 * 16 + 4, 9 * 16 + 7]),
        "sparse.bias": torch.tensor([5, 30]),
        "aux.weight": torch.tensor([3, 50, 100]),
        "fc.weight": torch.arange(160),
    }
    mask = FisherMask(tuple(indices), tuple(indices.values()), "fc.weight", False)
    kinds: dict[str, set] = {}
    real = fisher.layer_signals

    def recording(*args):
        out, signals, saved = real(*args)
        for name, s in signals.items():
            kinds.setdefault(name, set()).add(type(s).__name__)
        return out, signals, saved

    monkeypatch.setattr(fisher, "layer_signals", recording)
    results = {}
    idx = np.array([4, 1, 3, 0, 2])
    for vectorise in (False, True):
        monkeypatch.setattr(fisher, "_vectorise_classes", lambda model, signal_bytes, v=vectorise: v)
        results[vectorise] = torch.cat([v for v, _ in _iter_signal_embeddings(model, pool, idx, mask, 2)]).numpy()
        if not vectorise:
            formed = {name for name, k in kinds.items() if k == {FormedEntries.__name__}}
            assert formed == {"a", "bias_only", "sparse", "aux"}
            assert kinds["diagonal"] == {"Tensor"} and kinds["fc"] == {"Tensor"}
    grads, _ = _loop_log_prob_grads(model, pool, idx)
    expected = torch.cat([grads[n][:, :, i] for n, i in indices.items()], dim=2).numpy()
    scale = np.abs(expected).max()
    aux = slice(96 + 2 + 3 + 16 + 3 + 2, 96 + 2 + 3 + 16 + 3 + 2 + 3)
    assert not expected[:, :, aux].any() and np.abs(expected[:, :, : aux.start]).max(axis=(0, 1)).min() > 0
    np.testing.assert_allclose(results[False], expected, rtol=1e-10, atol=1e-10 * scale)
    np.testing.assert_allclose(results[False], results[True], rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("model_kind", ["signals", "fallback"])
@pytest.mark.parametrize("weighting", ["sqrt_p", "none"])
def test_embeddings_written_in_place_equal_the_iterated_chunks(model_kind, weighting, monkeypatch):
    """masked_fisher_embeddings has the signal method write each float32 chunk straight into its output (no copy
    of the chunk; counted) and weights it there; the result equals the public iterator's chunks, the last
    chunk smaller, with and without a Jacobian-fallback tensor (whose chunks are copied)."""
    import activelab.inference.fisher as fisher
    from activelab.inference.fisher import iter_masked_fisher_embeddings

    torch.manual_seed(0)
    model = (TwiceNet() if model_kind == "fallback" else LinearTokensNet()).eval()
    pool = _pool("tokens", 7, torch.float32)
    params = dict(model.named_parameters())
    mask = FisherMask(tuple(params), tuple(torch.arange(p.numel()) for p in params.values()), "fc.weight", False)
    idx = np.array([6, 0, 5, 1, 4, 2, 3])
    expected = torch.cat(list(iter_masked_fisher_embeddings(model, pool, idx, mask, weighting, chunk_size=3)))
    placed = []
    real = fisher._with_top_class
    monkeypatch.setattr(fisher, "_with_top_class", lambda *a: placed.append(a[4] is not None) or real(*a))
    got = masked_fisher_embeddings(model, pool, idx, mask, weighting, chunk_size=3)
    assert placed == [model_kind == "signals"] * 3
    np.testing.assert_array_equal(got, expected.numpy())


class MaxNormNet(nn.Module):
    """Tokens through an Embedding with max_norm (rows start above it, so the first forward pass renormalises
    them in place), read twice when ``twice`` (then its weight goes to the Jacobian fallback), a Linear per token
    and the classifier."""

    classifier_name = "fc"

    def __init__(self, twice: bool) -> None:
        super().__init__()
        self.twice = twice
        self.emb = nn.Embedding(9, 4, max_norm=1.0)
        with torch.no_grad():
            self.emb.weight.mul_(3)
        self.h = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = ((x[:, 0, 0, :5] + 1.5) * 3).long().clamp(0, 8)
        e = self.emb(tokens) + (self.emb(tokens.flip(1)) if self.twice else 0)
        return self.fc(torch.tanh(self.h(e)).mean(dim=1))


@pytest.mark.parametrize("twice", [False, True], ids=["signals", "fallback"])
def test_an_embedding_with_max_norm_is_differentiated_by_every_method(twice):
    """An Embedding with max_norm renormalises the rows it reads in place in each forward pass, which vmap cannot
    run (it used to fail there): the signal method, the Jacobian fallback and method, the diagonal Fisher and
    both gradient-norm methods now give the per-sample loop's values (float64), the rows renormalised."""
    from activelab.inference.fisher import diagonal_fisher

    torch.manual_seed(0)
    model = MaxNormNet(twice).double().eval()
    pool = _pool("tokens", 5, torch.float64)
    idx = np.array([4, 1, 3, 0, 2])
    params = dict(model.named_parameters())
    mask = FisherMask(tuple(params), tuple(torch.arange(p.numel()) for p in params.values()), "fc.weight", False)
    before = model.emb.weight.detach().clone()
    got = {
        "signals": torch.cat([v for v, _ in _iter_signal_embeddings(model, pool, idx, mask, 2)]).numpy(),
        "jacobian": masked_fisher_embeddings(model, pool, idx, mask, "none", chunk_size=2, method="jacobian"),
    }
    fisher = diagonal_fisher(model, pool, idx, chunk_size=2)
    norms = {m: entropy_gradient_norms(model, pool, idx, chunk_size=2, method=m) for m in ("signals", "vmap")}
    assert model.emb.max_norm == 1.0 and not torch.equal(before, model.emb.weight.detach())  # renormalised, kept
    assert model.emb.weight.detach().norm(dim=1).max() <= 1.0 + 1e-12
    grads, probs = _loop_log_prob_grads(model, pool, idx)  # the renormalised rows stay as they are now
    expected = torch.cat([grads[n] for n in params], dim=2).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got["signals"], expected, rtol=1e-10, atol=1e-10 * scale)
    np.testing.assert_allclose(got["jacobian"], expected, rtol=1e-6, atol=1e-6 * scale)  # float32 output
    for n in params:
        expected_fisher = (probs.unsqueeze(2) * grads[n] ** 2).sum(dim=(0, 1)).reshape(params[n].shape)
        torch.testing.assert_close(fisher[n], expected_fisher, rtol=1e-10, atol=1e-12)
    loop_norms = entropy_gradient_norms_loop(model, pool, idx)
    for m, values in norms.items():
        np.testing.assert_allclose(values, loop_norms, rtol=1e-10, err_msg=m)


class SequenceFirstNet(nn.Module):
    """A Linear over a sequence-first (T = 2, B, d) tensor, T equal to the probe's two samples, then the mean
    over the sequence: its output's first dimension is the sequence, not the batch."""

    classifier_name = "fc"

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.Linear(8, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x[:, 0, :2, :8].transpose(0, 1)  # (2, B, 8)
        return self.fc(torch.tanh(self.h(seq)).mean(dim=0))


def test_a_sequence_first_layer_as_long_as_the_probe_goes_to_the_fallback():
    """The probe has two samples and the sequence two steps: on the probe alone the Linear's output looked
    batch-first (its per-sample gradients were then mixed across samples); a second probe pass with one more
    sample tells them apart, so the Linear goes to the Jacobian fallback and every entry equals the loop."""
    torch.manual_seed(0)
    model = SequenceFirstNet().double().eval()
    pool = _pool("tokens", 5, torch.float64)
    params = dict(model.named_parameters())
    wanted = {n: torch.arange(p.numel()) for n, p in params.items()}
    layers, fallback = plan_signal_layers(model, wanted, torch.stack([pool[0][0], pool[1][0]]))
    assert [layer.name for layer in layers] == ["fc"] and sorted(fallback) == ["h.bias", "h.weight"]
    mask = FisherMask(tuple(params), tuple(wanted.values()), "fc.weight", False)
    idx = np.array([4, 1, 3, 0, 2])
    got = torch.cat([v for v, _ in _iter_signal_embeddings(model, pool, idx, mask, 2)]).numpy()
    grads, _ = _loop_log_prob_grads(model, pool, idx)
    expected = torch.cat([grads[n] for n in params], dim=2).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())
    norms = entropy_gradient_norms(model, pool, idx, chunk_size=2)
    np.testing.assert_allclose(norms, entropy_gradient_norms_loop(model, pool, idx), rtol=1e-10)
