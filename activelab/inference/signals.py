"""Per-sample weight gradients from layer inputs and backprop signals, without per-sample backward passes.

For a layer y = f(a; W) that is linear in its weights, the gradient of a per-sample objective with respect to
W is a product of the layer's input a and the *signal* g = d objective / d y, in closed form per layer kind:

- ``nn.Linear``: dW = g a^T (summed over extra positions when the layer maps over them);
- ``nn.Conv1d`` / ``nn.Conv2d``, any stride, dilation, padding (``"same"``, ``"valid"``, reflect / replicate /
  circular modes) and groups (grouped, depthwise): dW = sum over output positions of g times the input patch,
  formed for the whole chunk by one weight-gradient convolution with the batch folded into the groups
  (:func:`conv_weight_grads`), or, for norms, through Gram matrices when a layer has few output positions (a
  Conv1d's input Gram shifted along the kernel, :func:`_shifted_gram`, never the unfolded input);
- BatchNorm (eval mode, running statistics), GroupNorm, LayerNorm, RMSNorm, y = a_hat * weight + bias:
  d weight = sum of g * a_hat over the positions that share the parameter (BatchNorm: (sum g a - mean sum g)
  / sqrt(var + eps), so a_hat is not formed), d bias = sum of g;
- ``nn.Embedding``, y_t = W[i_t]: dW[v] = sum of g_t over the tokens with i_t = v (zero at ``padding_idx``,
  divided by the token's count in the sample with ``scale_grad_by_freq``), never the V x D gradient.

With the model in eval mode the samples of a batch do not interact, so one backward pass of the batch *sum* of
an objective yields every sample's own signal; the gradients with respect to the weights are never formed by
autograd (only the signals are asked for), and per-sample gradients are formed layer by layer from (a, g).

When only some entries of a layer are wanted (a Fisher mask), only the signals of the output units (channels
or features) those entries belong to are kept (when that is at most half of them), a convolution's input is
used only for the input channels they read, and the products are formed on the block of wanted rows x
columns, or, when that block would be much bigger than the wanted set (or than the wanted rows padded to the
longest, where the signals have unit stride along the positions or the positions are few), by one batched
product per sample and row over that row's wanted columns
(:func:`rowwise_products`), or entry by entry. That index work depends on the wanted entries and the shapes
only, so it is done on a layer's first chunk and kept (:attr:`SignalLayer.plans`). When the objectives are
differentiated one backward pass at a time, an Embedding and a Linear over positions (the latter while its block
is small enough, :func:`_per_pass_plan`) form their entries inside each pass, so their signals are not kept
for later (only a layer that keeps some units copies those units' signals in each pass).

Used by :mod:`activelab.inference.fisher` (masked Fisher embeddings: C - 1 objectives, log p(c|x) for each
class but the sample's most probable one)
and :mod:`activelab.inference.gradients` (entropy gradient norms: one objective, the entropy).

Layers of other types, or called more than once per forward pass, are not handled here: callers plan with
:func:`plan_signal_layers` and differentiate the returned fallback tensors another way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

_CONV = (nn.Conv1d, nn.Conv2d)
#: Modules whose batching rules give wrong results under vmap (nn.PReLU: nested vmaps mix the two batch
#: dimensions); models holding one never get vectorised backward passes.
VMAP_UNSAFE = (nn.PReLU,)
#: Modules whose backward PyTorch runs once per objective under vmap (a loop, then a concatenation), as profiled
#: with torch 2.14: a backward pass vectorised over the objectives gains nothing through them and loses to
#: separate passes by its C-fold tensors (LayerNorm models: about 2x).
LOOPED_UNDER_VMAP = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)


@dataclass(frozen=True)
class FormedEntries:
    """A layer's wanted entries {"weight" / "bias": (B, C, k)}, formed pass by pass as :func:`layer_signals`
    ran one backward pass per objective (an Embedding's, :class:`_PassEmbedding`; a Linear over positions',
    :func:`_per_pass_plan`), in place of its signals."""

    entries: dict[str, torch.Tensor]


#: A layer's signals for C objectives, (B, C, *out), or its entries already formed from them (:class:`FormedEntries`).
Signals = torch.Tensor | FormedEntries
#: Normalisation layers y = a_hat * weight + bias whose parameters are per channel (dimension 1 of the output).
_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
#: Normalisation layers whose parameters run over the trailing ``normalized_shape`` dimensions.
_TRAILING_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass
class SignalLayer:
    """A module whose wanted weight entries are formed from its input and the backprop signal at its output."""

    name: str
    module: nn.Module
    weight: torch.Tensor | None  # wanted flat indices into the module's weight (sorted), or None
    bias: torch.Tensor | None  # wanted flat indices into its bias, or None
    out_shape: tuple[int, ...] = ()
    units: torch.Tensor | None = None  # the output units (channels / features) whose signals are needed; None: all
    # index work that depends on the wanted entries and the shapes only, done on the first chunk (see _cached)
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def unit_dim(self) -> int:
        """The dimension of the module's output (batch first) that indexes its units: features for Linear,
        Embedding and LayerNorm (last), channels for convolutions, BatchNorm and GroupNorm (1)."""
        return 1 if isinstance(self.module, _CONV + _CHANNEL_NORMS) else -1

    def param_name(self, attr: str) -> str:
        """The model's name of this layer's parameter ``attr`` ("weight" or "bias"; the root module's: bare)."""
        return f"{self.name}.{attr}" if self.name else attr

    def unit_positions(self, units: torch.Tensor) -> torch.Tensor:
        """Where the given output units sit among the signals :func:`layer_signals` keeps for this layer."""
        return units if self.units is None else torch.searchsorted(self.units, units)


def _units_of(module: nn.Module, attr: str, idx: torch.Tensor) -> torch.Tensor:
    """The output unit each wanted flat entry of ``module.<attr>`` belongs to: a Linear weight (out, in) or
    convolution weight (out, in/groups, *k) entry to its first index, an Embedding weight (V, D) entry to its
    column, a normalisation layer's entries and every bias entry to their own index."""
    if attr == "bias":
        return idx
    if isinstance(module, nn.Embedding):
        return idx % module.embedding_dim
    if isinstance(module, (nn.Linear,) + _CONV):
        return idx // module.weight[0].numel()
    return idx


def _needed_units(module: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The output units that the wanted weight and bias entries involve (sorted), or None: more than half of
    them, or a layer whose signals are kept whole (a grouped convolution, a LayerNorm over more than one
    dimension)."""
    if isinstance(module, _CONV) and module.groups > 1:
        return None
    if isinstance(module, _TRAILING_NORMS) and len(module.normalized_shape) > 1:
        return None
    if isinstance(module, nn.Embedding):
        n_units = module.embedding_dim
    else:
        n_units = module.weight.shape[0] if module.weight is not None else module.bias.shape[0]
    parts = [_units_of(module, a, i) for a, i in (("weight", weight), ("bias", bias)) if i is not None]
    units = torch.unique(torch.cat(parts))
    # keeping most units would save little and cost a gather of the signals (slow along the last dimension)
    return None if 2 * len(units) > n_units else units


def signal_supported(module: nn.Module) -> bool:
    """Linear, Conv1d / Conv2d (any groups, padding or padding mode), BatchNorm with running statistics,
    GroupNorm, LayerNorm, RMSNorm and Embedding (with ``max_norm`` too: its forward renormalises the rows it reads
    in place, without grad, before the lookup, so the gradient is the plain lookup's, as PyTorch's is)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.running_mean is not None and module.running_var is not None
    return isinstance(module, (nn.Linear, nn.GroupNorm, nn.Embedding) + _CONV + _TRAILING_NORMS)


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
    forward pass, with an output whose first dimension is the batch (a Linear over a (T, B, d) sequence-first
    tensor is not), checked on two passes: of ``probe`` (give at least two samples) and of ``probe`` plus its
    first sample again. ``probe`` is only run, never differentiated.
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
    # two passes, of the probe and of the probe plus one sample: a batch-first output follows the batch size in
    # both (a sequence-first one whose length happens to equal one batch size does not follow it in the other)
    batches = (probe, torch.cat([probe, probe[:1]]))
    calls: list[dict[str, list[tuple[int, ...]]]] = [{n: [] for n in layers} for _ in batches]
    for batch, seen in zip(batches, calls, strict=True):
        handles = [
            layer.module.register_forward_hook(lambda _m, _i, out, n=n, seen=seen: seen[n].append(tuple(out.shape)))
            for n, layer in layers.items()
        ]
        try:
            with torch.no_grad():
                model(batch)
        finally:
            for h in handles:
                h.remove()

    def batch_first(n: str) -> bool:
        return all(
            len(seen[n]) == 1 and bool(seen[n][0]) and seen[n][0][0] == batch.shape[0]
            for batch, seen in zip(batches, calls, strict=True)
        )

    kept = []
    for n, layer in layers.items():
        # a module called twice or never, or whose output is not batch-first: differentiate its parameters
        if not batch_first(n):
            fallback += [layer.param_name(a) for a in ("weight", "bias") if getattr(layer, a) is not None]
            continue
        layer.out_shape = calls[0][n][0]
        layer.units = _needed_units(layer.module, layer.weight, layer.bias)
        kept.append(layer)
    return kept, fallback


def _forward_with_signal_hooks(
    model: nn.Module,
    layers: Sequence[SignalLayer],
    x: torch.Tensor,
    objectives: Callable[[torch.Tensor], Sequence[torch.Tensor]],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
    """The forward pass of :func:`layer_signals`: (output, objectives, the zeros added to the layers' outputs
    in the order of ``layers``, {name: the layer's input detached})."""
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
    return out, targets, [eps[layer.name] for layer in layers], saved


def layer_signals(
    model: nn.Module,
    layers: Sequence[SignalLayer],
    x: torch.Tensor,
    objectives: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    vectorise: bool = True,
    buffers: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, Signals], dict[str, torch.Tensor]]:
    """One forward pass over the batch with a hook adding a zero tensor (requiring grad) to each signal layer's
    output and saving its input, then the gradients of each objective w.r.t. those zeros.

    ``objectives(output)`` returns scalars, each a sum over the batch of a per-sample quantity. The parameters
    are held constant (only the zeros require grad), so each pass computes the gradients w.r.t. the layer
    outputs and nothing else; as samples do not interact in eval mode, the gradient of the sum at sample b is
    sample b's own. With ``vectorise`` (and no module in ``VMAP_UNSAFE``), several objectives are
    differentiated in one backward pass vectorised over them; otherwise by one backward pass per objective,
    each pass's signals copied into an (n_objectives, B, *out) tensor as it ends. That costs what a
    per-objective loop's passes cost, where the vectorised pass is slower: modules whose backward PyTorch
    runs once per objective under vmap (normalisation layers), or signals too big for the cache.
    ``buffers``: a dict the caller keeps across chunks, holding those tensors for reuse (a fresh tensor of
    several MiB per chunk costs its page faults again). With one pass per objective and more than one
    objective, every Embedding, and a Linear mapped over positions whose block is small enough
    (:func:`_per_pass_plan`), forms its wanted entries from each pass's signals as the pass computes them (a
    tensor hook), and gets them as :class:`FormedEntries` instead of signals (:func:`layer_entries` and
    :func:`layer_squared_norms` take either form).
    Returns (output detached, {name: signals (B, n_objectives, *out) or FormedEntries}, {name: input (B, *in)}),
    where a layer with ``units`` keeps only those units' signals (along its ``unit_dim``); the signals are a
    strided view, valid until the next call with the same ``buffers``.
    """
    out, targets, inputs, saved = _forward_with_signal_hooks(model, layers, x, objectives)
    if not layers:
        return out.detach(), {}, saved
    signals = {}
    n = len(targets)
    if vectorise and n > 1 and not any(isinstance(m, VMAP_UNSAFE) for m in model.modules()):
        # all objectives in one backward pass, vectorised over them (torch's is_grads_batched): each layer's
        # signals come out as (n_objectives, B, *out), so no per-objective copies are stacked
        grads = torch.autograd.grad(
            torch.stack(targets),
            inputs,
            torch.eye(n, dtype=targets[0].dtype, device=targets[0].device),
            is_grads_batched=True,
            allow_unused=True,  # a layer that runs but does not reach the objective (an auxiliary head): zeros
            materialize_grads=True,
        )
        for layer, g, e in zip(layers, grads, inputs, strict=True):
            if g.dim() == e.dim():  # an unused input's materialised zeros lack the objectives' dimension
                g = g.unsqueeze(0).expand(n, *g.shape)
            if layer.units is not None:  # on the model's device already (plan_signal_layers puts it there)
                g = g.index_select(1 + layer.unit_dim % (g.dim() - 1), layer.units)
            signals[layer.name] = g.transpose(0, 1)  # (B, n_objectives, *out), a view
        return out.detach(), signals, saved
    stacked: dict[str, torch.Tensor] = {}
    formed: dict[str, _PassEntries | _PassEmbedding] = {}
    if n > 1:
        for layer, e in zip(layers, inputs, strict=True):
            if isinstance(layer.module, nn.Embedding):
                formed[layer.name] = _PassEmbedding(layer, saved[layer.name], n, e)
            elif (plan := _per_pass_plan(layer, tuple(e.shape))) is not None:
                formed[layer.name] = _PassEntries(layer, plan, saved[layer.name], n, e)
    current = [0]  # the objective whose backward pass is running
    handles = [  # each formed layer takes its signals as the pass computes them, while they are in the cache
        e.register_hook(lambda g, entries=formed[layer.name]: entries.take(current[0], g))
        for layer, e in zip(layers, inputs, strict=True)
        if layer.name in formed
    ]
    try:
        for i, t in enumerate(targets):
            current[0] = i
            grads = torch.autograd.grad(t, inputs, retain_graph=i < n - 1, allow_unused=True, materialize_grads=True)
            for layer, g in zip(layers, grads, strict=True):
                if layer.name in formed:
                    continue
                g = _keep_units(layer, g)
                if n == 1:  # one objective: a view, not a copy
                    stacked[layer.name] = g.unsqueeze(0)
                else:
                    if i == 0:
                        stacked[layer.name] = _held_buffer(layer, n, g, buffers)
                    stacked[layer.name][i] = g
            del grads  # freed before the next pass, which reuses their memory
    finally:
        for h in handles:
            h.remove()
    signals = {name: v.transpose(0, 1) for name, v in stacked.items()}
    signals.update({name: FormedEntries(entries.entries) for name, entries in formed.items()})
    return out.detach(), signals, saved


def _keep_units(layer: SignalLayer, g: torch.Tensor) -> torch.Tensor:
    """A layer's signals for one objective (B, *out), only its ``units`` where it keeps some."""
    return g if layer.units is None else g.index_select(layer.unit_dim % g.dim(), layer.units)


#: A Linear over positions forms its wanted entries pass by pass (:func:`_per_pass_plan`) while its whole block
#: of kept units x wanted columns is at most this many times its padded row-wise products.
_PER_PASS_RATIO = 12


@dataclass(frozen=True)
class PerPassPlan:
    """How a Linear over positions forms its wanted entries from one objective's signals: the block of its kept
    units x ``cols`` of its input (None: all), then the wanted places ``flat`` in it (None: all, in order);
    ``bias``: its wanted bias entries among the kept units (None: all, in order)."""

    cols: torch.Tensor | None
    flat: torch.Tensor | None
    bias: torch.Tensor | None


def _per_pass_plan(layer: SignalLayer, out_shape: tuple[int, ...]) -> PerPassPlan | None:
    """Whether a layer forms its wanted entries pass by pass, as one backward pass per objective computes its
    signals, rather than from every objective's signals copied together: for a Linear mapped over positions
    whose block (kept units x the wanted entries' distinct input columns, or all columns when more than half
    are wanted) is at most ``_PER_PASS_RATIO`` times its padded row-wise products. Each pass then costs one
    batched product of that block (B x units x positions x columns multiply-adds, at matrix-product speed, on
    signals still in the cache) and no copy of them (but of the kept units' when there are fewer); the row-wise
    products on copied signals do fewer multiply-adds but run several times slower per multiply-add on tensors
    C times bigger (the token models of ``benchmarks/bench_layer_signals.py``, whose 5% masks are well inside
    the ratio, came up from 0.39-0.47 and 0.39-0.42 of their ceilings to 0.43-0.49)."""
    m = layer.module
    if not isinstance(m, nn.Linear) or len(out_shape) < 3:
        return None

    def make() -> PerPassPlan | None:
        n_units = m.out_features if layer.units is None else len(layer.units)
        bias = None if layer.bias is None else _subset(layer.unit_positions(layer.bias), n_units)
        if layer.weight is None:
            return PerPassPlan(None, None, bias)
        rows = layer.unit_positions(layer.weight // m.in_features)
        cols = layer.weight % m.in_features
        distinct, col_pos = torch.unique(cols, return_inverse=True)
        if 2 * len(distinct) > m.in_features:  # most columns: all of them, so the input is not gathered
            distinct, col_pos = torch.arange(m.in_features, device=cols.device), cols
        n_c = len(distinct)
        if n_units * n_c > _PER_PASS_RATIO * row_plan(rows, cols, n_units).size:
            return None
        return PerPassPlan(_subset(distinct, m.in_features), _subset(rows * n_c + col_pos, n_units * n_c), bias)

    return _cached(layer, ("per pass", out_shape[1:]), make)


class _PassEntries:
    """The wanted entries (B, C, k) of one layer, filled in pass by pass (see :func:`_per_pass_plan`); an
    objective that does not reach the layer leaves its entries zero."""

    def __init__(self, layer: SignalLayer, plan: PerPassPlan, a: torch.Tensor, n: int, like: torch.Tensor) -> None:
        m, b = layer.module, a.shape[0]
        self.layer, self.plan = layer, plan
        self.a = None if layer.weight is None else _take(a.reshape(b, -1, m.in_features), 2, plan.cols)
        self.entries: dict[str, torch.Tensor] = {}
        if layer.weight is not None:
            self.entries["weight"] = like.new_zeros(b, n, len(layer.weight))
        if layer.bias is not None:
            self.entries["bias"] = like.new_zeros(b, n, len(layer.bias))

    def take(self, i: int, g: torch.Tensor) -> None:
        g2 = _keep_units(self.layer, g)
        g2 = g2.reshape(g2.shape[0], -1, g2.shape[-1])  # (B, positions, units kept)
        if self.a is not None:
            block = torch.bmm(g2.transpose(1, 2), self.a)  # (B, units kept, columns)
            block = block.reshape(block.shape[0], -1)
            self.entries["weight"][:, i] = block if self.plan.flat is None else block.index_select(1, self.plan.flat)
        if "bias" in self.entries:
            sums = g2.sum(1)
            self.entries["bias"][:, i] = sums if self.plan.bias is None else sums.index_select(1, self.plan.bias)


def _held_buffer(layer: SignalLayer, n: int, g: torch.Tensor, buffers: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """The layer's tensor for ``n`` objectives' signals like ``g``: the one ``buffers`` holds when it fits, else a
    new one (then held there)."""
    held = None if buffers is None else buffers.get(layer.name)
    if held is None or held.shape != (n, *g.shape) or held.dtype != g.dtype or held.device != g.device:
        held = _signal_buffer(layer, n, g)
        if buffers is not None:
            buffers[layer.name] = held
    return held


def _signal_buffer(layer: SignalLayer, n: int, g: torch.Tensor) -> torch.Tensor:
    """An (n, *g.shape) tensor for ``n`` objectives' signals like ``g``, objective-major as a vectorised pass
    leaves them; for a Linear mapped over positions (B, *positions, units), as (n, B, units, positions), so
    that its products over positions (:func:`rowwise_products`, the block's matrix products) read each
    (sample, unit)'s signals of all objectives as a matrix with unit stride along the positions (a strided
    matrix product, no copy; copying one objective's signals in is a fast batched transpose)."""
    if isinstance(layer.module, nn.Linear) and g.dim() > 2:
        b, units = g.shape[0], g.shape[-1]
        held = g.new_empty(n, b, units, int(np.prod(g.shape[1:-1])))
        return held.transpose(2, 3).unflatten(2, g.shape[1:-1])
    return g.new_empty(n, *g.shape)


def _cached(layer: SignalLayer, key: tuple, make: Callable[[], object]):
    """``make()``, computed once per layer and ``key`` (the shapes it depends on): the index work of the closed
    forms depends only on the wanted entries and the shapes, not on the chunk's values, so later chunks reuse it."""
    if key not in layer.plans:
        layer.plans[key] = make()
    return layer.plans[key]


def _subset(idx: torch.Tensor, n: int) -> torch.Tensor | None:
    """``idx``, or None when it is every index 0..n-1 in order (a gather that :func:`_take` skips)."""
    if len(idx) == n and bool((idx == torch.arange(n, device=idx.device)).all()):
        return None
    return idx


def _sq_norm(t: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """Sum of squares of ``t`` over ``dim``, in one pass (no squared copy): about twice as fast as pow + sum."""
    return torch.linalg.vector_norm(t, dim=dim).square()


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    """``t.index_select(dim, idx)``, or ``t`` itself when ``idx`` is None or every index in order (no copy)."""
    if idx is None or _subset(idx, t.shape[dim]) is None:
        return t
    return t.index_select(dim, idx)


def _kept_positions(layer: SignalLayer, attr: str, n_kept: int) -> torch.Tensor | None:
    """Where the wanted entries of ``layer.<attr>`` (one per unit: a bias, a normalisation layer's weight) sit
    among the ``n_kept`` units whose signals the layer keeps; None: all of them, in order."""
    return _cached(layer, ("kept", attr, n_kept), lambda: _subset(layer.unit_positions(getattr(layer, attr)), n_kept))


def _wanted_units(layer: SignalLayer, attr: str, n_units: int) -> torch.Tensor | None:
    """The wanted entries of ``layer.<attr>`` (one per unit) among all ``n_units``; None: all, in order."""
    return _cached(layer, ("wanted", attr, n_units), lambda: _subset(getattr(layer, attr), n_units))


#: Wanted entries are formed from the whole block of their distinct rows x distinct columns by one batched
#: matrix product (then gathered) unless that block is more than this many times their number.
_BLOCK_RATIO = 32
#: ... or more than this many times the padded row-wise products (:func:`rowwise_products`), whose small
#: batched products run several times slower per multiply-add than the block's; that only over at most
#: _FEW_POSITIONS positions when the signals are not laid out with unit stride along the positions (over more,
#: the copy of the signals the row-wise products then need costs more than the block saves).
_ROWWISE_RATIO = 6
_FEW_POSITIONS = 64
#: Row-wise products are padded to the row with the most wanted entries; when that padding would more than
#: _PAD_RATIO-fold the entries, sparse sets are instead gathered and multiplied elementwise (in pieces of at most
#: _GATHER_ELEMENTS numbers) over few positions, or taken by one batched matrix product per distinct row.
_PAD_RATIO = 4
_GATHER_POSITIONS = 64
_GATHER_ELEMENTS = 2**22


@dataclass(frozen=True)
class RowPlan:
    """Wanted (row, col) pairs grouped by row and padded: ``pad`` (rows, width) holds each distinct row's columns
    (padding repeats column 0), ``where[k]`` is pair k's place in the flattened (rows x width) products."""

    rows: torch.Tensor | None  # the distinct rows, sorted; None: every row in order
    pad: torch.Tensor  # (number of distinct rows, width) columns
    where: torch.Tensor  # (k,) flat positions into (rows * width)

    @property
    def size(self) -> int:
        return int(self.pad.numel())


def row_plan(rows: torch.Tensor, cols: torch.Tensor, n_rows: int | None = None) -> RowPlan:
    """Group the pairs (rows[k], cols[k]) by row, padded to the longest row (see :class:`RowPlan`); ``n_rows``:
    how many rows there are (to know when every one is used)."""
    distinct, row_pos = torch.unique(rows, return_inverse=True)
    if n_rows is not None and 2 * len(distinct) >= n_rows:  # most rows: all of them, so none is gathered
        distinct, row_pos = torch.arange(n_rows, device=rows.device), rows
    order = torch.argsort(row_pos, stable=True)
    counts = torch.bincount(row_pos, minlength=len(distinct))
    width = int(counts.max()) if len(counts) else 0
    sorted_rows = row_pos[order]
    slot = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[sorted_rows]
    pad = torch.zeros(len(distinct), width, dtype=torch.int64, device=rows.device)
    pad[sorted_rows, slot] = cols[order]
    where = torch.empty_like(order)
    where[order] = sorted_rows * width + slot
    return RowPlan(distinct if n_rows is None else _subset(distinct, n_rows), pad, where)


def rowwise_products(g: torch.Tensor, u: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """out[b, c, k] = sum_l g[b, c, rows[k], l] * u[b, cols[k], l] for the pairs of ``plan``: one batched matrix
    product over (sample, distinct row) of that row's signals (C x L) by its padded columns of ``u`` (L x width),
    then a gather of the wanted places. Cost: B x rows x C x width x L multiply-adds, and a copy of the signals
    of the rows and of the padded columns of ``u``."""
    b, c, _, n_pos = g.shape
    n_r, width = plan.pad.shape
    if u.stride(2) != 1:  # a Linear's input (B, positions, in) seen transposed: one batched transpose, so that
        u = u.contiguous()  # the gather below copies whole rows (an element-wise strided gather: 3x slower)
    ug = u.index_select(1, plan.pad.reshape(-1)).view(b, n_r, width, n_pos)
    prod = torch.matmul(_take(g, 2, plan.rows).transpose(1, 2), ug.transpose(2, 3))  # (B, rows, C, width)
    return prod.transpose(1, 2).reshape(b, c, n_r * width).index_select(2, plan.where)


@dataclass(frozen=True)
class ProductPlan:
    """How :func:`gather_products` forms its entries for given pairs and shapes: the path and its index work."""

    path: str  # "block", "elementwise", "rowwise", "gather" or "loop"
    rows: torch.Tensor
    cols: torch.Tensor
    block_rows: torch.Tensor | None = None  # block: its rows and columns (None: all, in order)
    block_cols: torch.Tensor | None = None
    block_width: int = 0
    flat: torch.Tensor | None = None  # block: the wanted places in it (None: all, in order)
    rowwise: RowPlan | None = None
    loop: tuple | None = None  # loop: (order, cols in that order, [(row, count)], inverse order)


def product_plan(
    rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int, n_pos: int, unit_major: bool = True
) -> ProductPlan:
    """Choose the path of :func:`gather_products` for the pairs (rows[k], cols[k]) of ``n_rows`` x ``n_cols``
    products over ``n_pos`` positions, and do its index work. ``unit_major``: the signals have unit stride
    along the positions (convolutions; a Linear's signals from one backward pass per objective, see
    :func:`layer_signals`), so the row-wise products read them without a copy, over any number of positions."""
    distinct_rows, row_pos = torch.unique(rows, return_inverse=True)
    distinct_cols, col_pos = torch.unique(cols, return_inverse=True)
    n_r, n_c, k = len(distinct_rows), len(distinct_cols), len(rows)
    rowwise = row_plan(rows, cols, n_rows) if n_pos > 1 else None
    if 2 * n_r > n_rows:  # most rows: the block spans them all, rather than gathering them first
        distinct_rows, row_pos, n_r = torch.arange(n_rows, device=rows.device), rows, n_rows
    if 2 * n_c > n_cols:
        distinct_cols, col_pos, n_c = torch.arange(n_cols, device=cols.device), cols, n_cols
    if n_r * n_c <= _BLOCK_RATIO * k and (
        rowwise is None or (n_pos > _FEW_POSITIONS and not unit_major) or n_r * n_c <= _ROWWISE_RATIO * rowwise.size
    ):
        block_rows, block_cols = _subset(distinct_rows, n_rows), _subset(distinct_cols, n_cols)
        flat = _subset(row_pos * n_c + col_pos, n_r * n_c)
        return ProductPlan("block", rows, cols, block_rows, block_cols, n_c, flat)
    if n_pos == 1:
        return ProductPlan("elementwise", rows, cols)
    if rowwise.size <= _PAD_RATIO * k:
        return ProductPlan("rowwise", rows, cols, rowwise=rowwise)
    if n_pos < _GATHER_POSITIONS:
        return ProductPlan("gather", rows, cols)
    order = torch.argsort(rows, stable=True)
    distinct, counts = torch.unique_consecutive(rows[order], return_counts=True)
    groups = list(zip(distinct.tolist(), counts.tolist(), strict=True))
    return ProductPlan("loop", rows, cols, loop=(order, cols[order], groups, torch.argsort(order)))


def gather_products(
    g: torch.Tensor, u: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, plan: ProductPlan | None = None
) -> torch.Tensor:
    """out[b, c, k] = sum_l g[b, c, rows[k], l] * u[b, cols[k], l].

    When the block spanned by the wanted (row, col) pairs' distinct rows and distinct columns is at most
    ``_BLOCK_RATIO`` times their number and (with signals at unit stride along the positions, or over few
    positions; see :func:`product_plan`) at most ``_ROWWISE_RATIO`` times the padded row-wise products, every
    product of that block is formed by one batched matrix product (an outer product for
    l = 1, e.g. a linear layer) and the wanted entries are gathered from it. Otherwise, for l > 1, the padded
    row-wise products (:func:`rowwise_products`) unless padding would cost more than ``_PAD_RATIO`` times the
    entries; then sparse sets are gathered and multiplied elementwise when l is small (l = 1, or a Linear mapped
    over a few positions), or grouped by row, one batched matrix product per distinct row. ``plan``: the
    :func:`product_plan` of these pairs and shapes, when the caller keeps it (it is made here otherwise)."""
    b, c, n_rows, n_pos = g.shape
    if plan is None:
        plan = product_plan(rows, cols, n_rows, u.shape[1], n_pos, unit_major=n_pos > 1 and g.stride(3) == 1)
    if plan.path == "block":
        gs, us = _take(g, 2, plan.block_rows), _take(u, 1, plan.block_cols)
        n_r, n_c = gs.shape[2], us.shape[1]
        if n_pos == 1:
            full = gs[..., 0].unsqueeze(3) * us[:, None, :, 0].unsqueeze(2)  # (B, C, n_r, n_c)
        else:  # one batched product per objective: signals laid out objective-major need no copy
            full = g.new_empty(c, b, n_r, n_c)
            for i in range(c):
                torch.matmul(gs[:, i], us.transpose(1, 2), out=full[i])
            full = full.transpose(0, 1)
        return _take(full.reshape(b, c, n_r * n_c), 2, plan.flat)
    if plan.path == "elementwise":
        return g[..., 0].index_select(2, rows) * u[:, :, 0].index_select(1, cols).unsqueeze(1)
    if plan.path == "rowwise":
        return rowwise_products(g, u, plan.rowwise)
    k = len(rows)
    if plan.path == "gather":
        step = max(1, _GATHER_ELEMENTS // (b * c * n_pos))
        pieces = [
            (g.index_select(2, rows[s : s + step]) * u.index_select(1, cols[s : s + step]).unsqueeze(1)).sum(3)
            for s in range(0, k, step)
        ]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    _, cols_sorted, groups, inverse = plan.loop
    u_sorted = u.index_select(1, cols_sorted)  # (B, k, L), grouped by row: each group is a contiguous slice
    blocks, start = [], 0
    for r, n in groups:
        blocks.append(torch.matmul(g[:, :, r, :], u_sorted[:, start : start + n, :].transpose(1, 2)))
        start += n
    return torch.cat(blocks, dim=2).index_select(2, inverse)


def _normalised(m: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """a_hat of a GroupNorm, LayerNorm or RMSNorm y = a_hat * weight + bias, as its forward computes it."""
    if isinstance(m, nn.GroupNorm):
        return nn.functional.group_norm(a, m.num_groups, None, None, m.eps)
    if isinstance(m, nn.LayerNorm):
        return nn.functional.layer_norm(a, m.normalized_shape, None, None, m.eps)
    return nn.functional.rms_norm(a, m.normalized_shape, None, m.eps)


def _norm_entries(layer: SignalLayer, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Normalisation layers: d weight = sum of g * a_hat and d bias = sum of g over every output position
    that shares the parameter (spatial positions for channel norms; leading dimensions for LayerNorm).
    BatchNorm in eval mode, a_hat = (a - mean) / sqrt(var + eps) with the running statistics: d weight =
    (sum g a - mean sum g) / sqrt(var + eps), so a_hat is never formed."""
    m = layer.module
    b, c = g.shape[:2]
    out: dict[str, torch.Tensor] = {}
    if isinstance(m, _CHANNEL_NORMS):  # parameters along dimension 1
        g2 = g.reshape(b, c, g.shape[2], -1)  # (B, C, units kept, positions)
        if layer.weight is not None:
            gw = _take(g2, 2, _kept_positions(layer, "weight", g2.shape[2]))
            wanted = _wanted_units(layer, "weight", a.shape[1])
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                a_w = _take(a, 1, wanted).reshape(b, 1, len(layer.weight), -1)
                sums = (gw * a_w).sum(3) - _take(m.running_mean, 0, wanted) * gw.sum(3)
                out["weight"] = sums / torch.sqrt(_take(m.running_var, 0, wanted) + m.eps)
            else:
                a_hat = _take(_normalised(m, a), 1, wanted).reshape(b, 1, len(layer.weight), -1)
                out["weight"] = (gw * a_hat).sum(3)
        if layer.bias is not None:
            out["bias"] = _take(g2, 2, _kept_positions(layer, "bias", g2.shape[2])).sum(3)
        return out
    n_param = m.weight.numel() if m.weight is not None else m.bias.numel()
    n_kept = n_param if layer.units is None else len(layer.units)
    g2 = g.reshape(b, c, -1, n_kept)  # (B, C, leading positions, parameter entries kept)
    if layer.weight is not None:
        wanted = _wanted_units(layer, "weight", n_param)
        a_hat = _take(_normalised(m, a).reshape(b, 1, -1, n_param), 3, wanted)
        out["weight"] = (_take(g2, 3, _kept_positions(layer, "weight", n_kept)) * a_hat).sum(2)
    if layer.bias is not None:
        out["bias"] = _take(g2, 3, _kept_positions(layer, "bias", n_kept)).sum(2)
    return out


# -- convolutions ------------------------------------------------------------------------------------------------
def _conv_padding(m: nn.Module) -> list[int]:
    """The zero (or ``padding_mode``) padding of a Conv1d / Conv2d as F.pad's list for a 2-D input
    (left, right, top, bottom), a Conv1d being a Conv2d of height 1; ``padding="same"`` puts the odd element on
    the right / bottom, as PyTorch does."""
    dims = len(m.kernel_size)
    if m.padding == "valid":
        pads = [(0, 0)] * dims
    elif m.padding == "same":
        totals = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in m.padding]
    if dims == 1:
        pads = [(0, 0)] + pads
    return [pads[1][0], pads[1][1], pads[0][0], pads[0][1]]


def _conv_as_2d(m: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The layer's input as (B, in, H, W) with any padding that is not symmetric zeros applied, and the 2-D
    geometry (kernel, stride, dilation, padding) under which a Conv2d on it equals the layer."""
    two = (lambda t: tuple(t)) if len(m.kernel_size) == 2 else (lambda t: (1,) + tuple(t))
    if a.dim() == 3:  # Conv1d: (B, in, T) -> (B, in, 1, T)
        a = a.unsqueeze(2)
    pad = _conv_padding(m)
    if m.padding_mode == "zeros" and pad[0] == pad[1] and pad[2] == pad[3]:
        padding = (pad[2], pad[0])
    else:
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a, padding = nn.functional.pad(a, pad, mode=mode), (0, 0)
    return a, {"kernel": two(m.kernel_size), "stride": two(m.stride), "dilation": two(m.dilation), "padding": padding}


def _unfold(a: torch.Tensor, geom: dict) -> torch.Tensor:
    """The unfolded input (B, in * kh * kw, output positions) of a 2-D convolution: for a 1x1 kernel with
    stride 1 and no padding, the input itself reshaped (no copy)."""
    if geom["kernel"] == (1, 1) and geom["stride"] == (1, 1) and tuple(geom["padding"]) == (0, 0):
        return a.reshape(a.shape[0], a.shape[1], -1)
    return nn.functional.unfold(a, geom["kernel"], geom["dilation"], geom["padding"], geom["stride"])


def conv_weight_grads(geom: dict, groups: int, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-objective weight gradients of a 2-D convolution, (B, C, out, in/groups * kh * kw), in
    the weight's own layout, by one weight-gradient convolution over the whole chunk: the batch is folded into
    the groups (sample b's input channels are group b's, its C x out signals group b's outputs), so the
    backend's weight-gradient kernel does the work and no unfolded input is materialised.

    ``a`` (B, in, H, W) as :func:`_conv_as_2d` gives it, ``g`` (B, C, out, H', W'): every output channel,
    unless ``groups`` is 1 (then any subset of output channels and input channels: those of ``g`` and ``a``)."""
    b, c, n_out = g.shape[:3]
    n_in = a.shape[1]
    kh, kw = geom["kernel"]
    out_g = n_out // groups
    if groups == 1:
        grad_out = g.reshape(1, b * c * n_out, *g.shape[3:])
    else:  # each group's output channels together: (B, G, C, out/G)
        grad_out = g.reshape(b, c, groups, out_g, *g.shape[3:]).transpose(1, 2).reshape(1, -1, *g.shape[3:])
    weight = a.new_zeros(()).expand(b * c * n_out, n_in // groups, kh, kw)  # only its shape is read
    _, grads, _ = torch.ops.aten.convolution_backward(
        grad_out.contiguous(),
        a.reshape(1, b * n_in, *a.shape[2:]),
        weight,
        None,
        list(geom["stride"]),
        list(geom["padding"]),
        list(geom["dilation"]),
        False,
        [0, 0],
        b * groups,
        [False, True, False],
    )
    if groups == 1:
        return grads.reshape(b, c, n_out, -1)
    return grads.reshape(b, groups, c, out_g, -1).transpose(1, 2).reshape(b, c, n_out, -1)


def _signals_2d(g: torch.Tensor) -> torch.Tensor:
    """A Conv1d's signals (B, C, out, T') as (B, C, out, 1, T'); a Conv2d's as they are."""
    return g.unsqueeze(3) if g.dim() == 4 else g


#: The weight-gradient convolution forms a whole block of entries (rows x input channels x kernel) at a cost
#: per entry several times below that of the per-row products, so it is used unless the wanted entries fill
#: less than 1 / _CONV_BLOCK_RATIO of that block, or the layer has few output positions (the kernel's matrix
#: products per sample are small) and the block is more than _ROWWISE_RATIO times the padded row-wise products,
#: or a 1x1 kernel (batched matrix products on the input itself are faster).
_CONV_BLOCK_RATIO = 32


def _conv_plan(layer: SignalLayer, kk: int, n_pos: int, n_kept: int) -> dict:
    """The index work of :func:`_conv_entries` (see there), for a layer whose kernel has ``kk`` entries, with
    ``n_pos`` output positions and ``n_kept`` output channels' signals kept."""
    m = layer.module
    q_g = m.weight[0].numel()  # in/groups * kk: one output channel's entries
    rows, within = layer.weight // q_g, layer.weight % q_g
    if m.groups == 1:
        distinct_rows = torch.unique(rows)
        channels = torch.unique(within // kk)
        block = len(distinct_rows) * len(channels) * kk
    else:
        block = m.weight.numel()
    cols = (rows // (m.out_channels // m.groups)) * q_g + within  # columns of the whole unfolded input
    # a 1x1 kernel: unfolding is a reshape, and batched matrix products beat the weight-gradient kernel
    if (
        kk > 1
        and block <= _CONV_BLOCK_RATIO * len(layer.weight)
        and not (n_pos <= _FEW_POSITIONS and block > _ROWWISE_RATIO * row_plan(rows, cols).size)
    ):
        if m.groups > 1:
            return {"path": "conv", "rows": None, "channels": None, "flat": _subset(layer.weight, m.weight.numel())}
        flat = torch.searchsorted(distinct_rows, rows) * (len(channels) * kk)
        flat = flat + torch.searchsorted(channels, within // kk) * kk + within % kk
        return {
            "path": "conv",
            "rows": _subset(layer.unit_positions(distinct_rows), n_kept),
            "channels": _subset(channels, m.in_channels),
            "flat": _subset(flat, block),
        }
    # sparse: per-row products with the unfolded input, on the input channels read only
    channels = torch.unique(cols // kk)
    if len(channels) < m.in_channels:
        cols = torch.searchsorted(channels, cols // kk) * kk + cols % kk
    rows = layer.unit_positions(rows)
    plan = product_plan(rows, cols, n_kept, len(channels) * kk, n_pos)
    return {"path": "products", "channels": _subset(channels, m.in_channels), "plan": plan}


def _conv_entries(layer: SignalLayer, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Convolutions: d weight[o, j, k] = sum over output positions of g_o times the input patch entry it
    multiplies, by :func:`conv_weight_grads` on the block of wanted rows and read input channels, or by
    :func:`gather_products` with the unfolded input (input channels read only) when the wanted entries fill
    little of that block, when the layer has few output positions and the padded row-wise products cost much
    less than the block, or for a 1x1 kernel; d bias = sum of g over positions."""
    m = layer.module
    b, c = g.shape[:2]
    out: dict[str, torch.Tensor] = {}
    if layer.weight is not None:
        a2, geom = _conv_as_2d(m, a)
        g2 = _signals_2d(g)
        kk = geom["kernel"][0] * geom["kernel"][1]
        n_pos = int(np.prod(g2.shape[3:]))
        plan = _cached(layer, ("conv", kk, n_pos, g2.shape[2]), lambda: _conv_plan(layer, kk, n_pos, g2.shape[2]))
        a2 = _take(a2, 1, plan["channels"])
        if plan["path"] == "conv":
            g2 = _take(g2, 2, plan["rows"])
            full = conv_weight_grads(geom, m.groups, a2, g2).reshape(b, c, -1)
            out["weight"] = _take(full, 2, plan["flat"])
        else:
            pp = plan["plan"]
            u = _unfold(a2, geom)
            out["weight"] = gather_products(g2.reshape(b, c, g2.shape[2], -1), u, pp.rows, pp.cols, pp)
    if layer.bias is not None:
        out["bias"] = _take(g.reshape(b, c, g.shape[2], -1), 2, _kept_positions(layer, "bias", g.shape[2])).sum(3)
    return out


def _shifted_gram(a2: torch.Tensor, geom: dict, groups: int, n_pos: int) -> torch.Tensor:
    """U^T U (B, groups, L, L) of a convolution whose kernel is one row (a Conv1d as a Conv2d of height 1), per
    group, without unfolding: output position l reads input positions l s + k d (stride s, dilation d), so
    (u_l . u_m) = sum over kernel offsets k of A[l s + k d, m s + k d], A = a^T a the Gram of the (padded) input
    positions over the group's channels. Cost in x T^2 + groups x kw x L^2 per sample."""
    b, n_in = a2.shape[:2]
    pw = geom["padding"][1]
    a1 = a2[:, :, 0]
    if pw:
        a1 = nn.functional.pad(a1, (pw, pw))
    a1 = a1.reshape(b, groups, n_in // groups, -1)
    gram_a = torch.matmul(a1.transpose(2, 3), a1)  # (B, groups, T, T)
    s, d, kw = geom["stride"][1], geom["dilation"][1], geom["kernel"][1]
    span = (n_pos - 1) * s + 1
    gram_u = gram_a[:, :, :span:s, :span:s].clone()
    for k in range(1, kw):
        gram_u += gram_a[:, :, k * d : k * d + span : s, k * d : k * d + span : s]
    return gram_u


def _conv_squared_norms(layer: SignalLayer, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """||d weight||^2 of a convolution: the per-sample gradient G = g U^T formed by the weight-gradient
    convolution (cost C x out x q x L per sample for C objectives, q = in/groups x kh x kw, L output positions),
    or, when cheaper, through Grams, ||G||^2 = sum_{l,m} (g_l . g_m)(u_l . u_m) per group: for a one-row kernel
    (Conv1d) U^T U from the input's Gram (:func:`_shifted_gram`, cost in x T^2 + groups x kw x L^2), otherwise,
    ungrouped, from the unfolded input (q x L^2); plus C x out x L^2 for the signals' Grams. Gram work is
    counted 2x (one-row kernels) or 4x (unfolded) dearer per operation than the weight-gradient kernel's."""
    m = layer.module
    b, c = g.shape[:2]
    out: dict[str, torch.Tensor] = {}
    g_flat = g.reshape(b, c, m.out_channels, -1)  # (B, C, out, L)
    if layer.weight is not None:
        a2, geom = _conv_as_2d(m, a)
        q, n_pos, n_out, groups = m.weight[0].numel(), g_flat.shape[3], m.out_channels, m.groups
        direct = c * n_out * q * n_pos
        gram_g = c * n_out * n_pos * n_pos
        one_row = geom["kernel"][0] == 1 and a2.shape[2] == 1 and geom["padding"][0] == 0
        if one_row:
            n_t = a2.shape[3] + 2 * geom["padding"][1]
            shifted = a2.shape[1] * n_t * n_t + groups * geom["kernel"][1] * n_pos * n_pos
        if one_row and 2 * (shifted + gram_g) < direct:
            gram_u = _shifted_gram(a2, geom, groups, n_pos)  # (B, groups, L, L)
            g_groups = g_flat.reshape(b, c, groups, n_out // groups, n_pos)
            grams = torch.matmul(g_groups.transpose(3, 4), g_groups)  # (B, C, groups, L, L)
            out["weight"] = (grams * gram_u.unsqueeze(1)).sum((2, 3, 4))
        elif groups == 1 and 4 * (q * n_pos * n_pos + gram_g) < direct:
            u = _unfold(a2, geom)
            gram_u = torch.matmul(u.transpose(1, 2), u)  # (B, L, L)
            grams = torch.matmul(g_flat.transpose(2, 3), g_flat)  # (B, C, L, L)
            out["weight"] = (grams * gram_u.unsqueeze(1)).sum((2, 3))
        else:
            out["weight"] = _sq_norm(conv_weight_grads(geom, m.groups, a2, _signals_2d(g)), (2, 3))
    if layer.bias is not None:
        out["bias"] = _sq_norm(g_flat.sum(3), 2)
    return out


# -- embeddings --------------------------------------------------------------------------------------------------
def _token_weights(m: nn.Embedding, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Per-token factors of an Embedding's weight gradient (B, T), or None if all are 1: 0 at ``padding_idx``
    (PyTorch leaves that row's gradient zero), 1 / (count of the token in its sample) with
    ``scale_grad_by_freq`` (the frequency within the sample, as a per-sample backward pass sees it)."""
    if m.padding_idx is None and not m.scale_grad_by_freq:
        return None
    w = torch.ones(idx.shape, dtype=dtype, device=idx.device)
    if m.scale_grad_by_freq:
        counts = (idx.unsqueeze(2) == idx.unsqueeze(1)).sum(2)  # (B, T): occurrences of each token in its sample
        w = w / counts.to(dtype)
    if m.padding_idx is not None:
        w = w.masked_fill(idx == m.padding_idx, 0)
    return w


def _embedding_pairs(layer: SignalLayer, tokens: torch.Tensor, n_cols: int, dtype: torch.dtype) -> tuple:
    """The (token, wanted entry of its row) pairs of an Embedding's closed form for ``tokens`` (B, T):
    (read: each pair's place in one objective's flattened signals (B, T, n_cols), write: its place in the
    flattened (B, k) entries, factor: its token factor or None). Kept while the tokens repeat (a position
    embedding sees the same tokens in every chunk)."""
    m = layer.module
    k = len(layer.weight)

    def make() -> tuple[torch.Tensor, ...]:
        # wanted entries are sorted by flat index, so grouped by row: row r's entries are starts[r] .. + counts[r]
        vocab_rows, counts = torch.unique_consecutive(layer.weight // m.embedding_dim, return_counts=True)
        cols = layer.unit_positions(layer.weight % m.embedding_dim)
        row_of = torch.full((m.num_embeddings,), -1, dtype=torch.int64, device=vocab_rows.device)
        row_of[vocab_rows] = torch.arange(len(vocab_rows), device=vocab_rows.device)
        if m.padding_idx is not None:  # that row's gradient is zero
            row_of[m.padding_idx] = -1
        return row_of, counts, torch.cumsum(counts, 0) - counts, cols

    row_of, counts, starts, cols = _cached(layer, ("embedding",), make)
    held = layer.plans.get("embedding pairs")
    if held is not None and held[0].shape == tokens.shape and torch.equal(held[0], tokens):
        return held[1:]  # the same tokens as the last chunk (a position embedding)
    rows = row_of[tokens.reshape(-1)]  # (B * T): the token's place among the rows with wanted entries, -1 if none
    where = (rows >= 0).nonzero().squeeze(1)  # the tokens (flat sample * T + position) whose row has wanted entries
    rows = rows[where]
    per_token = counts[rows]
    token = torch.repeat_interleave(per_token)  # one per (token, wanted entry of its row) pair
    entry = (starts[rows] - torch.cumsum(per_token, 0) + per_token)[token]
    entry += torch.arange(len(token), device=tokens.device)  # the pair's wanted entry
    at = where[token]
    read = at * n_cols + cols[entry]
    write = at.div(tokens.shape[1], rounding_mode="floor") * k + entry
    factor = _token_weights(m, tokens, dtype).reshape(-1)[at] if m.scale_grad_by_freq else None
    layer.plans["embedding pairs"] = (tokens.clone(), read, write, factor)
    return read, write, factor


#: An Embedding forms its wanted entries by one-hot products (:func:`_embedding_block`) rather than by a gather
#: and a scatter-add per (token, wanted entry of its row) pair while the products cost at most this many
#: multiply-adds per pair: a multiply-add in a batched matrix product costs a small fraction of a pair's gather
#: and scatter, and finding each chunk's pairs costs more than both (``benchmarks/bench_layer_signals.py
#: --mask fisher``: dense masks on a small vocabulary take the products; its random 5% masks take the pairs).
_EMBEDDING_BLOCK_MACS = 100


def _embedding_block(
    layer: SignalLayer, tokens: torch.Tensor, n_cols: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An Embedding's wanted entries as products: d W[v, :] = sum_t [i_t = v] factor_t g_t for the vocabulary
    rows v that hold wanted entries, one batched matrix product per objective of the one-hot (B, rows, T)
    matrix of ``tokens`` (B, T), times the token factors, by the signals (B, T, ``n_cols``), then a gather of the
    wanted places. Returns (that one-hot matrix, the wanted places in the flattened (rows x n_cols) products),
    or None where the per-pair gather and scatter costs less: the products do B x T x rows x n_cols
    multiply-adds, the pairs number the wanted entries of each token's row summed over the tokens
    (``_EMBEDDING_BLOCK_MACS``)."""
    m = layer.module

    def make() -> tuple[torch.Tensor, ...]:
        vocab_rows = layer.weight // m.embedding_dim
        rows, row_pos = torch.unique(vocab_rows, return_inverse=True)
        per_row = torch.bincount(vocab_rows, minlength=m.num_embeddings)  # wanted entries per vocabulary row
        if m.padding_idx is not None:  # that row's gradient is zero: no pairs
            per_row[m.padding_idx] = 0
        return rows, per_row, row_pos * n_cols + layer.unit_positions(layer.weight % m.embedding_dim)

    rows, per_row, flat = _cached(layer, ("embedding block", n_cols), make)
    pairs = int(per_row[tokens].sum())
    if tokens.numel() * len(rows) * n_cols > _EMBEDDING_BLOCK_MACS * pairs:
        return None
    one_hot = (tokens.unsqueeze(1) == rows.view(1, -1, 1)).to(dtype)  # (B, rows, T)
    factors = _token_weights(m, tokens, dtype)
    if factors is not None:
        one_hot *= factors.unsqueeze(1)
    return one_hot, flat


def _embedding_products(block: tuple[torch.Tensor, torch.Tensor], g: torch.Tensor, out: torch.Tensor) -> None:
    """One objective's entries from :func:`_embedding_block`'s one-hot matrix: its product with the signals ``g``
    (B, T, columns), the wanted places gathered into ``out`` (B, k)."""
    one_hot, flat = block
    prod = torch.bmm(one_hot, g)  # (B, rows, columns)
    torch.index_select(prod.reshape(prod.shape[0], -1), 1, flat, out=out)


def _embedding_entries(layer: SignalLayer, idx: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Embedding y_t = W[i_t]: d W[v, j] = sum over tokens t with i_t = v of g_t[j] (times the token factors).
    Either one-hot products per objective (:func:`_embedding_block`, when their multiply-adds are few enough),
    or each token whose row v holds wanted entries adds its signal's wanted columns to those entries: one gather
    and one scatter-add over the (token, wanted entry of its row) pairs (:func:`_embedding_pairs`), nothing per
    vocabulary row. ``g``: the signals (B, C, *out)."""
    b, c = g.shape[:2]
    k = len(layer.weight)
    tokens = idx.reshape(b, -1)
    block = _embedding_block(layer, tokens, g.shape[-1], g.dtype)
    if block is not None:
        g4 = g.reshape(b, c, tokens.shape[1], g.shape[-1])  # a view of the objective-major signals
        out = g.new_empty(c, b, k)
        for i in range(c):
            _embedding_products(block, g4[:, i], out[i])
        return {"weight": out.transpose(0, 1)}
    read, write, factor = _embedding_pairs(layer, tokens, g.shape[-1], g.dtype)
    # from the objective-major layout (C, B * T * columns), as the vectorised backward leaves the signals: one
    # contiguous gather per objective, not an advanced index with a slice in the middle
    values = g.reshape(b, c, -1).transpose(0, 1).reshape(c, -1).index_select(1, read)
    if factor is not None:
        values = values * factor
    out = values.new_zeros(c, b * k).index_add_(1, write, values)
    return {"weight": out.view(c, b, k).transpose(0, 1)}


class _PassEmbedding:
    """An Embedding's wanted entries (B, C, k), filled in pass by pass from each pass's signals while in the
    cache, nothing of them kept for later: by one-hot products (:func:`_embedding_block`) or gathered at the
    token pairs (:func:`_embedding_pairs`)."""

    def __init__(self, layer: SignalLayer, idx: torch.Tensor, n: int, like: torch.Tensor) -> None:
        b, k = idx.shape[0], len(layer.weight)
        n_cols = like.shape[-1] if layer.units is None else len(layer.units)
        tokens = idx.reshape(b, -1)
        self.layer, self.b, self.k = layer, b, k
        self.block = _embedding_block(layer, tokens, n_cols, like.dtype)
        if self.block is None:
            self.read, self.write, self.factor = _embedding_pairs(layer, tokens, n_cols, like.dtype)
        self.out = like.new_zeros(n, b * k)  # an objective that does not reach the layer leaves its entries zero
        self.entries = {"weight": self.out.view(n, b, k).transpose(0, 1)}

    def take(self, i: int, g: torch.Tensor) -> None:
        g = _keep_units(self.layer, g)
        if self.block is not None:
            _embedding_products(self.block, g.reshape(self.b, -1, g.shape[-1]), self.out[i].view(self.b, self.k))
            return
        values = g.reshape(-1).index_select(0, self.read)
        self.out[i].index_add_(0, self.write, values if self.factor is None else values * self.factor)


def _embedding_squared_norms(layer: SignalLayer, idx: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """||d W||^2 = sum over distinct tokens v of a sample of ||sum_{t: i_t = v} g_t||^2: the signals summed per
    (sample, token) pair (at most B x T rows, never the V x D gradient), squared, summed per sample."""
    m = layer.module
    b, c = g.shape[:2]
    tokens = idx.reshape(b, -1)
    n_tok = tokens.shape[1]
    g_tok = g.reshape(b, c, n_tok, -1).transpose(1, 2).reshape(b * n_tok, c, -1)  # (B*T, C, D)
    factors = _token_weights(m, tokens, g.dtype)
    if factors is not None:
        g_tok = g_tok * factors.reshape(-1, 1, 1)
    keys = tokens + torch.arange(b, device=tokens.device).unsqueeze(1) * m.num_embeddings
    pairs, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
    sums = g_tok.new_zeros(len(pairs), c, g_tok.shape[2]).index_add_(0, inverse, g_tok)
    per_sample = g.new_zeros(b, c).index_add_(0, pairs // m.num_embeddings, _sq_norm(sums, 2))
    return {"weight": per_sample}


def per_sample_block(layer: SignalLayer) -> int:
    """The most numbers one sample and objective's closed form forms at once for this layer: its weight (a
    convolution's weight-gradient block, a Linear's outer product), or for an Embedding one signal per token
    (its V x D gradient is never formed)."""
    m = layer.module
    if isinstance(m, nn.Embedding):
        return int(np.prod(layer.out_shape[1:])) if layer.out_shape else m.embedding_dim
    return int(m.weight.numel()) if m.weight is not None else 0


# -- dispatch ----------------------------------------------------------------------------------------------------
def layer_entries(layer: SignalLayer, a: torch.Tensor, g: Signals) -> dict[str, torch.Tensor]:
    """Wanted entries (B, C, k) of d objective / d weight and d bias, from the layer's input ``a`` (B, *in)
    and the signals ``g`` = d objective_c / d output (B, C, *out), C objectives, holding only the layer's
    ``units`` if it has them (as :func:`layer_signals` gives them), or the entries themselves
    (:class:`FormedEntries`, returned as they are)."""
    if isinstance(g, FormedEntries):
        return g.entries
    m = layer.module
    if isinstance(m, _CONV):
        return _conv_entries(layer, a, g)
    if isinstance(m, nn.Embedding):
        return _embedding_entries(layer, a, g)
    if not isinstance(m, nn.Linear):
        return _norm_entries(layer, a, g)
    b, c = g.shape[:2]
    out: dict[str, torch.Tensor] = {}
    a2 = a.reshape(b, -1, m.in_features)  # (B, T, in): T > 1 when the layer maps over extra dimensions
    g2 = g.reshape(b, c, -1, g.shape[-1])  # (B, C, T, units kept)
    if layer.weight is not None:
        unit_major = g2.shape[2] > 1 and g2.stride(2) == 1  # positions at unit stride (see _signal_buffer)

        def make() -> ProductPlan:
            rows = layer.unit_positions(layer.weight // m.in_features)
            return product_plan(rows, layer.weight % m.in_features, g2.shape[3], m.in_features, g2.shape[2], unit_major)

        plan = _cached(layer, ("linear", g2.shape[2], g2.shape[3], unit_major), make)
        out["weight"] = gather_products(g2.transpose(2, 3), a2.transpose(1, 2), plan.rows, plan.cols, plan)
    if layer.bias is not None:
        out["bias"] = _take(g2, 3, _kept_positions(layer, "bias", g2.shape[3])).sum(2)
    return out


def layer_squared_norms(layer: SignalLayer, a: torch.Tensor, g: Signals) -> dict[str, torch.Tensor]:
    """Squared L2 norms (B, C) of the *whole* per-sample gradients of the layer's weight and bias (those of its
    tensors that ``layer`` wants), without forming what a closed form avoids.

    Linear with one input vector per sample: ||g a^T||^2 = ||g||^2 ||a||^2. Convolutions: see
    :func:`_conv_squared_norms`. Embedding: per-token sums, never the V x D gradient. Normalisation layers,
    a Linear mapped over extra dimensions and biases: their (small) entries.
    ``layer`` must want every unit (``units`` None): a squared norm of a whole tensor needs all its signals."""
    if layer.units is not None:
        raise ValueError(f"layer {layer.name!r} keeps only some units' signals; whole-gradient norms need all")
    m = layer.module
    if isinstance(g, FormedEntries):  # the whole norm from the entries: only when they are every entry
        sizes = {"weight": m.weight, "bias": getattr(m, "bias", None)}
        if any(v.shape[2] != sizes[attr].numel() for attr, v in g.entries.items()):
            raise ValueError(f"layer {layer.name!r} formed only some entries; whole-gradient norms need all")
        return {attr: _sq_norm(v, 2) for attr, v in g.entries.items()}
    if isinstance(m, nn.Embedding):
        return _embedding_squared_norms(layer, a, g)
    b, c = g.shape[:2]
    if isinstance(m, nn.Linear) and a.reshape(b, -1, m.in_features).shape[1] == 1:
        g2 = g.reshape(b, c, m.out_features)
        out: dict[str, torch.Tensor] = {}
        if layer.weight is not None:
            out["weight"] = _sq_norm(g2, 2) * _sq_norm(a.reshape(b, 1, m.in_features), 2)
        if layer.bias is not None:
            out["bias"] = _sq_norm(g2, 2)
        return out
    if isinstance(m, _CONV):
        return _conv_squared_norms(layer, a, g)
    return {attr: _sq_norm(v, 2) for attr, v in layer_entries(layer, a, g).items()}
