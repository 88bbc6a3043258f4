"""Selection over a pool given as shards: each shard is scored where it lives (a Ray task, or in turn in this
process) and only a bounded summary of it comes back.

Two paths, chosen by the strategy:

- **Score strategies** (uncertainty, MC dropout, gradient norms, predicted loss, ...: every
  :class:`~activelab.strategies.base.ScoreStrategy`): a shard returns its own top ``budget`` (score, index); the
  global top ``budget`` is the top of those, exactly the single-process top-k of the same scores. The driver
  holds at most shards x budget pairs; a worker holds one shard and its scores.
- **Diverse strategies** (core-set, k-center, BADGE, BAIT, FK, ...), which compare samples with each other, run
  in two stages: (1) each shard keeps ``per_shard`` candidates, its top by a score strategy (``prefilter``,
  default ``"margin"``) or a seeded uniform sample (``prefilter="random"``), and sends back those samples;
  (2) the diverse strategy selects ``budget`` of the merged candidates (with ``labeled_data`` as the labeled
  set, for strategies that start from it). This is a heuristic, not the single-process answer: stage 2 sees
  shards x per_shard candidates, not the pool. Memory: those candidates (plus ``labeled_data``) on the
  driver.

A sample's global id is ``(shard, index within the shard)``.

Scores match the single process where they are deterministic functions of one sample (least confidence,
margin, entropy, gradient norms without ``subset``). Parameters act per shard: ``subset=m`` scores m random
samples of each shard, and MC-dropout masks are drawn per shard (seeded by (seed, shard)), so MC scores equal
a single process's only in distribution. Ties are broken by (shard, index), not by the seeded permutation of
the single-process path.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.arrays import ArrayDataset, iter_batches
from ..errors import ActivelabError

ShardSource = Dataset | str | Path


@dataclass
class ShardedSelection:
    """The picks of :func:`select_sharded`: ``ids`` (budget, 2) int64 rows (shard, index within the shard), in
    pick order; ``scores`` (budget,) their scores on the exact path (None on the two-stage path); ``info``:
    notes (path, candidates per shard, ...)."""

    ids: np.ndarray
    scores: np.ndarray | None
    info: dict


def load_shard(source: ShardSource) -> Dataset:
    """A shard as a Dataset: a Dataset as is; a ``.pt`` file holding a Dataset, or a dict with ``x`` (and
    ``y``) tensors; a ``.npz`` file with arrays ``x`` (and ``y``); a ``.npy`` file of ``x``. Labels default to
    -1 (unknown); images are ``(N, C, H, W)`` (``(N, H, W)`` and ``(N, d)`` are reshaped)."""
    if isinstance(source, Dataset):
        return source
    path = Path(source)
    if not path.is_file():
        raise ActivelabError(
            f"shard file {path} not found (here: the process scoring it). Shards given as files must be on a "
            "filesystem every Ray node sees, at the same path"
        )
    if path.suffix == ".pt":
        obj = torch.load(path, weights_only=False)
        if isinstance(obj, Dataset):
            return obj
        if isinstance(obj, dict) and "x" in obj:
            return _arrays(torch.as_tensor(obj["x"]), obj.get("y"))
    elif path.suffix == ".npz":
        with np.load(path) as data:
            if "x" in data:
                return _arrays(torch.from_numpy(data["x"]), data["y"] if "y" in data else None)
    elif path.suffix == ".npy":
        return _arrays(torch.from_numpy(np.load(path)), None)
    raise ActivelabError(
        f"cannot read shard {path}: expected a .pt file (a Dataset, or a dict with 'x' and optional 'y'), a .npz "
        "file with arrays 'x' (and 'y') or a .npy file of x"
    )


def _arrays(x: torch.Tensor, y) -> ArrayDataset:
    if x.ndim == 2:
        x = x[:, None, None, :]
    y = np.full(len(x), -1, dtype=np.int64) if y is None else np.asarray(y, dtype=np.int64)
    return _unlabeled_dataset(x, y)


def _unlabeled_dataset(x: torch.Tensor, y: np.ndarray) -> ArrayDataset:
    """ArrayDataset without normalisation; labels may be -1 (unknown)."""
    classes = [str(c) for c in range(max(int(y.max()) + 1 if len(y) else 1, 1))]
    return ArrayDataset(x, np.asarray(y, dtype=np.int64), classes=classes)


def _shard_seed(seed: int, shard: int) -> int:
    return zlib.crc32(f"{seed}/{shard}".encode())


def _strategy(name: str, params: dict):
    from ..strategies.base import ScoreStrategy
    from ..strategies.wrappers import build_strategy

    instance = build_strategy(name, params, ())
    return instance, isinstance(instance, ScoreStrategy)


def shard_scores(
    strategy: str,
    params: dict,
    model: nn.Module,
    shard: Dataset,
    seed: int,
    batch_size: int = 512,
    taps: Sequence[str] | None = None,
    classifier: str | None = None,
) -> np.ndarray:
    """Scores (len(shard),) of a score strategy over every sample of ``shard`` (NaN where the strategy did not
    score, e.g. outside its ``subset``). The shard holds unlabeled samples only, so the first-round rule does
    not apply: the model is taken as trained."""
    from ..query.context import QueryContext

    instance, is_score = _strategy(strategy, params)
    if not is_score:
        raise ActivelabError(f"strategy {strategy!r} does not score samples one by one; use the two-stage path")
    if instance.needs_validation:
        raise ActivelabError(f"strategy {strategy!r} needs a validation set, which sharded scoring does not pass")
    n = len(shard)
    ctx = QueryContext(
        model,
        shard,
        np.arange(n, dtype=np.int64),
        np.zeros(0, dtype=np.int64),
        batch_size=batch_size,
        taps=taps,
        classifier=classifier,
        strategy_name=f"strategy {strategy!r}",
        outputs=instance.outputs,
    )
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**31)))
        scores = np.asarray(instance.scores(ctx, rng), dtype=np.float64)
    if scores.shape != (n,):
        raise RuntimeError(f"strategy {strategy!r} returned {scores.shape} scores for a shard of {n}")
    return scores


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` highest finite ``scores``, ties broken by ``ids`` (rows (shard, index)) ascending."""
    finite = np.flatnonzero(np.isfinite(scores))
    if len(finite) > k:
        # the k-th largest score; everything above it, and the ties at it, are candidates
        kth = np.partition(scores[finite], len(finite) - k)[len(finite) - k]
        finite = finite[scores[finite] >= kth]
    order = np.lexsort((ids[finite, 1], ids[finite, 0], -scores[finite]))
    return finite[order[:k]]


