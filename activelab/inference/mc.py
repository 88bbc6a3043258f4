"""MC-dropout and ensemble sampling, streamed into O(N·C) accumulators.

K stochastic passes (dropout on, everything else in eval mode) per model, for each of E models, are reduced
on the fly to the sufficient statistics of the MC uncertainty scores: argmax vote counts, sums of
probabilities and of their squares, and the sum of per-pass entropies. Nothing of size N x K x C is ever
held. Small batches are repeated to fill ``max_rows`` rows, so several passes run as one forward (each row
draws its own dropout mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.arrays import iter_batches
from ..errors import ActivelabError
from ..mcstats import MCStatistics
from ..models.introspection import eval_mode, model_device
from .device import inference_autocast, seeded_torch, to_device


def _fork_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _stream_passes(
    models: Sequence[nn.Module],
    dataset: Dataset,
    indices: np.ndarray,
    passes: int,
    seed: int,
    batch_size: int,
    max_rows: int | None,
):
    """Yield ``(model_index, positions, probs)`` for ``passes`` MC-dropout passes of every model over
    ``dataset[indices]``: ``probs`` is (r, b, C) float64 for r passes over the b samples at ``positions``.

    Dropout masks come from torch's global generator, re-seeded with ``seed`` (and ``seed + e`` for the
    e-th model) inside a forked RNG state, so the caller's RNG state is untouched and the result is
    reproducible. A model without dropout layers gives identical passes (an error: the scores would be
    meaningless). ``max_rows`` (default ``batch_size``) bounds the rows of one forward: a batch smaller than
    it is repeated to fill it, several passes at once (larger blocks help GPUs; on a CPU, max-pooling slows
    down on big blocks, so the default runs one pass of one batch per forward).
    """
    if passes < 1:
        raise ActivelabError(f"mc_samples must be >= 1; got {passes}")
    if not models:
        raise ActivelabError("MC sampling needs at least one model")
    for model in models:
        if not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
            raise ActivelabError(
                "MC-dropout needs nn.Dropout layers in the model (built-in models: model.dropout: true); "
                "this model has none, so every stochastic pass would be identical"
            )
    if len(indices) == 0:
        raise ActivelabError("no samples to score: the index list is empty")
    max_rows = batch_size if max_rows is None else max_rows
    for e, model in enumerate(models):
        device = model_device(model)
        with seeded_torch(int(seed) + e, _fork_devices(device)), eval_mode(model, dropout=True), torch.no_grad():
            start = 0
            for x, _ in iter_batches(dataset, indices, batch_size):
                x = to_device(x, device)
                b = len(x)
                positions = slice(start, start + b)
                reps = max(1, min(passes, max_rows // max(b, 1)))
                done = 0
                while done < passes:
                    r = min(reps, passes - done)
                    xr = x.unsqueeze(0).expand(r, *x.shape).reshape(r * b, *x.shape[1:])
                    with inference_autocast(device):
                        logits = model(xr)
                    probs = torch.softmax(logits.double(), dim=1).cpu().numpy()
                    yield e, done, positions, probs.reshape(r, b, -1)
                    done += r
                start += b


def mc_statistics(
    models: Sequence[nn.Module],
    dataset: Dataset,
    indices: np.ndarray,
    passes: int,
    seed: int,
    batch_size: int = 512,
    max_rows: int | None = None,
) -> MCStatistics:
    """Stream ``passes`` MC-dropout predictions of every model in ``models`` over ``dataset[indices]`` into
    :class:`MCStatistics` (seeding and batching as :func:`_stream_passes`).

    Time: E·K forward passes over N. Memory: O(N·C) accumulators plus one block of ``max_rows`` rows.
    """
    indices = np.asarray(indices, dtype=np.int64)
    stats: MCStatistics | None = None
    for _e, _done, positions, probs in _stream_passes(models, dataset, indices, passes, seed, batch_size, max_rows):
        if stats is None:
            stats = MCStatistics.empty(len(indices), probs.shape[2])
        stats.add(positions, probs)
    assert stats is not None
    stats.passes = passes * len(models)
    return stats


def mc_probabilities(
    models: Sequence[nn.Module],
    dataset: Dataset,
    indices: np.ndarray,
    passes: int,
    seed: int,
    batch_size: int = 512,
    max_rows: int | None = None,
) -> np.ndarray:
    """The stochastic predictions themselves, (E·K, N, C) float32 (pass t = e·K + k), for methods that need
    joint statistics across passes (BatchBALD). The same passes as :func:`mc_statistics` with the same seed.
    Memory: E·K·N·C floats."""
    indices = np.asarray(indices, dtype=np.int64)
    out: np.ndarray | None = None
    for e, done, positions, probs in _stream_passes(models, dataset, indices, passes, seed, batch_size, max_rows):
        if out is None:
            out = np.empty((passes * len(models), len(indices), probs.shape[2]), dtype=np.float32)
        out[e * passes + done : e * passes + done + len(probs), positions] = probs
    assert out is not None
    return out
