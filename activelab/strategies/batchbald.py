"""BatchBALD (Kirsch, van Amersfoort & Gal, NeurIPS 2019): greedy maximisation of the mutual information between
the joint labels of a batch and the model parameters, from stochastic forward passes (MC dropout, ensembles).

Pure core :func:`batchbald_select` on a (P, N, C) array of per-pass class probabilities.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field
from scipy.special import entr

from ..errors import ActivelabError
from .base import Strategy, StrategyParams, register

#: Entries (float64) of the largest temporary of one scoring step: 2**22 -> 32 MB.
CHUNK_ELEMENTS = 2**22
#: Default cap on the candidates scored: each sampled greedy step costs O(N·M·P·C), so that a batch of 100 at
#: 100,000 candidates already needs about 45 minutes of one CPU core (M = 4,000, C = 10, P = 20).
MAX_CANDIDATES = 100_000
#: Measured cost of one entry (one candidate, class and configuration) of a sampled scoring step at P = 20
#: passes: the entropy of the (M, N·C) product and the product itself (which grows with P) share it
#: (benchmarks/bench_batchbald.py, one core).
SECONDS_PER_ENTRY = 6.5e-9


def default_num_samples(num_classes: int) -> int:
    """M = 40000 // C label configurations, as baal suggests."""
    return max(1, 40000 // num_classes)


def conditional_entropies(probs: np.ndarray) -> np.ndarray:
    """(N,) mean over passes of the entropy of each pass's prediction, E_w H(y | x, w)."""
    out = np.zeros(probs.shape[1], dtype=np.float64)
    for p in probs:
        out += entr(p.astype(np.float64)).sum(axis=1)
    return out / len(probs)


class _JointConfigurations:
    """The batch so far as a (P, M) matrix: column m is a label configuration of the batch, entry [p, m] its
    probability under pass p (exact: all C^n configurations; sampled: M configurations drawn from the mixture
    over passes, column-normalised to mean 1 with the log of the scale kept aside)."""

    def __init__(self, probs: np.ndarray, num_samples: int, rng: np.random.Generator) -> None:
        self.probs = probs
        self.passes, _, self.classes = probs.shape
        self.num_samples = num_samples
        self.rng = rng
        self.table = np.ones((self.passes, 1), dtype=np.float64)
        self.exact = True
        self.batch: list[int] = []
        self.log_scale_mean = 0.0  # mean over sampled columns of log(mean_p table) removed by normalisation
        self.pass_of_sample: np.ndarray | None = None

    def add(self, index: int) -> None:
        self.batch.append(index)
        p_new = self.probs[:, index, :].astype(np.float64)  # (P, C)
        if self.exact and self.classes ** len(self.batch) <= self.num_samples:
            self.table = (self.table[:, :, None] * p_new[:, None, :]).reshape(self.passes, -1)
            return
        if self.exact:  # switch: draw M configurations of the whole batch, S per pass
            self.exact = False
            per_pass = max(1, self.num_samples // self.passes)
            self.pass_of_sample = np.repeat(np.arange(self.passes), per_pass)
            self.table = np.ones((self.passes, len(self.pass_of_sample)), dtype=np.float64)
            self.log_scale_mean = 0.0
            for i in self.batch:
                self._multiply_sampled(self.probs[:, i, :].astype(np.float64))
        else:
            self._multiply_sampled(p_new)

    def _multiply_sampled(self, p_new: np.ndarray) -> None:
        rows = p_new[self.pass_of_sample]  # (M, C): the distribution of the pass each sample was drawn from
        cdf = np.cumsum(rows, axis=1)
        u = self.rng.random(len(rows))[:, None] * cdf[:, -1:]
        labels = np.minimum((u >= cdf).sum(axis=1), self.classes - 1)
        self.table *= p_new[:, labels]  # (P, M)
        scale = self.table.mean(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        self.table /= scale
        self.log_scale_mean += float(np.log(scale).mean())

    def joint_entropies(self, rows: np.ndarray, chunk_elements: int) -> np.ndarray:
        """H(y_batch, y_x) for each candidate x in ``rows``, chunked so that one temporary holds at most
        ``chunk_elements`` float64 entries."""
        m = self.table.shape[1]
        chunk = max(1, chunk_elements // (m * self.classes))
        out = np.empty(len(rows), dtype=np.float64)
        table_t = np.ascontiguousarray(self.table.T)  # (M, P)
        for s in range(0, len(rows), chunk):
            r = rows[s : s + chunk]
            block = self.probs[:, r, :].reshape(self.passes, -1)  # (P, n·C)
            q = table_t @ block  # (M, n·C): sum_p table[p, m] p_p(x, c)
            q /= self.passes
            entr(q, out=q)
            h = q.reshape(m, len(r), self.classes).sum(axis=(0, 2))
            out[s : s + len(r)] = h if self.exact else h / m - self.log_scale_mean
        return out


def batchbald_select(
    probs: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    num_samples: int | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy BatchBALD: (positions, scores) of ``budget`` candidates.

    Args:
        probs: (P, N, C) class probabilities of P stochastic passes (MC dropout masks, ensemble members, or both).
        num_samples: M. The joint entropy of the batch is exact while C^n <= M (n = batch size so far), then
            estimated from M configurations drawn from the mixture over passes (M // P per pass), seeded by ``rng``.
        chunk_elements: bound on the largest temporary of a scoring step (float64 entries).

    Score of candidate x given batch A: H(y_A, y_x) - sum_{i in A + x} E_w H(y_i | w) (the first pick is BALD).
    Ties go to the lowest position. Time O(b·N·M·P·C); memory O(P·M + N + chunk_elements) besides ``probs``.
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ActivelabError(f"probs must be (passes, N, C); got shape {probs.shape}")
    passes, n, c = probs.shape
    if budget > n:
        raise ActivelabError(f"cannot pick {budget} samples from {n} candidates")
    if not np.all(np.isfinite(probs)):
        raise ActivelabError("the stochastic passes produced NaN or inf probabilities")
    m = default_num_samples(c) if num_samples is None else int(num_samples)
    if m < 1:
        raise ActivelabError(f"num_samples must be >= 1; got {num_samples}")
    cond = conditional_entropies(probs)
    joint = _JointConfigurations(probs, m, rng)
    available = np.ones(n, dtype=bool)
    chosen = np.empty(budget, dtype=np.int64)
    scores = np.empty(budget, dtype=np.float64)
    cond_batch = 0.0
    for step in range(budget):
        rows = np.flatnonzero(available)
        score = joint.joint_entropies(rows, chunk_elements) - cond[rows] - cond_batch
        best = int(np.argmax(score))
        chosen[step], scores[step] = rows[best], score[best]
        available[rows[best]] = False
        cond_batch += cond[rows[best]]
        if step + 1 < budget:
            joint.add(int(rows[best]))
    return chosen, scores


class BatchBALDParams(StrategyParams):
    mc_samples: int = Field(20, ge=1, description="K: stochastic (MC dropout) passes per ensemble member")
    ensemble: int = Field(1, ge=1, description="E: ensemble members (P = E·K passes; see the mc_dropout strategies)")
    num_samples: int | None = Field(None, ge=1, description="M label configurations (None: 40000 // C)")
    subset: int | None = Field(None, ge=1, description="random unlabeled candidates considered (None: all)")
    chunk_elements: int = Field(CHUNK_ELEMENTS, ge=1, description="largest temporary per scoring step (float64)")
    max_candidates: int = Field(
        MAX_CANDIDATES, ge=1, description="refuse larger candidate sets up front (use subset for bigger pools)"
    )


@register
class BatchBALD(Strategy):
    """BatchBALD (Kirsch, van Amersfoort & Gal, "BatchBALD: Efficient and Diverse Batch Acquisition for Deep
    Bayesian Active Learning", NeurIPS 2019): greedy maximisation of I(y_1..y_b; w) over K MC-dropout passes
    per ensemble member (E members, trained separately by the experiment runner: P = E·K passes).

    The joint entropy is exact while C^n <= M and estimated from M sampled label configurations after (M =
    40000 // C by default, as baal suggests; the configurations are drawn from the round's generator).
    Complexity: P forward passes over the candidates; greedy selection O(b·N·M·P·C) time; memory O(P·N·C) for
    the pass probabilities plus O(P·M) for the batch's configurations plus one scoring temporary of at most
    ``chunk_elements`` float64 entries (the naive form holds N·M·C at once: 3.2 GB at N = 10,000, M = 4,000,
    C = 10). ``subset`` (as the ``subsample`` wrapper) scores a seeded uniform subset of the candidates, which
    bounds the P·N·C probabilities and the time as well; above ``max_candidates`` (100,000) candidates it
    refuses up front with the time and memory it would need (at 1,000,000 candidates and b = 100: about 7
    hours of one core), before any forward pass.
    Deviations from the authors' code (batchbald_redux): numpy float64 on the CPU; the sampled configurations are
    renormalised per column after each pick (the log scale is added back, so the scores are unchanged) to avoid
    underflow at large batches; at the switch to sampling the whole batch's configurations are drawn anew from
    the generator, M // P per pass; ties go to the lowest position.
    """

    name = "batchbald"
    Params = BatchBALDParams
    first_round_random = True
    example_params = {"mc_samples": 3, "num_samples": 16}

    def ensemble_size(self) -> int:
        return self.params.ensemble

    def check_size(self, n_candidates, n_labeled, num_classes, budget):
        p: BatchBALDParams = self.params
        n, c = n_candidates, num_classes
        if n > p.max_candidates:
            m = p.num_samples or default_num_samples(c)
            hours = budget * n * m * c * SECONDS_PER_ENTRY / 3600
            raise ActivelabError(
                f"batchbald over N={n:,} candidates (C={c}, M={m:,} configurations, batch {budget}) scores "
                f"{budget * n * m * c:.2g} joint-entropy entries, about {hours:,.1f} hours of one CPU core, and "
                f"holds {p.mc_samples * p.ensemble * n * c * 4 / 2**30:.1f} GiB of pass probabilities. Score a "
                f"random subset (params: {{subset: {p.max_candidates}}}, or wrap: [{{name: subsample, params: "
                f"{{size: {p.max_candidates}}}}}]) or raise max_candidates"
            )

    def query(self, ctx, budget, rng):
        p: BatchBALDParams = self.params
        seed = int(rng.integers(2**31 - 1))
        probs = ctx.mc_probs(p.mc_samples, seed, p.ensemble)
        picks, scores = batchbald_select(probs, budget, rng, p.num_samples, p.chunk_elements)
        ctx.info["batchbald_num_samples"] = int(p.num_samples or default_num_samples(probs.shape[2]))
        ctx.info["batchbald_last_gain"] = float(scores[-1]) if len(scores) else None
        return picks
