"""Norms of per-sample gradients of the predictive entropy with respect to the weights, batched.

The score of AL-GradNorm (Wang et al., AAAI 2022) and LPLgrad (2024): for each sample x, with the model in
eval mode and no augmentation, H(x) = -sum_c p(c|x) log p(c|x), and the score is a norm of dH/dtheta. The
authors' code looped over the pool one sample at a time (a forward and a backward pass per sample). Here a
chunk of samples takes one batched pass, by one of two methods:

- ``"signals"`` (default): one forward and one backward pass of the chunk's summed entropy, asking autograd
  only for the gradients at each layer's output (the signals); each layer's per-sample weight-gradient norm
  is then formed from its input and its signal (:mod:`activelab.inference.signals`: Linear, Conv1d / Conv2d
  (any groups, padding), BatchNorm (eval mode), GroupNorm, LayerNorm, RMSNorm and Embedding, each in closed
  form). Needs every differentiated tensor to belong to such a layer, called once per forward pass;
  otherwise the call falls back to ``"vmap"``.
- ``"vmap"``: ``vmap(grad(H))`` from ``torch.func``, any model; it materialises a chunk of per-sample
  gradients.

Memory: one chunk's activations and signals (signals) or per-sample gradients, O(chunk x P) for P weights
(vmap); ``chunk_size=None`` picks the chunk from a memory budget. Plus the (N,) scores.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from ..data.arrays import iter_batches
from ..errors import ActivelabError
from ..models.introspection import auxiliary_prefixes, classifier_name, eval_mode, model_device, renormed_embeddings
from .signals import (
    SignalLayer,
    layer_signals,
    layer_squared_norms,
    per_sample_block,
    plan_signal_layers,
    samples_independent,
)

GradNorm = Literal["per_tensor_sum", "global", "last_layer"]
NORMS: tuple[str, ...] = ("per_tensor_sum", "global", "last_layer")
Method = Literal["signals", "vmap"]
METHODS: tuple[str, ...] = ("signals", "vmap")

#: Budget for one chunk of per-sample gradients when ``chunk_size`` is not given.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def backbone_parameters(model: nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The model's (trainable) parameters by name, without the training-only heads its trainer declared
    (:func:`~activelab.models.introspection.mark_auxiliary`, e.g. the loss-prediction module)."""
    exclude = auxiliary_prefixes(model)
    return {
        name: p
        for name, p in model.named_parameters()
        if (p.requires_grad or not trainable_only) and not any(name.startswith(prefix) for prefix in exclude)
    }


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) along the last dimension (0 log 0 = 0 handled by log_softmax)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def reduce_norms(per_tensor: torch.Tensor, norm: GradNorm) -> torch.Tensor:
    """Combine (B, T) per-tensor L2 norms into (B,) scores: the sum of the norms ("per_tensor_sum"), or the
    L2 norm of all the tensors together ("global", and "last_layer" over the classifier's tensors)."""
    if norm in ("global", "last_layer"):
        return per_tensor.pow(2).sum(dim=1).sqrt()
    return per_tensor.sum(dim=1)


def _grad_names(model: nn.Module, norm: GradNorm, classifier: str | None) -> list[str]:
    params = backbone_parameters(model)
    if norm == "last_layer":
        prefix = classifier_name(model, classifier) + "."
        names = [n for n in params if n.startswith(prefix)]
        if not names:
            raise ActivelabError(f"the classifier {prefix[:-1]!r} has no trainable parameters")
        return names
    if not params:
        raise ActivelabError("the model has no trainable parameters to take entropy gradients of")
    return list(params)


