"""Fisher information of a classifier's weights, per sample and per class, batched with ``torch.func``.

Used by FisherMask (FISH-mask parameter selection, Sung et al. 2021, + BAIT batch selection, Ash et al. 2021)
and BAIT:

- :func:`diagonal_fisher`: F_j = sum_{x in S} sum_c p(c|x) (d log p(c|x) / d theta_j)^2 on a sample S.
- :func:`fisher_mask`: the FISH mask, K = floor(pct * P) entries chosen by index.
- :func:`masked_fisher_embeddings`: V_x in R^{C x K}, row c = sqrt(p(c|x)) d log p(c|x) / d theta_mask.
- :func:`masked_fisher_gram`: sum_x V_x^T V_x streamed over a set, never storing the V_x.
- :func:`last_layer_fisher_embeddings`: BAIT's closed form for the classifier weight from one forward pass.

Per-sample, per-class gradients come from ``vmap(jacrev(...))`` over a chunk of samples: one batched pass
instead of chunk x C backward passes of a per-sample loop. The diagonal Fisher needs every entry, so it takes
the full per-sample Jacobian. The masked embeddings by default take gradients with respect to each masked
layer's *output* only and form the masked weight entries from them and the layer's saved input, so the
(chunk, C, P) Jacobian is never built (``method="signals"``, built on :mod:`activelab.inference.signals`; see
:func:`iter_masked_fisher_embeddings`). The
model is in eval mode (BatchNorm uses its running statistics, dropout is off), so samples do not interact.

Memory: one chunk's Jacobian (chunk x C x P_wrt floats; ``chunk_size=None`` picks the chunk from a 256 MiB
budget), or with signals one chunk's layer-output gradients (chunk x C x the masked layers' output sizes);
the embeddings themselves are N x C x K float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.data import Dataset

from ..data.arrays import iter_batches
from ..errors import ActivelabError
from ..models.introspection import eval_mode, model_device, renormed_embeddings
from .signals import (
    LOOPED_UNDER_VMAP,
    VMAP_UNSAFE,
    layer_entries,
    layer_signals,
    per_sample_block,
    plan_signal_layers,
    samples_independent,
)

Weighting = Literal["sqrt_p", "none"]
WEIGHTINGS: tuple[str, ...] = ("sqrt_p", "none")

#: Budget for one chunk of per-sample, per-class gradients when ``chunk_size`` is not given.
DEFAULT_CHUNK_BYTES = 256 * 2**20
#: When one chunk's signals (every class, every masked layer) would take more than this, the signal method runs
#: its backward passes one class at a time (each pass's signals copied into tensors kept across chunks, or, for
#: an Embedding and a small enough Linear over positions, their entries formed inside the pass; see
#: :func:`~activelab.inference.signals.layer_signals`), then forms the other entries of all classes at once: on
#: conv nets at 28x28 with depthwise layers about 15% faster than one backward pass vectorised over the classes,
#: whose C-fold tensors are memory-bound, and on an embedding model over 196 tokens (24 MiB) about 10%; below it
#: the vectorised pass is as fast or faster (a Conv1d net, 3.4 MiB; LeNet, 6 MiB: the same), unless
#: normalisation layers make it loop anyway (see :func:`_vectorise_classes`). Measured with torch 2.14, one thread.
STREAM_BYTES = 8 * 2**20


# -- per-sample, per-class log-probability Jacobians -----------------------------------------------------------
def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable parameters by name, in ``named_parameters`` order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def num_classes_of(model: nn.Module, classifier_weight: str) -> int:
    """C, read from the classifier weight's first dimension (``nn.Linear`` stores (out, in))."""
    params = dict(model.named_parameters())
    if classifier_weight not in params:
        raise ActivelabError(
            f"the model has no parameter {classifier_weight!r}; pass classifier='<name of the final nn.Linear>'"
        )
    return int(params[classifier_weight].shape[0])


