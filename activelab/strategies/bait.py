"""BAIT batch selection (Ash et al., NeurIPS 2021, "Gone Fishing") and FisherMask (Gul et al. 2024).

Both pick a batch that minimises tr(M^-1 F_U), the A-optimal design criterion on Fisher embeddings V_x
(C x K per sample, V_x^T V_x = the Fisher information of x):

- F_U: the Fisher of the whole pool (unlabeled and labeled, as in BAIT's code), a mean of V_x^T V_x;
- I_L: the same mean over the labeled set;
- M = lam I + n_L / (n_L + b) I_L, and a candidate adds b / (n_L + b) V_x^T V_x (its rows are scaled by
  sqrt(b / (n_L + b))).

Greedy forward selection adds the x that maximises the trace reduction
    t(x) = tr(V_x M^-1 F_U M^-1 V_x^T (I_C + V_x M^-1 V_x^T)^-1)
and updates M^-1 by Woodbury; with ``prune`` (BAIT's default) it oversamples 2b and then greedily removes the b
whose removal increases tr(M^-1 F_U) least, t_-(x) = tr(V_x M^-1 F_U M^-1 V_x^T (V_x M^-1 V_x^T - I_C)^-1),
largest first.

The fast core (:func:`bait_select`) never recomputes a candidate's products from scratch. It keeps, for every
candidate, the two C x C matrices G_x = V_x M^-1 V_x^T and H_x = V_x M^-1 F_U M^-1 V_x^T. After adding (or
removing, s = -1) the rows v of a pick, with u = M^-1 v^T (K x C), S = s I + v u, z = M^-1 F_U u and
T = u^T F_U u, Woodbury gives M'^-1 = M^-1 - u S^-1 u^T and, with W_x = V_x u, Y_x = V_x z, Q_x = W_x S^-1:
    G'_x = G_x - Q_x W_x^T,     H'_x = H_x - Y_x Q_x^T - Q_x Y_x^T + Q_x T Q_x^T.
So a pick costs one (N C x K) @ (K x 2C) product plus O(K^2 C + N C^3), instead of the O(N C K^2) of
recomputing every V_x M^-1 (:func:`bait_select_reference`, which also inverts M directly each pick).

Time: O(N C K^2) once (the initial G, H) + O(b (N C^2 K + K^2 C)) for the picks. Memory: V (N C K) plus
O(K^2 + N C^2); the initial products are chunked.

Deviations from the authors' code: candidates already picked are excluded by masking (same effect as their
scan over the sorted scores); ties go to the lowest position (``argmax``); with fewer than 2b candidates the
forward pass stops at N; a batch equal to the whole candidate set is returned without computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import ActivelabError
from ..inference.fisher import (
    diagonal_fisher,
    fisher_mask,
    last_layer_fisher_embeddings,
    masked_fisher_embeddings,
    masked_fisher_gram,
    num_classes_of,
    planned_mask_size,
)
from . import base
from .base import Strategy, StrategyParams, register

# -- the selection core: pure functions of arrays --------------------------------------------------------------


@dataclass
class BaitResult:
    positions: np.ndarray  # (b,) int64 positions into the candidates, in pick order (after pruning)
    m_inv: np.ndarray  # (K, K) float64: M^-1 after the final batch, Woodbury-updated
    forward: np.ndarray  # the forward picks (2b with pruning), in order
    removed: np.ndarray  # the pruned positions, in removal order


def _check_inputs(v: np.ndarray, fisher_pool: np.ndarray, fisher_labeled: np.ndarray | None, budget: int) -> None:
    if v.ndim != 3:
        raise ActivelabError(f"Fisher embeddings must be (N, C, K); got shape {v.shape}")
    n, _, k = v.shape
    if fisher_pool.shape != (k, k):
        raise ActivelabError(f"the pool Fisher must be ({k}, {k}); got {fisher_pool.shape}")
    if fisher_labeled is not None and fisher_labeled.shape != (k, k):
        raise ActivelabError(f"the labeled Fisher must be ({k}, {k}); got {fisher_labeled.shape}")
    if not 1 <= budget <= n:
        raise ActivelabError(f"budget must lie in [1, {n}] (the number of candidates); got {budget}")
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(fisher_pool))):
        raise ActivelabError("Fisher embeddings contain NaN or inf: the model's outputs are not finite")


def initial_inverse(fisher_labeled: np.ndarray | None, n_labeled: int, budget: int, lam: float, k: int) -> np.ndarray:
    """M_0^-1 = (lam I + n_L / (n_L + b) I_L)^-1, float64."""
    if lam <= 0:
        raise ActivelabError(f"lam must be positive; got {lam}")
    m = lam * np.eye(k)
    if fisher_labeled is not None and n_labeled > 0:
        m = m + (n_labeled / (n_labeled + budget)) * np.asarray(fisher_labeled, dtype=np.float64)
    return np.linalg.inv(m)


def _trace_scores(g: np.ndarray, h: np.ndarray, sign: float) -> np.ndarray:
    """tr(H_x (G_x + sign I)^-1) for stacks (N, C, C) of symmetric G, H (sign +1: add, -1: remove)."""
    c = g.shape[-1]
    s_inv = np.linalg.inv(g + sign * np.eye(c))
    return np.einsum("nij,nji->n", h, s_inv)


def _initial_products(
    v: np.ndarray, m_inv: np.ndarray, fisher: np.ndarray, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """G_x = V_x M^-1 V_x^T and H_x = V_x M^-1 F M^-1 V_x^T for every x, (N, C, C) float64, chunked."""
    n, c, k = v.shape
    g = np.empty((n, c, c))
    h = np.empty((n, c, c))
    mi = m_inv.astype(v.dtype)
    fi = fisher.astype(v.dtype)
    for s in range(0, n, chunk):
        vc = v[s : s + chunk]
        a = (vc.reshape(-1, k) @ mi).reshape(vc.shape)  # V_x M^-1
        g[s : s + chunk] = np.einsum("nik,njk->nij", a, vc)
        b = (a.reshape(-1, k) @ fi).reshape(vc.shape)  # V_x M^-1 F
        h[s : s + chunk] = np.einsum("nik,njk->nij", b, a)
    return g, h


class _GreedyState:
    """M^-1 and the per-candidate C x C products G, H, kept in step with rank-C Woodbury updates."""

    def __init__(self, v: np.ndarray, fisher: np.ndarray, m_inv: np.ndarray, scale: float = 1.0) -> None:
        self.v = v  # unscaled; every candidate's rows count as scale * V_x (no scaled copy of V is made)
        self.scale = float(scale)
        self.flat = v.reshape(-1, v.shape[2])
        self.fisher = np.asarray(fisher, dtype=np.float64)
        self.m_inv = np.asarray(m_inv, dtype=np.float64)
        g, h = _initial_products(v, self.m_inv, self.fisher)
        self.g, self.h = g * self.scale**2, h * self.scale**2

    def update(self, pick: int, sign: float, rows: np.ndarray | None = None) -> None:
        """Add (sign +1) or remove (-1) candidate ``pick``; refresh G, H on ``rows`` (default: all)."""
        c = self.v.shape[1]
        vp = self.scale * self.v[pick].astype(np.float64)  # (C, K)
        u = self.m_inv @ vp.T  # (K, C)
        s_inv = np.linalg.inv(sign * np.eye(c) + vp @ u)
        s_inv = 0.5 * (s_inv + s_inv.T)
        fu = self.fisher @ u
        z = self.m_inv @ fu  # M^-1 F u
        t = u.T @ fu
        uz = (self.scale * np.concatenate([u, z], axis=1)).astype(self.v.dtype)
        if rows is None:
            wy = (self.flat @ uz).astype(np.float64).reshape(-1, c, 2 * c)
        else:
            wy = (self.v[rows] @ uz).astype(np.float64)
        w, y = wy[:, :, :c], wy[:, :, c:]
        q = w @ s_inv
        dg = q @ np.swapaxes(w, 1, 2)
        qy = q @ np.swapaxes(y, 1, 2)
        dh = -qy - np.swapaxes(qy, 1, 2) + q @ t @ np.swapaxes(q, 1, 2)
        if rows is None:
            self.g -= dg
            self.h += dh
        else:
            self.g[rows] -= dg
            self.h[rows] += dh
        self.m_inv = self.m_inv - u @ s_inv @ u.T
        self.m_inv = 0.5 * (self.m_inv + self.m_inv.T)


def _counts(n: int, budget: int, prune: bool) -> int:
    return min(n, 2 * budget) if prune else budget


def bait_core(
    v: np.ndarray,
    fisher_pool: np.ndarray,
    fisher_labeled: np.ndarray | None,
    n_labeled: int,
    budget: int,
    lam: float = 1.0,
    prune: bool = True,
) -> BaitResult:
    """Greedy BAIT selection with cached C x C products (see the module docstring); returns the details.

    ``v``: candidates' Fisher embeddings (N, C, K) (float32 or float64: the big product runs in this dtype,
    everything else in float64); ``fisher_pool``: F_U (K, K); ``fisher_labeled``: I_L (K, K) or None.
    """
    _check_inputs(v, fisher_pool, fisher_labeled, budget)
    n, _, k = v.shape
    m_inv = initial_inverse(fisher_labeled, n_labeled, budget, lam, k)
    state = _GreedyState(v, fisher_pool, m_inv, scale=np.sqrt(budget / (n_labeled + budget)))
    picked: list[int] = []
    taken = np.zeros(n, dtype=bool)
    for _ in range(_counts(n, budget, prune)):
        scores = _trace_scores(state.g, state.h, 1.0)
        scores[taken] = -np.inf
        j = int(np.argmax(scores))
        picked.append(j)
        taken[j] = True
        state.update(j, 1.0)
    forward = np.asarray(picked, dtype=np.int64)
    removed: list[int] = []
    while len(picked) > budget:
        rows = np.asarray(picked, dtype=np.int64)
        scores = _trace_scores(state.g[rows], state.h[rows], -1.0)
        out = int(rows[int(np.argmax(scores))])
        picked.remove(out)
        removed.append(out)
        state.update(out, -1.0, rows=np.asarray(picked, dtype=np.int64))
    return BaitResult(np.asarray(picked, dtype=np.int64), state.m_inv, forward, np.asarray(removed, dtype=np.int64))


def bait_select(
    v: np.ndarray,
    fisher_pool: np.ndarray,
    fisher_labeled: np.ndarray | None,
    n_labeled: int,
    budget: int,
    lam: float = 1.0,
    prune: bool = True,
) -> np.ndarray:
    """Positions (b,) of the BAIT batch among the candidates ``v`` (N, C, K); see :func:`bait_core`."""
    if budget == len(v):
        return np.arange(len(v), dtype=np.int64)
    return bait_core(v, fisher_pool, fisher_labeled, n_labeled, budget, lam, prune).positions


def bait_select_reference(
    v: np.ndarray,
    fisher_pool: np.ndarray,
    fisher_labeled: np.ndarray | None,
    n_labeled: int,
    budget: int,
    lam: float = 1.0,
    prune: bool = True,
    max_picks: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The slow, from-scratch BAIT greedy, for tests and benchmarks: every pick recomputes V_x M^-1 F M^-1 V_x^T
    for every candidate, with M^-1 inverted directly from M (no Woodbury). O(N C K^2) per pick.

    Returns (positions, M^-1). ``max_picks`` stops the forward pass early (for timing); then it returns the
    forward picks made so far.
    """
    _check_inputs(v, fisher_pool, fisher_labeled, budget)
    n, c, k = v.shape
    m = lam * np.eye(k)
    if fisher_labeled is not None and n_labeled > 0:
        m = m + (n_labeled / (n_labeled + budget)) * np.asarray(fisher_labeled, dtype=np.float64)
    vs = v.astype(np.float64) * np.sqrt(budget / (n_labeled + budget))
    f = np.asarray(fisher_pool, dtype=np.float64)

    def products(rows: np.ndarray, m_inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g, h = np.empty((len(rows), c, c)), np.empty((len(rows), c, c))
        for s in range(0, len(rows), 256):  # chunked only to bound memory
            vr = vs[rows[s : s + 256]]
            a = vr @ m_inv
            g[s : s + 256] = a @ np.swapaxes(vr, 1, 2)
            h[s : s + 256] = a @ f @ np.swapaxes(a, 1, 2)
        return g, h

    picked: list[int] = []
    n_forward = _counts(n, budget, prune) if max_picks is None else min(max_picks, _counts(n, budget, prune))
    for _ in range(n_forward):
        m_inv = np.linalg.inv(m)
        g, h = products(np.arange(n), m_inv)
        scores = np.einsum("nij,nji->n", h, np.linalg.inv(g + np.eye(c)))
        scores[picked] = -np.inf
        j = int(np.argmax(scores))
        picked.append(j)
        m = m + vs[j].T @ vs[j]
    if max_picks is not None:
        return np.asarray(picked, dtype=np.int64), np.linalg.inv(m)
    while len(picked) > budget:
        m_inv = np.linalg.inv(m)
        rows = np.asarray(picked, dtype=np.int64)
        g, h = products(rows, m_inv)
        scores = np.einsum("nij,nji->n", h, np.linalg.inv(g - np.eye(c)))
        out = int(rows[int(np.argmax(scores))])
        picked.remove(out)
        m = m - vs[out].T @ vs[out]
    return np.asarray(picked, dtype=np.int64), np.linalg.inv(m)


def pool_fisher(
    candidate_gram_sum: np.ndarray,
    n_candidates_used: int,
    n_unlabeled: int,
    labeled_gram_sum: np.ndarray,
    n_labeled: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(F_U, I_L) from Gram sums: I_L = labeled sum / n_L; F_U = the pool mean, with the unlabeled part estimated
    from the candidates used (a seeded subset when the unlabeled pool is larger than ``subset``):
    F_U = (n_unlabeled * mean_candidates + n_L * I_L) / (n_unlabeled + n_L)."""
    mean_c = candidate_gram_sum / max(1, n_candidates_used)
    i_l = labeled_gram_sum / n_labeled if n_labeled > 0 else None
    f_u = n_unlabeled * mean_c
    if i_l is not None:
        f_u = f_u + n_labeled * i_l
    return f_u / (n_unlabeled + n_labeled), i_l


def candidate_subset(n_candidates: int, subset: int | None, budget: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`.base.candidate_subset` of ``subset`` candidates (all of them when ``subset`` is None or covers
    them), but never fewer than 2 x ``budget``, so that the oversampled forward pass has room."""
    return base.candidate_subset(n_candidates, None if subset is None else max(subset, 2 * budget), budget, rng)


def selection_memory_bytes(n: int, c: int, k: int, itemsize: int) -> int:
    """Peak memory of one BAIT / FisherMask query, estimated: the candidates' embeddings (N C K of ``itemsize``)
    plus about six K x K float64 matrices alive at once (the Gram sums, F_U, I_L, M^-1 and its update)."""
    return n * c * k * itemsize + 6 * k * k * 8


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_selection_memory(strategy: str, n: int, c: int, k: int, itemsize: int) -> None:
    """Refuse, before any expensive work, a query whose arrays cannot fit in the memory available now, with
    the sizes and what to change (the alternative is the kernel killing the worker mid-query)."""
    need, have = selection_memory_bytes(n, c, k, itemsize), available_memory_bytes()
    if have is None or need <= have:
        return
    gib = 2.0**30
    raise ActivelabError(
        f"{strategy}: a query on N={n:,} candidates with C={c} classes and K={k:,} embedding dimensions needs "
        f"about {need / gib:.1f} GiB (embeddings N x C x K: {n * c * k * itemsize / gib:.1f} GiB; K x K matrices: "
        f"{6 * k * k * 8 / gib:.1f} GiB), but {have / gib:.1f} GiB is available. Lower K (fishermask: pct), "
        "the candidate subset (subset), or use precision: float32; or run on a machine with more memory."
    )


# -- strategies ------------------------------------------------------------------------------------------------


class _BaitParams(StrategyParams):
    lam: float = Field(1.0, gt=0, description="lambda of M = lam I + n_L/(n_L+b) I_L")
    prune: bool = Field(True, description="oversample 2b, then greedily remove b (BAIT's default)")
    subset: int | None = Field(
        5000,
        ge=1,
        description="select among a seeded random subset of this many unlabeled samples, at least 2b (None: all)",
    )
    precision: Literal["float32", "float64"] = Field(
        "float64", description="dtype of the (N C x K) products of the greedy (state is always float64)"
    )


def _gram_sum(v: np.ndarray, chunk: int = 512) -> np.ndarray:
    """sum_x V_x^T V_x, (K, K) float64, chunked over samples."""
    k = v.shape[2]
    out = np.zeros((k, k))
    for s in range(0, len(v), chunk):
        rows = v[s : s + chunk].reshape(-1, k).astype(np.float64)
        out += rows.T @ rows
    return out


@register
class Bait(Strategy):
    """BAIT (Ash, Goel, Krishnamurthy, Kakade: "Gone Fishing: Neural Active Learning with Fisher Embeddings",
    NeurIPS 2021) on the classifier's weight.

    Fisher embeddings in closed form from one forward pass (probabilities and the classifier's input h):
    row c = sqrt(p_c) (e_c - p) (x) h, K = C d (+ C with ``include_bias``; BAIT's code leaves the bias out, and
    so does the default). Selection: :func:`bait_select` (greedy trace minimisation, Woodbury updates, optional
    backward pruning), F_U over the pool (labeled + unlabeled, as in BAIT's code), I_L over the labeled set.

    Complexity: one forward pass over candidates and labeled samples; O(N C K^2) to form F_U and the initial
    products, then O(b (N C^2 K + K^2 C)) for the greedy; memory O(N C K + K^2) for N = min(unlabeled, subset).
    Deviations: F_U's unlabeled part is estimated on the ``subset`` when the unlabeled pool is larger; the
    authors' code sampled nothing and built (N, C, C d) float64 embeddings of the whole pool.
    """

    name = "bait"
    first_round_random = False

    class Params(_BaitParams):
        include_bias: bool = Field(False, description="add the classifier bias's gradient to the embedding")

    example_params = {"subset": 40}

    def query(self, ctx, budget, rng):
        p: Bait.Params = self.params
        positions = candidate_subset(len(ctx.candidates), p.subset, budget, rng)
        if budget == len(positions):
            return positions
        dtype = np.float32 if p.precision == "float32" else np.float64
        probs, feats = ctx.probs("candidates"), ctx.embeddings("candidates")
        c = probs.shape[1]
        check_selection_memory(
            "bait", len(positions), c, c * feats.shape[1] + c * p.include_bias, np.dtype(dtype).itemsize
        )
        v = last_layer_fisher_embeddings(probs[positions], feats[positions], include_bias=p.include_bias, dtype=dtype)
        n_l = len(ctx.labeled)
        labeled_sum = np.zeros((v.shape[2], v.shape[2]))
        if n_l:
            for s in range(0, n_l, 1024):
                vl = last_layer_fisher_embeddings(
                    ctx.probs("labeled")[s : s + 1024],
                    ctx.embeddings("labeled")[s : s + 1024],
                    include_bias=p.include_bias,
                    dtype=np.float64,
                )
                labeled_sum += _gram_sum(vl)
        f_u, i_l = pool_fisher(_gram_sum(v), len(positions), len(ctx.candidates), labeled_sum, n_l)
        ctx.info["bait_embedding_dim"] = int(v.shape[2])
        return positions[bait_select(v, f_u, i_l, n_l, budget, p.lam, p.prune)]


@register
class FisherMaskStrategy(Strategy):
    """FisherMask (Gul et al. 2024: FISH-mask parameter selection of Sung et al. 2021 + BAIT batch selection).

    Each query: (1) the diagonal Fisher F_j = sum_{x in S} sum_c p(c|x) (d log p(c|x)/d theta_j)^2 on a seeded
    random sample S of ``fisher_samples`` pool samples (labeled and unlabeled; no labels read); (2) the mask: the
    whole classifier weight plus the top Fisher entries of every other tensor, K = floor(pct P) in all, chosen
    by index (if K <= |W_last| the mask is only the classifier weight); (3) Fisher embeddings on the mask,
    row c = sqrt(p_c) d log p_c / d theta_mask (``weighting="none"`` drops sqrt(p_c) as the authors' code did);
    (4) BAIT selection on them (:func:`bait_select`), F_U over the pool and I_L over the labeled set.

    Complexity: per-sample, per-class gradients for |S| + N + n_L samples (the diagonal Fisher by vmapped
    Jacobians; the embeddings by C batched backward passes per chunk to the masked layers' outputs);
    O((N + n_L) C K^2) for the Fisher matrices and the initial products, then
    O(b (N C^2 K + K^2 C)) for the greedy; memory O(N C K + K^2 + chunk C P), N = min(unlabeled, subset).
    Deviations from the authors' code: S is a seeded random sample (theirs was the first 1,024 of a class-sorted
    pool, i.e. two classes); the mask is chosen by index (they matched values, misaligned on ties); rows are
    sqrt(p)-weighted by default; the mask is recomputed at every query; the first query uses the same model as
    every other strategy (theirs queried from an untrained network); F_U's unlabeled part is estimated on the
    ``subset`` when the unlabeled pool is larger.
    """

    name = "fishermask"
    first_round_random = False

    class Params(_BaitParams):
        pct: float = Field(0.002, gt=0, le=1, description="mask size K = floor(pct * number of parameters)")
        fisher_samples: int = Field(1024, ge=1, description="pool samples of the diagonal Fisher (seeded)")
        weighting: Literal["sqrt_p", "none"] = Field(
            "sqrt_p",
            description="sqrt(p_c)-weighted rows (BAIT), or unweighted (the FisherMask authors' code)",
        )
        chunk_size: int | None = Field(
            None, ge=1, description="samples per batched Jacobian (None: from a 256 MiB budget)"
        )

    example_params = {"subset": 40, "fisher_samples": 32, "pct": 0.05}

    def query(self, ctx, budget, rng):
        p: FisherMaskStrategy.Params = self.params
        pool, candidates = ctx.dataset("candidates")
        labeled = ctx.labeled
        everything = np.concatenate([candidates, labeled])
        sample = np.sort(rng.choice(everything, size=min(p.fisher_samples, len(everything)), replace=False))
        positions = candidate_subset(len(candidates), p.subset, budget, rng)
        if budget == len(positions):
            return positions
        weight = f"{ctx.classifier}.weight"
        n_classes = num_classes_of(ctx.model, weight)  # a clear error (before the Fisher) if there is no weight
        dtype = np.float32 if p.precision == "float32" else np.float64
        # the embeddings arrive as float32 and are converted: both copies are alive for a moment
        itemsize = np.dtype(dtype).itemsize + (4 if dtype is np.float64 else 0)
        k = planned_mask_size(ctx.model, weight, p.pct)
        check_selection_memory("fishermask", len(positions), n_classes, k, itemsize)
        fisher = diagonal_fisher(ctx.model, pool, sample, p.chunk_size)
        mask = fisher_mask(fisher, weight, p.pct)
        v = masked_fisher_embeddings(ctx.model, pool, candidates[positions], mask, p.weighting, p.chunk_size)
        v = v.astype(dtype, copy=False)
        labeled_sum = (
            masked_fisher_gram(ctx.model, pool, labeled, mask, p.weighting, p.chunk_size)
            if len(labeled)
            else np.zeros((mask.size, mask.size))
        )
        f_u, i_l = pool_fisher(_gram_sum(v), len(positions), len(candidates), labeled_sum, len(labeled))
        ctx.info["fishermask_mask_size"] = mask.size
        ctx.info["fishermask_last_layer_only"] = mask.last_layer_only
        ctx.info["fishermask_mask_counts"] = mask.counts()
        return positions[bait_select(v, f_u, i_l, len(labeled), budget, p.lam, p.prune)]
