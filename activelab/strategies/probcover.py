"""ProbCover (Yehuda, Dekel, Hacohen & Weinshall, NeurIPS 2022): greedy maximum coverage of delta-balls in an
embedding space, for label-free and low-budget selection.

Pure cores: :func:`purity_delta` (the largest delta whose balls stay inside one k-means cluster for a share alpha
of the points) and :func:`probcover_select` (greedy coverage on a sparse radius graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from ..errors import ActivelabError
from ..neighbors import (
    BLOCK_ELEMENTS,
    Backend,
    ball_sizes,
    kmeans_labels,
    nearest_other_cluster_sq,
    purity_scan,
    radius_graph,
    resolve_backend,
    shrink_graph,
)
from ._embedding import EmbeddingParams, embedding_inputs
from .base import Strategy, register

#: Default cap on the edges of the delta-ball graph (about 10 bytes each with its transpose).
MAX_EDGES = 2**26
#: Default cap on labeled + candidate points: the exact graph needs all N^2 distances (500,000: about half an
#: hour of one core at d = 64; 1,000,000: about two hours).
MAX_POINTS = 500_000
#: Measured cost of one pairwise distance in the one-pass scan on one core, at d = 64 (the elementwise passes
#: dominate there; at d = 512 the matmul doubles it): benchmarks/bench_coldstart.py and bench_million.py.
SECONDS_PER_DISTANCE = 7e-9
#: Rows sampled to estimate the purity delta and the graph's size before the full pass.
SAMPLE_ROWS = 2000
#: The one-pass purity scan keeps the edges up to its bound of delta while they number at most this many times
#: the estimated edges at delta (plus 2**20); more, and the graph is built in a second pass.
WIDE_GRAPH_FACTOR = 3
#: Bytes per edge while the graph is built and searched (int32 column + int8 value, twice with the transpose,
#: plus a float32 length during the one-pass purity scan).
EDGE_BYTES = 14


def purity(other_cluster_distance: np.ndarray, delta: float) -> float:
    """Share of points whose open delta-ball holds no point of another cluster, given each point's distance to
    the nearest point of another cluster."""
    return float(np.mean(np.asarray(other_cluster_distance) >= delta))


def purity_delta(
    x: np.ndarray,
    cluster_labels: np.ndarray,
    alpha: float = 0.95,
    deltas: Sequence[float] | None = None,
    block_elements: int = BLOCK_ELEMENTS,
    backend: Backend = "exact",
) -> tuple[float, float]:
    """(delta, purity at delta): the largest delta with purity >= ``alpha``.

    Balls are open (||x - y|| < delta, as the authors' graph), so a point's ball is pure exactly while delta <=
    its distance to the nearest point of another cluster. Without ``deltas`` the largest such delta is exact:
    the ceil(alpha·N)-th largest of those distances. With ``deltas`` (a grid, as scikit-activeml's
    0.2, 0.4, ..., 2.0) it is the largest grid value meeting alpha, or the smallest grid value if none does.
    One chunked pass over the points (never N x N).
    """
    _check_alpha(alpha)
    d_other_sq = nearest_other_cluster_sq(x, cluster_labels, block_elements, backend)
    return purity_delta_from(d_other_sq, alpha, deltas)


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha <= 1:
        raise ActivelabError(f"alpha must be in (0, 1]; got {alpha}")


def purity_delta_from(
    d_other_sq: np.ndarray, alpha: float = 0.95, deltas: Sequence[float] | None = None
) -> tuple[float, float]:
    """:func:`purity_delta` from each point's squared distance to the nearest point of another cluster."""
    _check_alpha(alpha)
    d_other = np.sqrt(np.asarray(d_other_sq).astype(np.float64))
    if deltas is None:
        need = int(np.ceil(alpha * len(d_other)))
        delta = float(np.sort(d_other)[::-1][need - 1])
        if not np.isfinite(delta):  # a single cluster: every ball is pure
            raise ActivelabError("the purity rule needs at least two clusters: pass delta explicitly")
        return delta, purity(d_other, delta)
    grid = np.sort(np.asarray(deltas, dtype=np.float64))
    if len(grid) == 0 or grid[0] <= 0:
        raise ActivelabError("deltas must be a non-empty list of positive radii")
    ok = [d for d in grid if purity(d_other, d) >= alpha]
    delta = float(ok[-1] if ok else grid[0])
    return delta, purity(d_other, delta)


def _sample_rows(n: int) -> np.ndarray:
    """Rows for the size estimates: all when few, else a fixed-seed sample (estimates only: the picks never
    depend on it, and the strategy's generator is left untouched)."""
    if n <= SAMPLE_ROWS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, SAMPLE_ROWS, replace=False))


