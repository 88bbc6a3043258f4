"""Per-sample weight gradients from layer inputs and backprop signals, without per-sample backward passes.

For a layer y = f(a; W) that is linear in its weights (``nn.Linear``, ``nn.Conv2d`` with groups 1, BatchNorm
in eval mode), the gradient of a per-sample objective with respect to W is a product of the layer's input a
and the *signal* g = d objective / d y: Linear dW = g a^T, Conv2d dW = sum over positions of g times the
unfolded input, BatchNorm dgamma = sum of g times the normalised input, and every bias gradient is a sum of g.
With the model in eval mode the samples of a batch do not interact, so one backward pass of the batch *sum* of
an objective yields every sample's own signal; the gradients with respect to the weights are never formed by
autograd (only the signals are asked for), and per-sample gradients are formed layer by layer from (a, g).

When only some entries of a layer are wanted (a Fisher mask), only the signals of the output units (channels
or features) those entries belong to are kept, a convolution's input is unfolded only for the input channels
they read, and the products are formed on the block of wanted rows x columns (or row by row when sparse).

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
    units: torch.Tensor | None = None  # the output units (channels / features) whose signals are needed; None: all

    @property
    def unit_dim(self) -> int:
        """The dimension of the module's output (batch first) that indexes its units: features for Linear,
        channels for Conv2d and BatchNorm."""
        return -1 if isinstance(self.module, nn.Linear) else 1

    def unit_positions(self, units: torch.Tensor) -> torch.Tensor:
        """Where the given output units sit among the signals :func:`layer_signals` keeps for this layer."""
        return units if self.units is None else torch.searchsorted(self.units, units)


def _needed_units(module: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The output units that the wanted weight and bias entries involve (sorted), or None if that is all of them:
    Linear weight (out, in) and Conv2d weight (out, in, kh, kw) entries belong to their first index, BatchNorm's
    weight and every bias entry to their own index."""
    n_units = module.weight.shape[0] if module.weight is not None else module.bias.shape[0]
    per_unit = module.weight[0].numel() if module.weight is not None else 1
    parts = ([weight // per_unit] if weight is not None else []) + ([bias] if bias is not None else [])
    units = torch.unique(torch.cat(parts))
    return None if len(units) == n_units else units


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
        setattr(layer, attr, torch.as_tensor(idx, dtype=torch.int64, device=probe.device))
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
        layer.units = _needed_units(layer.module, layer.weight, layer.bias)
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
    sample b's own. Returns (output detached, {name: signals (B, n_objectives, *out)}, {name: input (B, *in)}),
    where a layer with ``units`` keeps only those units' signals (along its ``unit_dim``).
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
    signals = {}
    for i, layer in enumerate(layers):
        grads = [g[i] for g in per_objective]
        if layer.units is not None:  # on the model's device already (plan_signal_layers puts it there)
            grads = [g.index_select(layer.unit_dim % g.dim(), layer.units) for g in grads]
        signals[layer.name] = torch.stack(grads, dim=1)
    return out.detach(), signals, saved


def gather_products(g: torch.Tensor, u: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[b, c, k] = sum_l g[b, c, rows[k], l] * u[b, cols[k], l].

    When the wanted (row, col) pairs fill at least a quarter of the block spanned by their distinct rows and
    distinct columns, every product of that block is formed by one batched matrix product (an outer product for
    l = 1, e.g. a linear layer) and the wanted entries are gathered from it: at most 4x the output's memory.
    Sparser sets are grouped by row, one batched matrix product per distinct row (convolutions: l runs over
    output positions), or gathered and multiplied elementwise when l = 1."""
    b, c, n_rows, n_pos = g.shape
    distinct_rows, row_pos = torch.unique(rows, return_inverse=True)
    distinct_cols, col_pos = torch.unique(cols, return_inverse=True)
    n_r, n_c = len(distinct_rows), len(distinct_cols)
    if 4 * len(rows) >= n_r * n_c:
        gs = g if n_r == n_rows else g.index_select(2, distinct_rows)
        us = u if n_c == u.shape[1] else u.index_select(1, distinct_cols)
        if n_pos == 1:
            full = gs[..., 0].unsqueeze(3) * us[:, None, :, 0].unsqueeze(2)  # (B, C, n_r, n_c)
        else:
            full = torch.matmul(gs.reshape(b, c * n_r, n_pos), us.transpose(1, 2))
        full = full.reshape(b, c, n_r * n_c)
        flat = row_pos * n_c + col_pos
        if len(flat) == n_r * n_c and bool((flat == torch.arange(len(flat), device=flat.device)).all()):
            return full  # the whole block, in order (e.g. a whole weight tensor)
        return full.index_select(2, flat)
    if n_pos == 1:
        return g[..., 0].index_select(2, rows) * u[:, :, 0].index_select(1, cols).unsqueeze(1)
    order = torch.argsort(rows, stable=True)
    u_sorted = u.index_select(1, cols[order])  # (B, k, L), grouped by row: each group is a contiguous slice
    blocks, start = [], 0
    for r, n in zip(*torch.unique_consecutive(rows[order], return_counts=True), strict=True):
        n = int(n)
        blocks.append(torch.matmul(g[:, :, int(r), :], u_sorted[:, start : start + n, :].transpose(1, 2)))
        start += n
    return torch.cat(blocks, dim=2).index_select(2, torch.argsort(order))


def _batchnorm_normalised(m: nn.modules.batchnorm._BatchNorm, a: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (a.dim() - 2)
    return (a - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)


def layer_entries(layer: SignalLayer, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Wanted entries (B, C, k) of d objective / d weight and d bias, from the layer's input ``a`` (B, *in)
    and the signals ``g`` = d objective_c / d output (B, C, *out), C objectives, holding only the layer's
    ``units`` if it has them (as :func:`layer_signals` gives them)."""
    m = layer.module
    b, c = g.shape[:2]
    out: dict[str, torch.Tensor] = {}
    if isinstance(m, nn.Linear):
        a2 = a.reshape(b, -1, m.in_features)  # (B, T, in): T > 1 when the layer maps over extra dimensions
        g2 = g.reshape(b, c, -1, g.shape[-1])  # (B, C, T, units kept)
        if layer.weight is not None:
            rows = layer.unit_positions(layer.weight // m.in_features)
            out["weight"] = gather_products(g2.transpose(2, 3), a2.transpose(1, 2), rows, layer.weight % m.in_features)
        if layer.bias is not None:
            out["bias"] = g2.index_select(3, layer.unit_positions(layer.bias)).sum(2)
        return out
    g2 = g.reshape(b, c, g.shape[2], -1)  # (B, C, units kept, positions)
    if isinstance(m, nn.Conv2d):
        if layer.weight is not None:
            per_channel = m.kernel_size[0] * m.kernel_size[1]
            q = m.in_channels * per_channel
            cols = layer.weight % q
            channels = torch.unique(cols // per_channel)
            if len(channels) < m.in_channels:  # unfold only the input channels the wanted entries read
                a = a.index_select(1, channels)
                cols = torch.searchsorted(channels, cols // per_channel) * per_channel + cols % per_channel
            u = nn.functional.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (B, in'*kh*kw, L)
            out["weight"] = gather_products(g2, u, layer.unit_positions(layer.weight // q), cols)
        if layer.bias is not None:
            out["bias"] = g2.index_select(2, layer.unit_positions(layer.bias)).sum(3)
        return out
    # BatchNorm in eval mode: y = (a - mean) / sqrt(var + eps) * weight + bias, per channel (dimension 1)
    if layer.weight is not None:
        a_hat = _batchnorm_normalised(m, a).index_select(1, layer.weight).reshape(b, 1, len(layer.weight), -1)
        out["weight"] = (g2.index_select(2, layer.unit_positions(layer.weight)) * a_hat).sum(3)
    if layer.bias is not None:
        out["bias"] = g2.index_select(2, layer.unit_positions(layer.bias)).sum(3)
    return out


def layer_squared_norms(layer: SignalLayer, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Squared L2 norms (B, C) of the *whole* per-sample gradients of the layer's weight and bias (those of its
    tensors that ``layer`` wants), without forming what a closed form avoids.

    Linear with one input vector per sample: ||g a^T||^2 = ||g||^2 ||a||^2. Conv2d: the per-sample weight
    gradient G = g U^T (out x in*kh*kw) either formed by one batched matrix product (cost out * q * L per sample
    and objective) or, when cheaper, through Grams, ||G||^2 = sum_{l,m} (g_l . g_m)(u_l . u_m) (cost
    L^2 (out + q)); L output positions, q = in*kh*kw. BatchNorm and biases: their (small) entries.
    ``layer`` must want every unit (``units`` None): a squared norm of a whole tensor needs all its signals."""
    if layer.units is not None:
        raise ValueError(f"layer {layer.name!r} keeps only some units' signals; whole-gradient norms need all")
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