def _score_task(strategy, params, model, source, shard, k, seed, batch_size, taps, classifier, device):
    """One shard of the exact path: its top ``k`` (scores, ids)."""
    torch_model = model.to(device)
    data = load_shard(source)
    scores = shard_scores(strategy, params, torch_model, data, _shard_seed(seed, shard), batch_size, taps, classifier)
    ids = np.stack([np.full(len(scores), shard), np.arange(len(scores))], axis=1).astype(np.int64)
    rows = top_k(scores, ids, k)
    return scores[rows], ids[rows]


def _samples(data: Dataset, rows: np.ndarray, batch_size: int) -> torch.Tensor:
    """The model inputs of ``data[rows]`` (as the model sees them: normalised)."""
    xs = [x for x, _ in iter_batches(data, rows, batch_size)]
    return torch.cat(xs) if xs else torch.zeros(0)


def _candidate_task(prefilter, params, model, source, shard, m, seed, batch_size, taps, classifier, device):
    """One shard of the two-stage path: ``m`` candidates (their ids and inputs)."""
    data = load_shard(source)
    n = len(data)
    if prefilter == "random":
        rows = np.sort(np.random.default_rng(_shard_seed(seed, shard)).choice(n, size=min(m, n), replace=False))
    else:
        torch_model = model.to(device)
        scores = shard_scores(
            prefilter, params, torch_model, data, _shard_seed(seed, shard), batch_size, taps, classifier
        )
        ids = np.stack([np.full(n, shard), np.arange(n)], axis=1).astype(np.int64)
        rows = np.sort(top_k(scores, ids, m))
    ids = np.stack([np.full(len(rows), shard), rows], axis=1).astype(np.int64)
    return ids, _samples(data, rows, batch_size)


def _ray_dataset_shards(ds: Any, num_shards: int | None) -> list:
    """A Ray Dataset split into materialised shards (their order fixes the shard numbers)."""
    import ray

    n = num_shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return ds.split(n)


def _materialise_ray_shard(shard: Any) -> ArrayDataset:
    """A split of a Ray Dataset with an ``x`` column (and optional ``y``) as an ArrayDataset (in the task)."""
    xs, ys = [], []
    for batch in shard.iter_batches(batch_format="numpy", batch_size=65536):
        if "x" not in batch:
            raise ActivelabError(f"a Ray Dataset pool needs an 'x' column (and optional 'y'); got {list(batch)}")
        xs.append(np.asarray(batch["x"]))
        if "y" in batch:
            ys.append(np.asarray(batch["y"]))
    x = torch.from_numpy(np.concatenate(xs)) if xs else torch.zeros(0, 1, 1, 1)
    return _arrays(x, np.concatenate(ys) if ys else None)