def _refuse_if_too_big(
    n: int, n_labeled: int, rows: np.ndarray, x: np.ndarray, delta: float, max_edges: int | None, how: str
) -> float:
    """The graph's edges at ``delta`` estimated from the ball sizes of ``rows``; refuses before the full pass
    when the estimate passes ``max_edges``."""
    estimate = float(ball_sizes(x, rows, delta).mean()) * n
    if max_edges is not None and estimate > max_edges:
        # edges grow about as the square of the points at a fixed delta (the purity rule's delta also changes)
        fit = max(1, int(n * np.sqrt(max_edges / estimate)) - n_labeled)
        raise ActivelabError(
            f"probcover: the delta-ball graph over {n:,} points at delta = {delta:.4g} ({how}) would hold about "
            f"{estimate:,.0f} edges (about {estimate * EDGE_BYTES / 2**20:,.0f} MB), more than max_edges = "
            f"{max_edges:,}. Subsample the candidates (params: {{subset: {fit}}}, or wrap: [{{name: subsample, "
            f"params: {{size: {fit}}}}}], about; smaller if the purity rule's delta grows), pass a smaller delta, "
            "or raise max_edges if the memory is there"
        )
    return estimate


def _check_delta(delta: float) -> None:
    if not delta > 0:
        raise ActivelabError(
            f"the purity rule chose delta = {delta:.4g}: points of different k-means clusters coincide (duplicate "
            "embeddings), so no positive radius keeps the balls pure; pass delta explicitly or lower alpha"
        )


def _upper_quantile_rank(m: int, n: int, s: int) -> int:
    """0-based rank in a sorted sample of ``s`` of an upper confidence bound (4 standard deviations) for the
    m-th smallest of ``n`` values."""
    q = m / n
    return int(min(s - 1, np.ceil(s * q + 4 * np.sqrt(s * q * (1 - q)))))


