"""MC-dropout and ensemble sampling, streamed into O(N·C) accumulators.

K stochastic passes (dropout on, everything else in eval mode) per model, for each of E models, are reduced
on the fly to the sufficient statistics of the MC uncertainty scores: argmax vote counts, sums of
probabilities and of their squares, and the sum of per-pass entropies. Nothing of size N x K x C is ever
held. Small batches are repeated to fill ``max_rows`` rows, so several passes run as one forward (each row
draws its own dropout mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.arrays import iter_batches
from ..errors import ActivelabError
from .forward import eval_mode, model_device


@dataclass
class MCStatistics:
    """Sufficient statistics of T = E·K stochastic predictions per sample.

    - ``counts`` (N, C): how many passes predicted each class (argmax).
    - ``prob_sum`` (N, C), ``prob_sq_sum`` (N, C): Σ_t p_t and Σ_t p_t².
    - ``entropy_sum`` (N,): Σ_t H(p_t) (natural log).
    - ``passes``: T.
    """

    counts: np.ndarray
    prob_sum: np.ndarray
    prob_sq_sum: np.ndarray
    entropy_sum: np.ndarray
    passes: int

    @classmethod
    def empty(cls, n: int, num_classes: int) -> MCStatistics:
        return cls(
            np.zeros((n, num_classes), np.int64),
            np.zeros((n, num_classes), np.float64),
            np.zeros((n, num_classes), np.float64),
            np.zeros(n, np.float64),
            0,
        )

    def add(self, positions: np.ndarray | slice, probs: np.ndarray) -> None:
        """Add passes for the samples at ``positions`` (unique): ``probs`` (T, B, C), or (B, C) for one pass.
        ``passes`` is not changed (the caller knows how many passes each sample got)."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim == 2:
            probs = probs[None]
        t, b, c = probs.shape
        flat = (np.arange(b)[None, :] * c + probs.argmax(axis=2)).reshape(-1)
        votes = np.bincount(flat, minlength=b * c).reshape(b, c)
        self.counts[positions] += votes
        self.prob_sum[positions] += probs.sum(axis=0)
        self.prob_sq_sum[positions] += (probs * probs).sum(axis=0)
        self.entropy_sum[positions] += entropy(probs).sum(axis=0)

    @classmethod
    def from_samples(cls, probs: np.ndarray) -> MCStatistics:
        """Statistics of hand-made samples ``probs`` (N, T, C) (for tests and for users with their own
        stochastic predictions)."""
        n, t, c = probs.shape
        stats = cls.empty(n, c)
        stats.add(np.arange(n), np.transpose(probs, (1, 0, 2)))
        stats.passes = t
        return stats

    def merge(self, other: MCStatistics) -> MCStatistics:
        return MCStatistics(
            self.counts + other.counts,
            self.prob_sum + other.prob_sum,
            self.prob_sq_sum + other.prob_sq_sum,
            self.entropy_sum + other.entropy_sum,
            self.passes + other.passes,
        )


def entropy(probs: np.ndarray) -> np.ndarray:
    """-Σ_c p log p along the last axis, with 0 log 0 = 0."""
    p = np.asarray(probs, dtype=np.float64)
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=-1)


def _fork_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def mc_statistics(
    models: Sequence[nn.Module],
    dataset: Dataset,
    indices: np.ndarray,
    passes: int,
    seed: int,
    batch_size: int = 512,
    max_rows: int | None = None,
) -> MCStatistics:
    """Stream ``passes`` MC-dropout predictions of every model in ``models`` over ``dataset[indices]``.

    Dropout masks come from torch's global generator, re-seeded with ``seed`` (and ``seed + e`` for the
    e-th model) inside a forked RNG state, so the caller's RNG state is untouched and the result is
    reproducible. A model without dropout layers gives identical passes (an error: the scores would be
    meaningless).

    ``max_rows`` (default ``batch_size``) bounds the rows of one forward: a batch smaller than it is repeated
    to fill it, several passes at once (larger blocks help GPUs; on a CPU, max-pooling slows down on big
    blocks, so the default runs one pass of one batch per forward).

    Time: E·K forward passes over N. Memory: O(N·C) accumulators plus one block of ``max_rows`` rows.
    """
    if passes < 1:
        raise ActivelabError(f"mc_samples must be >= 1; got {passes}")
    if not models:
        raise ActivelabError("mc_statistics needs at least one model")
    for model in models:
        if not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
            raise ActivelabError(
                "MC-dropout needs nn.Dropout layers in the model (built-in models: model.dropout: true); "
                "this model has none, so every stochastic pass would be identical"
            )
    indices = np.asarray(indices, dtype=np.int64)
    max_rows = batch_size if max_rows is None else max_rows
    stats: MCStatistics | None = None
    for e, model in enumerate(models):
        device = model_device(model)
        with (
            torch.random.fork_rng(devices=_fork_devices(device)),
            eval_mode(model, dropout=True),
            torch.no_grad(),
        ):
            torch.manual_seed(int(seed) + e)
            start = 0
            for x, _ in iter_batches(dataset, indices, batch_size):
                x = x.to(device)
                b = len(x)
                positions = slice(start, start + b)
                reps = max(1, min(passes, max_rows // max(b, 1)))
                done = 0
                while done < passes:
                    r = min(reps, passes - done)
                    xr = x.unsqueeze(0).expand(r, *x.shape).reshape(r * b, *x.shape[1:])
                    probs = torch.softmax(model(xr).double(), dim=1).cpu().numpy()
                    if stats is None:
                        stats = MCStatistics.empty(len(indices), probs.shape[1])
                    stats.add(positions, probs.reshape(r, b, -1))
                    done += r
                start += b
    if stats is None:
        raise ActivelabError("no samples to score: the index list is empty")
    stats.passes = passes * len(models)
    return stats
