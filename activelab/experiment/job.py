"""One job: the active learning loop of one strategy in one run, resumable round by round.

Each round is four steps, each a small function: :func:`_select` (the one call of the query engine),
:func:`_train_members` (the model and its ensemble members, checked for divergence), :func:`_evaluate` and
:func:`_commit` (checkpoints, then the round's record in one transaction). :func:`_resume` finds where a job
stopped: the latest round whose checkpoints are on disk; rounds recorded after it (their checkpoints deleted)
are recomputed and must match what is recorded.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ExperimentConfig, StrategyConfig
from ..data.arrays import dataset_labels
from ..data.pool_state import PoolState
from ..errors import StopRound
from ..inference.device import resolve_device
from ..metrics import round_metrics
from ..query.engine import RoundSeed, run_query
from ..strategies.base import Strategy
from ..strategies.wrappers import build_strategy
from ..train import get_trainer
from ..train.base import TrainResult
from ..train.supervised import evaluate, prior_offset
from .layout import Layout, safe_name
from .seeding import numpy_rng, torch_generator, torch_seed
from .setup import RunData, atomic_save, ensure_initial_model, new_model, prepare_run
from .stopset import stop_reason, stop_set_entry, stop_set_indices
from .store import RoundRecord, Store
from .store_service import open_store

__all__ = ["checkpoint_path", "round_seed", "run_job", "safe_name", "select_round"]


def checkpoint_path(exp_dir: Path, run: int, label: str, round_: int, member: int = 0) -> Path:
    """The saved model of a round (see :class:`~activelab.experiment.layout.Layout`)."""
    return Layout(exp_dir).checkpoint(run, label, round_, member)


@dataclass
class _Job:
    """What every round of one job reads."""

    layout: Layout
    cfg: ExperimentConfig
    run: int
    label: str
    scfg: StrategyConfig
    store: Store
    device: torch.device
    data: RunData
    strategy: Strategy
    first_round: Strategy | None
    trainer: object
    members: list[nn.Module]
    init_states: list[dict]
    pool_labels: np.ndarray
    test_labels: np.ndarray
    progress: bool
    stop_idx: np.ndarray
    infos: list[dict]  # the info of every round so far (stopping criteria read them)
    labeled_history: list[int]

    @property
    def seed(self) -> int:
        return self.cfg.loop.seed


def run_job(exp_dir: str | Path, cfg: ExperimentConfig, run: int, scfg: StrategyConfig, progress: bool = False) -> None:
    """Run (or resume) every remaining round of ``scfg`` in ``run``; each round is committed atomically."""
    layout = Layout(exp_dir)
    store = open_store(layout.store)  # through the driver's store service under Ray
    label = scfg.label
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    threads = torch.get_num_threads()
    try:
        stored_threads = store.get_meta("threads")
        if stored_threads:
            torch.set_num_threads(int(stored_threads))  # the experiment's numerics, whatever the executor
        store.set_job(run, label, "running", **owner)
        job = _setup(layout, cfg, run, scfg, store, progress)
        start, state, recorded = _resume(job)
        for round_ in range(start, cfg.loop.rounds + 1):
            if job.infos and "stopped_by" in job.infos[-1]:
                break  # a stopping criterion ended this run
            _round(job, state, round_, recorded.get(round_))
        store.set_job(run, label, "done", **owner)
    except BaseException as exc:
        import traceback

        try:
            store.set_job(run, label, "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", **owner)
        except Exception:  # noqa: BLE001 - e.g. a full disk; the job stays "running" and is seen as interrupted
            pass
        raise
    finally:
        torch.set_num_threads(threads)
        store.close()


def _setup(layout: Layout, cfg: ExperimentConfig, run: int, scfg: StrategyConfig, store: Store, progress: bool) -> _Job:
    device = resolve_device(cfg.device)
    data = prepare_run(cfg, run)
    store.put_run(run, data.pool_indices, data.validation_indices, data.class_counts, data.minority, data.data_root)
    strategy = build_strategy(scfg.name, scfg.params, [w.model_dump() for w in scfg.wrap])
    first_round = build_strategy(scfg.first_round.name, scfg.first_round.params) if scfg.first_round else None
    trainer = get_trainer(strategy.training)
    init_state = ensure_initial_model(cfg, layout.root, data, scfg.init or cfg.init, device, progress)
    members = [
        _member_model(cfg, data, trainer, init_state, cfg.loop.seed, run, j, device)
        for j in range(strategy.ensemble_size())
    ]
    return _Job(
        layout=layout,
        cfg=cfg,
        run=run,
        label=scfg.label,
        scfg=scfg,
        store=store,
        device=device,
        data=data,
        strategy=strategy,
        first_round=first_round,
        trainer=trainer,
        members=members,
        init_states=[{k: v.clone() for k, v in m.state_dict().items()} for m in members],
        pool_labels=dataset_labels(data.pool),
        test_labels=dataset_labels(data.test),
        progress=progress,
        stop_idx=stop_set_indices(cfg, data),
        infos=[],
        labeled_history=[],
    )


def _member_model(cfg, data, trainer, init_state, seed, run, j, device) -> nn.Module:
    """Model ``j`` of a strategy's ensemble (``j`` = 0: the model itself). Every member starts from the run's
    initial weights; members beyond the first get their own freshly drawn classifier head, and their own
    training seeds, so they differ as separately trained models do."""
    from ..models import replace_classifier

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed, run, "trainer-modules", trainer.name, *(("member", j) if j else ())))
        model = new_model(cfg, data)
        trainer.prepare(model)
        model.load_state_dict(init_state, strict=False)
        if j:
            replace_classifier(model, data.num_classes)
    return model.to(device)


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise StopRound(
            f"checkpoint {path} is damaged ({type(exc).__name__}: {exc}). Delete it and run again: its round (and "
            "any later one of this job) is recomputed from the previous checkpoint, identically, and checked "
            "against the recorded results"
        ) from None


def _resume(job: _Job) -> tuple[int, PoolState, dict[int, RoundRecord]]:
    """Where the job starts: (first round to compute, the pool's state before it, recorded rounds to recompute).

    The job restarts after the latest recorded round whose every member checkpoint is on disk; recorded rounds
    after it (checkpoints deleted, or kept only for the last round) are recomputed and compared."""
    n = len(job.data.pool)
    records = {r.round: r for r in job.store.rounds(job.run, job.label)}
    if not records:
        return 0, PoolState(n), {}
    for k in sorted(records, reverse=True):
        paths = [job.layout.checkpoint(job.run, job.label, k, j) for j in range(len(job.members))]
        if all(p.exists() for p in paths):
            for member, path in zip(job.members, paths, strict=True):
                member.load_state_dict(_load_checkpoint(path, job.device))
            _keep_history(job, records, k)
            selections = {r: rec.selected for r, rec in records.items() if r <= k}
            return k + 1, PoolState.from_selections(n, selections), {r: v for r, v in records.items() if r > k}
    return 0, PoolState(n), records


def _keep_history(job: _Job, records: dict[int, RoundRecord], upto: int) -> None:
    for r in sorted(records):
        if r <= upto:
            job.infos.append(records[r].info)
            job.labeled_history.append(records[r].n_labeled)


def _round(job: _Job, state: PoolState, round_: int, recorded: RoundRecord | None) -> None:
    if round_ == 0 and job.cfg.loop.initial == 0:
        return  # nothing to train on: the first round selects with the initial model
    info: dict = {}
    t0 = time.perf_counter()
    selected = _select(job, state, round_, info)
    select_seconds = time.perf_counter() - t0
    state.label(selected, round_)
    results = _train_members(job, state, round_)
    predictions, eval_seconds = _evaluate(job, state)
    _stop_notes(job, info, len(state.labeled))
    labeled_counts = np.bincount(job.pool_labels[state.labeled], minlength=job.data.num_classes)
    metrics = round_metrics(job.test_labels, predictions, job.data.num_classes, job.data.minority, labeled_counts)
    selected = np.asarray(selected, dtype=np.int64)
    rec = RoundRecord(
        run=job.run,
        strategy=job.label,
        round=round_,
        n_labeled=len(state.labeled),
        accuracy=metrics["accuracy"],
        balanced_accuracy=metrics["balanced_accuracy"],
        minority_recall=metrics["minority_recall"],
        per_class_recall=metrics["per_class_recall"],
        labeled_per_class=labeled_counts.tolist(),
        select_seconds=select_seconds,
        train_seconds=sum(r.seconds for r in results),
        eval_seconds=eval_seconds + sum(r.eval_seconds for r in results),
        epochs=results[0].epochs,
        val_accuracy=results[0].val_accuracy,
        selected=selected,
        test_predictions=predictions,
        info=info,
        selected_per_class=np.bincount(job.pool_labels[selected], minlength=job.data.num_classes).tolist(),
        macro_f1=metrics["macro_f1"],
        worst_class_recall=metrics["worst_class_recall"],
        classes_labeled=metrics["classes_labeled"],
        minority_label_share=metrics["minority_label_share"],
    )
    _commit(job, rec, recorded)


def _select(job: _Job, state: PoolState, round_: int, info: dict) -> np.ndarray:
    """The pool indices labeled in ``round_``: the initial set, or the (first-round) strategy's picks through
    the engine shared with ``activelab.select``."""
    if round_ == 0:
        return job.data.initial
    if job.first_round is not None and round_ == 1:
        budget = job.scfg.first_round.budget or job.cfg.loop.budget
        members = [job.members[0]]
        selected, notes = select_round(
            job.first_round, job.members[0], members, job.data, state, job.cfg, job.run, job.label, round_,
            job.pool_labels, budget,
        )  # fmt: skip
        notes["first_round"] = job.scfg.first_round.label
    else:
        selected, notes = select_round(
            job.strategy, job.members[0], job.members, job.data, state, job.cfg, job.run, job.label, round_,
            job.pool_labels,
        )  # fmt: skip
    info.update(notes)
    return selected


def round_seed(seed: int, run: int, label: str, round_: int) -> RoundSeed:
    """The randomness of one round's selection: the same in every process, on every resume."""
    return RoundSeed(
        numpy_rng(seed, run, label, round_, "select"), torch_seed(seed, run, label, round_, "select-torch")
    )


def select_round(
    strategy,
    model,
    members,
    data: RunData,
    state: PoolState,
    cfg,
    run: int,
    label: str,
    round_: int,
    pool_labels: np.ndarray,
    budget=None,
):
    """One round's picks through the engine shared with ``activelab.select``; ``pool_labels`` answer the
    in-round oracle, only for the samples asked. ``budget``: default ``loop.budget``."""
    result = run_query(
        strategy,
        model,
        data.pool,
        state.labeled,
        budget or cfg.loop.budget,
        round_seed(cfg.loop.seed, run, label, round_),
        validation=data.validation,
        batch_size=cfg.loop.query_batch_size,
        ensemble_models=members if len(members) > 1 else None,
        oracle=lambda idx: pool_labels[idx],
    )
    return result.indices, result.info


def _train_members(job: _Job, state: PoolState, round_: int) -> list[TrainResult]:
    """Train the model and its ensemble members on the labeled set; a diverged member stops the round."""
    cfg = job.cfg
    validation = (
        (job.data.validation, np.arange(len(job.data.validation))) if cfg.train.select_by == "validation" else None
    )
    results = []
    for j, member in enumerate(job.members):
        if cfg.train.restart == "reinit":
            member.load_state_dict(job.init_states[j])
        # Round 0 trains on the shared initial set with seeds that leave out the strategy, so every strategy
        # (with the same trainer) starts the first acquisition from the same model.
        owner = "round0" if round_ == 0 else job.label
        keys = (job.run, owner, round_) if j == 0 else (job.run, owner, round_, "member", j)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed(job.seed, *keys, "train-torch"))
            result = job.trainer.fit(
                member,
                job.data.pool,
                state.labeled,
                cfg.train,
                generator=torch_generator(job.seed, *keys, "train"),
                validation=validation,
                device=job.device,
                progress=job.progress,
            )
        check_finite_training(
            member,
            result,
            f"run {job.run}, {job.label}, round {round_}",
            cfg.train.lr,
            probe=(job.data.pool, state.labeled[:32], job.device),
        )
        results.append(result)
    return results