def greedy_coverage(
    graph: sp.csr_matrix, n_labeled: int, budget: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Greedy maximum coverage on a directed graph over ``[labeled; candidates]`` rows: points reachable from
    the labeled rows are covered; then repeatedly take the candidate covering the most uncovered points (ties:
    lowest position) and mark what it covers. When everything is covered the rest are drawn uniformly from
    ``rng`` among the unpicked candidates. Returns (candidate positions, number drawn at random).
    Time O(E + budget·N) for E edges: each newly covered point lowers the degrees of its in-neighbours once."""
    n_total = graph.shape[0]
    graph = graph.tocsr()
    into = graph.tocsc()  # column j lists the rows that cover j
    covered = np.zeros(n_total, dtype=bool)
    if n_labeled:
        covered[np.unique(graph[:n_labeled].indices)] = True
    degree = (
        np.asarray(graph[:, ~covered].sum(axis=1)).ravel().astype(np.int64)
        if covered.any()
        else np.diff(graph.indptr).astype(np.int64)
    )
    degree[:n_labeled] = -1
    picked = np.zeros(n_total, dtype=bool)
    chosen: list[int] = []
    while len(chosen) < budget:
        row = int(np.argmax(degree))
        if degree[row] <= 0:
            break
        chosen.append(row)
        picked[row] = True
        neigh = graph.indices[graph.indptr[row] : graph.indptr[row + 1]]
        new = neigh[~covered[neigh]]
        covered[new] = True
        if len(new):
            sources = into[:, new].indices  # one entry per (source, newly covered) edge
            degree -= np.bincount(sources, minlength=n_total)
        degree[picked] = -1
        degree[:n_labeled] = -1
    n_random = budget - len(chosen)
    if n_random:
        rest = np.flatnonzero(~picked[n_labeled:]) + n_labeled
        chosen.extend(rng.choice(rest, size=n_random, replace=False).tolist())
    return np.asarray(chosen, dtype=np.int64) - n_labeled, n_random


def probcover_select(
    candidates: np.ndarray,
    labeled: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    *,
    delta: float | None = None,
    alpha: float = 0.95,
    num_classes: int | None = None,
    deltas: Sequence[float] | None = None,
    cluster_labels: np.ndarray | None = None,
    max_edges: int | None = MAX_EDGES,
    block_elements: int = BLOCK_ELEMENTS,
    backend: Backend = "exact",
    info: dict | None = None,
) -> np.ndarray:
    """Positions of ``budget`` candidates chosen by ProbCover on the graph ||x - y|| < delta over
    ``[labeled; candidates]``. ``delta`` None: the purity rule (:func:`purity_delta`) on k-means with
    ``num_classes`` clusters (or the given ``cluster_labels``), seeded from ``rng``."""
    candidates = np.asarray(candidates, dtype=np.float32)
    labeled = np.asarray(labeled, dtype=np.float32).reshape(-1, candidates.shape[1])
    if budget > len(candidates):
        raise ActivelabError(f"cannot pick {budget} samples from {len(candidates)} candidates")
    x = np.concatenate([labeled, candidates])
    n = len(x)
    rows = _sample_rows(n)
    pure = None
    if delta is not None:
        if delta <= 0:
            raise ActivelabError(f"delta must be positive; got {delta}")
        if max_edges is not None:  # the estimate only serves the refusal here
            _refuse_if_too_big(n, len(labeled), rows, x, delta, max_edges, "given")
        graph = radius_graph(x, delta, block_elements, backend, max_edges)
    else:
        if cluster_labels is None:
            if num_classes is None or num_classes < 2:
                raise ActivelabError("the purity rule needs num_classes >= 2 (the k of its k-means), or pass delta")
            cluster_labels = kmeans_labels(x, num_classes, rng, backend=backend)
        _check_alpha(alpha)
        sample_sq = np.sort(nearest_other_cluster_sq(x, cluster_labels, block_elements, backend, rows=rows))
        edges = 0.0
        if np.isfinite(sample_sq).any():  # the delta the rule would choose on the sampled rows (grid included)
            estimate = purity_delta_from(sample_sq, alpha, deltas)[0]
            if np.isfinite(estimate) and estimate > 0:
                how = f"the purity rule's, estimated from {len(rows):,} rows"
                edges = _refuse_if_too_big(n, len(labeled), rows, x, estimate, max_edges, how)
        if resolve_backend(backend) == "faiss":
            delta, pure = purity_delta(x, cluster_labels, alpha, deltas, block_elements, backend)
            _check_delta(delta)
            graph = radius_graph(x, delta, block_elements, backend, max_edges)
            passes = 2
        else:
            # one pass for both the purity distances and the graph up to an upper bound of delta; a second pass
            # only if the bound was too low (or the bounded graph passed its cap)
            m = n - int(np.ceil(alpha * n)) + 1  # the exact delta is the m-th smallest distance
            bound = float(np.sqrt(sample_sq[_upper_quantile_rank(m, n, len(rows))]))
            if deltas is not None:
                bound = max(bound, float(np.min(deltas)))
            if not np.isfinite(bound):
                bound = 0.0
            # the wider graph may hold a few times the final one's edges; past that, a second pass is cheaper in
            # memory than keeping them
            cap = int(WIDE_GRAPH_FACTOR * edges) + 2**20
            cap = cap if max_edges is None else min(cap, max_edges)
            d_other_sq, wide, wide_sq = purity_scan(x, cluster_labels, bound, cap, block_elements)
            delta, pure = purity_delta_from(d_other_sq, alpha, deltas)
            del d_other_sq
            _check_delta(delta)
            if wide is not None and delta <= bound:
                graph, passes = shrink_graph(wide, wide_sq, delta), 1
            else:
                graph, passes = None, 2
            del wide, wide_sq  # before the second pass and the greedy step
            if graph is None:
                graph = radius_graph(x, delta, block_elements, backend, max_edges)
        if info is not None:
            info["probcover_passes"] = passes
    picks, n_random = greedy_coverage(graph, len(labeled), budget, rng)
    if info is not None:
        info["probcover_delta"] = float(delta)
        if pure is not None:
            info["probcover_purity"] = pure
        info["probcover_edges"] = int(graph.nnz)
        covered = np.zeros(len(x), dtype=bool)
        covered[graph[np.concatenate([np.arange(len(labeled)), picks + len(labeled)])].indices] = True
        info["probcover_coverage"] = float(covered.mean())
        if n_random:
            info["probcover_random_after_full_coverage"] = int(n_random)
    return picks


class ProbCoverParams(EmbeddingParams):
    delta: float | None = Field(None, gt=0, description="ball radius on the L2-normalised embeddings (None: purity)")
    alpha: float = Field(0.95, gt=0, le=1, description="purity the chosen delta must reach (delta None)")
    deltas: list[float] | None = Field(None, description="grid of radii for the purity rule (None: exact largest)")
    max_edges: int = Field(MAX_EDGES, ge=1, description="refuse a delta-ball graph with more edges")
    max_points: int = Field(
        MAX_POINTS, ge=1, description="refuse larger labeled + candidate sets up front (O(N^2 d) distances)"
    )
    backend: Backend = Field("exact", description="'exact' (chunked torch) or 'faiss' (if installed)")


@register
class ProbCover(Strategy):
    """ProbCover (Yehuda, Dekel, Hacohen & Weinshall, "Active Learning Through a Covering Lens", NeurIPS 2022):
    greedy maximum coverage of the balls ||x - y|| < delta over labeled + candidate embeddings; points within
    delta of a labeled sample are already covered.

    delta: given, or chosen by the purity rule (scikit-activeml's ProbCover): the largest delta whose balls stay
    inside one k-means cluster (k = number of classes) for a share ``alpha`` = 0.95 of the points. The authors
    tune delta by hand (0.6 on normalised SimCLR features of CIFAR-10). Embeddings as TypiClust (``embedding:
    model|user``, L2-normalised). Label-free, so it also serves the first round.

    Complexity: one pass over blocks of ``BLOCK_ELEMENTS`` distances, O(N^2·d) time, gives the purity distances
    and the graph up to an upper bound of delta (from 2,000 sampled rows), kept as CSR: O(N + E) memory for E
    edges; a second pass only if the bound was low. The row sample also estimates E first: a graph above
    ``max_edges`` is refused before the pass, as is a set above ``max_points`` (500,000 labeled + candidates,
    about 30 minutes of one core at d = 64; ``subset`` or the subsample wrapper bound it). The greedy selection
    is O(E + b·N). Deviations: the purity delta is
    the exact largest one (no grid unless ``deltas``); once every point is covered the remaining picks are drawn
    at random (the authors' argmax would return row 0, possibly a labeled sample); the authors' graph builder
    skipped the last partial batch of rows, here every row is used. Per-class counts of its picks are recorded
    in experiments (it favours dense regions).
    """

    name = "probcover"
    Params = ProbCoverParams
    outputs = ("embeddings",)
    example_params: dict = {}

    def check_size(self, n_candidates, n_labeled, num_classes, budget):
        p: ProbCoverParams = self.params
        n = n_candidates + n_labeled
        if n > p.max_points:
            room = p.max_points - n_labeled
            fix = (
                f"Score a random subset of the candidates (params: {{subset: {room}}}, or wrap: [{{name: subsample, "
                f"params: {{size: {room}}}}}]) or raise max_points to run it anyway"
                if room >= budget
                else f"The labeled set alone has {n_labeled:,} points: raise max_points to run it anyway"
            )
            raise ActivelabError(
                f"probcover over N={n:,} labeled + candidate points computes all N^2 = {float(n) ** 2:.2g} pairwise "
                f"distances, about {n**2 * SECONDS_PER_DISTANCE / 3600:,.1f} hours of one CPU core (memory stays "
                f"O(N + edges)). {fix}"
            )

    def query(self, ctx, budget, rng):
        p: ProbCoverParams = self.params
        cand, lab = embedding_inputs(ctx, p.embedding)
        return probcover_select(
            cand,
            lab,
            budget,
            rng,
            delta=p.delta,
            alpha=p.alpha,
            num_classes=ctx.num_classes,
            deltas=p.deltas,
            max_edges=p.max_edges,
            backend=p.backend,
            info=ctx.info,
        )
