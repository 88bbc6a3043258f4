"""Core-set selection: greedy k-center on the classifier's input embeddings (Sener & Savarese, ICLR 2018).

Start from each candidate's distance to its nearest labeled sample; repeatedly pick the candidate farthest
from everything chosen so far and lower the running minimum distances by the new centre. Memory is linear in
the pool: the N x L distances to the labeled set are reduced block by block, and each pick updates one (N,)
vector.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ..errors import ActivelabError
from ..neighbors import Backend, min_sq_distances, squared_norms
from .base import Strategy, StrategyParams, register

#: Rows x columns of one block of the candidate-to-labeled distance matrix.
BLOCK_ELEMENTS = 2**20


def kcenter_greedy(
    embeddings: np.ndarray,
    labeled_embeddings: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    block_elements: int = BLOCK_ELEMENTS,
    backend: Backend = "exact",
) -> np.ndarray:
    """Positions of ``budget`` candidates chosen by greedy k-center (farthest-first traversal).

    Args:
        embeddings: (N, d) candidate embeddings.
        labeled_embeddings: (L, d) embeddings of the labeled set (L may be 0: the first centre is then a
            uniformly random candidate drawn from ``rng``).
        budget: centres to pick (<= N).
        rng: used only when there is no labeled sample.
        backend: the search for each candidate's nearest labeled sample ("exact", "faiss" or "auto"; see
            :mod:`activelab.neighbors`); the greedy steps are matrix-vector products either way.

    Ties in the farthest distance go to the lowest position. Chosen candidates are marked (distance -1) and
    never picked again, so the positions are distinct even when the pool holds duplicates.
    Complexity: O((N·L + N·budget)·d) time; O(N) memory besides the embeddings (no N x N or N x L matrix).
    """
    x = torch.as_tensor(np.ascontiguousarray(embeddings, dtype=np.float32))
    if x.ndim != 2:
        raise ActivelabError(f"embeddings must be (N, d); got shape {tuple(x.shape)}")
    n = len(x)
    if budget > n:
        raise ActivelabError(f"cannot pick {budget} centres from {n} candidates")
    labeled = torch.as_tensor(np.ascontiguousarray(labeled_embeddings, dtype=np.float32)).reshape(-1, x.shape[1])
    chosen = np.empty(budget, dtype=np.int64)
    if budget == 0:
        return chosen
    x_sq = squared_norms(x)
    if len(labeled):
        dist = torch.from_numpy(min_sq_distances(x.numpy(), labeled.numpy(), backend, block_elements)[0])
        start = 0
    else:
        first = int(rng.integers(n))
        chosen[0] = first
        dist = (x_sq + x_sq[first] - 2 * (x @ x[first])).clamp_(min=0)
        dist[first] = -1.0
        start = 1
    for k in range(start, budget):
        pick = int(torch.argmax(dist))
        chosen[k] = pick
        d_new = (x_sq + x_sq[pick] - 2 * (x @ x[pick])).clamp_(min=0)
        torch.minimum(dist, d_new, out=dist)
        dist[pick] = -1.0
    return chosen


class CoresetParams(StrategyParams):
    subset: int | None = Field(
        None, ge=1, description="random unlabeled candidates considered (None: all); as the subsample wrapper"
    )
    backend: Backend = Field(
        "exact", description="nearest labeled sample search: 'exact' (chunked torch), 'faiss' or 'auto'"
    )


@register
class Coreset(Strategy):
    """Core-set (Sener & Savarese, ICLR 2018), greedy k-center on the classifier's input embeddings.

    The distances of the unlabeled candidates to the labeled set are the starting point; with no labeled
    sample, the first centre is a seeded random candidate. Baseline of LPLgrad and (as k-center) FisherMask.
    Complexity: one forward pass over candidates and labeled samples; O((N·L + N·b)·d) time for N candidates,
    L labeled, b = budget, d = embedding size; O(N + L) memory besides the (N + L, d) embeddings.
    Deviations: only the greedy 2-approximation (the paper's robust MIP refinement is not used, as in most
    reimplementations); Euclidean distance on the penultimate features.
    """

    name = "coreset"
    Params = CoresetParams
    outputs = ("embeddings",)

    def query(self, ctx, budget, rng):
        emb = ctx.embeddings("candidates")
        labeled = ctx.embeddings("labeled") if len(ctx.labeled) else np.zeros((0, emb.shape[1]), np.float32)
        return kcenter_greedy(emb, labeled, budget, rng, backend=self.params.backend)


@register
class KCenter(Coreset):
    """``kcenter``: the same greedy k-center selection as ``coreset`` (the name FisherMask's paper uses)."""

    name = "kcenter"