def check_finite_training(model: nn.Module, result: TrainResult, where: str, lr: float, probe=None) -> None:
    """Raise :class:`StopRound` when training left a non-finite loss, non-finite weights, or (``probe`` =
    (dataset, indices, device)) non-finite outputs on those samples: a diverged run is never recorded."""
    losses = [h.get("loss") for h in result.history if h.get("loss") is not None]
    bad_loss = next((v for v in losses if not np.isfinite(v)), None)
    bad_weight = next(
        (name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()),
        None,
    )
    bad_output = False
    if bad_loss is None and bad_weight is None and probe is not None and len(probe[1]):
        from ..data.arrays import iter_batches

        dataset, indices, device = probe
        was_training = model.training
        model.eval()
        with torch.no_grad():
            x, _ = next(iter_batches(dataset, np.asarray(indices), len(indices)))
            out = model(x.to(device))
        model.train(was_training)
        bad_output = isinstance(out, torch.Tensor) and not torch.isfinite(out).all()
    if bad_loss is None and bad_weight is None and not bad_output:
        return
    if bad_loss is not None:
        what = f"the training loss became {bad_loss}"
    elif bad_weight is not None:
        what = f"non-finite weights in {bad_weight}"
    else:
        what = "the model's outputs on labeled samples are not finite"
    raise StopRound(
        f"{where}: training diverged ({what}). The likely cause is the learning rate (train.lr = {lr}): lower it, "
        "or add train.warmup_epochs; this round is not recorded"
    )