def select_sharded(
    strategy: str,
    model: nn.Module,
    shards: Sequence[ShardSource] | Any,
    budget: int,
    *,
    seed: int = 0,
    executor: str = "ray",
    labeled_data: Dataset | None = None,
    prefilter: str = "margin",
    per_shard: int | None = None,
    oversample: float = 10.0,
    num_shards: int | None = None,
    batch_size: int = 512,
    taps: Sequence[str] | None = None,
    classifier: str | None = None,
    device: str = "cpu",
    cpus_per_task: int = 1,
    address: str | None = None,
    **params,
) -> ShardedSelection:
    """Select ``budget`` samples of a pool given as shards (see the module docstring for the two paths).

    Args:
        strategy: a registered strategy name; ``**params`` are its parameters.
        model: a trained ``nn.Module`` (sent once to every task).
        shards: a list of Datasets or shard files (.pt / .npz / .npy, on a filesystem every node sees), or a
            Ray Dataset with an ``x`` column (split into ``num_shards`` shards, default one per cluster CPU).
        budget: how many samples to pick, over all shards.
        executor: ``"ray"`` (a task per shard; ``address`` as for ``ray.init``, None: the running or a new
            local Ray) or ``"local"`` (the shards in turn in this process: bounded memory without Ray).
        labeled_data: the labeled samples, for diverse strategies that start from them (core-set, BAIT).
        prefilter, per_shard, oversample: two-stage path only: the score strategy (or ``"random"``) that keeps
            ``per_shard`` candidates per shard (default ``ceil(oversample * budget / shards)``, at least
            ``budget``... capped by the shard's size).
        cpus_per_task: CPUs each Ray task reserves (and its torch threads).

    Returns:
        :class:`ShardedSelection` with ids (shard, index within the shard).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ActivelabError(f"budget must be a positive integer; got {budget!r}")
    if executor not in ("ray", "local"):
        raise ActivelabError(f"executor must be 'ray' or 'local'; got {executor!r}")
    instance, is_score = _strategy(strategy, params)
    model = model.cpu()
    ray_dataset = type(shards).__module__.startswith("ray.data")
    if ray_dataset and executor != "ray":
        raise ActivelabError("a Ray Dataset pool needs executor='ray'")

    if executor == "ray":
        from ..experiment.executors import import_ray

        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=address, **({} if address else {"include_dashboard": False}), log_to_driver=False)
        sources = _ray_dataset_shards(shards, num_shards) if ray_dataset else list(shards)
        model_ref = ray.put(model)

        def run_all(fn, per_source: list) -> list:
            def task(*args):
                torch.set_num_threads(cpus_per_task)
                src = args[3]
                if type(src).__module__.startswith("ray.data"):
                    args = (*args[:3], _materialise_ray_shard(src), *args[4:])
                return fn(*args)

            remote = ray.remote(num_cpus=cpus_per_task)(task)
            refs = [remote.remote(*a[:2], model_ref, *a[3:]) for a in per_source]
            return ray.get(refs)

    else:
        sources = list(shards)

        def run_all(fn, per_source: list) -> list:
            return [fn(*a) for a in per_source]

    if not sources:
        raise ActivelabError("no shards given")
    s = len(sources)
    common = (seed, batch_size, taps, classifier, device)
    if is_score:
        if instance.needs_validation:
            raise ActivelabError(f"strategy {strategy!r} needs a validation set, which sharded scoring does not pass")
        out = run_all(
            _score_task, [(strategy, params, model, src, i, budget, *common) for i, src in enumerate(sources)]
        )
        scores = np.concatenate([o[0] for o in out])
        ids = np.concatenate([o[1] for o in out]).reshape(-1, 2)
        if len(scores) < budget:
            raise ActivelabError(f"budget {budget} is larger than the {len(scores)} scored samples of the shards")
        rows = top_k(scores, ids, budget)
        return ShardedSelection(ids[rows], scores[rows], {"path": "exact top-k", "shards": s})

    m = per_shard or max(budget, math.ceil(oversample * budget / s))
    if prefilter != "random":
        _, pre_is_score = _strategy(prefilter, {})
        if not pre_is_score:
            raise ActivelabError(f"prefilter must be a score strategy or 'random'; {prefilter!r} is neither")
    out = run_all(_candidate_task, [(prefilter, {}, model, src, i, m, *common) for i, src in enumerate(sources)])
    ids = np.concatenate([o[0] for o in out]).reshape(-1, 2)
    x = torch.cat([o[1] for o in out if len(o[1])])
    n_labeled = 0
    if labeled_data is not None and len(labeled_data):
        lx = _samples(labeled_data, np.arange(len(labeled_data)), batch_size)
        x, n_labeled = torch.cat([lx, x]), len(lx)
    if len(ids) < budget:
        raise ActivelabError(f"budget {budget} is larger than the {len(ids)} candidates the shards sent")
    merged = _unlabeled_dataset(x, np.full(len(x), -1, dtype=np.int64))
    from ..api import select

    picked = select(
        strategy,
        model.to(device),
        merged,
        labeled=np.arange(n_labeled),
        budget=budget,
        seed=seed,
        device=device,
        batch_size=batch_size,
        taps=taps,
        classifier=classifier,
        **params,
    )
    info = {"path": "two-stage", "shards": s, "per_shard": m, "prefilter": prefilter, "candidates": len(ids)}
    return ShardedSelection(ids[picked - n_labeled], None, info)