def auto_chunk(
    model: nn.Module, names: Sequence[str], num_classes: int, budget_bytes: int = DEFAULT_CHUNK_BYTES
) -> int:
    """Samples per vmapped chunk so that a chunk's (chunk, C, P_wrt) Jacobian (x3 for intermediates) fits."""
    params = dict(model.named_parameters())
    per_sample = num_classes * sum(params[n].numel() * params[n].element_size() for n in names)
    return int(max(1, min(256, budget_bytes // max(1, 3 * per_sample))))


def _probe(model: nn.Module, dataset: Dataset, indices: np.ndarray, device: torch.device) -> tuple[torch.Tensor, int]:
    """The first two samples (one if there is only one) as a batch, and the number of classes C read from the
    model's output on it."""
    if len(indices) == 0:
        raise ActivelabError("no samples to differentiate")
    x, _ = next(iter_batches(dataset, indices[:2], 2))
    x = x.to(device)
    with torch.no_grad():
        return x, int(model(x).shape[-1])


def _jacobian_fn(model: nn.Module, names: Sequence[str]):
    """(params_wrt, f) where f(params_wrt, x) = (Jacobians {name: (B, C, *shape)}, log p (B, C))."""
    params = trainable_parameters(model)
    wrt = {n: params[n].detach() for n in names}
    const = {n: p.detach() for n, p in model.named_parameters() if n not in wrt}
    const.update({n: b.detach() for n, b in model.named_buffers()})

    def log_probs(w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, {**const, **w}, (x.unsqueeze(0),))
        lp = torch.log_softmax(_at_least_float32(out), dim=-1).squeeze(0)
        return lp, lp.detach()

    # Nested vmaps (classes inside samples) give silently wrong Jacobians through nn.PReLU when a chunk holds
    # exactly C samples (its batching rule mixes the two batch dimensions; other sizes raise). For such models
    # jacrev takes its C vector-Jacobian products one after another (chunk_size=1): one level of vmap, correct,
    # about 15% slower on LeNet, so the others keep the nested form.
    one_level = any(isinstance(m, VMAP_UNSAFE) for m in model.modules())
    return wrt, vmap(jacrev(log_probs, has_aux=True, chunk_size=1 if one_level else None), in_dims=(None, 0))


def iter_log_prob_jacobians(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    names: Sequence[str],
    chunk_size: int | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Yield, chunk by chunk in the order of ``indices``, ``({name: d log p / d theta, (B, C, *shape)}, p (B, C))``.

    ``names`` are the parameter tensors to differentiate (others are held constant).
    """
    names = list(names)
    if not names:
        raise ActivelabError("no parameters to differentiate")
    device = model_device(model)
    indices = np.asarray(indices, dtype=np.int64)
    with eval_mode(model):
        if chunk_size is None:
            _, num_classes = _probe(model, dataset, indices, device)
            chunk_size = auto_chunk(model, names, num_classes)
        wrt, jac_fn = _jacobian_fn(model, names)
        for x, _ in iter_batches(dataset, np.asarray(indices, dtype=np.int64), chunk_size):
            x = x.to(device)
            with renormed_embeddings(model, x):
                jac, logp = jac_fn(wrt, x)
            yield jac, logp.exp()


# -- diagonal Fisher and the FISH mask -------------------------------------------------------------------------
def diagonal_fisher(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    chunk_size: int | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """F_j = sum_{x in indices} sum_c p(c|x) (d log p(c|x) / d theta_j)^2, per parameter tensor (float64, CPU).

    The expectation over classes is exact (every class weighted by the model's own p), so no label is read.
    Time: one vmapped Jacobian per chunk, i.e. about C backward passes per sample. Memory: one chunk's Jacobian.
    """
    names = list(names) if names is not None else list(trainable_parameters(model))
    params = trainable_parameters(model)
    total = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    for jac, p in iter_log_prob_jacobians(model, dataset, indices, names, chunk_size):
        p64 = p.double()
        for n in names:
            g = jac[n].double().flatten(2)  # (B, C, numel)
            total[n] += torch.einsum("bc,bcj->j", p64, g * g).view(total[n].shape).cpu()
    return total


@dataclass(frozen=True)
class FisherMask:
    """The masked parameter entries: for each parameter tensor (model order), sorted flat indices into it.

    The columns of a Fisher embedding follow this order: tensor by tensor, ascending flat index.
    """

    names: tuple[str, ...]
    indices: tuple[torch.Tensor, ...]  # int64, sorted, per name
    classifier_weight: str
    last_layer_only: bool  # K <= |classifier weight|: the mask is the whole classifier weight and nothing else

    @property
    def size(self) -> int:
        return int(sum(len(i) for i in self.indices))

    def counts(self) -> dict[str, int]:
        return {n: int(len(i)) for n, i in zip(self.names, self.indices, strict=True)}


def mask_size(num_params: int, pct: float) -> int:
    """K = floor(pct * P)."""
    return int(np.floor(pct * num_params))


def planned_mask_size(model: nn.Module, classifier_weight: str, pct: float) -> int:
    """The size :func:`fisher_mask` will give a mask of ``model``'s trainable parameters, known before the
    diagonal Fisher is computed: floor(pct * P), but never less than the whole classifier weight."""
    num_classes_of(model, classifier_weight)  # a clear error if the model has no such weight
    n_last = dict(model.named_parameters())[classifier_weight].numel()
    return max(mask_size(sum(q.numel() for q in trainable_parameters(model).values()), pct), n_last)


def fisher_mask(fisher: Mapping[str, torch.Tensor], classifier_weight: str, pct: float) -> FisherMask:
    """The FISH mask for FisherMask: K = floor(pct * P) entries, P = the number of entries of ``fisher``.

    The whole classifier weight (``classifier_weight``) is always in the mask; the remaining
    K - |W_last| slots go to the largest Fisher values of all other tensors, ranked globally on their
    concatenation (in ``fisher``'s order) and chosen **by index**: a stable descending sort, so ties go to the
    lower concatenated index (the authors' code matched values, which misaligns on ties). If
    K <= |W_last| the mask is just the classifier weight (``last_layer_only``), so K is then |W_last|.
    """
    if classifier_weight not in fisher:
        raise ActivelabError(f"the classifier weight {classifier_weight!r} is not among the Fisher's parameters")
    if not 0.0 < pct <= 1.0:
        raise ActivelabError(f"pct must lie in (0, 1]; got {pct}")
    names = list(fisher)
    sizes = [fisher[n].numel() for n in names]
    k = mask_size(sum(sizes), pct)
    n_last = fisher[classifier_weight].numel()
    others = [n for n in names if n != classifier_weight]
    chosen: dict[str, torch.Tensor] = {n: torch.zeros(0, dtype=torch.int64) for n in names}
    chosen[classifier_weight] = torch.arange(n_last, dtype=torch.int64)
    extra = k - n_last
    if extra > 0 and others:
        flat = torch.cat([fisher[n].detach().reshape(-1).double().cpu() for n in others]).numpy()
        if not np.all(np.isfinite(flat)):
            raise ActivelabError("the diagonal Fisher has NaN or inf entries: the model's outputs are not finite")
        order = np.argsort(-flat, kind="stable")[:extra]
        offsets = np.cumsum([0] + [fisher[n].numel() for n in others])
        owner = np.searchsorted(offsets, order, side="right") - 1
        for t, n in enumerate(others):
            local = order[owner == t] - offsets[t]
            chosen[n] = torch.as_tensor(np.sort(local), dtype=torch.int64)
    kept = [n for n in names if len(chosen[n])]
    return FisherMask(tuple(kept), tuple(chosen[n] for n in kept), classifier_weight, last_layer_only=extra <= 0)


# -- Fisher embeddings on the mask -----------------------------------------------------------------------------
def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ActivelabError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")


Method = Literal["signals", "jacobian"]


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32; float32 and float64 ones as they are (a float64 model stays exact)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _other_class_objectives(kept: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The signal objectives of Fisher embeddings: for i < C - 1, the sum over the batch of log p(c_i(x)|x), the
    classes c_i(x) being x's classes other than its most probable one (in class order). ``kept`` receives the
    log-probabilities (``lp``), each sample's most probable class (``top``) and its others (``others``)."""

    def objectives(logits: torch.Tensor) -> list[torch.Tensor]:
        lp = torch.log_softmax(_at_least_float32(logits), dim=-1)
        b, c = lp.shape
        top = lp.detach().argmax(dim=1)
        below = torch.arange(c - 1, device=lp.device).expand(b, c - 1)
        others = below + (below >= top.unsqueeze(1))  # 0..C-1 without top, in order
        kept.update(lp=lp.detach(), top=top, others=others)
        return list(lp.gather(1, others).sum(dim=0))  # one sum and an unbind: a few autograd nodes, not 2C

    return objectives


def _with_top_class(
    v: torch.Tensor, p: torch.Tensor, top: torch.Tensor, others: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, C, K) gradients of log p(c|x) for every class c, in class order, from ``v`` (B, C, K) whose first
    C - 1 rows are those of x's classes ``others`` (the classes other than its most probable one, in order)
    and whose last row is written here: sum_c p(c|x) d log p(c|x) = d sum_c p(c|x) = 0, so the most probable
    class's row is -sum_{c != top} p(c|x) row_c / p(top|x), exact up to rounding (p(top|x) >= 1 / C, so
    nothing is divided by a small number). ``out``: a (B, C, K) tensor to write the result into (contiguous,
    ``v``'s dtype), else a new one."""
    b, c, _ = v.shape
    w = (p.gather(1, others) / p.gather(1, top.unsqueeze(1))).to(v.dtype)  # (B, C - 1)
    v[:, c - 1] = -torch.bmm(w.unsqueeze(1), v[:, : c - 1]).squeeze(1)
    # class k of sample x sits in row k of v if k < top, row k - 1 if k > top, row C - 1 if k = top
    k = torch.arange(c, device=v.device).expand(b, c)
    row = torch.where(k < top.unsqueeze(1), k, k - 1).masked_fill(k == top.unsqueeze(1), c - 1)
    rows = (row + c * torch.arange(b, device=v.device).unsqueeze(1)).view(-1)
    if out is None:
        return v.reshape(b * c, -1).index_select(0, rows).view(b, c, -1)
    torch.index_select(v.reshape(b * c, -1), 0, rows, out=out.view(b * c, -1))
    return out


def _vectorise_classes(model: nn.Module, signal_bytes: int) -> bool:
    """Whether the signal method differentiates the classes in one backward pass vectorised over them, rather
    than one pass per class: not when the model holds a module whose backward PyTorch runs once per class under
    vmap anyway (normalisation layers: about 2x slower than separate passes), nor when one chunk's signals take
    more than ``STREAM_BYTES`` (C-fold tensors that leave the cache)."""
    return signal_bytes <= STREAM_BYTES and not any(isinstance(m, LOOPED_UNDER_VMAP) for m in model.modules())


def _iter_signal_embeddings(model, dataset, indices, mask, chunk_size, place=None):
    """Yield ((B, C, K) d log p / d theta_mask, p (B, C)) by the signal method (see iter_masked_fisher_embeddings).
    ``place(b, c, dtype)``: where a chunk of b samples goes (a contiguous (b, C, K) tensor the caller keeps, written
    in place and yielded: no copy of the chunk), or None (a new tensor)."""
    device = model_device(model)
    indices = np.asarray(indices, dtype=np.int64)
    with eval_mode(model):
        probe, num_classes = _probe(model, dataset, indices, device)
        layers, fallback = plan_signal_layers(model, dict(zip(mask.names, mask.indices, strict=True)), probe)
        wrt, jac_fn = _jacobian_fn(model, fallback) if fallback else ({}, None)
        if chunk_size is None:  # per sample and class: signals per output, the biggest closed-form block, the
            # gradients of each fallback entry, float32
            per_class = sum(int(np.prod(layer.out_shape)) for layer in layers) + sum(wrt[n].numel() for n in fallback)
            per_class += max((per_sample_block(layer) for layer in layers), default=0)
            # at most 32 samples: C x 32 signals per layer stay cache-friendly (64 was 10-40% slower on conv nets)
            chunk_size = int(max(1, min(32, DEFAULT_CHUNK_BYTES // max(1, 3 * 4 * num_classes * per_class))))
        signal_bytes = num_classes * chunk_size * 4 * sum(int(np.prod(layer.out_shape[1:])) for layer in layers)
        vectorise = _vectorise_classes(model, signal_bytes)
        buffers: dict[str, torch.Tensor] = {}  # the per-class passes' signals, reused chunk after chunk
        held_v: torch.Tensor | None = None  # the chunk's rows before the classes are put in order, reused too
        for x, _ in iter_batches(dataset, indices, chunk_size):
            x = x.to(device)
            if num_classes == 1:  # log p(c|x) = 0 for the only class: every gradient is zero
                with torch.no_grad():
                    p = torch.log_softmax(_at_least_float32(model(x)), dim=-1).exp()
                yield p.new_zeros(x.shape[0], 1, mask.size), p
                continue
            blocks: dict[str, torch.Tensor] = {}
            if layers:
                kept: dict[str, torch.Tensor] = {}
                objectives = _other_class_objectives(kept)
                _, signals, saved = layer_signals(model, layers, x, objectives, vectorise, buffers)
                parts = {}
                for layer in layers:
                    for attr, val in layer_entries(layer, saved[layer.name], signals[layer.name]).items():
                        parts[layer.param_name(attr)] = val
                signal_names = [n for n in mask.names if n in parts]
                sizes = [parts[n].shape[2] for n in signal_names]
                dtype = torch.float32
                for n in signal_names:  # a float64 head behind a float32 body stays float64
                    dtype = torch.promote_types(dtype, parts[n].dtype)
                shape = (x.shape[0], num_classes, sum(sizes))
                if held_v is None or held_v.shape != shape or held_v.dtype != dtype:
                    held_v = torch.empty(shape, dtype=dtype, device=device)
                v = held_v
                torch.cat([parts[n] for n in signal_names], dim=2, out=v[:, : num_classes - 1])
                p = kept["lp"].exp()
                dest = None if fallback or place is None else place(x.shape[0], num_classes, dtype)
                v = _with_top_class(v, p, kept["top"], kept["others"], dest)
                if not fallback:
                    yield v, p
                    continue
                blocks = dict(zip(signal_names, v.split(sizes, dim=2), strict=True))
            with renormed_embeddings(model, x):
                jac, lp = jac_fn(wrt, x)
            if not layers:  # the Jacobian pass gives the probabilities too
                p = lp.exp()
            for n, idx in zip(mask.names, mask.indices, strict=True):
                if n in jac:
                    blocks[n] = jac[n].flatten(2)[:, :, idx.to(device)]
            yield torch.cat([blocks[n] for n in mask.names], dim=2), p


def iter_masked_fisher_embeddings(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    mask: FisherMask,
    weighting: Weighting = "sqrt_p",
    chunk_size: int | None = None,
    method: Method = "signals",
) -> Iterator[torch.Tensor]:
    """Yield chunks (B, C, K) float32 of Fisher embeddings, in the order of ``indices``.

    Row c of V_x is sqrt(p(c|x)) * d log p(c|x) / d theta_mask (``weighting="sqrt_p"``, BAIT's weighting, so
    that V_x^T V_x is x's Fisher information on the mask), or the bare gradient (``"none"``: the FisherMask
    authors' rows, kept to reproduce them).

    ``method="signals"`` (default): per-sample, per-class gradients of log p with respect to each masked layer's
    *output* (batched backward passes w.r.t. a zero tensor a hook adds to the output; samples do not interact in
    eval mode, so the gradient of the batch sum at a sample is its own: C - 1 passes, one per class but each
    sample's most probable one, whose row follows from sum_c p(c|x) d log p(c|x) = 0), and the layer's input; the
    masked weight entries are then products of the two (Linear: g_o a_j; convolutions: sum over positions of g_o
    times the input patch; normalisation layers: sum of g times the normalised input; Embedding: sum of g over
    the tokens of that row; see :mod:`activelab.inference.signals`), so neither weight
    gradients nor the per-sample Jacobian (C x P per sample) are ever formed. Tensors of other modules (or of
    modules called more than once) are differentiated directly with ``vmap(jacrev)``. A model whose BatchNorm
    uses batch statistics in eval mode gets the Jacobian method. ``method="jacobian"``: the full per-sample,
    per-class Jacobian of every masked tensor by ``vmap(jacrev)``, then a gather (C x P_wrt memory per sample).
    """
    return _weighted_chunks(model, dataset, indices, mask, weighting, chunk_size, method)


def _weighted_chunks(model, dataset, indices, mask, weighting, chunk_size, method, place=None):
    """:func:`iter_masked_fisher_embeddings`'s chunks; ``place``: see :func:`_iter_signal_embeddings` (the
    signal method's chunks may then be views of the caller's tensor, weighted in place)."""
    _check_weighting(weighting)
    if method == "signals" and not samples_independent(model):
        method = "jacobian"  # the signal method sums over the batch; the Jacobian one runs sample by sample
    if method == "signals":
        chunks = _iter_signal_embeddings(model, dataset, indices, mask, chunk_size, place)
    elif method == "jacobian":
        chunks = (
            (
                torch.cat(
                    [
                        jac[n].flatten(2)[:, :, i.to(jac[n].device)]
                        for n, i in zip(mask.names, mask.indices, strict=True)
                    ],
                    dim=2,
                ),
                p,
            )
            for jac, p in iter_log_prob_jacobians(model, dataset, indices, list(mask.names), chunk_size)
        )
    else:
        raise ActivelabError(f"method must be 'signals' or 'jacobian'; got {method!r}")
    for v, p in chunks:
        if weighting == "sqrt_p":
            w = p.sqrt().unsqueeze(2)
            # each chunk is a fresh tensor or the caller's (``place``): weighted in place unless that would round
            v = v.mul_(w) if torch.promote_types(v.dtype, w.dtype) == v.dtype else v * w
        yield v.float().cpu()


def masked_fisher_embeddings(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    mask: FisherMask,
    weighting: Weighting = "sqrt_p",
    chunk_size: int | None = None,
    method: Method = "signals",
) -> np.ndarray:
    """Fisher embeddings (N, C, K) float32 of ``dataset[indices]`` on ``mask``; see
    :func:`iter_masked_fisher_embeddings`. Memory: the output, N x C x K floats, plus one chunk's Jacobian."""
    n = len(indices)
    if n == 0:
        raise ActivelabError("no samples to embed")
    out: torch.Tensor | None = None
    start = 0

    def allocate(c: int) -> torch.Tensor:
        nonlocal out
        if out is None:  # allocated once C is known: no second copy of the N x C x K output
            # a torch allocation: its first-touch cost is several times lower than numpy's here
            out = torch.empty((n, c, mask.size), dtype=torch.float32)
        return out

    on_cpu = model_device(model).type == "cpu"

    def place(b: int, c: int, dtype: torch.dtype) -> torch.Tensor | None:
        # the signal method writes a float32 CPU chunk straight into the output (no copy of it)
        return allocate(c)[start : start + b] if on_cpu and dtype == torch.float32 else None

    for chunk in _weighted_chunks(model, dataset, indices, mask, weighting, chunk_size, method, place):
        dest = allocate(chunk.shape[1])[start : start + len(chunk)]
        if chunk.data_ptr() != dest.data_ptr():
            dest.copy_(chunk)
        start += len(chunk)
    return out.numpy()


def masked_fisher_gram(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    mask: FisherMask,
    weighting: Weighting = "sqrt_p",
    chunk_size: int | None = None,
    method: Method = "signals",
) -> np.ndarray:
    """sum over ``indices`` of V_x^T V_x, (K, K) float64, streamed (the V_x are never stored together)."""
    gram = np.zeros((mask.size, mask.size), dtype=np.float64)
    for v in iter_masked_fisher_embeddings(model, dataset, indices, mask, weighting, chunk_size, method):
        rows = v.double().reshape(-1, mask.size).numpy()
        gram += rows.T @ rows
    return gram


def last_layer_fisher_embeddings(
    probs: np.ndarray,
    features: np.ndarray,
    weighting: Weighting = "sqrt_p",
    include_bias: bool = False,
    dtype: np.dtype = np.float32,
) -> np.ndarray:
    """BAIT's Fisher embeddings on the classifier's weight, in closed form: (N, C, C*d [+ C]).

    For logits z = W h + b: d log p(c|x) / d W = (e_c - p) h^T, so row c is sqrt(p_c) (e_c - p) (x) h, flattened
    like ``W`` ((C, d) row-major). ``include_bias`` appends d log p(c|x) / d b = e_c - p (BAIT's code leaves the
    bias out). ``probs`` (N, C) and ``features`` h (N, d, the classifier's input) come from one forward pass.
    Time O(N C^2 d); memory: the output (N, C, K) in ``dtype``, written in place (no float64 intermediate
    of that size), plus O(N C^2 + N d).
    """
    _check_weighting(weighting)
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    h = np.asarray(features)
    if h.shape[0] != n:
        raise ActivelabError(f"probs has {n} rows but features has {h.shape[0]}")
    d = h.reshape(n, -1).shape[1]
    a = np.eye(c)[None, :, :] - probs[:, None, :]  # (N, C rows, C outputs): e_c - p
    if weighting == "sqrt_p":
        a = a * np.sqrt(probs)[:, :, None]
    out = np.empty((n, c, c * d + (c if include_bias else 0)), dtype=dtype)
    weight_part = out[:, :, : c * d].reshape(n, c, c, d)  # a view: the last axis is split, not copied
    np.multiply(a.astype(dtype)[:, :, :, None], h.reshape(n, d).astype(dtype)[:, None, None, :], out=weight_part)
    if include_bias:
        out[:, :, c * d :] = a
    return out