def _evaluate(job: _Job, state: PoolState) -> tuple[np.ndarray, float]:
    t1 = time.perf_counter()
    test = job.data.test
    offset = None
    if job.cfg.train.prior_correction:
        offset = prior_offset(job.pool_labels[state.labeled], job.data.num_classes)
    predictions = evaluate(
        job.members[0], test, np.arange(len(test)), job.cfg.train.eval_batch_size, job.device, logit_offset=offset
    )
    return predictions, time.perf_counter() - t1


def _stop_notes(job: _Job, info: dict, n_labeled: int) -> None:
    """The stop set's predictions and the stopping criteria's verdict, into the round's info."""
    if len(job.stop_idx):
        previous = next((i["stop_set"]["predictions"] for i in reversed(job.infos) if "stop_set" in i), None)
        info["stop_set"] = stop_set_entry(
            job.members[0], job.data, job.stop_idx, previous, job.cfg.loop.query_batch_size
        )
    job.infos.append(info)
    job.labeled_history.append(n_labeled)
    reason = stop_reason(job.cfg.loop.stop_when, job.infos, job.labeled_history)
    if reason:
        info["stopped_by"] = reason


def _commit(job: _Job, rec: RoundRecord, recorded: RoundRecord | None) -> None:
    """Save the members' checkpoints, then record the round (one transaction). A round that was recorded
    before (recomputed after its checkpoint was deleted) is compared with the record instead."""
    if recorded is not None and (
        not np.array_equal(recorded.selected, rec.selected)
        or not np.array_equal(recorded.test_predictions, rec.test_predictions)
    ):
        raise StopRound(
            f"run {job.run}, {job.label}, round {rec.round} was recomputed (its checkpoint was missing) and differs "
            "from its recorded result; the experiment was recorded with other settings or code: start it in a "
            "new directory"
        )
    for j, member in enumerate(job.members):
        state = {k: v.detach().cpu() for k, v in member.state_dict().items()}
        atomic_save(state, job.layout.checkpoint(job.run, job.label, rec.round, j))
    if recorded is None:
        job.store.put_round(rec)
    if job.cfg.loop.keep_checkpoints == "last" and rec.round > 0:
        for j in range(len(job.members)):
            job.layout.checkpoint(job.run, job.label, rec.round - 1, j).unlink(missing_ok=True)
