"""Per-sample weight gradients from layer inputs and backprop signals, without per-sample backward passes.

For a layer y = f(a; W) that is linear in its weights (``nn.Linear``, ``nn.Conv2d`` with groups 1, BatchNorm
in eval mode), the gradient of a per-sample objective with respect to W is a product of the layer's input a
and the *signal* g = d objective / d y: Linear dW = g a^T, Conv2d dW = sum over positions of g times the
unfolded input, BatchNorm dgamma = sum of g times the normalised input, and every bias gradient is a sum of g.
With the model in eval mode the samples of a batch do not interact, so one backward pass of the batch *sum* of
an objective yields every sample's own signal; the gradients with respect to the weights are never formed by
autograd (only the signals are asked for), and per-sample gradients are formed layer by layer from (a, g).

Used by :mod:`activelab.inference.fisher` (masked Fisher embeddings: C objectives, log p(c|x) for each class)
and :mod:`activelab.inference.gradients` (entropy gradient norms: one objective, the entropy).

Layers of other types, or called more than once per forward pass, are not handled here: callers plan with
:func:`plan_signal_layers` and differentiate the returned fallback tensors another way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

_SIGNAL_MODULES = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class SignalLayer:
    """A module whose wanted weight entries are formed from its input and the backprop signal at its output."""

    name: str
    module: nn.Module
    weight: torch.Tensor | None  # wanted flat indices into the module's weight (sorted), or None
    bias: torch.Tensor | None  # wanted flat indices into its bias, or None
    out_shape: tuple[int, ...] = ()


def signal_supported(module: nn.Module) -> bool:
    """Linear, Conv2d (groups 1, zero padding) and BatchNorm with running statistics."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.running_mean is not None and module.running_var is not None
    return isinstance(module, _SIGNAL_MODULES)


def samples_independent(model: nn.Module) -> bool:
    """In eval mode, is each sample's output a function of that sample alone? Not if a BatchNorm normalises
    with the statistics of the batch (no running statistics)."""
    return not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None)
        for m in model.modules()
    )


def _shared_parameter_names(model: nn.Module) -> set[str]:
    """Names (as ``named_parameters`` gives them) of parameters that more than one module holds (tied weights):
    a hook on one module would miss the others' share of the gradient."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return {names[0] for names in owners.values() if len(names) > 1}


def plan_signal_layers(
    model: nn.Module, wanted: Mapping[str, torch.Tensor], probe: torch.Tensor
) -> tuple[list[SignalLayer], list[str]]:
    """Split the wanted parameter tensors ({name: sorted flat indices}) into signal layers and fallback tensor
    names (to differentiate directly).

    A signal layer is a supported module whose parameters no other module shares, called exactly once in a
    forward pass of ``probe`` (give at least two samples), with an output whose first dimension is the batch
    (a Linear over a (T, B, d) sequence-first tensor would not be). ``probe`` is only run, never differentiated.
    """
    modules = dict(model.named_modules())
    shared = _shared_parameter_names(model)
    layers: dict[str, SignalLayer] = {}
    fallback: list[str] = []
    for name, idx in wanted.items():
        prefix, _, attr = name.rpartition(".")
        module = modules.get(prefix)
        if module is None or attr not in ("weight", "bias") or not signal_supported(module) or name in shared:
            fallback.append(name)
            continue
        layer = layers.setdefault(prefix, SignalLayer(prefix, module, None, None))
        setattr(layer, attr, idx)
    calls: dict[str, list[tuple[int, ...]]] = {n: [] for n in layers}
    handles = [
        layer.module.register_forward_hook(lambda _m, _i, out, n=n: calls[n].append(tuple(out.shape)))
        for n, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    kept = []
    for n, layer in layers.items():
        # a module called twice or never, or whose output is not batch-first: differentiate its parameters
        if len(calls[n]) != 1 or not calls[n][0] or calls[n][0][0] != probe.shape[0]:
            fallback += [f"{n}.{a}" for a in ("weight", "bias") if getattr(layer, a) is not None]
            continue
        layer.out_shape = calls[n][0]
        kept.append(layer)
    return kept, fallback


def layer_signals(
    model: nn.Module,
    layers: Sequence[SignalLayer],
    x: torch.Tensor,
    objectives: Callable[[torch.Tensor], Sequence[torch.Tensor]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward pass over the batch with a hook adding a zero tensor (requiring grad) to each signal layer's
    output and saving its input, then one backward pass per objective w.r.t. those zeros.

    ``objectives(output)`` returns scalars, each a sum over the batch of a per-sample quantity. The parameters
    are held constant (only the zeros require grad), so each pass computes the gradients w.r.t. the layer
    outputs and nothing else; as samples do not interact in eval mode, the gradient of the sum at sample b is
    sample b's own. Returns (output detached, {name: signals (B, n_objectives, *out)}, {name: input (B, *in)}).
    """
    const = {n: p.detach() for n, p in model.named_parameters()}
    const.update({n: b.detach() for n, b in model.named_buffers()})
    eps: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_module, inputs, output):
            saved[name] = inputs[0].detach()
            eps[name] = torch.zeros_like(output, requires_grad=True)
            return output + eps[name]

        return add

    handles = [layer.module.register_forward_hook(hook(layer.name)) for layer in layers]
    try:
        with torch.enable_grad():
            out = functional_call(model, const, (x,))
            targets = list(objectives(out))
    finally:
        for h in handles:
            h.remove()
    names = [layer.name for layer in layers]
    if not names:
        return out.detach(), {}, saved
    # a layer that runs but does not reach the objective (e.g. an auxiliary head) gets zero signals
    per_objective = [
        torch.autograd.grad(
            t, [eps[n] for n in names], retain_graph=i < len(targets) - 1, allow_unused=True, materialize_grads=True
        )
        for i, t in enumerate(targets)
    ]
    signals = {n: torch.stack([g[i] for g in per_objective], dim=1) for i, n in enumerate(names)}
    return out.detach(), signals, saved


