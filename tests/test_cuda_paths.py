"""CUDA code paths of the inference passes: batch moves, chunk sizes from the device's free memory, and half
precision. The CUDA tests run where CUDA is present and are skipped otherwise; the CPU side of each path (its
fallback, and that it changes nothing on CPU) runs everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import activelab
from activelab.inference.device import (
    free_memory_bytes,
    half_precision,
    half_precision_enabled,
    inference_autocast,
    probe_batch_size,
    rows_that_fit,
    to_device,
)
from activelab.inference.forward import forward_pass
from activelab.inference.mc import mc_statistics

from .conftest import TinyNet, make_pool

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


# -- CPU side: runs everywhere -------------------------------------------------------------------------------
def test_half_precision_is_a_no_op_on_cpu():
    model, pool = _model(), make_pool(50)
    idx = np.arange(50)
    ref = forward_pass(model, pool, idx, 16).logits
    with half_precision():
        assert half_precision_enabled()
        assert not isinstance(inference_autocast("cpu"), torch.autocast)
        np.testing.assert_array_equal(forward_pass(model, pool, idx, 16).logits, ref)
    assert not half_precision_enabled()


def test_rows_that_fit_divides_a_share_of_free_memory(monkeypatch):
    import activelab.inference.device as dev

    monkeypatch.setattr(dev, "free_memory_bytes", lambda device: 1000)
    assert rows_that_fit("cpu", 10, share=0.5) == 50
    assert rows_that_fit("cpu", 10, share=0.5, maximum=20) == 20
    assert rows_that_fit("cpu", 10**6) == 1  # never below the minimum
    monkeypatch.setattr(dev, "free_memory_bytes", lambda device: None)
    assert rows_that_fit("cpu", 10, default=123) == 123
    with pytest.raises(ValueError):
        rows_that_fit("cpu", 0)


def test_cpu_free_memory_and_probe():
    free = free_memory_bytes("cpu")
    assert free is None or free > 0
    assert probe_batch_size(_model(), torch.zeros(3, 32, 32)) == (64 << 20) // (3 * 32 * 32 * 4)
    assert probe_batch_size(_model(), torch.zeros(1, 8, 8)) == 1 << 16  # capped
    x = torch.ones(3)
    assert to_device(x, "cpu") is x


# -- CUDA ------------------------------------------------------------------------------------------------------
@cuda
def test_device_moves_give_the_cpu_picks():
    """select on CUDA: model moved and left there, batches moved per pass, the CPU's picks (uncertainty,
    core-set), and the caller's pool stays on the host."""
    pool, labeled = make_pool(200, seed=2), np.arange(0, 200, 10)
    for name in ("entropy", "margin", "coreset"):
        cpu = activelab.select(name, _model(), pool, labeled=labeled, budget=10, seed=1)
        model = _model()
        gpu = activelab.select(name, model, pool, labeled=labeled, budget=10, seed=1, device="cuda")
        assert next(model.parameters()).device.type == "cuda" and pool.x.device.type == "cpu"
        np.testing.assert_array_equal(np.sort(cpu), np.sort(gpu))
    x = torch.arange(6.0)
    y = to_device(x, "cuda")
    assert y.device.type == "cuda" and torch.equal(y.cpu(), x)


@cuda
def test_chunk_sizes_follow_the_devices_free_memory():
    free, _ = torch.cuda.mem_get_info()
    assert free_memory_bytes("cuda") == pytest.approx(free, rel=0.05)
    rows = rows_that_fit("cuda", 4096, share=0.1, maximum=1 << 40)
    assert rows == pytest.approx(free * 0.1 // 4096, rel=0.05)
    model = _model().cuda()
    small = probe_batch_size(model, torch.zeros(1, 8, 8), share=0.01)
    large = probe_batch_size(model, torch.zeros(1, 8, 8), share=0.5)
    assert 1 <= small <= large
    # a batch of that size fits: one forward of `large` rows stays within half the free memory
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(torch.zeros(min(large, 1 << 16), 1, 8, 8, device="cuda"))
    assert torch.cuda.max_memory_allocated() - base <= 0.5 * free


@cuda
def test_half_precision_inference_on_cuda():
    model, pool = _model().cuda(), make_pool(300, seed=4)
    idx = np.arange(300)
    full = forward_pass(model, pool, idx, 64).logits
    with half_precision():
        half = forward_pass(model, pool, idx, 64).logits
        stats = mc_statistics([model], pool, idx, 4, seed=0, batch_size=64)
    assert half.dtype == np.float32
    assert not np.array_equal(half, full)  # the pass did run in float16
    np.testing.assert_allclose(half, full, atol=2e-2, rtol=2e-2)
    assert np.array_equal(half.argmax(1), full.argmax(1)) or (half.argmax(1) != full.argmax(1)).mean() < 0.02
    assert stats.passes == 4 and np.allclose(stats.prob_sum.sum(1), 4)


@cuda
def test_fisher_embeddings_formed_inside_each_pass_on_cuda(monkeypatch):
    """The signal method with one backward pass per class (entries formed inside each pass by tensor hooks on
    CUDA tensors, token pairs built on the device, the chunk not written in place off the host) and the
    max_norm renormalisation before vmap: the CPU's embeddings and gradient norms, float64."""
    import activelab.inference.fisher as fisher
    from activelab.inference.fisher import FisherMask, masked_fisher_embeddings
    from activelab.inference.gradients import entropy_gradient_norms

    from .test_layer_signals import LinearTokensNet, MaxNormNet, _pool

    monkeypatch.setattr(fisher, "_vectorise_classes", lambda model, signal_bytes: False)
    pool = _pool("tokens", 7, torch.float64)
    idx = np.array([6, 0, 5, 1, 4, 2, 3])
    for make in (LinearTokensNet, lambda: MaxNormNet(True)):
        torch.manual_seed(0)
        model = make().double().eval()
        params = dict(model.named_parameters())
        mask = FisherMask(tuple(params), tuple(torch.arange(p.numel()) for p in params.values()), "fc.weight", False)
        masked_fisher_embeddings(model, pool, idx, mask, chunk_size=3)  # max_norm: rows renormalised once here
        cpu = masked_fisher_embeddings(model, pool, idx, mask, chunk_size=3)
        cpu_norms = entropy_gradient_norms(model, pool, idx, chunk_size=3)
        model.to("cuda")
        np.testing.assert_allclose(masked_fisher_embeddings(model, pool, idx, mask, chunk_size=3), cpu, atol=1e-6)
        np.testing.assert_allclose(entropy_gradient_norms(model, pool, idx, chunk_size=3), cpu_norms, rtol=1e-10)
