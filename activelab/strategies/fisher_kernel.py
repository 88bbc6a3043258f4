"""FK: active learning for biased pools by Fisher-kernel self-supervision (Gudovskiy et al., CVPR 2020).

Pick the pool samples nearest, in a joint space of multi-scale features z and Fisher scores g, to the
validation samples the current model gets wrong. The pure functions below (segment standardisation,
similarity, k-center with a running maximum, chunked top-K, rank-wise fill) take arrays and an explicit
generator; :class:`FisherKernel` gets the descriptors from the query context.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ..errors import ActivelabError
from ..neighbors import Backend, best_inner_products, topk_inner_products
from .base import Strategy, StrategyParams, register
from .random import random_positions

EPS = 1e-10
Estimator = Literal["argmax", "p_hat", "p_hat_zg", "oracle", "trace_cov", "mutual_info"]


# -- similarity ---------------------------------------------------------------------------------------------


def standardise_segments(x: np.ndarray | torch.Tensor, segments: np.ndarray) -> np.ndarray | torch.Tensor:
    """Per sample and per segment: (x_s - mean(x_s)) / (std(x_s) + 1e-10) over the segment's channels.

    The std is the sample std (ddof = 1), so that ⟨x̂_s, ŷ_s⟩ = (n_s - 1)·Pearson(x_s, y_s) exactly (up to
    the 1e-10); with the population std the factor would be n_s. A segment of one channel becomes 0.
    Works on numpy arrays and torch tensors (returns the same kind, float32 for numpy).
    """
    is_torch = isinstance(x, torch.Tensor)
    t = x.float() if is_torch else torch.as_tensor(np.asarray(x, dtype=np.float32))
    out = torch.empty_like(t)
    for a, b in zip(segments[:-1], segments[1:], strict=True):
        seg = t[:, a:b]
        centred = seg - seg.mean(dim=1, keepdim=True)
        std = seg.std(dim=1, keepdim=True, unbiased=True) if b - a > 1 else torch.zeros_like(seg[:, :1])
        out[:, a:b] = centred / (std + EPS)
    return out if is_torch else out.numpy()


def similarity_vectors(z: np.ndarray, segments: np.ndarray, g: np.ndarray | None = None) -> np.ndarray:
    """Rows whose dot products are R_z (``g`` None) or R_zg = R_z + R_g: [ẑ, ĝ] standardised per segment."""
    parts = [standardise_segments(z, segments)]
    if g is not None:
        parts.append(standardise_segments(g, segments))
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


# -- selection ----------------------------------------------------------------------------------------------


def kcenter_running_max(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-center under a similarity (dot product of rows of ``x``): first centre uniformly at random,
    then repeatedly the sample whose maximum similarity to the chosen centres is smallest.

    A running max-similarity vector is updated with one new column per pick: O(k·M·D) time, O(M) memory
    (the reference recomputed all k columns each step, O(k²·M·D)). Chosen samples are never picked again;
    ties go to the lowest index.
    """
    m = len(x)
    if not 1 <= k <= m:
        raise ActivelabError(f"k-center needs 1 <= k <= {m} centres; got {k}")
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    chosen = [int(rng.integers(m))]
    running = xt @ xt[chosen[0]]
    running[chosen[0]] = torch.inf
    for _ in range(1, k):
        nxt = int(torch.argmin(running))
        chosen.append(nxt)
        running = torch.maximum(running, xt @ xt[nxt])
        running[chosen] = torch.inf
    return np.asarray(chosen, dtype=np.int64)


def rankwise_fill(values: np.ndarray, indices: np.ndarray, max_sim: np.ndarray, budget: int) -> np.ndarray:
    """The batch: rank-1 neighbours of all centres sorted by similarity (descending), then rank 2, ...,
    keeping unique indices until ``budget`` are chosen; if fewer unique candidates exist, the rest are the
    unchosen pool rows with the highest ``max_sim`` (similarity to the nearest centre).

    Ties in similarity keep centre order (stable sort). O(K·M log M + N log N).
    """
    if budget > len(max_sim):
        raise ActivelabError(f"budget {budget} is larger than the pool ({len(max_sim)})")
    chosen: list[int] = []
    seen: set[int] = set()
    for r in range(values.shape[0]):
        for i in indices[r][np.argsort(-values[r], kind="stable")]:
            if int(i) not in seen:
                seen.add(int(i))
                chosen.append(int(i))
                if len(chosen) == budget:
                    return np.asarray(chosen, dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(max_sim)), np.asarray(chosen, dtype=np.int64))
    rest = rest[np.argsort(-max_sim[rest], kind="stable")][: budget - len(chosen)]
    return np.concatenate([np.asarray(chosen, dtype=np.int64), rest.astype(np.int64)])