def gather_products(g: torch.Tensor, u: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[b, c, k] = sum_l g[b, c, rows[k], l] * u[b, cols[k], l].

    With l > 1 (convolutions: l runs over output positions) the entries are grouped by row, one batched matrix
    product per distinct row (output channel), or, when at least a quarter of all (row, col) pairs is wanted,
    every product in one matrix product followed by a gather; with l = 1 (linear layers) a gathered elementwise
    product, in blocks of k so that memory stays bounded."""
    if g.shape[-1] > 1:
        b, c, n_rows, n_pos = g.shape
        if 4 * len(rows) >= n_rows * u.shape[1]:  # a dense mask: all products in one matmul, then a gather
            full = torch.matmul(g.reshape(b, c * n_rows, n_pos), u.transpose(1, 2)).reshape(b, c, -1)
            return full[:, :, rows * u.shape[1] + cols]
        order = torch.argsort(rows, stable=True)
        distinct, counts = torch.unique_consecutive(rows[order], return_counts=True)
        u_sorted = u[:, cols[order], :]  # (B, k, L), grouped by row: each group is a contiguous slice
        blocks, start = [], 0
        for r, n in zip(distinct.tolist(), counts.tolist(), strict=True):
            blocks.append(torch.matmul(g[:, :, r, :], u_sorted[:, start : start + n, :].transpose(1, 2)))
            start += n
        return torch.cat(blocks, dim=2)[:, :, torch.argsort(order)]
    out = []
    step = max(1, int(2**22 // max(1, g.shape[0] * g.shape[1] * g.shape[-1])))
    for s in range(0, len(rows), step):
        r, c = rows[s : s + step], cols[s : s + step]
        out.append(torch.einsum("bckl,bkl->bck", g[:, :, r, :], u[:, c, :]))
    return torch.cat(out, dim=2)


def _batchnorm_normalised(m: nn.modules.batchnorm._BatchNorm, a: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (a.dim() - 2)
    return (a - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)


def layer_entries(layer: SignalLayer, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Wanted entries (B, C, k) of d objective / d weight and d bias, from the layer's input ``a`` (B, *in)
    and the signals ``g`` = d objective_c / d output (B, C, *out), C objectives."""
    m = layer.module
    b, c = g.shape[:2]
    out: dict[str, torch.Tensor] = {}
    if isinstance(m, nn.Linear):
        a2 = a.reshape(b, -1, m.in_features)  # (B, T, in): T > 1 when the layer maps over extra dimensions
        g2 = g.reshape(b, c, -1, m.out_features)  # (B, C, T, out)
        if layer.weight is not None:
            rows, cols = layer.weight // m.in_features, layer.weight % m.in_features
            if a2.shape[1] == 1:  # the usual case: one input vector per sample, entries g_o * a_j
                out["weight"] = g2[:, :, 0, rows] * a2[:, 0, cols].unsqueeze(1)
            else:
                out["weight"] = gather_products(g2.transpose(2, 3), a2.transpose(1, 2), rows, cols)
        if layer.bias is not None:
            out["bias"] = g2.sum(2)[:, :, layer.bias]
        return out
    if isinstance(m, nn.Conv2d):
        u = nn.functional.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (B, in*kh*kw, L)
        g2 = g.reshape(b, c, m.out_channels, -1)  # (B, C, out, L)
        if layer.weight is not None:
            q = u.shape[1]
            out["weight"] = gather_products(g2, u, layer.weight // q, layer.weight % q)
        if layer.bias is not None:
            out["bias"] = g2.sum(3)[:, :, layer.bias]
        return out
    # BatchNorm in eval mode: y = (a - mean) / sqrt(var + eps) * weight + bias, per channel (dimension 1)
    g2 = g.reshape(b, c, a.shape[1], -1)
    if layer.weight is not None:
        a_hat = _batchnorm_normalised(m, a)
        out["weight"] = (g2 * a_hat.reshape(b, 1, a.shape[1], -1)).sum(3)[:, :, layer.weight]
    if layer.bias is not None:
        out["bias"] = g2.sum(3)[:, :, layer.bias]
    return out


def layer_squared_norms(layer: SignalLayer, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Squared L2 norms (B, C) of the *whole* per-sample gradients of the layer's weight and bias (those of its
    tensors that ``layer`` wants), without forming what a closed form avoids.

    Linear with one input vector per sample: ||g a^T||^2 = ||g||^2 ||a||^2. Conv2d: the per-sample weight
    gradient G = g U^T (out x in*kh*kw) either formed by one batched matrix product (cost out * q * L per sample
    and objective) or, when cheaper, through Grams, ||G||^2 = sum_{l,m} (g_l . g_m)(u_l . u_m) (cost
    L^2 (out + q)); L output positions, q = in*kh*kw. BatchNorm and biases: their (small) entries."""
    m = layer.module
    b, c = g.shape[:2]
    out: dict[str, torch.Tensor] = {}
    if isinstance(m, nn.Linear) and a.reshape(b, -1, m.in_features).shape[1] == 1:
        g2 = g.reshape(b, c, m.out_features)
        if layer.weight is not None:
            out["weight"] = g2.pow(2).sum(2) * a.reshape(b, 1, m.in_features).pow(2).sum(2)
        if layer.bias is not None:
            out["bias"] = g2.pow(2).sum(2)
        return out
    if isinstance(m, nn.Conv2d) and layer.weight is not None:
        u = nn.functional.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (B, q, L)
        g2 = g.reshape(b, c, m.out_channels, -1)  # (B, C, out, L)
        q, n_pos = u.shape[1], u.shape[2]
        if n_pos * n_pos * (m.out_channels + q) < m.out_channels * q * n_pos:
            gram_u = torch.matmul(u.transpose(1, 2), u)  # (B, L, L)
            gram_g = torch.matmul(g2.transpose(2, 3), g2)  # (B, C, L, L)
            out["weight"] = (gram_g * gram_u.unsqueeze(1)).sum((2, 3))
        else:
            full = torch.matmul(g2.reshape(b, c * m.out_channels, n_pos), u.transpose(1, 2))  # (B, C*out, q)
            out["weight"] = full.reshape(b, c, -1).pow(2).sum(2)
        if layer.bias is not None:
            out["bias"] = g2.sum(3).pow(2).sum(2)
        return out
    return {attr: v.pow(2).sum(2) for attr, v in layer_entries(layer, a, g).items()}
