"""SIMILAR (Kothawade, Beck, Killamsetty & Iyer, NeurIPS 2021): submodular mutual information with a rare-class
query set, as in DISTIL's rare-class protocol.

A batch A of B candidates greedily maximises I_f(A; Q), Q a labeled query set of rare-class exemplars: the
rare-class validation examples plus the rare-class examples labeled so far. Similarities s_ij = (cos(x_i, x_j) + 1)
/ 2 on BADGE-style gradient embeddings g = (onehot(y) - p) (x) h (hypothesised labels y = argmax p for the pool,
true labels for Q) or on the features h. The cosine of two gradient embeddings factorises,
cos(g_i, g_j) = cos(a_i, a_j) cos(h_i, h_j), so the C d-wide embeddings are never built.

- ``flqmi``: sum_{i in Q} max_{j in A} s_ij + eta sum_{i in A} max_{j in Q} s_ij. Memory N |Q|, time O(B N |Q|).
- ``gcmi``: 2 lambda sum_{i in A} sum_{j in Q} s_ij (modular: the top B). Memory N |Q|.
- ``logdetmi``: log det(S_A + r I) - log det(S_A + r I - eta^2 S_AQ (S_Q + r I)^-1 S_QA) (r = ``ridge``,
  submodlib's lambdaVal), greedy by two incremental Cholesky factorisations (the fast greedy MAP of Chen et al.
  2018): the kernel row of each pick against all candidates is computed on the fly, so memory is O(N (B + |Q|)),
  never N x N; the greedy is exact (no lazy evaluation needed, since every gain is updated in O(N) per pick).
- FLVMI sums over the whole pool V of max_{j in A} s_ij and needs N x N similarities: not offered.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import ActivelabError
from ..memory import check_memory
from .base import Strategy, StrategyParams, register

SmiFunction = Literal["flqmi", "gcmi", "logdetmi"]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 1e-12, norms, 1.0)


class Similarity:
    """s(i, j) = (cos + 1) / 2 between rows of two embedding sets given as factors: cosine of (a (x) h) when ``a``
    is given (gradient embeddings), else of h."""

    def __init__(self, h: np.ndarray, a: np.ndarray | None = None) -> None:
        self.h = _unit(h)
        self.a = None if a is None else _unit(a)

    def rows(self, other: Similarity, j: np.ndarray | slice) -> np.ndarray:
        """(N, len(j)) similarities of all rows of ``self`` with rows ``j`` of ``other``."""
        cos = self.h @ other.h[j].T
        if self.a is not None:
            cos *= self.a @ other.a[j].T
        cos += 1.0  # in place: at N = 10^6 every N x |Q| temporary counts
        cos *= 0.5
        return cos

    @classmethod
    def concatenate(cls, parts: list[Similarity]) -> Similarity:
        """The rows of several sets (of the same kind: all gradient or all feature embeddings) as one."""
        out = cls.__new__(cls)
        out.h = np.concatenate([p.h for p in parts])
        out.a = None if parts[0].a is None else np.concatenate([p.a for p in parts])
        return out

    def take(self, rows: np.ndarray) -> Similarity:
        """The given rows only."""
        out = Similarity.__new__(Similarity)
        out.h = self.h[rows]
        out.a = None if self.a is None else self.a[rows]
        return out

    def diagonal(self) -> np.ndarray:
        cos = np.einsum("ij,ij->i", self.h, self.h)
        if self.a is not None:
            cos *= np.einsum("ij,ij->i", self.a, self.a)
        return (cos + 1.0) / 2.0


def gradient_factors(probs: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """a = onehot(y) - p, with y = argmax p when ``labels`` is None."""
    probs = np.asarray(probs, dtype=np.float64)
    y = probs.argmax(axis=1) if labels is None else np.asarray(labels, dtype=np.int64)
    a = -probs.copy()
    a[np.arange(len(a)), y] += 1.0
    return a


def flqmi_greedy(s_nq: np.ndarray, budget: int, eta: float = 1.0) -> np.ndarray:
    """Greedy FLQMI from the (N, |Q|) similarities, in pick order (first index on ties)."""
    n = len(s_nq)
    relevance = eta * s_nq.max(axis=1)
    best = np.zeros(s_nq.shape[1])
    chosen = np.zeros(n, dtype=bool)
    picks = []
    gain = np.empty(n)
    rows = max(1, 2**22 // max(1, s_nq.shape[1]))  # gains by row blocks: no N x |Q| temporary per pick
    for _ in range(budget):
        for r in range(0, n, rows):
            block = s_nq[r : r + rows] - best
            np.maximum(block, 0.0, out=block)
            gain[r : r + rows] = block.sum(axis=1)
        gain += relevance
        gain[chosen] = -np.inf
        j = int(np.argmax(gain))
        picks.append(j)
        chosen[j] = True
        np.maximum(best, s_nq[j], out=best)
    return np.asarray(picks, dtype=np.int64)


def gcmi_top(s_nq: np.ndarray, budget: int, lam: float = 1.0) -> np.ndarray:
    """GCMI is modular: the ``budget`` largest 2 lambda sum_j s_ij (first index on ties)."""
    score = 2.0 * lam * s_nq.sum(axis=1)
    return np.argsort(-score, kind="stable")[:budget].astype(np.int64)


def logdetmi_greedy(
    pool: Similarity,
    query: Similarity,
    budget: int,
    eta: float = 1.0,
    ridge: float = 1.0,
    max_bytes: float = 4e9,
) -> np.ndarray:
    """Greedy LogDetMI in pick order. Memory 2 N B + N |Q| floats (refused above ``max_bytes``)."""
    n, nq = len(pool.h), len(query.h)
    need = 8.0 * n * (2 * budget + nq + 4)
    if need > max_bytes:
        raise ActivelabError(
            f"logdetmi on {n} candidates with budget {budget} and |Q| = {nq} needs {need / 1e9:.1f} GB "
            f"(limit {max_bytes / 1e9:.1f} GB): lower subset= or the budget, or use flqmi / gcmi (memory N |Q|)"
        )
    if ridge <= 0:
        raise ActivelabError("logdetmi needs ridge > 0")
    s_nq = pool.rows(query, slice(None))
    s_qq = query.rows(query, slice(None)) + ridge * np.eye(nq)
    chol = np.linalg.cholesky(s_qq)
    z = np.linalg.solve(chol, s_nq.T).T * eta  # z_a . z_b = eta^2 s_aQ (S_Q + rI)^-1 s_Qb
    d1 = pool.diagonal() + ridge
    d2 = d1 - np.einsum("ij,ij->i", z, z)
    c1 = np.zeros((n, budget))
    c2 = np.zeros((n, budget))
    chosen = np.zeros(n, dtype=bool)
    picks = []
    for t in range(budget):
        gain = np.log(np.maximum(d1, 1e-300)) - np.log(np.maximum(d2, 1e-300))
        gain[chosen] = -np.inf
        j = int(np.argmax(gain))
        picks.append(j)
        chosen[j] = True
        if t + 1 == budget:
            break
        k1 = pool.rows(pool, [j])[:, 0]
        k1[j] += ridge
        k2 = k1 - z @ z[j]
        for c, d, k in ((c1, d1, k1), (c2, d2, k2)):
            e = (k - c[:, :t] @ c[j, :t]) / np.sqrt(max(d[j], 1e-300))
            c[:, t] = e
            d -= e * e
    return np.asarray(picks, dtype=np.int64)


def smi_select(
    function: SmiFunction,
    pool: Similarity,
    query: Similarity,
    budget: int,
    eta: float = 1.0,
    lam: float = 1.0,
    ridge: float = 1.0,
) -> np.ndarray:
    """Picks (positions into the pool) maximising I_f(A; Q) greedily."""
    if len(query.h) == 0:
        raise ActivelabError("the query set Q is empty")
    n, nq = len(pool.h), len(query.h)
    if function == "flqmi":
        check_memory(
            "similar (flqmi)",
            8.0 * n * (2 * nq + pool.h.shape[1] + (0 if pool.a is None else pool.a.shape[1])),
            f"the N x |Q| similarities for N={n:,} candidates and |Q|={nq:,}, plus the unit embeddings",
            "wrap the strategy in subsample, or use function: gcmi (no N x |Q| matrix)",
        )
        return flqmi_greedy(pool.rows(query, slice(None)), budget, eta)
    if function == "gcmi":  # modular: the row sums, block by block
        rows = max(1, 2**22 // max(1, nq))
        sums = np.concatenate(
            [pool.take(np.arange(r, min(n, r + rows))).rows(query, slice(None)).sum(axis=1) for r in range(0, n, rows)]
        )
        return gcmi_top(sums[:, None], budget, lam)
    if function == "logdetmi":
        return logdetmi_greedy(pool, query, budget, eta, ridge)
    raise ActivelabError(f"unknown SMI function {function!r}: use flqmi, gcmi or logdetmi")


def rare_classes(
    labeled_labels: np.ndarray, num_classes: int, given: list[int] | None = None, share: float | None = None
) -> np.ndarray:
    """The rare classes: ``given``; else those whose share of the labeled set is below ``share`` (default 1/C);
    if none is, the classes with the fewest labels."""
    if given is not None:
        bad = [c for c in given if not 0 <= c < num_classes]
        if bad:
            raise ActivelabError(f"rare_classes {bad} are not classes of a {num_classes}-class model")
        return np.asarray(sorted(set(given)), dtype=np.int64)
    counts = np.bincount(np.asarray(labeled_labels, dtype=np.int64), minlength=num_classes)
    limit = (1.0 / num_classes if share is None else share) * max(counts.sum(), 1)
    rare = np.flatnonzero(counts < limit)
    return rare if len(rare) else np.flatnonzero(counts == counts.min())


@register
class Similar(Strategy):
    """SIMILAR (Kothawade et al., NeurIPS 2021; DISTIL's smi.py with submodlib): greedy maximisation of a
    submodular mutual information with a rare-class query set Q.

    Q = the validation examples of the rare classes plus the rare-class examples labeled so far (DISTIL's
    rare-class protocol). "Rare": ``rare_classes`` if given, else the classes whose share of the labeled set is
    below ``rare_share`` (default 1/C), else the least-labeled classes. Embeddings: BADGE-style gradient
    embeddings (default; factorised cosine, never materialised) or the features.
    Time: flqmi O(B N |Q|), gcmi O(N |Q|), logdetmi O(B N (B + |Q| + C + d)); memory N |Q| (flqmi, gcmi) or
    N (2 B + |Q|) (logdetmi; refused up front beyond 4 GB). FLVMI (N x N) is not offered.
    Deviations: exact greedy instead of submodlib's lazy greedy (same picks up to ties; ties go to the first
    candidate); with an empty Q (no rare example anywhere yet) the batch is drawn at random (noted in the round).
    """

    name = "similar"
    first_round_random = True
    outputs = ("probs", "embeddings")

    class Params(StrategyParams):
        function: SmiFunction = "flqmi"
        embedding: Literal["gradient", "features"] = "gradient"
        rare_classes: list[int] | None = Field(None, description="the rare classes (default: from rare_share)")
        rare_share: float | None = Field(None, gt=0, lt=1, description="rare: share of the labeled set below this")
        eta: float = Field(1.0, ge=0)
        lam: float = Field(1.0, gt=0, description="gcmi's lambda")
        ridge: float = Field(1.0, gt=0, description="logdetmi's diagonal regulariser (submodlib's lambdaVal)")

    def _factors(self, ctx, subset: str, labels: np.ndarray | None) -> Similarity:
        h = ctx.embeddings(subset)
        if self.params.embedding == "features":
            return Similarity(h)
        return Similarity(h, gradient_factors(ctx.probs(subset), labels))

    def query(self, ctx, budget, rng):
        p = self.params
        lab_y = np.asarray(ctx.labeled_labels(), dtype=np.int64)
        rare = rare_classes(lab_y, ctx.num_classes, p.rare_classes, p.rare_share)
        parts = []
        if len(lab_y) and np.isin(lab_y, rare).any():
            parts.append(self._factors(ctx, "labeled", lab_y).take(np.flatnonzero(np.isin(lab_y, rare))))
        if _has_validation(ctx):
            val_y = np.asarray(ctx.validation_labels(), dtype=np.int64)
            if np.isin(val_y, rare).any():
                parts.append(self._factors(ctx, "validation", val_y).take(np.flatnonzero(np.isin(val_y, rare))))
        ctx.info["similar_rare_classes"] = rare.tolist()
        ctx.info["similar_query_size"] = int(sum(len(q.h) for q in parts))
        if not parts:
            ctx.info["similar_fallback"] = "empty query set: random batch"
            return rng.choice(len(ctx.candidates), budget, replace=False).astype(np.int64)
        query = Similarity.concatenate(parts)
        pool = self._factors(ctx, "candidates", None)
        return smi_select(p.function, pool, query, budget, p.eta, p.lam, p.ridge)


def _has_validation(ctx) -> bool:
    return getattr(ctx, "validation", None) is not None