def fk_select(
    pool_vectors: np.ndarray,
    miss_vectors: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    top_k: int = 32,
    chunk_size: int = 4096,
    backend: Backend = "exact",
) -> np.ndarray:
    """FK acquisition on precomputed similarity vectors (rows: pool and misclassified validation samples).

    Centres: k-center over the misclassified validation samples when there are more than ``budget`` of
    them, else all of them; then the top-``top_k`` pool neighbours of each centre and the rank-wise fill.
    Time O(b·M·D + N·b·D), memory O(chunk·b + N).
    """
    m = len(miss_vectors)
    if m == 0:
        raise ActivelabError("fk needs at least one misclassified validation sample")
    centres = kcenter_running_max(miss_vectors, budget, rng) if budget < m else np.arange(m)
    values, indices, max_sim = topk_inner_products(pool_vectors, miss_vectors[centres], top_k, backend, chunk_size)
    return rankwise_fill(values, indices, max_sim, budget)


# -- pseudo-label estimators ------------------------------------------------------------------------------


def nearest_label_fn(
    reference: np.ndarray,
    reference_labels: np.ndarray,
    segments: np.ndarray,
    use_g: str | None = None,
    chunk_size: int = 4096,
):
    """A label function for :func:`compute_descriptors`: the label of the nearest reference (validation)
    sample under R_z, or under R_z + R_g with the batch's gradients ``state.g[use_g]`` when ``use_g`` is set.
    ``reference`` holds the reference similarity vectors ([ẑ] or [ẑ, ĝ])."""
    ref_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def label(state) -> torch.Tensor:  # state: a batch's z (pooled taps) and g (Fisher scores)
        device = state.z.device
        if device not in ref_cache:
            ref_cache[device] = (
                torch.as_tensor(reference, device=device),
                torch.as_tensor(reference_labels, dtype=torch.int64, device=device),
            )
        ref, ref_labels = ref_cache[device]
        parts = [standardise_segments(state.z, segments)]
        if use_g is not None:
            parts.append(standardise_segments(state.g[use_g], segments))
        return ref_labels[best_inner_products(torch.cat(parts, dim=1), ref, chunk_size)[0]]

    return label


# -- the strategy ---------------------------------------------------------------------------------------


class FKParams(StrategyParams):
    similarity: Literal["features", "fisher"] = Field(
        "fisher", description="features: R_z only (the paper's R_z baseline); fisher: R_z + R_g"
    )
    estimator: Estimator | None = Field(
        None, description="pseudo-label of the Fisher scores (fisher similarity only; default p_hat)"
    )
    taps: list[str] | None = Field(None, description="tapped layers (default: the model's default_taps)")
    top_k: int = Field(32, ge=1, description="neighbours per centre (32; 128 for ImageNet)")
    chunk_size: int = Field(4096, ge=1, description="rows per similarity block (memory O(chunk x centres))")
    backend: Backend = Field(
        "exact", description="neighbour search of the centres: 'exact' (chunked torch), 'faiss' or 'auto'"
    )
    perturbations: int = Field(128, ge=2, description="K perturbed copies for trace_cov / mutual_info")
    rotation_degrees: float = Field(5.0, ge=0, description="std of the random rotation, degrees")
    noise_std: float = Field(0.01, ge=0, description="std of the pixel noise on normalised images")
    ridge: float = Field(1e-4, gt=0, description="relative ridge of the mutual_info covariances")

    @model_validator(mode="after")
    def _check(self) -> FKParams:
        if self.similarity == "features" and self.estimator is not None:
            raise ValueError(
                "similarity 'features' (R_z) uses no Fisher scores, so an estimator has no effect: remove it "
                "or use similarity 'fisher'"
            )
        return self

    @property
    def resolved_estimator(self) -> Estimator | None:
        if self.similarity == "features":
            return None
        return self.estimator or "p_hat"


