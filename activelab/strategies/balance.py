"""Class-balanced selection without label peeking: BASE and the balance-penalised entropy of Bengar et al.

- BASE (Emam, Chu, Chen, Krishnan & Ghodsi 2021, "Active learning at the ImageNet scale"): every class gets B / C
  of the batch (the remainder to randomly drawn classes); class c takes the candidates closest to its decision
  boundary in the last linear layer, d(x, c) = |z_pred - z_c| / ||w_pred - w_c|| for c != pred(x), and for the
  points predicted c the distance to their nearest boundary min_{c' != c} d(x, c'). Classes pick in turn, one
  point at a time, each its closest not yet picked point. Time O(N C d + C N log N), memory O(N C).
- Bengar, van de Weijer, Fuentes, Raducanu (WACV 2022): choose z in {0, 1}^N, sum z = b, minimising
  z . U + lambda ||P^T z - Omega||_1 with U_i = sum_c p_ic log p_ic (minus the entropy), Omega_c = max(0, T - n_c),
  T = (labeled size + b) / C. The authors solve the MIP with a commercial solver; here its LP relaxation is solved
  by HiGHS (scipy.optimize.linprog) and rounded by taking the b largest z (a basic optimum has at most 2 C + 1
  fractional entries, so rounding moves at most that many picks). Variables N + C, constraints 2 C + 1 (dense
  N x C block): fine at 10^5 candidates.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ..errors import ActivelabError
from .base import Strategy, StrategyParams, register
from .wrappers import balanced_quotas


def boundary_distances(logits: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(N, C): d(x, c) = |z_pred - z_c| / ||w_pred - w_c||; for c = pred the distance to the nearest boundary."""
    logits = np.asarray(logits, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    n, c = logits.shape
    if weight.shape[0] != c:
        raise ActivelabError(f"the classifier has {weight.shape[0]} rows but the logits have {c} classes")
    pred = logits.argmax(axis=1)
    sq = np.einsum("ij,ij->i", weight, weight)
    wdist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * weight @ weight.T, 0.0))  # (C, C)
    rows = np.arange(n)
    gap = np.abs(logits[rows, pred][:, None] - logits)
    norm = wdist[pred]
    d = np.where(norm > 1e-12, gap / np.where(norm > 1e-12, norm, 1.0), np.inf)
    d[rows, pred] = np.inf
    d[rows, pred] = d.min(axis=1)
    return d