def auto_chunk_size(model: nn.Module, names: list[str], budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Samples per vmapped chunk so that the chunk's per-sample gradients fit in ``budget_bytes``."""
    params = dict(model.named_parameters())
    per_sample = sum(params[n].numel() * params[n].element_size() for n in names)
    # gradients, plus about as much again for the vmapped backward's intermediates
    return int(max(1, min(256, budget_bytes // max(1, 2 * per_sample))))


def entropy_gradient_norms(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    *,
    norm: GradNorm = "per_tensor_sum",
    chunk_size: int | None = None,
    classifier: str | None = None,
    method: Method = "signals",
) -> np.ndarray:
    """Norm of dH(x)/dtheta for every ``dataset[indices]``, in order, as float64 (N,).

    Args:
        model: returns logits; used in eval mode (dropout off, BatchNorm running statistics).
        dataset: a torch Dataset of ``(x, y)``; labels are not read.
        indices: which samples.
        norm: ``"per_tensor_sum"`` (sum over the backbone's parameter tensors of per-tensor L2 norms:
            the paper's score), ``"global"`` (one L2 norm over all backbone parameters) or ``"last_layer"``
            (L2 norm over the classifier's weight and bias together).
        chunk_size: samples per batched pass (None: chosen from a 256 MiB budget).
        classifier: the classifier's module name for ``"last_layer"`` (default: the model's own).
        method: ``"signals"`` (layer signals, one backward pass per chunk; falls back to ``"vmap"`` for models
            it does not cover) or ``"vmap"`` (torch.func per-sample gradients); both give the same scores.

    Parameters of training-only heads (the loss-prediction module) are never part of theta.
    Complexity: signals, one forward and one backward pass per chunk plus, per layer and sample, the cheaper
    of out x q x L and L^2 (out + q) multiply-adds for a convolution (L positions, q = in x kh x kw); vmap,
    about one forward and one backward pass per sample, batched.
    """
    if norm not in NORMS:
        raise ActivelabError(f"unknown gradient norm {norm!r}; choose one of {', '.join(NORMS)}")
    if method not in METHODS:
        raise ActivelabError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if chunk_size is not None and chunk_size < 1:
        raise ActivelabError(f"chunk_size must be a positive integer; got {chunk_size}")
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return np.zeros(0, dtype=np.float64)
    names = _grad_names(model, norm, classifier)
    with eval_mode(model):
        if method == "signals" and samples_independent(model):
            layers = _signal_plan(model, dataset, indices, names)
            if layers is not None:
                return _signal_norms(model, dataset, indices, names, layers, norm, chunk_size)
        return _vmap_norms(model, dataset, indices, names, norm, chunk_size)


def _signal_plan(model: nn.Module, dataset: Dataset, indices: np.ndarray, names: list[str]) -> list[SignalLayer] | None:
    """The signal layers holding every tensor of ``names``, or None if some tensor is not covered."""
    params = dict(model.named_parameters())
    wanted = {n: torch.arange(params[n].numel()) for n in names}
    probe, _ = next(iter_batches(dataset, indices[:2], 2))
    layers, fallback = plan_signal_layers(model, wanted, probe.to(model_device(model)))
    return None if fallback else layers


def _signal_chunk(layers: list[SignalLayer], budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Samples per chunk so that the saved layer inputs, the signals and one layer's per-sample weight
    gradients (float32) fit in ``budget_bytes``, with room for the forward pass's own activations."""
    acts = sum(int(np.prod(layer.out_shape[1:])) for layer in layers)
    biggest = max(per_sample_block(layer) for layer in layers)
    return int(max(1, min(256, budget_bytes // max(1, 4 * (4 * acts + biggest)))))


def _signal_norms(model, dataset, indices, names, layers, norm, chunk_size) -> np.ndarray:
    chunk = chunk_size or _signal_chunk(layers)
    device = model_device(model)
    scores = []
    for x, _ in iter_batches(dataset, indices, chunk):
        _, signals, saved = layer_signals(model, layers, x.to(device), lambda logits: [entropy(logits).sum()])
        squared: dict[str, torch.Tensor] = {}
        for layer in layers:
            for attr, sq in layer_squared_norms(layer, saved[layer.name], signals[layer.name]).items():
                squared[layer.param_name(attr)] = sq[:, 0]
        del signals, saved
        per_tensor = torch.stack([squared[n].double().clamp_min(0).sqrt() for n in names], dim=1)
        scores.append(reduce_norms(per_tensor, norm).cpu())
    return torch.cat(scores).numpy()


def _vmap_norms(model, dataset, indices, names, norm, chunk_size) -> np.ndarray:
    chunk = chunk_size or auto_chunk_size(model, names)
    device = model_device(model)
    all_params = {n: p.detach() for n, p in backbone_parameters(model, trainable_only=False).items()}
    grad_params = {n: all_params.pop(n) for n in names}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_entropy(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (theta, all_params, buffers), (x.unsqueeze(0),))
        return entropy(logits)[0]

    per_sample_grad = vmap(grad(sample_entropy), in_dims=(None, 0))
    scores = []
    for x, _ in iter_batches(dataset, indices, chunk):
        x = x.to(device)
        with renormed_embeddings(model, x):
            grads = per_sample_grad(grad_params, x)
        per_tensor = torch.stack([grads[n].flatten(1).norm(dim=1) for n in names], dim=1)
        scores.append(reduce_norms(per_tensor.double(), norm).cpu())
        del grads
    return torch.cat(scores).numpy()


def entropy_gradient_norms_loop(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    *,
    norm: GradNorm = "per_tensor_sum",
    classifier: str | None = None,
) -> np.ndarray:
    """The same scores one sample at a time with ``torch.autograd.grad`` (the authors' way).

    Slow by design: the independent reference for tests and benchmarks.
    """
    if norm not in NORMS:
        raise ActivelabError(f"unknown gradient norm {norm!r}; choose one of {', '.join(NORMS)}")
    indices = np.asarray(indices, dtype=np.int64)
    names = _grad_names(model, norm, classifier)
    params = dict(model.named_parameters())
    theta = [params[n] for n in names]
    device = model_device(model)
    scores = []
    with eval_mode(model):
        for x, _ in iter_batches(dataset, indices, 1):
            h = entropy(model(x.to(device)))[0]
            grads = torch.autograd.grad(h, theta, allow_unused=True)
            norms = torch.stack([g.norm() if g is not None else torch.zeros((), device=device) for g in grads])
            scores.append(reduce_norms(norms.double().unsqueeze(0), norm).cpu())
    return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float64)