@register
class FisherKernel(Strategy):
    """FK (Gudovskiy, Hodgkinson, Yamaguchi, Tsukizawa: "Deep Active Learning for Biased Datasets via
    Fisher Kernel Self-Supervision", CVPR 2020).

    Descriptors z (pooled tapped activations) and g (gradients of CE(·, s) w.r.t. those activations) of the
    unlabeled pool and the validation set; centres = misclassified validation samples (k-center when more
    than b); the batch = top-K pool neighbours of the centres under R_z or R_zg, filled rank by rank.

    Estimators of the pool's pseudo-label s: ``argmax``, ``p_hat`` (label of the nearest validation sample
    under R_z; the paper's method), ``p_hat_zg`` (nearest under R_z + R_g with argmax gradients),
    ``oracle`` (true pool labels; ablation, the only one that reads them), ``trace_cov`` and ``mutual_info``
    (K perturbed copies; full-covariance Gaussian MI). Validation uses true labels for p_hat, p_hat_zg and
    oracle, and the estimator itself for argmax, trace_cov and mutual_info (as in the paper's table).

    Complexity (N pool, V validation, L channels, b budget): one forward + one backward over N + V (two
    backward for p_hat_zg); p_hat adds an N x V x L nearest-neighbour search streamed per batch; k-center
    O(b·|V_miss|·L); top-K O(N·b·L). trace_cov / mutual_info multiply the passes by K·C. Memory
    O((N + V)·L), plus O(batch x V) and O(chunk x b) blocks; never N x V.

    Deviations from the authors' code: descriptors for the pool and validation only (not the whole train
    set every round); k-center keeps a running maximum and never re-picks a centre; the fill has no
    off-by-one and a guard when fewer than b unique candidates exist; rotation angles are degrees converted to
    radians (the reference fed degrees to cos/sin); mutual_info uses full covariances (the reference's
    diagonal variant is identically zero); the segment std is the sample std as in the reference. Built-in
    taps are module outputs (e.g. LeNet's conv1 before max-pool and ReLU), where the reference tapped after
    pool and ReLU (LeNet's ``taps=["act1", "act2", "act3"]`` reads those points). Falls back to random
    (``info["fallback"] = "random"``) when no validation sample is
    misclassified.
    """

    name = "fk"
    Params = FKParams
    needs_validation = True
    first_round_random = False
    example_params = {"estimator": "p_hat", "top_k": 4}

    @property
    def reads_pool_labels(self) -> bool:  # type: ignore[override]
        return self.params.resolved_estimator == "oracle"

    def query(self, ctx, budget, rng):
        p: FKParams = self.params
        taps = ctx.taps(p.taps)
        est = p.resolved_estimator
        val = self._validation(ctx, taps, est, rng)
        miss = np.flatnonzero(val.predictions != ctx.validation_labels())
        if len(miss) == 0:
            ctx.info["fallback"] = "random"
            ctx.info["fallback_reason"] = "no validation sample is misclassified"
            return random_positions(len(ctx.candidates), budget, rng)
        pool = self._pool(ctx, taps, est, val, rng)
        g_val = val.g.get("est")
        g_pool = pool.g.get("est")
        pool_vec = similarity_vectors(pool.z, pool.segments, g_pool)
        miss_vec = similarity_vectors(val.z[miss], val.segments, None if g_val is None else g_val[miss])
        ctx.info["misclassified_validation"] = int(len(miss))
        if est is not None:
            ctx.info["pseudo_label_counts"] = np.bincount(pool.labels["est"]).tolist()
        return fk_select(pool_vec, miss_vec, budget, rng, p.top_k, p.chunk_size, p.backend)

    # -- descriptors -------------------------------------------------------------------------------------
    def _perturbed_labels(self, ctx, subset, taps, rng) -> np.ndarray:
        p: FKParams = self.params
        scores = ctx.perturbed_class_scores(
            subset, taps, p.resolved_estimator, p.perturbations, int(rng.integers(2**63 - 1)),
            p.rotation_degrees, p.noise_std, p.ridge,
        )  # fmt: skip
        return scores.argmax(axis=1)

    def _validation(self, ctx, taps, est, rng):
        y = ctx.validation_labels()
        if est is None:
            labels = {}
        elif est == "argmax":
            labels = {"est": "argmax"}
        elif est == "p_hat_zg":
            labels = {"argmax": "argmax", "est": y}
        elif est in ("p_hat", "oracle"):
            labels = {"est": y}
        else:  # perturbation estimators
            labels = {"est": self._perturbed_labels(ctx, "validation", taps, rng)}
        return ctx.descriptors("validation", taps, labels, key=(est, self._perturb_key(est)))

    def _pool(self, ctx, taps, est, val, rng):
        p: FKParams = self.params
        y_val = ctx.validation_labels()
        if est is None:
            labels = {}
        elif est == "argmax":
            labels = {"est": "argmax"}
        elif est == "p_hat":
            ref = similarity_vectors(val.z, val.segments)
            labels = {"est": nearest_label_fn(ref, y_val, val.segments, None, p.chunk_size)}
        elif est == "p_hat_zg":
            ref = similarity_vectors(val.z, val.segments, val.g["argmax"])
            labels = {
                "argmax": "argmax",
                "est": nearest_label_fn(ref, y_val, val.segments, "argmax", p.chunk_size),
            }
        elif est == "oracle":
            labels = {"est": ctx.pool_labels("candidates")}
        else:
            labels = {"est": self._perturbed_labels(ctx, "candidates", taps, rng)}
        return ctx.descriptors("candidates", taps, labels, key=(est, self._perturb_key(est)))

    def _perturb_key(self, est) -> tuple:
        p: FKParams = self.params
        if est in ("trace_cov", "mutual_info"):
            return (p.perturbations, p.rotation_degrees, p.noise_std, p.ridge)
        return ()