def base_select(dist: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """BASE's picks from the (N, C) boundary distances: B / C per class, classes taking turns."""
    n, c = dist.shape
    if not 0 <= budget <= n:
        raise ActivelabError(f"budget {budget} is larger than the {n} candidates")
    tie = rng.permutation(n)
    orders = [np.lexsort((tie, dist[:, k])) for k in range(c)]
    quota = np.full(c, budget // c)
    quota[rng.permutation(c)[: budget % c]] += 1
    ptr = np.zeros(c, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    picks: list[int] = []
    for _round in range(int(quota.max())):
        for k in range(c):
            if quota[k] <= _round:
                continue
            while taken[orders[k][ptr[k]]]:
                ptr[k] += 1
            j = int(orders[k][ptr[k]])
            taken[j] = True
            picks.append(j)
    return np.asarray(picks, dtype=np.int64)


def bengar_select(
    probs: np.ndarray, labeled_counts: np.ndarray, budget: int, lam: float = 0.6, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, dict]:
    """Bengar et al.'s selection by the LP relaxation (HiGHS) rounded to the ``budget`` largest z.

    Returns the picks and notes (LP objective, number of fractional entries)."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, hstack, identity, vstack

    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    if not 0 <= budget <= n:
        raise ActivelabError(f"budget {budget} is larger than the {n} candidates")
    counts = np.asarray(labeled_counts, dtype=np.float64)
    target = (counts.sum() + budget) / c
    omega = np.maximum(0.0, target - counts)
    u = (probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
    cost = np.concatenate([u, np.full(c, lam)])
    pt = csr_matrix(probs.T)
    eye = identity(c, format="csr")
    # P^T z - s <= Omega and -P^T z - s <= -Omega  (s >= |P^T z - Omega|)
    a_ub = vstack([hstack([pt, -eye]), hstack([-pt, -eye])]).tocsr()
    b_ub = np.concatenate([omega, -omega])
    a_eq = csr_matrix(np.concatenate([np.ones(n), np.zeros(c)])[None, :])
    res = linprog(
        cost,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=a_eq,
        b_eq=[budget],
        bounds=np.column_stack([np.zeros(n + c), np.r_[np.ones(n), np.full(c, np.inf)]]),
        method="highs",
    )
    if res.status != 0:
        raise ActivelabError(f"the Bengar LP failed ({res.message}); report this with the pool size")
    z = res.x[:n]
    tie = (rng or np.random.default_rng(0)).permutation(n)
    picks = np.lexsort((tie, -z))[:budget].astype(np.int64)
    frac = int(((z > 1e-9) & (z < 1 - 1e-9)).sum())
    return picks, {"lp_objective": float(res.fun), "lp_fractional": frac}


def minority_first_select(
    labels: np.ndarray, labeled_counts: np.ndarray, budget: int, rng: np.random.Generator
) -> np.ndarray:
    """Oracle ablation: the per-class quotas of :func:`~activelab.strategies.wrappers.balanced_quotas` (each label
    to the class with the fewest labels so far, among the classes with candidates left) computed on the true
    ``labels`` of the candidates, and a uniform random draw within each class."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if not 0 <= budget <= n:
        raise ActivelabError(f"budget {budget} is larger than the {n} candidates")
    c = max(len(labeled_counts), int(labels.max()) + 1 if n else 0)
    counts = np.zeros(c, dtype=np.int64)
    counts[: len(labeled_counts)] = labeled_counts
    quotas = balanced_quotas(counts, np.bincount(labels, minlength=c), budget)
    picks = [rng.choice(np.flatnonzero(labels == k), q, replace=False) for k, q in enumerate(quotas) if q]
    return np.concatenate(picks).astype(np.int64) if picks else np.zeros(0, np.int64)


@register
class Base(Strategy):
    """BASE (Emam et al. 2021): B / C per class, the candidates closest to each class's decision boundary in the
    last linear layer (see the module docstring). No label peeking. Time O(N C d + C N log N), memory O(N C).
    Deviation: for points predicted c, their distance to c's boundary is taken as the nearest boundary of c."""

    name = "base"
    first_round_random = True
    outputs = ("logits",)

    def query(self, ctx, budget, rng):
        weight, _bias = ctx.classifier_parameters()
        return base_select(boundary_distances(ctx.logits("candidates"), weight), budget, rng)


@register
class Bengar(Strategy):
    """Balance-penalised entropy (Bengar, van de Weijer, Fuentes & Raducanu, WACV 2022): minimise
    z . U + lambda ||P^T z - Omega||_1 over batches z. Solved as an LP relaxation (HiGHS through
    scipy.optimize.linprog) rounded to the budget largest z, instead of the authors' MIP with a commercial
    solver. Time: one LP with N + C variables and 2 C + 1 dense rows; memory O(N C)."""

    name = "bengar"
    first_round_random = True
    outputs = ("probs",)

    class Params(StrategyParams):
        lam: float = Field(0.6, ge=0, description="weight of the balance term (0.6 on CIFAR-10 in the paper)")
        max_candidates: int = Field(
            200_000, ge=1, description="refuse larger LPs up front (wrap in subsample for bigger pools)"
        )

    def check_size(self, n_candidates, n_labeled, num_classes, budget):
        n, c = n_candidates, num_classes
        if n > self.params.max_candidates:
            raise ActivelabError(
                f"bengar: the LP over N={n:,} candidates and C={c} classes has {n + c:,} variables and "
                f"{2 * c * n + n:,} nonzeros; HiGHS needed more than 4 GB at N=1,000,000, C=10. Wrap the strategy in "
                f"subsample (wrap: [{{name: subsample, params: {{size: {self.params.max_candidates}}}}}]) or raise "
                "max_candidates if the machine has the memory"
            )

    def query(self, ctx, budget, rng):
        counts = np.bincount(np.asarray(ctx.labeled_labels(), dtype=np.int64), minlength=ctx.num_classes)
        picks, notes = bengar_select(ctx.probs("candidates"), counts, budget, self.params.lam, rng)
        ctx.info.update(notes)
        return picks


@register
class MinorityFirst(Strategy):
    """Oracle ablation (reads the labels of the unlabeled pool): each pick goes to the class with the fewest labels
    so far among the classes with candidates left, a random candidate within it. The ceiling the imbalance
    benchmark measures against, not a usable strategy. Time O(N + B C)."""

    name = "minority_first"
    reads_pool_labels = True

    def query(self, ctx, budget, rng):
        counts = np.bincount(np.asarray(ctx.labeled_labels(), dtype=np.int64), minlength=ctx.num_classes)
        return minority_first_select(ctx.pool_labels("candidates"), counts, budget, rng)
