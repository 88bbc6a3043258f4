"""BAIT batch selection (Ash et al., NeurIPS 2021, "Gone Fishing"); :mod:`.fishermask` runs it on Fisher
embeddings of a parameter mask.

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
recomputing every V_x M^-1 (the from-scratch reference in the tests, which also inverts M directly).

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
from ..memory import check_selection_memory
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


# -- strategies ------------------------------------------------------------------------------------------------


class BaitParams(StrategyParams):
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


def gram_sum(v: np.ndarray, chunk: int = 512) -> np.ndarray:
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
    outputs = ("probs", "embeddings")

    class Params(BaitParams):
        include_bias: bool = Field(False, description="add the classifier bias's gradient to the embedding")

    example_params = {"subset": 40}

    def subsample_size(self, budget: int) -> int | None:
        """``subset`` candidates, but never fewer than 2 x ``budget`` (room for the oversampled forward pass)."""
        return None if self.params.subset is None else max(self.params.subset, 2 * budget)

    def query(self, ctx, budget, rng):
        p: Bait.Params = self.params
        if budget == len(ctx.candidates):
            return np.arange(budget, dtype=np.int64)
        dtype = np.float32 if p.precision == "float32" else np.float64
        probs, feats = ctx.probs("candidates"), ctx.embeddings("candidates")
        c = probs.shape[1]
        k = c * feats.shape[1] + c * p.include_bias
        check_selection_memory("bait", len(ctx.candidates), c, k, np.dtype(dtype).itemsize)
        v = ctx.last_layer_fisher_embeddings("candidates", slice(None), p.include_bias, dtype)
        n_l = len(ctx.labeled)
        labeled_sum = np.zeros((k, k))
        for s in range(0, n_l, 1024):
            labeled_sum += gram_sum(
                ctx.last_layer_fisher_embeddings("labeled", slice(s, s + 1024), p.include_bias, np.float64)
            )
        f_u, i_l = pool_fisher(gram_sum(v), len(ctx.candidates), ctx.n_unlabeled, labeled_sum, n_l)
        ctx.info["bait_embedding_dim"] = int(k)
        return bait_select(v, f_u, i_l, n_l, budget, p.lam, p.prune)
